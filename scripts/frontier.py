"""Accuracy vs mean NFE of many unmasking samplers on one task and model, each with and without early exit.

    python scripts/frontier.py recipes/tiny/frontier.yaml
    python scripts/frontier.py recipes/tiny/frontier.yaml --exit_gamma 0.3 --frontier_dir /tmp/frontier
    python scripts/frontier.py recipes/tiny/frontier.yaml --samplers left_to_right med --with_exit false

Keys are the fields of ModelConfig, TaskConfig, TemplateConfig, SamplerConfig, EvalConfig and FrontierConfig.
SamplerConfig keys set what every config shares (block_length, temperature, seed, med_k_max, eb_gamma, eb_proxy,
tau, exit_gamma); policy, k and med_lambda are swept (fixed_k, med_lambdas) and may not be given. A null
exit_gamma is calibrated on rows of another split (rl/frontier.py says how). Writes under frontier_dir one JSONL
of traces per config, frontier.csv, frontier.png and frontier.json; prints the JSON summary as the last line of
stdout. Deltas (accuracy points, NFE ratio) are against left-to-right k=1 without exit.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time


def configs() -> list[type]:
    """The dataclasses whose fields are this script's recipe keys."""
    from rl.evaluate import EvalConfig
    from rl.frontier import FrontierConfig
    from rl.models import ModelConfig
    from rl.tasks import TaskConfig
    from rollout.sampler import SamplerConfig
    from rollout.template import TemplateConfig

    return [ModelConfig, TaskConfig, TemplateConfig, SamplerConfig, EvalConfig, FrontierConfig]


def given_keys(argv: list[str]) -> set[str]:
    """Keys set by the recipe (first positional argument) or by `--key` flags."""
    from rl.recipe import load_recipe

    keys = {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
    return keys | (set(load_recipe(argv[0])) if argv and not argv[0].startswith("-") else set())


def main(argv: list[str] | None = None) -> dict:
    from rl.cli import exit_if_help

    exit_if_help("frontier", argv, __doc__)
    from rl.recipe import parse

    argv = list(sys.argv[1:] if argv is None else argv)
    model_cfg, task, template, base, config, frontier = parse(configs(), argv, description=__doc__.split("\n\n")[0])
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    from rl import frontier as fr
    from rl.evaluate import default_device
    from rl.models import load_for_inference
    from rl.tasks import load_task
    from rollout.adapter import MDLMAdapter

    start = time.perf_counter()
    split = task.split or "test"
    fr.check_inputs(given_keys(argv), task, split, template, base, config, frontier)
    out_dir = frontier.frontier_dir or f"outputs/frontier/{task.task}-{split}"
    data = load_task(task, split=split)
    model, tokenizer = load_for_inference(model_cfg, default_device(config.device))
    adapter = MDLMAdapter.from_pretrained(model, tokenizer)

    exit_gamma, calibration = base.exit_gamma, None
    if frontier.with_exit and exit_gamma is None:
        rows = load_task(task, split=frontier.exit_calibration_split).dataset
        rows = rows.select(range(min(len(rows), frontier.exit_calibration_size)))
        calibration = fr.calibrate_on(adapter, tokenizer, rows, template, base, config,
                                      os.path.join(out_dir, "calibration.jsonl"), frontier.exit_tolerance)
        exit_gamma = calibration["exit_gamma"]
    points = fr.frontier_points(base, frontier, exit_gamma if frontier.with_exit else None)
    rows = fr.run_frontier(adapter, tokenizer, data.dataset, template, points, config, out_dir, frontier.match_points)

    csv_path, png_path = os.path.join(out_dir, "frontier.csv"), os.path.join(out_dir, "frontier.png")
    fr.write_csv(rows, csv_path)
    title = f"Accuracy vs NFE: {task.task}/{split}, {model_cfg.model_name_or_path}, n={len(data.dataset)}"
    fr.plot_frontier(rows, png_path, title, frontier.match_points)
    summary = {
        "model": model_cfg.model_name_or_path, "task": task.task, "split": split, "n": len(data.dataset),
        "reference": {k: rows[0][k] for k in ("name", "accuracy", "mean_nfe")},
        "exit_gamma": exit_gamma if frontier.with_exit else None,
        "exit_gamma_source": None if not frontier.with_exit else "calibrated" if calibration else "recipe",
        "calibration": calibration, "claims": fr.claims(rows, frontier.match_points),
        "configs": [{k: r[k] for k in ("name", "accuracy", "mean_nfe", "acc_delta_pts", "delta_se_pts", "nfe_ratio")}
                    for r in rows],
        "csv": csv_path, "png": png_path, "wall_seconds": round(time.perf_counter() - start, 1),
        "bad_rows": data.bad_rows.total,
    }
    with open(os.path.join(out_dir, "frontier.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    print(json.dumps(main()))
