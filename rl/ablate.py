"""Ablations: run a recipe's arms for several seeds, then tabulate and plot held-out accuracy against steps and NFE.

An ablation recipe names a base training recipe, overrides shared by every arm, and the arms themselves:

    base: recipes/tiny/grpo.yaml
    script: scripts/grpo.py
    common: {max_steps: 40, heldout_eval_steps: 10}
    reference_arm: outcome
    arms:
      outcome: {dense_coef: 0.0}
      dense_phi: {dense_coef: 0.1}

Each (arm, seed) run gets a flat recipe (base + common + arm + seed + output_dir) written next to its outputs and
is launched as its own process (`accelerate launch` by default), so a crashed run is reported and skipped, and
finished runs (those with `final/`) are not run again. Results are read back from what every run writes anyway:
`heldout/step*_rank*.jsonl` (held-out samples at each evaluation) and `rollouts/step*_rank*.jsonl` (training
rollouts with their NFE and rewards).
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import yaml

logger = logging.getLogger(__name__)
STEP_FILE = re.compile(r"step(\d+)_rank(\d+)\.jsonl$")


@dataclass
class Ablation:
    """A parsed ablation recipe."""

    base: str
    arms: dict[str, dict]
    script: str = "scripts/grpo.py"
    common: dict = field(default_factory=dict)
    reference_arm: str | None = None
    seeds: int = 3
    output_dir: str = "outputs/ablations"
    launcher: str | None = None  # command prefix before the script (None: `accelerate launch` of this Python)

    def __post_init__(self) -> None:
        if not self.arms:
            raise ValueError("An ablation needs at least one arm under 'arms'.")
        bad = [name for name, over in self.arms.items() if not isinstance(over, dict)]
        if bad:
            raise ValueError(f"Arms {bad} must map to a mapping of recipe overrides (use {{}} for none).")
        self.launcher = self.launcher or default_launcher()
        self.reference_arm = self.reference_arm or next(iter(self.arms))
        if self.reference_arm not in self.arms:
            raise ValueError(f"reference_arm {self.reference_arm!r} is not one of the arms {list(self.arms)}.")
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}.")
        for key in ("seed", "output_dir"):
            if key in self.common or any(key in over for over in self.arms.values()):
                raise ValueError(f"{key!r} is set by the ablation per run; remove it from common/arms.")


def load_ablation(path: str, **overrides) -> Ablation:
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"Ablation recipe {path} must be a mapping.")
    data.update({k: v for k, v in overrides.items() if v is not None})
    known = set(Ablation.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"Ablation recipe {path} has unknown key(s) {unknown}; known: {sorted(known)}.")
    return Ablation(**data)


def run_dir(ablation: Ablation, arm: str, seed: int) -> str:
    return os.path.join(ablation.output_dir, arm, f"seed{seed}")


def run_recipe(ablation: Ablation, arm: str, seed: int) -> dict:
    """The flat training recipe of one run."""
    with open(ablation.base) as f:
        recipe = yaml.safe_load(f) or {}
    recipe.update(ablation.common)
    recipe.update(ablation.arms[arm])
    recipe.update(seed=seed, output_dir=run_dir(ablation, arm, seed))
    return recipe


def run_all(ablation: Ablation, extra_args: list[str] | None = None) -> list[dict]:
    """Launch every (arm, seed) run not finished yet; returns one status record per run."""
    runs, start = [], time.perf_counter()
    total = len(ablation.arms) * ablation.seeds
    for i, (arm, seed) in enumerate((a, s) for a in ablation.arms for s in range(ablation.seeds)):
        out = run_dir(ablation, arm, seed)
        if os.path.isdir(os.path.join(out, "final")):
            logger.info("[%d/%d] %s seed %d: already finished, skipped.", i + 1, total, arm, seed)
            runs.append({"arm": arm, "seed": seed, "status": "done"})
            continue
        if os.path.isdir(out):  # an unfinished run: start it over (its step logs would mix with the new ones)
            logger.info("[%d/%d] %s seed %d: removing the unfinished run in %s.", i + 1, total, arm, seed, out)
            shutil.rmtree(out)
        os.makedirs(out)
        path = os.path.join(out, "run_recipe.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(run_recipe(ablation, arm, seed), f, sort_keys=False)
        cmd = [*shlex.split(ablation.launcher), ablation.script, path, *(extra_args or [])]
        logger.info("[%d/%d] %s seed %d: %s", i + 1, total, arm, seed, shlex.join(cmd))
        t0 = time.perf_counter()
        with open(os.path.join(out, "train.log"), "w") as log:
            code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
        took = time.perf_counter() - t0
        status = "ok" if code == 0 else f"failed (exit {code}, see {out}/train.log)"
        logger.info("[%d/%d] %s seed %d: %s in %.0f s (%.0f s elapsed).", i + 1, total, arm, seed, status, took,
                    time.perf_counter() - start)
        runs.append({"arm": arm, "seed": seed, "status": status, "seconds": round(took, 1)})
    return runs


def _step_files(folder: str) -> dict[int, list[str]]:
    files: dict[int, list[str]] = {}
    for path in glob.glob(os.path.join(folder, "step*_rank*.jsonl")):
        m = STEP_FILE.search(path)
        if m:
            files.setdefault(int(m.group(1)), []).append(path)
    return files


def _records(paths: list[str]) -> list[dict]:
    return [json.loads(line) for p in sorted(paths) for line in open(p) if line.strip()]


def read_run(folder: str) -> dict:
    """Curves of one run: held-out accuracy per evaluated step, train reward and rollout NFE per step.

    Returns {"eval": [(step, accuracy, cumulative rollout NFE before that step)], "train": [(step, mean outcome
    reward, cumulative NFE after the step)]}. The outcome reward is the first reward function's value.
    """
    train, cumulative, nfe_before = [], 0, {}
    for step, paths in sorted(_step_files(os.path.join(folder, "rollouts")).items()):
        rows = _records(paths)
        nfe_before[step] = cumulative
        cumulative += sum(r["nfe"] for r in rows)
        rewards = [r["rewards"][0] for r in rows if r.get("rewards") and r["rewards"][0] is not None]
        train.append((step, statistics.fmean(rewards) if rewards else math.nan, cumulative))
    evals = []
    for step, paths in sorted(_step_files(os.path.join(folder, "heldout")).items()):
        rows = _records(paths)
        # Rollout logs are numbered by the step being trained (0-based), so the NFE spent before evaluation at
        # global step s is everything logged for steps < s.
        spent = nfe_before.get(step, cumulative if step > 0 else 0)
        evals.append((step, sum(r["correct"] for r in rows) / max(1, len(rows)), spent))
    return {"eval": evals, "train": train}


def _first_reaching(evals: list[tuple], target: float) -> tuple[float, float]:
    for step, acc, nfe in evals:
        if acc >= target - 1e-12:
            return step, nfe
    return math.nan, math.nan


def _mean_std(values: list[float]) -> tuple[float, float, int]:
    ok = [v for v in values if not math.isnan(v)]
    if not ok:
        return math.nan, math.nan, 0
    return statistics.fmean(ok), (statistics.stdev(ok) if len(ok) > 1 else 0.0), len(ok)


def summarize(ablation: Ablation) -> tuple[list[dict], dict]:
    """Per-arm table rows and the per-run curves. The target is the reference arm's mean final accuracy."""
    curves = {arm: {s: read_run(run_dir(ablation, arm, s)) for s in range(ablation.seeds)} for arm in ablation.arms}
    finals = {arm: [c["eval"][-1][1] for c in runs.values() if c["eval"]] for arm, runs in curves.items()}
    ref = finals[ablation.reference_arm]
    target = statistics.fmean(ref) if ref else math.nan
    table = []
    for arm, runs in curves.items():
        reach = [_first_reaching(c["eval"], target) for c in runs.values() if c["eval"]]
        acc_m, acc_s, n = _mean_std(finals[arm])
        steps_m, steps_s, n_steps = _mean_std([r[0] for r in reach])
        nfe_m, nfe_s, _ = _mean_std([r[1] for r in reach])
        first = [c["eval"][0][1] for c in runs.values() if c["eval"]]
        table.append({
            "arm": arm, "seeds": n, "initial_accuracy": statistics.fmean(first) if first else math.nan,
            "final_accuracy_mean": acc_m, "final_accuracy_std": acc_s,
            "target_accuracy": target, "seeds_reaching_target": n_steps,
            "steps_to_target_mean": steps_m, "steps_to_target_std": steps_s,
            "nfe_to_target_mean": nfe_m, "nfe_to_target_std": nfe_s,
        })
    return table, curves


