"""Accuracy-vs-NFE frontier: one task and model, many unmasking samplers, each with and without early exit.

Every sampler config goes through `rl.evaluate.evaluate` on the same rows with the same per-row seeds, so rows
are paired across configs and each config's accuracy delta against the reference (left-to-right, one token per
step) comes with a paired standard error. The configs (each also with early exit when `with_exit`):

    left_to_right k=1 (reference) | entropy, fixed k | MED(lambda) | EB(eb_gamma) | threshold(tau)

Early exit fires when H_UB, the answer block's entropy sum, drops below `exit_gamma`. H_UB's scale depends on the
answer length and on the model (LLaDA's 0.1 nats saves almost nothing on the tiny model's 3-token answers), so
without an explicit value the gamma is calibrated. A no-exit run records H_UB(t) and phi(t) at every step, and
the same run with exit at gamma is that trace cut at the first step with H_UB(t) < gamma: its NFE is known
exactly, and its accuracy is estimated from phi(t) = log p_t(gold answer). Greedy: the committed answer is the
gold one when exp(phi) > 1/2 (sufficient; nearly necessary when H_UB is small, the only case where exit fires).
T > 0: the gold answer is drawn with probability exp(phi) (exact at T = 1). The largest gamma of a log grid whose
estimated accuracy, and that of every smaller gamma, stays within `exit_tolerance` points of the run's own accuracy
is used. The calibration run is left-to-right k=1 on rows of another split (default: the first rows of the train
split), so the held-out rows do not tune it; a model is surer on rows it trained on, so this gamma can be on the
large side (pass `exit_gamma` to set it).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field

from rollout.sampler import SamplerConfig

logger = logging.getLogger(__name__)

FAMILIES = ("left_to_right", "fixed_k", "med", "eb", "threshold")
SWEPT_KEYS = ("policy", "k", "med_lambda")
"""SamplerConfig keys that the frontier sets per config; a recipe or flag giving them is an error."""
GAMMA_GRID = tuple(round(10 ** (e / 10), 6) for e in range(-30, 11))
"""Exit thresholds tried by the calibration: 1e-3 .. 10 nats, ten per decade."""
COLUMNS = ("name", "family", "policy", "k", "med_lambda", "med_k_max", "eb_gamma", "eb_proxy", "tau",
           "block_length", "exit_gamma", "accuracy", "mean_nfe", "tokens_per_nfe", "exit_rate", "n", "wall_seconds",
           "acc_delta_pts", "delta_se_pts", "nfe_ratio", "matches_ref", "output_file")


@dataclass
class FrontierConfig:
    """Which samplers the frontier runs and where it writes. Field names are recipe keys."""

    samplers: list[str] = field(
        default_factory=lambda: list(FAMILIES),
        metadata={"help": f"Sampler families to run, from {', '.join(FAMILIES)}. left_to_right (k=1) is the "
                          "reference every delta is taken against and always runs."},
    )
    fixed_k: list[int] = field(
        default_factory=lambda: [2, 4], metadata={"help": "Tokens per step of the fixed-k entropy policy."}
    )
    med_lambdas: list[float] = field(
        default_factory=lambda: [0.1, 0.2, 0.3], metadata={"help": "MED entropy thresholds lambda (nats)."}
    )
    with_exit: bool = field(
        default=True,
        metadata={"help": "Also run every config with early exit at exit_gamma (null exit_gamma: calibrated)."},
    )
    exit_tolerance: float = field(
        default=1.0, metadata={"help": "Calibration: accuracy points the estimated exit accuracy may lose."}
    )
    exit_calibration_split: str = field(
        default="train", metadata={"help": "Calibration: split whose first rows calibrate exit_gamma."}
    )
    exit_calibration_size: int = field(default=200, metadata={"help": "Calibration: rows of that split."})
    match_points: float = field(
        default=2.0,
        metadata={"help": "A config matches the reference when it loses at most this many accuracy points."},
    )
    frontier_dir: str | None = field(
        default=None, metadata={"help": "Output folder (None: outputs/frontier/<task>-<split>)."}
    )

    def __post_init__(self) -> None:
        unknown = sorted(set(self.samplers) - set(FAMILIES))
        if unknown:
            raise ValueError(f"Unknown sampler famil(ies) {unknown}; choose from {', '.join(FAMILIES)}.")
        for name in ("samplers", "fixed_k", "med_lambdas"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"{name} lists a value twice: {values}.")
        if any(k < 1 for k in self.fixed_k):
            raise ValueError(f"fixed_k values must be >= 1, got {self.fixed_k}.")
        if any(not lam > 0 for lam in self.med_lambdas):
            raise ValueError(f"med_lambdas must be > 0 (entropies in nats), got {self.med_lambdas}.")
        if not self.exit_tolerance >= 0 or not self.match_points >= 0:
            raise ValueError("exit_tolerance and match_points are accuracy points and must be >= 0.")
        if self.exit_calibration_size < 1:
            raise ValueError(f"exit_calibration_size must be >= 1, got {self.exit_calibration_size}.")


@dataclass
class FrontierPoint:
    """One sampler config of the frontier."""

    name: str
    family: str
    sampler: SamplerConfig

    def params(self) -> dict:
        """The policy parameters that apply to this config (the CSV leaves the others empty)."""
        s = self.sampler
        keys = {"left_to_right": ("k",), "fixed_k": ("k",), "med": ("med_lambda", "med_k_max"),
                "eb": ("eb_gamma", "eb_proxy"), "threshold": ("tau",)}[self.family]
        return {key: getattr(s, key) for key in keys}


def frontier_points(base: SamplerConfig, config: FrontierConfig, exit_gamma: float | None) -> list[FrontierPoint]:
    """The sampler configs in run order, the reference first; each followed by its early-exit twin."""
    specs = [("left_to_right", "left_to_right_k1", {"policy": "left_to_right", "k": 1})]
    if "fixed_k" in config.samplers:
        specs += [("fixed_k", f"entropy_k{k}", {"policy": "entropy", "k": k}) for k in config.fixed_k]
    if "med" in config.samplers:
        specs += [("med", f"med_{lam:g}", {"policy": "med", "med_lambda": lam}) for lam in config.med_lambdas]
    if "eb" in config.samplers:
        specs.append(("eb", f"eb_{base.eb_gamma:g}", {"policy": "eb"}))
    if "threshold" in config.samplers:
        specs.append(("threshold", f"threshold_{base.tau:g}", {"policy": "threshold"}))
    points = []
    for family, name, overrides in specs:
        points.append(FrontierPoint(name, family, dataclasses.replace(base, exit_gamma=None, **overrides)))
        if exit_gamma is not None:
            exiting = dataclasses.replace(base, exit_gamma=exit_gamma, **overrides)
            points.append(FrontierPoint(f"{name}_exit", family, exiting))
    return points


def read_records(path: str) -> list[dict]:
    """The JSONL records `evaluate` wrote, in row order."""
    with open(path) as f:
        return sorted((json.loads(line) for line in f), key=lambda r: r["index"])


def exit_outcome(record: dict, gamma: float, greedy: bool) -> tuple[int, float]:
    """(NFE, expected correctness) of a no-exit run's row had it exited at `gamma` (see the module docstring)."""
    for t, (h, phi) in enumerate(zip(record["h_ub"], record["phi"])):
        if h is not None and h < gamma:
            p_gold = math.exp(phi)
            return t + 1, float(p_gold > 0.5) if greedy else p_gold
    return record["nfe"], float(record["correct"])


