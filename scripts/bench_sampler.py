"""Benchmark the batched sampler: unmasking policies side by side on the same prompts and model.

Prints one JSON object as its last line: per policy NFE per row, tokens per NFE, rows/s and exit rate, plus
`sampler_overhead` (fraction of sampler wall time outside model forwards) and `batch_speedup` (16 rows in
one batch versus the same 16 rows one at a time).

    python scripts/bench_sampler.py --quick                 # random tiny bidirectional model on CPU
    python scripts/bench_sampler.py --model outputs/tiny/sft  # a saved model directory (+ its tokenizer)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

POLICIES = {
    "left_to_right_k1": {"policy": "left_to_right", "k": 1},
    "entropy_k2": {"policy": "entropy", "k": 2},
    "med_0.2": {"policy": "med", "med_lambda": 0.2},
    "med_0.2_exit": {"policy": "med", "med_lambda": 0.2, "exit": True},
    "eb_0.1": {"policy": "eb", "eb_gamma": 0.1},
    "threshold_0.9": {"policy": "threshold", "tau": 0.9},
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="saved model directory (default: a random tiny bidirectional Gemma3)")
    p.add_argument("--quick", action="store_true", help="small sizes for a CPU smoke run (< 2 minutes)")
    p.add_argument("--rows", type=int, default=16, help="prompts per batch")
    p.add_argument("--reasoning-length", type=int, default=None)
    p.add_argument("--answer-length", type=int, default=None)
    p.add_argument("--block-length", type=int, default=None)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--exit-gamma", type=float, default=None, help="H_UB exit threshold for the *_exit policy")
    p.add_argument("--logit-scale", type=float, default=100.0, help="random model: sharpen logits so entropies vary")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def random_setup(args, device):
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from rollout import MDLMAdapter

    torch.manual_seed(args.seed)
    vocab, hidden, layers = (64, 64, 2) if args.quick else (512, 256, 6)
    config = Gemma3TextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=1024,
        use_bidirectional_attention=True, layer_types=["full_attention"] * layers, final_logit_softcapping=None,
    )
    model = Gemma3ForCausalLM(config).to(device).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(args.logit_scale)
    mask_id, pad_id = vocab - 1, 0
    gen = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(4, 24, (args.rows,), generator=gen).tolist()
    prompts = [torch.randint(3, vocab - 2, (n,), generator=gen).tolist() for n in lengths]
    return MDLMAdapter(model, mask_id=mask_id, pad_id=pad_id, eos_ids=(1,), max_length=1024), prompts


def make_canvas(prompts, R, A, mask_id, pad_id, delimiter=(2, 2)):
    """Token-level canvas (the random model has no tokenizer): [pad][prompt][R masks][delim][A masks]."""
    import torch

    from rollout import Canvas

    P = max(len(p) for p in prompts)
    gen = [mask_id] * R + list(delimiter) + [mask_id] * A
    ids = torch.full((len(prompts), P + len(gen)), pad_id, dtype=torch.long)
    am = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, P - len(p) : P] = torch.tensor(p)
        am[i, P - len(p) :] = 1
    ids[:, P:] = torch.tensor(gen)
    answer = slice(R + len(delimiter), R + len(delimiter) + A)
    return Canvas(ids, am, P, slice(0, R), answer, None, mask_id)


def model_setup(args, device):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollout import MDLMAdapter

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device).eval()
    adapter = MDLMAdapter.from_pretrained(model, tokenizer)
    gen = torch.Generator().manual_seed(args.seed)
    ids = [i for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids]
    lengths = torch.randint(8, 32, (args.rows,), generator=gen).tolist()
    prompts = [[ids[j] for j in torch.randint(0, len(ids), (n,), generator=gen).tolist()] for n in lengths]
    return adapter, prompts


def run(adapter, canvas, config, seeds):
    from rollout import sample

    start = time.perf_counter()
    out = sample(adapter, canvas, config, seeds=seeds)
    return out, time.perf_counter() - start


def main() -> None:
    args = parse_args()
    import torch

    from rollout import SamplerConfig

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_grad_enabled(False)
    adapter, prompts = model_setup(args, device) if args.model else random_setup(args, device)
    R = args.reasoning_length or (32 if args.quick else 128)
    A = args.answer_length or (4 if args.quick else 8)
    canvas = make_canvas(prompts, R, A, adapter.mask_id, adapter.pad_id)
    seeds = list(range(args.seed, args.seed + len(prompts)))
    run(adapter, canvas, SamplerConfig(policy="left_to_right", k=R + A), seeds)  # warm-up

    # Exit threshold: by default the 25th percentile of H_UB seen by a k=1 run, so some rows exit.
    probe, _ = run(adapter, canvas, SamplerConfig(policy="entropy", temperature=args.temperature), seeds)
    hub = probe.h_ub[~torch.isnan(probe.h_ub)]
    exit_gamma = args.exit_gamma or float(hub.quantile(0.25))

    results, fwd_total, wall_total = {}, 0.0, 0.0
    for name, spec in POLICIES.items():
        spec = dict(spec)
        use_exit = spec.pop("exit", False)
        config = SamplerConfig(**spec, block_length=args.block_length, temperature=args.temperature,
                               exit_gamma=exit_gamma if use_exit else None)
        out, wall = run(adapter, canvas, config, seeds)
        fwd_total += out.stats["forward_seconds"]
        wall_total += wall
        results[name] = {
            "nfe_per_row": round(out.nfe.float().mean().item(), 2),
            "tokens_per_nfe": round(out.stats["tokens_decoded"] / out.stats["row_forwards"], 3),
            "rows_per_s": round(len(prompts) / wall, 2),
            "exit_rate": round(out.exited.float().mean().item(), 3),
        }

    med = SamplerConfig(policy="med", med_lambda=0.2, temperature=args.temperature)
    _, batched = run(adapter, canvas, med, seeds)
    one_by_one = 0.0
    for i, p in enumerate(prompts):
        single = make_canvas([p], R, A, adapter.mask_id, adapter.pad_id)
        one_by_one += run(adapter, single, med, [seeds[i]])[1]

    print(json.dumps({
        "device": device,
        "model": args.model or "random-gemma3-bidirectional",
        "rows": len(prompts), "reasoning_length": R, "answer_length": A, "exit_gamma": round(exit_gamma, 4),
        "policies": results,
        "sampler_overhead": round(1 - fwd_total / wall_total, 4),
        "batch_speedup": round(one_by_one / batched, 2),
    }))


if __name__ == "__main__":
    main()
