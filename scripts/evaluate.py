"""Evaluate a masked diffusion LM on a task with any unmasking policy and canvas template.

    python scripts/evaluate.py --model_name_or_path outputs/tiny/sft/final --policy left_to_right
    python scripts/evaluate.py --model_name_or_path outputs/tiny/sft/final --policy med --med_lambda 0.2
    python scripts/evaluate.py recipes/tiny/eval.yaml --exit_gamma 0.1
    python scripts/evaluate.py --model_name_or_path GSAI-ML/LLaDA-8B-Base \\
        --task gsm8k --dataset_path ../shared/data/gsm8k_test.jsonl --reasoning_length 256 --block_length 32

Keys are the fields of ModelConfig, TaskConfig, TemplateConfig, SamplerConfig and EvalConfig. A model dir that
holds a LoRA adapter loads its base and merges the adapter. Writes one JSONL record per row (trace, decoded
reasoning/answer, correctness) and prints one JSON summary as the last line of stdout: accuracy, mean NFE, exit
rate, wall time, n; on the infill canvas also `reasoning_accuracy` (the reasoning's own conclusion, its last number
or boxed value, is right) and `answer_follows_reasoning` (the answer block states that conclusion).
"""

from __future__ import annotations

import json
import logging


def configs() -> list[type]:
    """The dataclasses whose fields are this script's recipe keys."""
    from rl.evaluate import EvalConfig
    from rl.models import ModelConfig
    from rl.tasks import TaskConfig
    from rollout.sampler import SamplerConfig
    from rollout.template import TemplateConfig

    return [ModelConfig, TaskConfig, TemplateConfig, SamplerConfig, EvalConfig]


def main(argv: list[str] | None = None) -> dict:
    from rl.cli import exit_if_help

    exit_if_help("evaluate", argv, __doc__)
    from rl.recipe import parse

    model_cfg, task, template, sampler, config = parse(configs(), argv, description=__doc__.split("\n\n")[0])
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    from rl.evaluate import default_device, evaluate
    from rl.models import load_for_inference
    from rl.tasks import load_task
    from rollout.adapter import MDLMAdapter

    split = task.split or "test"
    data = load_task(task, split=split)
    model, tokenizer = load_for_inference(model_cfg, default_device(config.device))
    adapter = MDLMAdapter.from_pretrained(model, tokenizer)
    output_file = config.output_file or f"outputs/eval/{task.task}-{split}-{sampler.policy}.jsonl"
    summary = evaluate(adapter, tokenizer, data.dataset, template, sampler, config, output_file)
    summary = {"model": model_cfg.model_name_or_path, "task": task.task, "split": split, "policy": sampler.policy,
               **summary, "bad_rows": data.bad_rows.total}
    return summary


if __name__ == "__main__":
    print(json.dumps(main()))
