"""Rollout throughput and peak memory with and without the KV cache, on a shape-realistic thin model on CPU.

The model is a random bidirectional Gemma3 with LLaDA's vocabulary (126,464) and a few narrow layers; the canvas is
LLaDA's GSM8K protocol: a 256-token prompt, 256 reasoning positions in semi-AR blocks of 32, a 16-token answer
block. A random model's predictions are near-uniform, so its output layer is scaled to put the median per-position
entropy near `--target_entropy` nats (MED then has confident and unconfident positions to tell apart); the exit
threshold is the median H_UB of the first forward, so some rows exit.

Every configuration - no cache / prefix cache / dual cache x k=1 / MED / MED + exit - runs in a fresh child process
(one thread): rows/s from the child's CPU time (robust to other jobs on the machine; wall time is reported too),
peak RSS over the sampler call (VmHWM reset just before it, minus the resident set then), NFE and tokens per NFE,
canvas columns run through the model. Speed-ups are ratios within this one run. The last line is JSON.

    python scripts/bench_rollout.py                  # the full shape (slow on a shared CPU: k=1 takes 272 steps)
    python scripts/bench_rollout.py --quick          # a CI-sized smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

POLICIES = {"k1": {"policy": "left_to_right", "k": 1}, "med": {"policy": "med", "med_lambda": 0.2, "med_k_max": 8},
            "med_exit": {"policy": "med", "med_lambda": 0.2, "med_k_max": 8, "exit": True}}
CACHES = {"none": None, "prefix": "prefix", "dual": "dual"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes (a smoke run of every configuration)")
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--prompt_length", type=int, default=256)
    p.add_argument("--reasoning_length", type=int, default=256)
    p.add_argument("--answer_length", type=int, default=16)
    p.add_argument("--block_length", type=int, default=32)
    p.add_argument("--vocab", type=int, default=126464)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--target_entropy", type=float, default=0.3)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--policies", nargs="+", default=list(POLICIES))
    p.add_argument("--caches", nargs="+", default=list(CACHES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.prompt_length, args.reasoning_length, args.answer_length = 2, 16, 32, 4
        args.block_length, args.vocab, args.hidden, args.layers = 8, 512, 32, 2
    return args


def setup(args):
    """(adapter, canvas, exit_gamma): the thin model with its output layer scaled to the target entropy."""
    import torch
    from bench_memory import thin_model
    from bench_sampler import make_canvas

    from rollout import MDLMAdapter

    model = thin_model(args.vocab, args.hidden, args.layers, seed=args.seed, tie=False)
    gen = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(3, args.vocab - 2, (args.prompt_length,), generator=gen).tolist()
               for _ in range(args.rows)]
    adapter = MDLMAdapter(model, mask_id=args.vocab - 1, pad_id=0, eos_ids=(1,), max_length=4096)
    canvas = make_canvas(prompts, args.reasoning_length, args.answer_length, adapter.mask_id, adapter.pad_id)
    with torch.no_grad():
        read = adapter.readout(canvas.input_ids, canvas.attention_mask, canvas.gen_length)
        hidden = read.hidden.reshape(-1, read.hidden.shape[-1])[:: max(1, read.hidden.shape[1] // 16)]
        logits = model.lm_head(hidden).float()
        lo, hi = 1e-3, 1e3  # scale s: median entropy of softmax(s * logits) at the target
        for _ in range(40):
            mid = (lo * hi) ** 0.5
            entropy = torch.special.entr(torch.softmax(logits * mid, -1)).sum(-1).median().item()
            lo, hi = (mid, hi) if entropy > args.target_entropy else (lo, mid)
        model.lm_head.weight.mul_((lo * hi) ** 0.5)
        read = adapter.readout(canvas.input_ids, canvas.attention_mask, canvas.gen_length)
        a = canvas.answer
        ent = torch.special.entr(torch.softmax(read.hidden[:, a] @ model.lm_head.weight.T, -1)).sum(-1).sum(-1)
    return adapter, canvas, float(ent.median())


def run_child(spec: dict) -> dict:
    import torch
    from bench_memory import _settle_and_reset_peak, _status_kb

    from rollout import SamplerConfig, sample

    torch.set_num_threads(1)
    args = parse_args(spec["argv"])
    adapter, canvas, exit_gamma = setup(args)
    policy = dict(POLICIES[spec["policy"]])
    use_exit = policy.pop("exit", False)
    config = SamplerConfig(**policy, block_length=args.block_length, temperature=args.temperature,
                           exit_gamma=exit_gamma if use_exit else None, kv_cache=CACHES[spec["cache"]])
    seeds = list(range(args.rows))
    base = _settle_and_reset_peak()
    cpu0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    out = sample(adapter, canvas, config, seeds=seeds)
    cpu1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - wall0
    peak = _status_kb("VmHWM")
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {
        "rows_per_cpu_s": round(args.rows / cpu, 4), "rows_per_wall_s": round(args.rows / wall, 4),
        "cpu_s": round(cpu, 2), "peak_rss_mb": round((peak - base) / 1024, 1),
        "nfe_per_row": round(out.nfe.float().mean().item(), 2),
        "tokens_per_nfe": round(out.stats["tokens_decoded"] / max(1, out.stats["row_forwards"]), 3),
        "exit_rate": round(out.exited.float().mean().item(), 3), "columns_run": out.stats["columns_run"],
        "exit_gamma": round(exit_gamma, 4) if use_exit else None,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return {}
    argv = list(argv if argv is not None else sys.argv[1:])
    results = {}
    for policy in args.policies:
        for cache in args.caches:
            spec = {"policy": policy, "cache": cache, "argv": argv}
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
            env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")  # see bench_memory.py
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode:
                results[f"{policy}/{cache}"] = {"error": proc.stderr.strip().splitlines()[-1:]}
            else:
                results[f"{policy}/{cache}"] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(json.dumps({f"{policy}/{cache}": results[f"{policy}/{cache}"]}), file=sys.stderr, flush=True)
    for policy in args.policies:
        base = results.get(f"{policy}/none", {}).get("rows_per_cpu_s")
        for cache in args.caches:
            r = results[f"{policy}/{cache}"]
            if base and "rows_per_cpu_s" in r:
                r["speedup_vs_no_cache"] = round(r["rows_per_cpu_s"] / base, 2)
    shape = {k: getattr(args, k) for k in ("rows", "prompt_length", "reasoning_length", "answer_length",
                                          "block_length", "vocab", "hidden", "layers", "temperature")}
    return {"model": "random bidirectional Gemma3 (thin), CPU, 1 thread", **shape, "results": results}


if __name__ == "__main__":
    out = main()
    if out:
        print(json.dumps(out))
