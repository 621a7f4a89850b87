"""Ablation results: per-run curves read from the runs' own logs, the per-arm table with a paired test against the
reference arm, and the learning-curve plot.

Every run writes `heldout/step*_rank*.jsonl` (held-out samples at each evaluation, one record per problem with its
`index` and `correct`) and `rollouts/step*_rank*.jsonl` (training rollouts with their NFE and rewards); `run.json`
holds its status and wall time (`rl.ablate.run_all`).
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import re
import statistics

import yaml

from rl.ablate import Ablation, run_dir

STEP_FILE = re.compile(r"step(\d+)_rank(\d+)\.jsonl$")


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
    reward, cumulative NFE after the step)], "decoding": [(step, tokens per NFE, mean NLL of the decoded tokens,
    mean final answer entropy)]}. The outcome reward is the first reward function's value. The decoding curves
    (NaN where the rollout logs lack the fields) are how parallel decoding moves during RL: decoded tokens over
    forwards, -log-prob of each decoded token at its own step, and each row's last logged H_UB.
    """
    train, decoding, cumulative, nfe_before = [], [], 0, {}
    for step, paths in sorted(_step_files(os.path.join(folder, "rollouts")).items()):
        rows = _records(paths)
        nfe_before[step] = cumulative
        cumulative += sum(r["nfe"] for r in rows)
        decoding.append((step, *_decoding_stats(rows)))
        rewards = [r["rewards"][0] for r in rows if r.get("rewards") and r["rewards"][0] is not None]
        train.append((step, statistics.fmean(rewards) if rewards else math.nan, cumulative))
    evals = []
    for step, paths in sorted(_step_files(os.path.join(folder, "heldout")).items()):
        rows = _records(paths)
        # Rollout logs are numbered by the step being trained (0-based), so the NFE spent before evaluation at
        # global step s is everything logged for steps < s.
        spent = nfe_before.get(step, cumulative if step > 0 else 0)
        evals.append((step, sum(r["correct"] for r in rows) / max(1, len(rows)), spent))
    return {"eval": evals, "train": train, "decoding": decoding}


def _decoding_stats(rows: list[dict]) -> tuple[float, float, float]:
    """(tokens per NFE, mean NLL of decoded tokens, mean final H_UB) over one step's rollout records."""
    decoded = [[lp for d, lp in zip(r["decode_step"], r["token_logprob"]) if d >= 0]
               for r in rows if "decode_step" in r and "token_logprob" in r]
    nfe = sum(r["nfe"] for r in rows if "decode_step" in r)
    tokens = sum(len(d) for d in decoded)
    nll = [-lp for d in decoded for lp in d]
    final_h = [[h for h in r["h_ub"] if h is not None][-1] for r in rows
               if any(h is not None for h in r.get("h_ub") or [])]
    return (tokens / nfe if nfe else math.nan, statistics.fmean(nll) if nll else math.nan,
            statistics.fmean(final_h) if final_h else math.nan)


def final_rows(folder: str) -> dict[int, bool]:
    """{problem index: correct} of a run's last held-out evaluation ({} if it has none)."""
    files = _step_files(os.path.join(folder, "heldout"))
    if not files:
        return {}
    rows = _records(files[max(files)])
    return {int(r.get("index", i)): bool(r["correct"]) for i, r in enumerate(rows)}


def paired(ablation: Ablation, arm: str) -> dict:
    """Paired comparison of `arm` with the reference arm on the same held-out problems, seed by seed.

    Each (seed, problem) evaluated by both arms at their last evaluation is one pair d = correct_arm -
    correct_reference in {-1, 0, 1}. Returns the mean difference over pairs, its standard error
    (sd(d) / sqrt(n), treating pairs as independent: seeds share problems, so this understates the spread between
    seeds), the z score, and the problems gained and lost.
    """
    diffs = []
    for seed in range(ablation.seeds):
        pair = (run_dir(ablation, arm, seed), run_dir(ablation, ablation.reference_arm, seed))
        if not all(os.path.isdir(os.path.join(folder, "final")) for folder in pair):
            continue  # only finished runs are compared
        mine = final_rows(run_dir(ablation, arm, seed))
        ref = final_rows(run_dir(ablation, ablation.reference_arm, seed))
        diffs += [int(mine[i]) - int(ref[i]) for i in sorted(set(mine) & set(ref))]
    if not diffs:
        return {"pairs": 0, "delta": math.nan, "se": math.nan, "z": math.nan, "gained": 0, "lost": 0}
    delta = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
    z = delta / se if se and not math.isnan(se) else math.nan
    return {"pairs": len(diffs), "delta": delta, "se": se, "z": z, "gained": diffs.count(1), "lost": diffs.count(-1)}


QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)


def _pearson(xs: list[float], ys: list[float]) -> float:
    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return math.nan
    return statistics.correlation(xs, ys)


def credit_diagnostics(folder: str, group_size: int) -> dict:
    """What the training rollouts of one run say about the phi credit (read from `rollouts/*.jsonl`).

    phi_corr: Pearson correlation, over rollouts, between the outcome reward and phi at each quantile of the row's
    defined steps (0: before any reasoning token, 1: phi_T). zero_spread: share of groups (`group_size`
    consecutive rows of a step file) whose outcome rewards are all equal (no outcome signal);
    zero_spread_phi_varies: share of those whose phi_T still varies (> 1e-6), i.e. that a phi credit turns into
    signal. dense_share: mean of the `advantage/dense_share` values the trainer logged (`train.log`; NaN if none).
    """
    xs: dict[float, list[float]] = {q: [] for q in QUANTILES}
    ys: dict[float, list[float]] = {q: [] for q in QUANTILES}
    flat = varies = groups = 0
    for _, paths in sorted(_step_files(os.path.join(folder, "rollouts")).items()):
        for path in paths:
            rows = _records([path])
            for g in range(0, len(rows) - group_size + 1, group_size):
                group = rows[g : g + group_size]
                rewards = [r["rewards"][0] if r.get("rewards") else None for r in group]
                finals = [[p for p in r.get("phi") or [] if p is not None][-1:] for r in group]
                groups += 1
                if None not in rewards and len(set(rewards)) == 1:
                    flat += 1
                    values = [f[0] for f in finals if f]
                    varies += bool(values) and max(values) - min(values) > 1e-6
            for r in rows:
                phi = [p for p in r.get("phi") or [] if p is not None]
                reward = r["rewards"][0] if r.get("rewards") else None
                if phi and reward is not None:
                    for q in QUANTILES:
                        xs[q].append(phi[round(q * (len(phi) - 1))])
                        ys[q].append(float(reward))
    shares = []
    log = os.path.join(folder, "train.log")
    if os.path.exists(log):
        with open(log, errors="replace") as f:
            shares = [float(x) for x in re.findall(r"'advantage/dense_share': '([-0-9.e]+)'", f.read())]
    return {"phi_corr": {q: _pearson(xs[q], ys[q]) for q in QUANTILES}, "groups": groups,
            "zero_spread": flat / groups if groups else math.nan,
            "zero_spread_phi_varies": varies / flat if flat else math.nan,
            "dense_share": statistics.fmean(shares) if shares else math.nan}


