"""GPU benchmark on a random-initialised 8B-shaped bidirectional model (bf16): forward cost, rollout throughput,
sampler overhead and the peak memory of one LoRA GRPO step. Prints one JSON object as its last line.

    python scripts/bench_gpu.py                 # LLaDA-8B-shaped (hidden 4096, 32 layers, vocab 126464) on CUDA
    python scripts/bench_gpu.py --tiny          # the same measurements on a tiny model (CPU smoke run)

Measured:
- `ms_per_nfe`: one forward of G rows x L tokens (default 8 x 256), median of `--repeats`.
- `rollouts`: left-to-right k=1, MED and MED + early exit on the same canvas (R reasoning + A answer positions):
  NFE per row, tokens per NFE, rows/s and tokens/s, exit rate, sampler overhead (share of wall time outside the
  model forwards). A random model's distributions are near-uniform, so the logits are divided by a fixed
  temperature chosen (by bisection on one forward) to put the median per-token entropy at `--target_entropy`
  nats: MED then has confident and unconfident positions to tell apart. The exit threshold is the 25th
  percentile of H_UB seen by the k=1 run.
- `cache`: k=1 / MED / MED + exit with no KV cache, the prefix cache and the dual cache (`kv_cache`), side by side:
  rows/s, speed-up over no cache at the same policy, and the peak CUDA memory of each rollout batch.
- `grpo_step`: one diffusion GRPO step through `DiffusionGRPOTrainer` with LoRA (r=128, alpha=64 on every linear
  layer), gradient checkpointing and bf16: wall seconds and peak CUDA memory; `update_memory`: the peak of the
  update alone (the rollout batch generated first, then the loss's forward and backward), with the trajectory
  estimator at S=8 contiguous buckets and at S=8 sampled steps - the memory envelope of docs/memory.md.

`--code DIR` imports the library (rollout/, rl/, rewards/) from another checkout, e.g. the revision before the
logits-only change, so its peaks can be set side by side with these (the cache rows are skipped when that code has
no `kv_cache`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

SHAPES = {  # LLaDA-8B: 32 layers, hidden 4096, MLP 12288, 32 heads; vocab 126464
    "8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, head_dim=128, vocab_size=126464),
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=512),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny model (CPU smoke run) instead of the 8B shape")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--rows", type=int, default=8, help="G: rows per forward and per rollout batch")
    p.add_argument("--tokens", type=int, default=256, help="L: tokens per row for ms_per_nfe")
    p.add_argument("--reasoning_length", type=int, default=None, help="R (default 224; 24 with --tiny)")
    p.add_argument("--answer_length", type=int, default=None, help="A (default 16; 4 with --tiny)")
    p.add_argument("--block_length", type=int, default=None, help="semi-AR blocks (default 32; 8 with --tiny)")
    p.add_argument("--med_lambda", type=float, default=0.2)
    p.add_argument("--target_entropy", type=float, default=0.3, help="median per-token entropy (nats)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--skip_grpo", action="store_true", help="skip the LoRA GRPO step")
    p.add_argument("--skip_cache", action="store_true", help="skip the KV-cache comparison")
    p.add_argument("--code", default=None, help="import the library from this checkout instead (side by side)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_model(shape: dict, device, dtype):
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    layers = shape["num_hidden_layers"]
    config = Gemma3TextConfig(**shape, max_position_embeddings=4096, use_bidirectional_attention=True,
                              layer_types=["full_attention"] * layers, final_logit_softcapping=None)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # initialise on the device: an 8B model initialises in seconds on a GPU
            model = Gemma3ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def _sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def ms_per_forward(adapter, vocab: int, rows: int, tokens: int, repeats: int, device) -> float:
    import torch

    ids = torch.randint(0, vocab, (rows, tokens), device=device)  # the first quarter: a random "prompt"
    ids[:, tokens // 4 :] = adapter.mask_id
    am = torch.ones_like(ids)
    times = []
    with torch.no_grad():
        for i in range(repeats + 2):
            _sync(device)
            start = time.perf_counter()
            adapter.logits(ids, am, tokens - tokens // 4)
            _sync(device)
            if i >= 2:  # two warm-up forwards
                times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def calibrate_temperature(adapter, canvas, target: float) -> float:
    """Logit temperature putting the median masked-position entropy of one forward at `target` nats."""
    import torch

    with torch.no_grad():
        logits = adapter.logits(canvas.input_ids, canvas.attention_mask, canvas.gen_length).float()
    lo, hi = 1e-4, 10.0
    for _ in range(40):
        mid = (lo * hi) ** 0.5
        entropy = torch.special.entr(torch.softmax(logits / mid, -1)).sum(-1).median().item()
        lo, hi = (mid, hi) if entropy < target else (lo, mid)
    return (lo * hi) ** 0.5


def rollouts(adapter, canvas, args, temperature: float, device) -> tuple[dict, float]:
    import torch

    from rollout import SamplerConfig, sample

    seeds = list(range(args.seed, args.seed + canvas.input_ids.shape[0]))
    block = args.block_length
    probe = sample(adapter, canvas, SamplerConfig(policy="left_to_right", temperature=temperature), seeds=seeds)
    hub = probe.h_ub[~torch.isnan(probe.h_ub)]
    exit_gamma = float(hub.quantile(0.25))
    configs = {
        "left_to_right_k1": SamplerConfig(policy="left_to_right", temperature=temperature),
        f"med_{args.med_lambda}": SamplerConfig(policy="med", med_lambda=args.med_lambda, block_length=block,
                                                temperature=temperature),
        f"med_{args.med_lambda}_exit": SamplerConfig(policy="med", med_lambda=args.med_lambda, block_length=block,
                                                     temperature=temperature, exit_gamma=exit_gamma),
    }
    results = {}
    for name, config in configs.items():
        _sync(device)
        start = time.perf_counter()
        out = sample(adapter, canvas, config, seeds=seeds)
        _sync(device)
        wall = time.perf_counter() - start
        rows = canvas.input_ids.shape[0]
        results[name] = {
            "nfe_per_row": round(out.nfe.float().mean().item(), 2),
            "tokens_per_nfe": round(out.stats["tokens_decoded"] / max(1, out.stats["row_forwards"]), 3),
            "rows_per_s": round(rows / wall, 3),
            "tokens_per_s": round(out.stats["tokens_decoded"] / wall, 1),
            "exit_rate": round(out.exited.float().mean().item(), 3),
            "sampler_overhead": round(1 - out.stats["forward_seconds"] / wall, 4),
            "wall_s": round(wall, 3),
        }
    base = results["left_to_right_k1"]["rows_per_s"]
    for r in results.values():
        r["speedup_vs_k1"] = round(r["rows_per_s"] / base, 2)
    return results, exit_gamma


def _peak_reset(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if str(device).startswith("cuda") else None


def cache_rollouts(adapter, canvas, args, temperature: float, exit_gamma: float, device) -> dict:
    """k=1 / MED / MED + exit x no cache / prefix / dual on the same canvas: rows/s and peak memory."""
    from rollout import SamplerConfig, sample

    seeds = list(range(args.seed, args.seed + canvas.input_ids.shape[0]))
    policies = {"k1": {"policy": "left_to_right"}, "med": {"policy": "med", "med_lambda": args.med_lambda},
                "med_exit": {"policy": "med", "med_lambda": args.med_lambda, "exit_gamma": exit_gamma}}
    results = {}
    for name, spec in policies.items():
        for cache in (None, "prefix", "dual"):
            config = SamplerConfig(**spec, block_length=args.block_length, temperature=temperature, kv_cache=cache)
            _peak_reset(device)
            start = time.perf_counter()
            out = sample(adapter, canvas, config, seeds=seeds)
            _sync(device)
            wall = time.perf_counter() - start
            results[f"{name}/{cache or 'none'}"] = {
                "rows_per_s": round(len(seeds) / wall, 3), "nfe_per_row": round(out.nfe.float().mean().item(), 2),
                "peak_memory_gib": _peak_gib(device), "columns_run": out.stats.get("columns_run"),
            }
        base = results[f"{name}/none"]["rows_per_s"]
        for cache in ("none", "prefix", "dual"):
            r = results[f"{name}/{cache}"]
            r["speedup_vs_no_cache"] = round(r["rows_per_s"] / base, 2)
    return results


def update_memory(model, rows_tok, args, device, bf16: bool) -> dict:
    """Peak memory of one GRPO update alone (rollouts generated first), trajectory S=8 buckets and S=8 sampled steps.
    LoRA r=128 on every linear layer, gradient checkpointing, beta 0; tokens in the loss and bytes per such token."""
    from bench_memory import _text_hash  # the same cheap deterministic reward as the CPU envelope

    out = {}
    for sampled in (False, True):
        with tempfile.TemporaryDirectory() as out_dir:
            trainer = _trainer(model, rows_tok, args, device, bf16, out_dir, reward=_text_hash, trajectory_buckets=8,
                               trajectory_sample_steps=sampled, skip_zero_advantage_rows=False)
            trainer.model.train()
            trainer.current_gradient_accumulation_steps = 1  # set by `train()`, read by TRL's loss
            batch = trainer._generate_and_score_completions([rows_tok[0][0]] * args.rows)
            tokens = int(batch["tool_mask"].sum())
            _peak_reset(device)
            trainer.compute_loss(trainer.model, batch).backward()
            _sync(device)
            peak = _peak_gib(device)
            _release(trainer)
        out["sampled_steps" if sampled else "buckets"] = {
            "peak_memory_gib": peak, "loss_tokens": tokens,
            "bytes_per_loss_token": None if peak is None else round(peak * 2**30 / max(1, tokens))}
    return out


def _trainer(model, rows_tok, args, device, bf16: bool, out_dir: str, reward, **overrides):
    """A LoRA (r=128, every linear layer) diffusion GRPO trainer of one step on `model`."""
    from datasets import Dataset
    from peft import LoraConfig

    from rl.config import DiffusionGRPOConfig
    from rl.trainer import DiffusionGRPOTrainer

    rows, tokenizer = rows_tok
    settings = dict(output_dir=out_dir, use_cpu=not str(device).startswith("cuda"), bf16=bf16,
                    per_device_train_batch_size=args.rows, num_generations=args.rows, max_steps=1,
                    reasoning_length=args.reasoning_length, answer_length=args.answer_length,
                    block_length=args.block_length, policy="med", med_lambda=args.med_lambda, learning_rate=1e-5,
                    beta=0.0, report_to=[], save_strategy="no", logging_steps=1, gradient_checkpointing=True,
                    trajectory_buckets=4, seed=args.seed, rollout_log_dir="")
    config = DiffusionGRPOConfig(**{**settings, **overrides})
    peft = LoraConfig(r=128, lora_alpha=64, target_modules="all-linear")  # no task type: PEFT wraps any model
    model.train()
    return DiffusionGRPOTrainer(model=model, reward_funcs=[reward], args=config, train_dataset=Dataset.from_list(rows),
                                processing_class=tokenizer, peft_config=peft)


def _release(trainer) -> None:
    """Take the LoRA layers out of the base model again (the next measurement wraps it afresh), free the rest."""
    import gc

    import torch

    trainer.model.unload()
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def grpo_step(model, tokenizer_texts, args, device, bf16: bool) -> dict:
    """One LoRA GRPO step through the trainer; peak CUDA memory (None on CPU) and wall time."""
    with tempfile.TemporaryDirectory() as out:
        trainer = _trainer(model, tokenizer_texts, args, device, bf16, out, reward=_math())
        _peak_reset(device)
        start = time.perf_counter()
        trainer.train()
        _sync(device)
        wall = time.perf_counter() - start
        peak = _peak_gib(device)
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        _release(trainer)
    return {"rows": args.rows, "wall_s": round(wall, 2), "peak_memory_gib": peak,
            "trainable_params": trainable, "lora_r": 128, "gradient_checkpointing": True}


def _math():
    from rewards.registry import get_reward

    return get_reward("math")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.code:
        sys.path.insert(0, str(Path(args.code).resolve()))
    import torch

    from rl.tasks import TaskConfig, load_task
    from rl.tokenizer import build_tokenizer
    from rollout import MDLMAdapter, TemplateConfig, build_canvas

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    args.reasoning_length = args.reasoning_length or (24 if args.tiny else 224)
    args.answer_length = args.answer_length or (4 if args.tiny else 16)
    args.block_length = args.block_length or (8 if args.tiny else 32)
    shape = dict(SHAPES["tiny" if args.tiny else "8b"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(args.seed)

    # Prompts and a word-level tokenizer from the arithmetic task; the model's vocabulary is the 8B one (larger
    # than the tokenizer's: the extra rows are never produced by the tokenizer but cost what they cost).
    data = load_task(TaskConfig(train_size=max(64, args.rows), test_size=8), split="train").dataset
    rows = [dict(r) for r in data]
    tokenizer = build_tokenizer([t for r in rows for t in (r["prompt"], r["reasoning"], r["answer"])]
                                + ["The answer is"])
    shape["vocab_size"] = max(shape["vocab_size"], len(tokenizer))
    model = build_model(shape, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    adapter = MDLMAdapter.from_pretrained(model, tokenizer)

    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "model": f"random Gemma3 bidirectional, {'tiny' if args.tiny else '8B-shaped'}",
              "params_billion": round(params / 1e9, 3), "dtype": str(dtype).replace("torch.", ""),
              "rows": args.rows, "tokens": args.tokens}
    ms = ms_per_forward(adapter, len(tokenizer), args.rows, args.tokens, args.repeats, device)
    result["ms_per_nfe"] = round(ms, 2)

    template = TemplateConfig(reasoning_length=args.reasoning_length, answer_length=args.answer_length)
    canvas = build_canvas(tokenizer, [r["prompt"] for r in rows[: args.rows]], template, adapter.mask_id,
                          answers=[r["answer"] for r in rows[: args.rows]]).to(device)
    temperature = calibrate_temperature(adapter, canvas, args.target_entropy)
    result["logit_temperature"] = round(temperature, 5)
    result["rollouts"], result["exit_gamma"] = rollouts(adapter, canvas, args, temperature, device)
    result["exit_gamma"] = round(result["exit_gamma"], 4)
    from rollout import SamplerConfig

    if not args.skip_cache and "kv_cache" in SamplerConfig.__dataclass_fields__:
        result["cache"] = cache_rollouts(adapter, canvas, args, temperature, result["exit_gamma"], device)
    if not args.skip_grpo:
        result["grpo_step"] = grpo_step(model, (rows, tokenizer), args, device, bf16=device.type == "cuda")
        result["update_memory"] = update_memory(model, (rows, tokenizer), args, device, bf16=device.type == "cuda")
    return result


if __name__ == "__main__":
    print(json.dumps(main()))
