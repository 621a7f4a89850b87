"""Ablations: run a recipe's arms for several seeds (tables and plots: `rl.ablate_report`).

An ablation recipe names a base training recipe, overrides shared by every arm, and the arms themselves:

    base: recipes/tiny/grpo.yaml
    script: scripts/grpo.py
    common: {max_steps: 40, heldout_eval_steps: 10}
    reference_arm: outcome
    arms:
      outcome: {dense_coef: 0.0}
      dense_phi: {dense_coef: 0.1}

Every key of the base recipe, `common` and the arms must be a key of the script's recipe (read from
`rl/cli_help.json`, no heavy import): an unknown one fails before anything is launched, naming it. Each (arm, seed)
run gets a flat recipe (base + common + arm + seed + output_dir) written next to its outputs and is launched as its
own process (`accelerate launch` by default), so a crashed run is reported as failed (in the table too) while the
others complete. A finished run (one with `final/`) is not run again; one launched with another recipe or other
extra arguments (`run_recipe.yaml`, `run_args.json`) is an error before anything launches, never reported as this
ablation's. Each run's status and wall time go to its `run.json`. Results are read back from what every run writes
anyway:
`heldout/step*_rank*.jsonl` (held-out samples at each evaluation) and `rollouts/step*_rank*.jsonl` (training
rollouts with their NFE and rewards).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

import yaml

logger = logging.getLogger(__name__)


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
    parallel: int = 1  # runs at once (on 2 cores: 2 runs at cpu_threads 1 each beat 1 run at 2 threads)

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
        if self.parallel < 1:
            raise ValueError(f"parallel must be >= 1, got {self.parallel}.")
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


def script_keys(script: str) -> set[str] | None:
    """The recipe keys of an entry script (`scripts/grpo.py` -> the fields of its config classes); None for a
    script that is not one of the project's entry scripts."""
    help_file = os.path.join(os.path.dirname(__file__), "cli_help.json")
    with open(help_file) as f:
        info = json.load(f)
    name = os.path.splitext(os.path.basename(script))[0]
    if name not in info["scripts"]:
        return None
    return {flags[0].lstrip("-") for cls in info["scripts"][name] for flags, *_ in info["classes"][cls]}


def check_keys(ablation: Ablation) -> None:
    """Raise, naming the key and the closest known ones, if the base, `common` or an arm sets an unknown key."""
    known = script_keys(ablation.script)
    if known is None:
        logger.warning("%s is not a project entry script: its recipe keys are not checked.", ablation.script)
        return
    with open(ablation.base) as f:
        sources = {f"base recipe {ablation.base}": yaml.safe_load(f) or {}, "common": ablation.common}
    sources.update({f"arm {arm!r}": over for arm, over in ablation.arms.items()})
    for where, keys in sources.items():
        for key in keys:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=3)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                raise ValueError(f"{where} sets {key!r}, which {ablation.script} does not know.{hint} Nothing "
                                 "was launched.")


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


def _launch(ablation: Ablation, arm: str, seed: int, extra_args: list[str] | None) -> dict:
    """What defines one run: its flat recipe and the extra command-line arguments every run gets."""
    return {"recipe": run_recipe(ablation, arm, seed), "args": list(extra_args or [])}


def _launched(out: str) -> dict | None:
    """The launch an existing run folder records (`run_recipe.yaml`, `run_args.json`); None if it records none."""
    paths = [os.path.join(out, name) for name in ("run_recipe.yaml", "run_args.json")]
    if not all(os.path.isfile(p) for p in paths):
        return None
    with open(paths[0]) as f, open(paths[1]) as g:
        return {"recipe": yaml.safe_load(f), "args": json.load(g)}