def simulate_exit(records: list[dict], gamma: float, greedy: bool) -> tuple[float, float]:
    """(estimated accuracy, exact mean NFE) of the records' sampler with early exit at `gamma`."""
    outcomes = [exit_outcome(r, gamma, greedy) for r in records]
    return sum(c for _, c in outcomes) / len(outcomes), sum(n for n, _ in outcomes) / len(outcomes)


def calibrate_exit_gamma(records: list[dict], tolerance_points: float, greedy: bool,
                         grid: tuple[float, ...] = GAMMA_GRID) -> dict:
    """The largest gamma of `grid` such that it and every smaller gamma lose at most `tolerance_points` of the
    records' accuracy (estimated; see the module docstring). Records need `phi` (evaluate with record_phi)."""
    if not records or "phi" not in records[0]:
        raise ValueError("Calibrating exit_gamma needs phi in the traces: evaluate with record_phi on the "
                         "infill layout, or pass exit_gamma explicitly.")
    accuracy = sum(r["correct"] for r in records) / len(records)
    mean_nfe = sum(r["nfe"] for r in records) / len(records)
    chosen = {"exit_gamma": grid[0], "accuracy": accuracy, "mean_nfe": mean_nfe, "n": len(records)}
    for gamma in sorted(grid):
        est_acc, est_nfe = simulate_exit(records, gamma, greedy)
        if 100 * (accuracy - est_acc) > tolerance_points:
            break
        chosen.update(exit_gamma=gamma, estimated_accuracy=est_acc, estimated_mean_nfe=est_nfe)
    else:
        logger.warning("exit_gamma calibration: even the largest gamma (%g) stays within tolerance.", grid[-1])
    if "estimated_accuracy" not in chosen:
        logger.warning("exit_gamma calibration: even gamma=%g loses more than %g points; using it.",
                       grid[0], tolerance_points)
    return chosen


