"""Checkpoint evaluation hook: held-out accuracy and NFE every N steps, with a chosen sampler.

`HeldOutEvalCallback` runs `rl.evaluate.evaluate` (the same sampler, canvas and answer checking as
`scripts/evaluate.py`) on a fixed held-out set at the start of training, every `every` optimizer steps and at
the end. Each process evaluates its own contiguous shard; totals are summed across processes, so the figure is
the same for any number of processes. It logs `eval/accuracy`, `eval/nfe` and `eval/exit_rate` through the
trainer's log (console, log_history, report_to) and writes each evaluation's samples to
`<output_dir>/heldout/step<N>.jsonl` (per rank).
"""

from __future__ import annotations

import logging
import os

import torch
from transformers import Trainer, TrainerCallback

logger = logging.getLogger(__name__)


class HeldOutEvalCallback(TrainerCallback):
    """Evaluate the policy on `dataset` (columns prompt, answer) every `every` steps (and before/after training).

    Args:
        trainer: the diffusion trainer (its model, processing class, template and accelerator are used).
        dataset: held-out rows.
        sampler: `rollout.SamplerConfig` of the evaluation (typically greedy).
        every: steps between evaluations (> 0).
        template: `rollout.TemplateConfig` of the evaluation canvas.
        batch_size: rows per sampler call.
    """

    def __init__(self, trainer, dataset, sampler, every: int, template, batch_size: int = 64):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}.")
        if len(dataset) == 0:
            raise ValueError("The held-out evaluation set is empty.")
        self.trainer, self.dataset, self.sampler = trainer, dataset, sampler
        self.every, self.batch_size = every, batch_size
        self.template = template
        self.history: list[dict] = []  # one entry per evaluation, steps increasing

    def on_train_begin(self, args, state, control, **kwargs):
        # Before training, and on resume only at a scheduled step: a run resumed at step 27 of an every-10 schedule
        # would otherwise add an off-schedule evaluation and misalign its curve with uninterrupted runs'.
        if state.global_step % self.every == 0:
            self.run(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self.run(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if getattr(self.trainer, "stop_signal", None):  # SIGTERM/Ctrl-C: save and leave, no evaluation
            return
        self.run(state.global_step)

    @torch.no_grad()
    def run(self, step: int) -> dict | None:
        """Evaluate now (once per step); returns the logged metrics."""
        if self.history and self.history[-1]["step"] == step:  # the last step's eval already ran at on_step_end
            return None
        from trl.models import unwrap_model_for_generation

        from rl.evaluate import EvalConfig, evaluate

        trainer = self.trainer
        acc = trainer.accelerator
        shard = self.dataset.shard(num_shards=acc.num_processes, index=acc.process_index, contiguous=True)
        path = os.path.join(trainer.args.output_dir, "heldout", f"step{step:06d}_rank{acc.process_index}.jsonl")
        with unwrap_model_for_generation(trainer.model_wrapped, acc) as model:
            was_training = model.training
            model.eval()
            summary = evaluate(trainer._adapter_for(model), trainer.processing_class, shard, self.template,
                               self.sampler, EvalConfig(batch_size=self.batch_size), path, progress=False)
            model.train(was_training)
        n = summary["n"]
        names = {"accuracy": "accuracy", "nfe": "mean_nfe", "exit_rate": "exit_rate"}
        if "reasoning_accuracy" in summary:  # infill: how right the chain is, how much the answer reads it
            names.update(reasoning_accuracy="reasoning_accuracy", answer_follows_reasoning="answer_follows_reasoning")
        local = torch.tensor([summary[key] * n for key in names.values()] + [n], dtype=torch.float64,
                             device=acc.device)
        total = acc.reduce(local, reduction="sum").cpu()
        rows = float(total[-1])
        metrics = {f"eval/{name}": float(value / rows) for name, value in zip(names, total[:-1])}
        self.history.append({"step": step, **metrics, "n": int(rows)})
        if acc.is_main_process:
            logger.info("Held-out eval at step %d on %d rows: %s", step, int(rows), metrics)
        Trainer.log(trainer, dict(metrics))  # the base log: TRL's own flushes its rollout metrics
        return metrics
