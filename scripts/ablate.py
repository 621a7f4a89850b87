"""Ablations: run every arm of an ablation recipe for N seeds, then write a results table and learning curves.

    python scripts/ablate.py recipes/ablations/tiny_credit.yaml
    python scripts/ablate.py recipes/ablations/tiny_credit.yaml --report_only   # re-read finished runs

Writes under the recipe's output_dir: <arm>/seed<k>/ (each run's outputs, run_recipe.yaml, train.log),
results.csv and results.md (final held-out accuracy mean ± std; steps and cumulative rollout NFE to reach the
reference arm's final accuracy) and curves.png (held-out accuracy and train reward vs step and vs rollout NFE,
shaded ± 1 std across seeds). Finished runs (with final/) are skipped and unfinished ones continue from their last
checkpoint, so an interrupted ablation resumes; a run launched with another recipe or other extra arguments
starts over if unfinished and is an error if finished (pick another --output_dir).
The last stdout line is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys


def main(argv: list[str] | None = None) -> dict:
    from rl.ablate import load_ablation, run_all
    from rl.ablate_report import report

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="Ablation recipe (base, script, common, arms, reference_arm, ...).")
    parser.add_argument("--seeds", type=int, default=None, help="Seeds per arm (default: the recipe's, else 3).")
    parser.add_argument("--parallel", type=int, default=None,
                        help="Runs at once (default: the recipe's; 1 when another ablation shares the cores).")
    parser.add_argument("--output_dir", default=None, help="Where runs and results go (default: the recipe's).")
    parser.add_argument("--launcher", default=None, help="Command prefix before the training script "
                        "(default: accelerate launch; e.g. 'python' to run in a plain process).")
    parser.add_argument("--report_only", action="store_true", help="Only tabulate and plot finished runs.")
    parser.add_argument("--title", default=None, help="Plot title (default: the output folder's name).")
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # stops the running runs too
    ablation = load_ablation(args.recipe, seeds=args.seeds, output_dir=args.output_dir, launcher=args.launcher,
                             parallel=args.parallel)
    runs = [] if args.report_only else run_all(ablation, extra)
    summary = report(ablation, args.title)
    summary["runs"] = runs
    failed = [r for r in runs if r["status"] not in ("ok", "done")]
    if failed:
        logging.getLogger("ablate").warning("%d run(s) failed: %s", len(failed), failed)
    return summary


if __name__ == "__main__":
    result = main()
    print(json.dumps(result, default=str))
    sys.exit(1 if any(r["status"] not in ("ok", "done") for r in result["runs"]) else 0)