def check_inputs(given_keys: set[str], task, split: str, template, base: SamplerConfig, eval_config,
                 config: FrontierConfig) -> None:
    """Reject settings the frontier cannot honour, each with how to fix it. `given_keys`: recipe keys and flags."""
    swept = sorted(given_keys & set(SWEPT_KEYS))
    if swept:
        raise ValueError(f"The frontier sets {swept} per config; remove them from the recipe/flags and list the "
                         "values to sweep in fixed_k and med_lambdas.")
    if "output_file" in given_keys:
        raise ValueError("The frontier writes one JSONL per config under frontier_dir; remove output_file.")
    if not config.with_exit and base.exit_gamma is not None:
        raise ValueError(f"exit_gamma={base.exit_gamma} is set but with_exit is false; drop one of them.")
    if config.with_exit and template.layout != "infill":
        raise ValueError("Early exit needs the 'infill' layout (an answer block); set with_exit: false.")
    if config.with_exit and base.exit_gamma is None:
        local_file = (task.dataset_path or "").endswith((".jsonl", ".json"))
        if config.exit_calibration_split == split or local_file:
            raise ValueError(f"Calibrating exit_gamma on split {config.exit_calibration_split!r} would tune it on the "
                             "evaluated rows (a local dataset file is one split); pass exit_gamma explicitly.")
        if not eval_config.record_phi:
            raise ValueError("Calibrating exit_gamma reads phi from the traces; set record_phi: true or pass "
                             "exit_gamma explicitly.")


def calibrate_on(adapter, tokenizer, dataset, template, base: SamplerConfig, eval_config, path: str,
                 tolerance_points: float) -> dict:
    """Run left-to-right k=1 without exit on `dataset` (traces to `path`) and calibrate exit_gamma on it."""
    from rl.evaluate import evaluate

    reference = dataclasses.replace(base, policy="left_to_right", k=1, exit_gamma=None)
    logger.info("Calibrating exit_gamma on %d rows with left-to-right k=1.", len(dataset))
    evaluate(adapter, tokenizer, dataset, template, reference, eval_config, path)
    result = calibrate_exit_gamma(read_records(path), tolerance_points, greedy=base.temperature == 0)
    logger.info("exit_gamma = %g: estimated accuracy %.3f (no exit %.3f), mean NFE %.2f (no exit %.2f).",
                result["exit_gamma"], result.get("estimated_accuracy", float("nan")), result["accuracy"],
                result.get("estimated_mean_nfe", float("nan")), result["mean_nfe"])
    return {**result, "output_file": path}


