"""Cost of a GRPO update with and without the rows that carry no signal (`skip_zero_advantage_rows`), side by side.

    python scripts/bench_trainer.py                                   # the tiny GRPO recipe, from the tiny SFT model
    python scripts/bench_trainer.py recipes/tiny/grpo.yaml --reps 5 --gradient_accumulation_steps 4

Builds the recipe's trainer (any recipe flag works), generates one generation batch of rollouts with its sampler
and rewards, then runs the update's loss forward + backward over that batch's micro-batches with the skip off and
on, alternating, `--reps` times. Prints one JSON object as the last line: the share of rows whose advantage is 0,
seconds per update for each mode (median), their ratio, and the largest difference between the two modes'
gradients (rounding only: leaving those rows out is exact).
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_RECIPE = "recipes/tiny/grpo.yaml"


def update_grads(trainer, micro_batches: list[dict], skip: bool) -> tuple[float, list]:
    """Seconds for the loss forward + backward of every micro-batch, and the accumulated gradients."""
    model = trainer.model
    trainer.args.skip_zero_advantage_rows = skip
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    for batch in micro_batches:
        trainer._compute_loss(model, dict(batch)).backward()
    seconds = time.perf_counter() - start
    return seconds, [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def main(argv: list[str] | None = None) -> dict:
    from rl.cli import exit_if_help

    exit_if_help("grpo", argv, __doc__)  # the recipe keys are scripts/grpo.py's, plus --reps
    from trl.trainer.utils import split_tensor_dict

    from rl.recipe import parse
    from rl.rl_run import build_trainer
    from rl.trainer import DiffusionGRPOTrainer

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from grpo import configs  # the recipe keys of scripts/grpo.py

    argv = list(sys.argv[1:] if argv is None else argv)
    reps = 3
    if "--reps" in argv:
        i = argv.index("--reps")
        reps = int(argv[i + 1])
        del argv[i : i + 2]
    if not argv or argv[0].startswith("-"):
        argv.insert(0, DEFAULT_RECIPE)
    argv += ["--heldout_eval_steps", "0", "--report_to", "none", "--save_strategy", "no",
             "--output_dir", tempfile.mkdtemp(prefix="bench_trainer_"), "--rollout_log_dir", ""]
    task, model_cfg, lora, rewards, _, args = parse(configs(), argv, description=__doc__.split("\n\n")[0])
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    trainer = build_trainer(DiffusionGRPOTrainer, task, model_cfg, lora, rewards, args)
    if not trainer._skip_is_exact():
        raise SystemExit("This recipe's loss is not one the skip applies to (loss_type dapo or cispo, beta 0, no "
                         "entropy terms): nothing to compare.")
    prompts = args.per_device_train_batch_size * args.steps_per_generation // args.num_generations
    rows = [dict(x) for x in trainer.train_dataset.select(range(prompts)) for _ in range(args.num_generations)]
    trainer.model.train()
    batch = trainer._generate_and_score_completions(rows)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps
    micro_batches = split_tensor_dict(batch, args.steps_per_generation)
    times = {False: [], True: []}
    max_diff = 0.0
    for _ in range(reps):
        t_full, g_full = update_grads(trainer, micro_batches, False)
        t_skip, g_skip = update_grads(trainer, micro_batches, True)
        times[False].append(t_full)
        times[True].append(t_skip)
        max_diff = max([max_diff] + [float((a - b).abs().max()) for a, b in zip(g_full, g_skip)])
    skipped_share = trainer._metrics["train"]["loss/rows_skipped"][-len(micro_batches):]  # the trainer's own count
    zero_share = statistics.fmean(skipped_share)  # micro-batches have equal sizes
    full, skipped = statistics.median(times[False]), statistics.median(times[True])
    result = {
        "recipe": argv[0], "rollouts": len(rows), "micro_batches": len(micro_batches), "reps": reps,
        "zero_advantage_row_share": round(zero_share, 4),
        "update_seconds_all_rows": round(full, 3), "update_seconds_skip": round(skipped, 3),
        "speedup": round(full / skipped, 3), "max_grad_abs_diff": max_diff,
        "threads": __import__("torch").get_num_threads(),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
