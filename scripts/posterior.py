"""Sample posterior reasoning traces p(r | c, a*), score them by phi (appendix E), filter, write SFT data.

    python scripts/posterior.py recipes/tiny/posterior.yaml
    python scripts/posterior.py recipes/tiny/posterior.yaml --num_samples 100 --output_dir /tmp/posterior
    python scripts/sft.py recipes/tiny/sft_posterior.yaml     # SFT on the kept traces (posterior_sft.jsonl)

Keys are the fields of ModelConfig, TaskConfig, TemplateConfig, SamplerConfig and PosteriorConfig. The answer block
is pre-filled with the gold answer and the sampler decodes the reasoning; each trace is then scored by the mean
over left-to-right reveal steps of the gold answer's log-likelihood (`rl/posterior.py`). Writes traces.jsonl,
posterior_sft.jsonl, gold_matched.jsonl and summary.json to `output_dir` and prints the summary (trace counts,
fraction with correct reasoning, ROC AUC of the score, threshold, kept count) as the last line of stdout.
"""

from __future__ import annotations

import json
import logging


def configs() -> list[type]:
    """The dataclasses whose fields are this script's recipe keys."""
    from rl.models import ModelConfig
    from rl.posterior import PosteriorConfig
    from rl.tasks import TaskConfig
    from rollout.sampler import SamplerConfig
    from rollout.template import TemplateConfig

    return [ModelConfig, TaskConfig, TemplateConfig, SamplerConfig, PosteriorConfig]


def main(argv: list[str] | None = None) -> dict:
    from rl.cli import exit_if_help

    exit_if_help("posterior", argv, __doc__)
    from rl.recipe import parse

    model_cfg, task, template, sampler, config = parse(configs(), argv, description=__doc__.split("\n\n")[0])
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    from rl.evaluate import default_device
    from rl.models import load_for_inference
    from rl.posterior import check_sampler, generate_traces, select_by_score, summarize, write_outputs
    from rl.tasks import load_task
    from rollout.adapter import MDLMAdapter

    check_sampler(sampler, config.traces_per_question)  # before loading anything
    split = task.split or "train"
    data = load_task(task, split=split)
    model, tokenizer = load_for_inference(model_cfg, default_device(config.device))
    adapter = MDLMAdapter.from_pretrained(model, tokenizer)
    records, report = generate_traces(adapter, tokenizer, data.dataset, template, sampler, config)
    keep, threshold = select_by_score([r["score"] for r in records], config.min_score, config.keep_top_fraction,
                                       [not r["too_long"] for r in records])
    summary = {"model": model_cfg.model_name_or_path, "task": task.task, "split": split,
               "traces_per_question": config.traces_per_question, "policy": sampler.policy,
               "temperature": sampler.temperature, **summarize(records, keep, threshold), **report,
               "bad_rows": data.bad_rows.total}
    summary["files"] = write_outputs(records, keep, summary, config.output_dir)
    return summary


if __name__ == "__main__":
    print(json.dumps(main()))