def run_status(folder: str) -> dict:
    """A run's `run.json` (status, seconds), or {} when it was never launched by `run_all`."""
    path = os.path.join(folder, "run.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


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
    """Per-arm table rows and the per-run curves.

    The target is the reference arm's mean final accuracy. Steps and NFE to reach it are reported (not NaN) only
    when the reference arm improved on its own mean initial accuracy: otherwise every seed "reaches" it at step 0.
    Failed runs count in `failed`, runs not finished (no `final/`: still running, or never launched) in
    `unfinished`; both are left out of every other column.
    """
    failed = {arm: [s for s in range(ablation.seeds) if run_status(run_dir(ablation, arm, s)).get("status", "")
                    .startswith("failed")] for arm in ablation.arms}
    finished = {arm: [s for s in range(ablation.seeds) if s not in failed[arm]
                      and os.path.isdir(os.path.join(run_dir(ablation, arm, s), "final"))] for arm in ablation.arms}
    curves = {arm: {s: read_run(run_dir(ablation, arm, s)) for s in finished[arm]} for arm in ablation.arms}
    finals = {arm: [c["eval"][-1][1] for c in runs.values() if c["eval"]] for arm, runs in curves.items()}
    ref = finals[ablation.reference_arm]
    target = statistics.fmean(ref) if ref else math.nan
    ref_start = [c["eval"][0][1] for c in curves[ablation.reference_arm].values() if c["eval"]]
    improved = bool(ref_start) and target > statistics.fmean(ref_start) + 1e-12
    table = []
    for arm, runs in curves.items():
        reach = [_first_reaching(c["eval"], target) if improved else (math.nan, math.nan)
                 for c in runs.values() if c["eval"]]
        acc_m, acc_s, n = _mean_std(finals[arm])
        steps_m, steps_s, n_steps = _mean_std([r[0] for r in reach])
        nfe_m, nfe_s, _ = _mean_std([r[1] for r in reach])
        first = [c["eval"][0][1] for c in runs.values() if c["eval"]]
        seconds = [run_status(run_dir(ablation, arm, s)).get("seconds") for s in runs]
        seconds = [x for x in seconds if x is not None]
        test = paired(ablation, arm) if arm != ablation.reference_arm else {}
        table.append({
            "arm": arm, "is_reference": arm == ablation.reference_arm, "seeds": n, "failed": len(failed[arm]),
            "unfinished": ablation.seeds - len(failed[arm]) - len(finished[arm]),
            "initial_accuracy": statistics.fmean(first) if first else math.nan,
            "final_accuracy_mean": acc_m, "final_accuracy_std": acc_s,
            "target_accuracy": target, "seeds_reaching_target": n_steps,
            "steps_to_target_mean": steps_m, "steps_to_target_std": steps_s,
            "nfe_to_target_mean": nfe_m, "nfe_to_target_std": nfe_s, "reference_improved": improved,
            "delta_vs_reference": test.get("delta", math.nan), "delta_se": test.get("se", math.nan),
            "delta_z": test.get("z", math.nan), "pairs": test.get("pairs", 0), "gained": test.get("gained", 0),
            "lost": test.get("lost", 0), "wall_seconds_mean": statistics.fmean(seconds) if seconds else math.nan,
        })
    return table, curves


def _fmt(mean: float, std: float, digits: int) -> str:
    return "n/a" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _delta(row: dict) -> str:
    if row["is_reference"]:
        return "reference"
    if math.isnan(row["delta_vs_reference"]):
        return "n/a"
    return (f"{100 * row['delta_vs_reference']:+.1f} ± {100 * row['delta_se']:.1f} pts "
            f"(z {row['delta_z']:+.1f}; +{row['gained']}/-{row['lost']} of {row['pairs']})")


def write_table(table: list[dict], folder: str, reference: str) -> tuple[str, str]:
    csv_path, md_path = os.path.join(folder, "results.csv"), os.path.join(folder, "results.md")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    target = table[0]["target_accuracy"]
    lines = [
        f"Target: the `{reference}` arm's mean final held-out accuracy ({target:.3f}). Steps and rollout NFE to reach",
        "it are averaged over the seeds that reach it (reaching: the first held-out evaluation at or above target).",
        *([f"The `{reference}` arm did not improve on its initial accuracy, so steps and NFE to its final accuracy "
           "are not reported (every seed would 'reach' it at step 0)."] if not table[0]["reference_improved"] else []),
        f"Paired difference against `{reference}`: same seed, same held-out problems, last evaluation; mean ± SE "
        "over (seed, problem) pairs, z = mean / SE, problems gained/lost. Failed runs are left out of every column.",
        "",
        "| arm | seeds (failed, unfinished) | initial acc | final acc (mean ± std) | vs reference (paired) | seeds "
        "reaching "
        "target | steps to target | rollout NFE to target | wall s / run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in table:
        wall = "n/a" if math.isnan(row["wall_seconds_mean"]) else f"{row['wall_seconds_mean']:.0f}"
        lines.append(
            f"| {row['arm']} | {row['seeds']} ({row['failed']}, {row['unfinished']}) | "
            f"{row['initial_accuracy']:.3f} | "
            f"{_fmt(row['final_accuracy_mean'], row['final_accuracy_std'], 3)} | {_delta(row)} | "
            f"{row['seeds_reaching_target']}/{row['seeds']} | "
            f"{_fmt(row['steps_to_target_mean'], row['steps_to_target_std'], 1)} | "
            f"{_fmt(row['nfe_to_target_mean'], row['nfe_to_target_std'], 0)} | {wall} |"
        )
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return csv_path, md_path


def _common_steps(curves: list[list[tuple]]) -> list[list[tuple]]:
    """Each seed's evaluations at the steps every seed evaluated (an off-schedule one, e.g. where an older run
    resumed, would shift the index-aligned mean)."""
    common = set.intersection(*(set(p[0] for p in c) for c in curves)) if curves else set()
    return [[p for p in c if p[0] in common] for c in curves]


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
        ev = _common_steps([c["eval"] for c in runs])
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
    return _save(fig, axes, labels, f"{title}: mean ± 1 std across seeds", os.path.join(folder, "curves.png"))


def _save(fig, axes, labels: list[tuple[str, str]], title: str, path: str) -> str:
    """Label the 2 x 2 panels ((x, y) per panel), title the figure and write it to `path`."""
    import matplotlib.pyplot as plt

    for ax, (x, y) in zip(axes.flat, labels):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_decoding(curves: dict, folder: str, title: str, smooth: int = 5) -> str:
    """2 x 2 PNG of how decoding moves during training: held-out accuracy, tokens per NFE, NLL of the decoded
    tokens and final answer entropy against optimizer steps (the stability check for parallel decoding in RL)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    colors = plt.get_cmap("tab10")
    k = max(1, smooth)
    for i, (arm, runs) in enumerate(curves.items()):
        runs = [c for c in runs.values() if c["eval"] or c.get("decoding")]
        if not runs:
            continue
        color = colors(i % 10)
        ev = _common_steps([c["eval"] for c in runs])
        _band(axes[0, 0], [[s for s, _, _ in e] for e in ev], [[a for _, a, _ in e] for e in ev], arm, color)
        dec = [c.get("decoding", []) for c in runs]
        for ax, j in ((axes[0, 1], 1), (axes[1, 0], 2), (axes[1, 1], 3)):
            series = [[x for x in d if math.isfinite(x[j])] for d in dec]  # logs without the fields: no curve
            series = [d for d in series if d]
            ys = [[statistics.fmean(x[j] for x in d[max(0, t - k + 1) : t + 1]) for t in range(len(d))]
                  for d in series]
            if series:
                _band(ax, [[x[0] + 1 for x in d] for d in series], ys, arm, color)
    labels = [("optimizer step", y) for y in (
        "held-out accuracy (greedy)", f"rollout tokens per NFE ({k}-step mean)",
        f"NLL of decoded tokens, nats ({k}-step mean)", f"answer entropy H_UB at the last step, nats ({k}-step mean)")]
    return _save(fig, axes, labels, f"{title}: decoding during training (mean ± 1 std across seeds)",
                 os.path.join(folder, "decoding.png"))


def _group_size(folder: str) -> int:
    path = os.path.join(folder, "run_recipe.yaml")
    if not os.path.exists(path):
        return 8
    with open(path) as f:
        return int((yaml.safe_load(f) or {}).get("num_generations", 8))


def diagnostics_lines(ablation: Ablation) -> list[str]:
    """A markdown table of `credit_diagnostics` per arm (means over its seeds' runs)."""
    lines = ["", "What the training rollouts say about phi (means over seeds; `credit_diagnostics`): correlation of "
             "phi with the outcome reward at 0/25/50/75/100% of each rollout's steps; share of groups with no outcome "
             "spread, and of those, the share whose phi_T varies (signal a phi credit adds); mean logged dense share "
             "of the advantage.", "",
             "| arm | corr(phi, reward) at 0 / 25 / 50 / 75 / 100% | groups without outcome spread | of them, phi_T "
             "varies | dense share |", "|---|---|---|---|---|"]

    def mean(values: list[float]) -> float:
        ok = [v for v in values if not math.isnan(v)]
        return statistics.fmean(ok) if ok else math.nan

    def fmt(x: float, digits: int = 2) -> str:
        return "n/a" if math.isnan(x) else f"{x:.{digits}f}"

    for arm in ablation.arms:
        runs = [run_dir(ablation, arm, s) for s in range(ablation.seeds)]
        diags = [credit_diagnostics(r, _group_size(r)) for r in runs if os.path.isdir(os.path.join(r, "final"))]
        if not diags:
            continue
        corr = " / ".join(fmt(mean([d["phi_corr"][q] for d in diags])) for q in QUANTILES)
        lines.append(f"| {arm} | {corr} | {fmt(mean([d['zero_spread'] for d in diags]))} | "
                     f"{fmt(mean([d['zero_spread_phi_varies'] for d in diags]))} | "
                     f"{fmt(mean([d['dense_share'] for d in diags]), 3)} |")
    return lines


def report(ablation: Ablation, title: str | None = None) -> dict:
    """Write results.csv, results.md, curves.png and decoding.png under the ablation's output_dir; returns a JSON
    summary."""
    table, curves = summarize(ablation)
    os.makedirs(ablation.output_dir, exist_ok=True)
    csv_path, md_path = write_table(table, ablation.output_dir, ablation.reference_arm)
    with open(md_path, "a") as f:
        f.write("\n".join(diagnostics_lines(ablation)) + "\n")
    title = title or os.path.basename(ablation.output_dir.rstrip("/"))
    png = plot(curves, ablation.output_dir, title)
    decoding_png = plot_decoding(curves, ablation.output_dir, title)
    return {"table": table, "csv": csv_path, "markdown": md_path, "png": png, "decoding_png": decoding_png}


