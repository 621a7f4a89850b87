"""Throughput of the outcome rewards on the reference data: GSM8K and MATH-500 (math-verify in the worker pool) and
HumanEval canonical solutions (each in a sandbox, its tests in a trusted judge: two interpreters per sample).

    python scripts/bench_rewards.py                 # everything: 2 x 1319 GSM8K, 2 x 500 MATH, 164 HumanEval
    python scripts/bench_rewards.py --quick         # a subset, < 1 minute on 2 cores
    python scripts/bench_rewards.py --data /path/to/data --workers 4

Each math set is scored twice: once with the gold answer as the completion (all must be 1.0) and once perturbed
(GSM8K: the number + 1; MATH: the next problem's answer). Worker start-up is timed separately. Prints one JSON
object as the last line of stdout: rewards per second per set, CPU milliseconds per sample (this process and
its children: steadier than wall time on a shared machine), counts, accuracies, start-up seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="folder of the jsonl files")
    p.add_argument("--quick", action="store_true", help="200 GSM8K, 100 MATH, 32 HumanEval samples")
    p.add_argument("--workers", type=int, default=None, help="math worker processes / parallel sandboxes")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per math sample")
    return p.parse_args(argv)


def load(path: Path, limit: int | None) -> list[dict]:
    if not path.exists():
        raise SystemExit(f"{path} not found; pass --data pointing at the folder with the reference jsonl files.")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the math workers count once they exit)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(fn, *args, **kwargs) -> tuple[list, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    log = logging.getLogger("bench_rewards")

    from rewards.code_reward import CodeReward
    from rewards.common import close_pools
    from rewards.math_reward import MathReward

    reward = MathReward(timeout=args.timeout, num_workers=args.workers)
    _, startup = timed(reward, ["1"], answer=["1"])  # start the workers
    result: dict = {"quick": args.quick, "math_workers": reward.pool.num_workers, "math_startup_seconds": startup}

    gsm = load(args.data / "gsm8k_test.jsonl", 200 if args.quick else None)
    gold = [r["answer"] for r in gsm]
    finals = [g.rsplit("####", 1)[1].strip().replace(",", "") for g in gold]
    completions = [f"... so the answer is {n}." for n in finals] + [f"The answer is {int(n) + 1}." for n in finals]
    scores, seconds = timed(reward, completions, answer=gold + gold)
    result["gsm8k"] = summary(scores, seconds, len(gsm))
    log.info("gsm8k: %s", result["gsm8k"])

    m500 = load(args.data / "math500_test.jsonl", 100 if args.quick else None)
    answers = [r["answer"] for r in m500]
    shifted = answers[1:] + answers[:1]
    completions = [f"Hence \\boxed{{{a}}}." for a in answers + shifted]
    scores, seconds = timed(reward, completions, answer=answers + answers)
    result["math"] = summary(scores, seconds, len(m500))
    log.info("math: %s", result["math"])
    close_pools()

    code = CodeReward(max_workers=args.workers)
    he = load(args.data / "humaneval.jsonl", 32 if args.quick else None)
    columns = {k: [r[k] for r in he] for k in ("prompt", "test", "entry_point")}
    warm = {"prompt": ["def f():\n"], "test": ["def check(f):\n    pass\n"], "entry_point": ["f"]}
    _, result["sandbox_startup_seconds"] = timed(code, ["    return 1\n"], **warm)  # probes what Python reads
    cpu = cpu_seconds()
    scores, seconds = timed(code, [r["canonical_solution"] for r in he], **columns)
    result["humaneval"] = {
        "samples": len(he), "seconds": seconds, "samples_per_second": len(he) / seconds,
        "cpu_ms_per_sample": 1000 * (cpu_seconds() - cpu) / len(he),
        "pass_rate": sum(s == 1.0 for s in scores) / len(he), "unscorable": sum(s is None for s in scores),
        "guards": code.last_results[0].guards if code.last_results else [],
    }
    log.info("humaneval: %s", result["humaneval"])
    print(json.dumps(result))
    return result


def summary(scores: list, seconds: float, n: int) -> dict:
    """First half of `scores` is gold-as-completion (should be 1.0), second half perturbed (should be 0.0)."""
    return {
        "samples": len(scores), "seconds": seconds, "rewards_per_second": len(scores) / seconds,
        "gold_accuracy": sum(s == 1.0 for s in scores[:n]) / n,
        "perturbed_accuracy": sum(s == 1.0 for s in scores[n:]) / n,
        "unscorable": sum(s is None for s in scores),
    }


if __name__ == "__main__":
    main()
