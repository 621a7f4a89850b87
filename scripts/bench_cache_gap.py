"""How far the KV cache moves the sampler's conditionals: per-token log-prob gap, cached vs uncached, on a real model.

For each cache mode the task's rows are sampled with the cached sampler (the recipe's policy, canvas and temperature);
every decoded token is then scored twice from the state it was decoded in: under the cached conditional (the
trajectory replay with the cache plan, which equals the sampler's own log-prob) and under the uncached one (the same
state, every column recomputed). Reported per mode: mean and quantiles of |log q - log p| per token, the mean signed
gap, and the largest. Takes evaluate.py's recipe keys; prints one JSON object as its last line.

    python scripts/bench_cache_gap.py recipes/tiny/eval.yaml --temperature 0.7 --test_size 200
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> dict:
    from evaluate import configs

    from rl.recipe import parse

    model_cfg, task, template, sampler, config = parse(configs(), argv, description=__doc__.split("\n\n")[0])
    import torch

    from rl.evaluate import row_seed
    from rl.logprobs import trajectory_logps
    from rl.models import load_for_inference
    from rl.tasks import load_task
    from rollout import MDLMAdapter, build_canvas, sample

    rows = load_task(task, split=task.split or "test").dataset  # --test_size N: the first N held-out rows
    model, tokenizer = load_for_inference(model_cfg, "cpu")
    adapter = MDLMAdapter.from_pretrained(model, tokenizer)
    result = {"model": model_cfg.model_name_or_path, "policy": sampler.policy, "temperature": sampler.temperature,
              "block_length": sampler.block_length, "rows": len(rows), "modes": {}}
    for mode in ("prefix", "dual"):
        cfg = dataclasses.replace(sampler, kv_cache=mode)
        gaps, signed = [], []
        for lo in range(0, len(rows), config.batch_size):
            batch = rows.select(range(lo, min(lo + config.batch_size, len(rows))))
            canvas = build_canvas(tokenizer, batch["prompt"], template, adapter.mask_id, answers=batch["answer"],
                                  max_length=adapter.max_length, answer_overflow="truncate")
            out = sample(adapter, canvas, cfg, seeds=[row_seed(sampler.seed, lo + i) for i in range(len(batch))])
            with torch.no_grad():
                args = (adapter.logits, out.sequences, out.attention_mask, out.gen_start, out.decode_step, out.nfe,
                        adapter.mask_id, int(out.nfe.max()), sampler.temperature or 1.0)
                cached = trajectory_logps(*args, cache=out.cache_plan)[0]
                uncached = trajectory_logps(*args)[0]
            gen = out.generated
            gaps.append((cached - uncached)[gen].abs().double())
            signed.append((cached - uncached)[gen].double())
        gap, sig = torch.cat(gaps), torch.cat(signed)
        result["modes"][mode] = {
            "tokens": gap.numel(), "mean_abs_gap": round(gap.mean().item(), 5),
            "median_abs_gap": round(gap.median().item(), 5), "p90_abs_gap": round(gap.quantile(0.9).item(), 5),
            "p99_abs_gap": round(gap.quantile(0.99).item(), 5), "max_abs_gap": round(gap.max().item(), 5),
            "mean_gap_cached_minus_uncached": round(sig.mean().item(), 5),
            "share_above_0.1_nats": round((gap > 0.1).double().mean().item(), 4),
        }
    return result


if __name__ == "__main__":
    print(json.dumps(main()))