def run_frontier(adapter, tokenizer, dataset, template, points: list[FrontierPoint], eval_config, out_dir: str,
                 match_points: float = 2.0, progress: bool = True) -> list[dict]:
    """Evaluate every point on `dataset`; one JSONL per point under `out_dir`; the CSV rows, reference first."""
    from rl.evaluate import evaluate

    if not points or points[0].sampler.policy != "left_to_right" or points[0].sampler.k != 1:
        raise ValueError("The first frontier point must be the left-to-right k=1 reference (see frontier_points).")
    rows, correct = [], {}
    for i, point in enumerate(points, 1):
        logger.info("[%d/%d] %s", i, len(points), point.name)
        path = os.path.join(out_dir, f"{point.name}.jsonl")
        summary = evaluate(adapter, tokenizer, dataset, template, point.sampler, eval_config, path, progress=progress)
        s = point.sampler
        rows.append({"name": point.name, "family": point.family, "policy": s.policy, **point.params(),
                     "block_length": s.block_length, "exit_gamma": s.exit_gamma,
                     **{k: summary[k] for k in ("accuracy", "mean_nfe", "tokens_per_nfe", "exit_rate", "n",
                                                "wall_seconds")}, "output_file": path})
        correct[point.name] = [bool(r["correct"]) for r in read_records(path)]
        add_deltas(rows, correct, match_points)
        row = rows[-1]
        logger.info("%s: accuracy %.3f (%+.1f pts vs k=1), mean NFE %.2f (x%.2f of k=1), exit rate %.2f, %.0f s",
                    point.name, row["accuracy"], row["acc_delta_pts"], row["mean_nfe"], row["nfe_ratio"],
                    row["exit_rate"], row["wall_seconds"])
    return rows


def add_deltas(rows: list[dict], correct: dict[str, list[bool]], match_points: float) -> None:
    """Set each row's accuracy delta (points) and its paired standard error, the NFE ratio and `matches_ref`
    against rows[0], the reference. `correct` maps row names to per-row correctness on the shared rows."""
    ref = rows[0]
    ref_correct = correct[ref["name"]]
    for row in rows:
        diffs = [float(a) - float(b) for a, b in zip(correct[row["name"]], ref_correct)]  # paired on dataset rows
        n = len(diffs)
        mean = sum(diffs) / n
        var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
        row["acc_delta_pts"] = round(100 * (row["accuracy"] - ref["accuracy"]), 2)
        row["delta_se_pts"] = round(100 * math.sqrt(var / n), 2)
        row["nfe_ratio"] = round(row["mean_nfe"] / ref["mean_nfe"], 4)
        row["matches_ref"] = row is not ref and row["acc_delta_pts"] >= -match_points and row["mean_nfe"] < ref[
            "mean_nfe"]


def claims(rows: list[dict], match_points: float) -> dict:
    """The frontier's questions answered from the no-exit rows: does each family reach the reference accuracy
    (within `match_points`) at fewer NFE, and does each fixed k lose more than `match_points`?"""
    plain = [r for r in rows[1:] if r["exit_gamma"] is None]
    out = {}
    for family in FAMILIES[1:]:
        members = [r for r in plain if r["family"] == family]
        if members:
            out[f"{family}_matches_ref"] = any(r["matches_ref"] for r in members)
    for r in plain:
        if r["family"] == "fixed_k":
            out[f"entropy_k{r['k']}_loses_accuracy"] = r["acc_delta_pts"] < -match_points
    return out