def _fmt(mean: float, std: float, digits: int) -> str:
    return "n/a" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_table(table: list[dict], folder: str, reference: str) -> tuple[str, str]:
    csv_path, md_path = os.path.join(folder, "results.csv"), os.path.join(folder, "results.md")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    target = table[0]["target_accuracy"]
    start = min((r["initial_accuracy"] for r in table if not math.isnan(r["initial_accuracy"])), default=math.nan)
    lines = [
        f"Target: the `{reference}` arm's mean final held-out accuracy ({target:.3f}). Steps and rollout NFE to reach",
        "it are averaged over the seeds that reach it (reaching: the first held-out evaluation at or above target).",
        *([f"The target is at or below every arm's accuracy before training ({start:.3f}): every seed 'reaches' it "
           "at step 0, so steps and NFE to target say nothing here."] if start >= target - 1e-12 else []),
        "",
        "| arm | seeds | initial acc | final acc (mean ± std) | seeds reaching target | steps to target | "
        "rollout NFE to target |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in table:
        lines.append(
            f"| {row['arm']} | {row['seeds']} | {row['initial_accuracy']:.3f} | "
            f"{_fmt(row['final_accuracy_mean'], row['final_accuracy_std'], 3)} | "
            f"{row['seeds_reaching_target']}/{row['seeds']} | "
            f"{_fmt(row['steps_to_target_mean'], row['steps_to_target_std'], 1)} | "
            f"{_fmt(row['nfe_to_target_mean'], row['nfe_to_target_std'], 0)} |"
        )
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return csv_path, md_path


def _band(ax, xs_per_seed: list[list[float]], ys_per_seed: list[list[float]], label: str, color) -> None:
    """Mean curve with a ±1 std band across seeds (curves aligned by index; x is the mean across seeds)."""
    n = min(len(y) for y in ys_per_seed)
    if n == 0:
        return
    xs = [statistics.fmean(x[i] for x in xs_per_seed) for i in range(n)]
    ys = [[y[i] for y in ys_per_seed] for i in range(n)]
    mean = [statistics.fmean(v) for v in ys]
    std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in ys]
    ax.plot(xs, mean, marker="o", markersize=3, color=color, label=f"{label} (n={len(ys_per_seed)})")
    ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color=color,
                    alpha=0.2, linewidth=0)