def _prepare(ablation: Ablation, arm: str, seed: int, extra_args: list[str] | None) -> list[str]:
    """The command of one unfinished run, after writing its recipe and arguments.

    An earlier attempt with the same recipe and arguments continues from its last complete checkpoint (`--resume`,
    fresh if it has none: a Ctrl-C'd ablation loses at most each run's current step); one launched differently is
    removed (its step logs would mix with the new ones)."""
    out = run_dir(ablation, arm, seed)
    launch = _launch(ablation, arm, seed, extra_args)
    resume = False
    if os.path.isdir(out):
        resume = _launched(out) == launch
        if resume:
            logger.info("%s seed %d: continuing the unfinished run in %s.", arm, seed, out)
        else:
            logger.info("%s seed %d: removing the unfinished run in %s (launched with another recipe or other "
                        "arguments).", arm, seed, out)
            shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "run_recipe.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(launch["recipe"], f, sort_keys=False)
    with open(os.path.join(out, "run_args.json"), "w") as f:
        json.dump(launch["args"], f)
    flags = ["--resume", "--fresh_if_no_checkpoint"] if resume else []
    return [*shlex.split(ablation.launcher), ablation.script, path, *flags, *launch["args"]]


def run_all(ablation: Ablation, extra_args: list[str] | None = None) -> list[dict]:
    """Launch every (arm, seed) run not finished yet, `parallel` at a time; returns one status record per run.

    Seed-major order (every arm's seed 0, then every arm's seed 1, ...): an ablation stopped part-way leaves every
    arm with the same seeds, so the finished runs still compare paired."""
    check_keys(ablation)
    start = time.perf_counter()
    order = [(a, s) for s in range(ablation.seeds) for a in ablation.arms]
    records: dict[tuple[str, int], dict] = {}
    queue, running = [], {}  # running: (arm, seed) -> (process, log file, start time)
    stale = []
    for arm, seed in order:
        out = run_dir(ablation, arm, seed)
        if not os.path.isdir(os.path.join(out, "final")):
            queue.append((arm, seed))
        elif _launched(out) != _launch(ablation, arm, seed, extra_args):
            stale.append(out)
        else:
            logger.info("%s seed %d: already finished, skipped.", arm, seed)
            records[(arm, seed)] = {"arm": arm, "seed": seed, "status": "done"}
    if stale:
        raise ValueError(f"Finished run(s) {stale} were launched with another recipe or other arguments (or record "
                         "none) than this ablation gives them now, so their results would be reported as this "
                         "ablation's. Remove them or use another --output_dir. Nothing was launched.")
    total = len(queue)
    try:
        while queue or running:
            while queue and len(running) < ablation.parallel:
                arm, seed = queue.pop(0)
                cmd = _prepare(ablation, arm, seed, extra_args)  # written at launch: a stopped ablation leaves
                # no prepared-but-never-run folders behind
                logger.info("[%d/%d] %s seed %d: %s", total - len(queue), total, arm, seed, shlex.join(cmd))
                log = open(os.path.join(run_dir(ablation, arm, seed), "train.log"), "a")
                running[(arm, seed)] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log,
                                        time.perf_counter())
            time.sleep(0.2)
            for (arm, seed), (proc, log, t0) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                log.close()
                del running[(arm, seed)]
                out, took = run_dir(ablation, arm, seed), time.perf_counter() - t0
                status = "ok" if code == 0 else f"failed (exit {code}, see {out}/train.log)"
                logger.info("%s seed %d: %s in %.0f s (%.0f s elapsed).", arm, seed, status, took,
                            time.perf_counter() - start)
                records[(arm, seed)] = {"arm": arm, "seed": seed, "status": status, "seconds": round(took, 1)}
                with open(os.path.join(out, "run.json"), "w") as f:
                    json.dump(records[(arm, seed)], f)
    finally:  # interrupted (Ctrl-C, SIGTERM, an error here): no run outlives the ablation, half-written
        for proc, log, _ in running.values():
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
    return [records[(a, s)] for a in ablation.arms for s in range(ablation.seeds)]  # grouped by arm


def default_launcher() -> str:
    """`accelerate launch` through this interpreter (works without the venv's bin on PATH)."""
    return f"{shlex.quote(sys.executable)} -m accelerate.commands.launch"