def write_csv(rows: list[dict], path: str) -> None:
    """One line per config with `COLUMNS`; parameters that do not apply to a config are left empty."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="raise")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: "" if row.get(c) is None else row.get(c) for c in COLUMNS})


def read_csv(path: str) -> list[dict]:
    """Rows of a frontier CSV with numbers, booleans and empty cells (None) restored, as `run_frontier` made them."""

    def value(text: str):
        if text in ("", "True", "False"):
            return None if text == "" else text == "True"
        for convert in (int, float):
            try:
                return convert(text)
            except ValueError:
                pass
        return text

    with open(path, newline="") as f:
        return [{k: value(v) for k, v in row.items()} for row in csv.DictReader(f)]


STYLE = {"left_to_right": ("black", "o", "left-to-right k=1"), "fixed_k": ("tab:red", "s", "fixed k (entropy)"),
         "med": ("tab:blue", "^", "MED (λ)"), "eb": ("tab:green", "D", "EB (γ)"),
         "threshold": ("tab:purple", "v", "threshold (τ)")}


def _label(row: dict) -> str:
    family = row["family"]
    if family in ("left_to_right", "fixed_k"):
        return f"k={row['k']}"
    symbol, key = {"med": ("λ", "med_lambda"), "eb": ("γ", "eb_gamma"), "threshold": ("τ", "tau")}[family]
    return f"{symbol}={row[key]:g}"


def _overlaps(a: tuple, b: tuple) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _place_labels(ax, labels: list[tuple[float, float, str, str]], markers: list[tuple[float, float]],
                  fontsize: float = 9) -> None:
    """Annotate each (x, y, text, colour) at the first of a few offsets where its box covers no marker and no
    earlier label (boxes estimated in display pixels; the axes limits must be final)."""
    px = ax.figure.dpi / 72  # pixels per point
    char_w, height = 0.62 * fontsize * px, 1.2 * fontsize * px
    taken = []
    for x, y in markers:
        cx, cy = ax.transData.transform((x, y))
        taken.append((cx - 6 * px, cy - 6 * px, cx + 6 * px, cy + 6 * px))
    offsets = [(7, 3), (7, -13), (-7, 3), (-7, -13), (7, 13), (-7, 13), (7, -23), (-7, -23)]  # points
    for x, y, text, colour in labels:
        cx, cy = ax.transData.transform((x, y))
        width = len(text) * char_w
        for dx, dy in offsets:
            left = cx + dx * px if dx > 0 else cx + dx * px - width
            box = (left, cy + dy * px, left + width, cy + dy * px + height)
            if not any(_overlaps(box, other) for other in taken):
                break
        else:
            dx, dy = offsets[0]
            left = cx + dx * px
            box = (left, cy + dy * px, left + width, cy + dy * px + height)
        taken.append(box)
        ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize, color=colour,
                    ha="left" if dx > 0 else "right", va="bottom")


def plot_frontier(rows: list[dict], path: str, title: str, match_points: float = 2.0) -> None:
    """Accuracy (%) vs mean NFE: colour and marker per family, filled = no exit, hollow = early exit (an arrow
    joins each config to its early-exit twin); the band marks `match_points` below the reference."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    fig = Figure(figsize=(10, 6), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    ref_acc = 100 * rows[0]["accuracy"]
    ax.axhspan(ref_acc - match_points, ref_acc, color="0.9", zorder=0)
    ax.axhline(ref_acc, color="0.5", ls="--", lw=1, zorder=1)
    xy = {r["name"]: (r["mean_nfe"], 100 * r["accuracy"]) for r in rows}
    for row in rows:
        colour, marker, _ = STYLE[row["family"]]
        exits = row["exit_gamma"] is not None
        ax.scatter(*zip(xy[row["name"]]), s=70, marker=marker, edgecolors=colour, linewidths=1.6, zorder=3,
                   facecolors="none" if exits else colour)
        twin = xy.get(row["name"] + "_exit")
        if twin is not None:
            ax.annotate("", xy=twin, xytext=xy[row["name"]],
                        arrowprops={"arrowstyle": "->", "color": colour, "alpha": 0.35, "lw": 1, "shrinkB": 5})
    x_max = max(x for x, _ in xy.values())
    y_values = [y for _, y in xy.values()] + [ref_acc - match_points]
    pad = max(1.0, 0.06 * (max(y_values) - min(y_values)))
    ax.set_xlim(0, 1.1 * x_max)
    ax.set_ylim(min(y_values) - pad, max(y_values) + pad)
    ax.set_xlabel("Mean NFE per row (forward passes)")
    ax.set_ylabel("Held-out accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    gammas = sorted({r["exit_gamma"] for r in rows if r["exit_gamma"] is not None})
    handles = [Line2D([], [], ls="", marker=STYLE[f][1], color=STYLE[f][0], markersize=8, label=STYLE[f][2])
               for f in FAMILIES if any(r["family"] == f for r in rows)]
    handles.append(Line2D([], [], ls="", marker="o", color="0.3", markersize=8, label="no early exit"))
    if gammas:
        handles.append(Line2D([], [], ls="", marker="o", markerfacecolor="none", color="0.3", markersize=8,
                              label=f"early exit:\nH_UB < {', '.join(f'{g:.3g}' for g in gammas)} nats"))
    handles.append(Patch(color="0.9", label=f"within {match_points:g} pts\nof left-to-right k=1"))
    fig.legend(handles=handles, loc="outside right upper", fontsize=9)
    fig.draw_without_rendering()  # settle the layout so label boxes are measured where they will be drawn
    labels = [(*xy[r["name"]], _label(r), STYLE[r["family"]][0]) for r in rows if r["exit_gamma"] is None]
    _place_labels(ax, labels, list(xy.values()))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