def plot(curves: dict, folder: str, title: str, smooth: int = 5) -> str:
    """2 x 2 PNG: held-out accuracy and train reward, against optimizer steps and cumulative rollout NFE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    colors = plt.get_cmap("tab10")
    for i, (arm, runs) in enumerate(curves.items()):
        runs = [c for c in runs.values() if c["eval"] or c["train"]]
        if not runs:
            continue
        color = colors(i % 10)
        ev = [c["eval"] for c in runs]
        _band(axes[0, 0], [[s for s, _, _ in e] for e in ev], [[a for _, a, _ in e] for e in ev], arm, color)
        _band(axes[0, 1], [[n for _, _, n in e] for e in ev], [[a for _, a, _ in e] for e in ev], arm, color)
        tr = [c["train"] for c in runs]
        k = max(1, smooth)
        smoothed = [[statistics.fmean(r for _, r, _ in t[max(0, j - k + 1) : j + 1]) for j in range(len(t))]
                    for t in tr]
        _band(axes[1, 0], [[s + 1 for s, _, _ in t] for t in tr], smoothed, arm, color)
        _band(axes[1, 1], [[n for _, _, n in t] for t in tr], smoothed, arm, color)
    labels = [("optimizer step", "held-out accuracy"), ("cumulative rollout NFE (row forwards)", "held-out accuracy"),
              ("optimizer step", f"train outcome reward ({smooth}-step mean)"),
              ("cumulative rollout NFE (row forwards)", f"train outcome reward ({smooth}-step mean)")]
    for ax, (x, y) in zip(axes.flat, labels):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    fig.suptitle(f"{title}: mean ± 1 std across seeds")
    fig.tight_layout()
    path = os.path.join(folder, "curves.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(ablation: Ablation, title: str | None = None) -> dict:
    """Write results.csv, results.md and curves.png under the ablation's output_dir; returns a JSON summary."""
    table, curves = summarize(ablation)
    os.makedirs(ablation.output_dir, exist_ok=True)
    csv_path, md_path = write_table(table, ablation.output_dir, ablation.reference_arm)
    png = plot(curves, ablation.output_dir, title or os.path.basename(ablation.output_dir.rstrip("/")))
    return {"table": table, "csv": csv_path, "markdown": md_path, "png": png}


def default_launcher() -> str:
    """`accelerate launch` through this interpreter (works without the venv's bin on PATH)."""
    return f"{shlex.quote(sys.executable)} -m accelerate.commands.launch"
