"""Memory envelope: peak memory of a rollout batch and of one GRPO update at LLaDA's vocabulary (126,464) on CPU.

The model is a thin bidirectional Gemma3 (LLaDA's vocabulary, `--hidden` wide, `--layers` deep): its body is cheap,
so the peaks are those of the vocabulary-sized tensors (logits, softmax, their gradients) that an 8B model makes
exactly as large. Each configuration runs in a fresh child process; its peak is the child's resident-set high-water
mark (VmHWM, reset through /proc/self/clear_refs right before the measured work) minus its resident set just before
it, so model weights, Python and torch are not counted and configurations cannot contaminate each other (glibc's
mmap threshold is fixed, so freed tensors leave the resident set).

- `rollout`: one sampler call on `--rows` rows (prompt + R reasoning + A answer, semi-AR blocks of 32, fixed k=32
  per step so a row takes R/32 + 1 forwards: the peak is per forward, the step count does not change it).
- `update`: one GRPO update through `DiffusionGRPOTrainer` (LoRA r=32 on every linear layer, gradient checkpointing,
  beta 0): the rollout batch is generated first (not counted), then the loss's forward and backward are measured,
  with the trajectory estimator at S=8 contiguous buckets and with S=8 sampled steps.

`--baseline REV` runs every configuration a second time on the code of git revision REV (exported to a temporary
directory; the measurement code is this file's, the library code REV's), side by side. The last line is JSON.

    python scripts/bench_memory.py --baseline 5972dad --current HEAD --rows 2 8 --skip_baseline_above 2
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 126464  # LLaDA-8B


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[8], help="rows per rollout batch / update (G)")
    p.add_argument("--reasoning_length", type=int, default=224)
    p.add_argument("--answer_length", type=int, default=16)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=VOCAB)
    p.add_argument("--kinds", nargs="+", default=["rollout", "update_buckets", "update_sampled"])
    p.add_argument("--baseline", default=None, help="git revision to measure side by side (e.g. HEAD~3)")
    p.add_argument("--current", default=None, help="git revision to measure as 'current' (default: the working tree)")
    p.add_argument("--baseline_only", action="store_true", help="measure only the baseline revision")
    p.add_argument("--skip_baseline_above", type=int, default=None,
                   help="measure the baseline only up to this many rows (its peaks can exceed the machine)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--code", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- child: one configuration ---------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _settle_and_reset_peak() -> int:
    """Free what can be freed, reset the high-water mark; returns the resident set (kB) the peak is measured from."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)
    return _status_kb("VmRSS")


def thin_model(vocab: int, hidden: int, layers: int, seed: int = 0, tie: bool = True):
    """A random bidirectional Gemma3 with `vocab` outputs and a thin body (fp32)."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    heads = max(2, hidden // 32)
    config = Gemma3TextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=hidden // heads,
        query_pre_attn_scalar=hidden // heads, max_position_embeddings=2048, use_bidirectional_attention=True,
        layer_types=["full_attention"] * layers, final_logit_softcapping=None, tie_word_embeddings=tie,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Gemma3ForCausalLM(config).eval()


def _task(rows: int):
    from rl.tasks import TaskConfig, load_task
    from rl.tokenizer import build_tokenizer

    data = [dict(r) for r in load_task(TaskConfig(train_size=max(64, rows), test_size=8), split="train").dataset]
    tokenizer = build_tokenizer([t for r in data for t in (r["prompt"], r["reasoning"], r["answer"])]
                                + ["The answer is"])
    return data, tokenizer


def _text_hash(completions, **kwargs):
    return [sum(map(ord, c)) % 13 / 13 for c in completions]


def run_child(spec: dict) -> dict:
    import torch

    from rollout import MDLMAdapter, SamplerConfig, TemplateConfig, build_canvas, sample

    torch.set_num_threads(1)
    rows, kind = spec["rows"], spec["kind"]
    data, tokenizer = _task(rows)
    model = thin_model(spec["vocab"], spec["hidden"], spec["layers"])
    R, A = spec["reasoning_length"], spec["answer_length"]
    if kind == "rollout":
        adapter = MDLMAdapter.from_pretrained(model, tokenizer)
        template = TemplateConfig(reasoning_length=R, answer_length=A)
        canvas = build_canvas(tokenizer, [r["prompt"] for r in data[:rows]], template, adapter.mask_id,
                              answers=[r["answer"] for r in data[:rows]])
        config = SamplerConfig(policy="entropy", k=32, block_length=32, temperature=0.7)
        base = _settle_and_reset_peak()
        out = sample(adapter, canvas, config, seeds=list(range(rows)))
        peak = _status_kb("VmHWM")
        tokens = int(out.generated.sum())
        return {"peak_mb": round((peak - base) / 1024, 1), "tokens": tokens, "nfe": int(out.nfe.max()),
                "gen_columns": canvas.gen_length}

    from datasets import Dataset
    from peft import LoraConfig

    from rl.config import DiffusionGRPOConfig
    from rl.trainer import DiffusionGRPOTrainer

    sampled = kind == "update_sampled"
    with tempfile.TemporaryDirectory() as out_dir:
        args = DiffusionGRPOConfig(
            output_dir=out_dir, use_cpu=True, bf16=False, per_device_train_batch_size=rows, num_generations=rows,
            max_steps=1, reasoning_length=R, answer_length=A, block_length=32, policy="entropy", k=16,
            learning_rate=1e-5, beta=0.0, report_to=[], save_strategy="no", gradient_checkpointing=True,
            trajectory_buckets=8, trajectory_sample_steps=sampled, skip_zero_advantage_rows=False,
            rollout_log_dir="", seed=0, logging_steps=1,
        )
        trainer = DiffusionGRPOTrainer(model=model, reward_funcs=[_text_hash], args=args,
                                       train_dataset=Dataset.from_list(data), processing_class=tokenizer,
                                       peft_config=LoraConfig(r=32, lora_alpha=64, target_modules="all-linear"))
        trainer.model.train()
        if not getattr(trainer.model, "is_gradient_checkpointing", True):
            trainer.model.gradient_checkpointing_enable()
        trainer.current_gradient_accumulation_steps = 1  # set by `train()`, read by TRL's loss
        batch = trainer._generate_and_score_completions([data[0]] * rows)
        in_loss = int(batch["tool_mask"].sum())
        base = _settle_and_reset_peak()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        peak = _status_kb("VmHWM")
    return {"peak_mb": round((peak - base) / 1024, 1), "tokens": in_loss,
            "gen_columns": int(batch["completion_ids"].shape[1]), "loss_finite": bool(torch.isfinite(loss))}


# -- parent: every configuration in its own process -----------------------------------------------------------------
def export_revision(rev: str, dest: str) -> str:
    """The tracked files of `rev` in `dest` (git archive), for the side-by-side baseline."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], check=True, capture_output=True,
                          text=True).stdout.strip()


def measure(spec: dict, code: str) -> dict:
    # A fixed mmap threshold: glibc otherwise raises it after big frees and serves later tensors from a heap that
    # does not shrink, so the resident set would count memory already freed.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=code, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec), "--code", code]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        sys.path.insert(0, args.code)
        print(json.dumps(run_child(json.loads(args.child))))
        return {}
    shape = {k: getattr(args, k) for k in ("reasoning_length", "answer_length", "hidden", "layers", "vocab")}
    result = {"vocab": args.vocab, "model": f"thin bidirectional Gemma3, hidden {args.hidden}, {args.layers} layers",
              "reasoning_length": args.reasoning_length, "answer_length": args.answer_length, "runs": []}
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as tmp_current:
        codes = [] if args.baseline_only else [("current", str(ROOT))]
        if args.current and codes:
            codes = [(f"current {export_revision(args.current, tmp_current)}", tmp_current)]
        if args.baseline:
            codes.append((f"baseline {export_revision(args.baseline, tmp)}", tmp))
        for kind in args.kinds:
            for rows in args.rows:
                for label, code in codes:
                    if label.startswith("baseline") and args.skip_baseline_above and rows > args.skip_baseline_above:
                        continue
                    run = {"kind": kind, "rows": rows, "code": label, **measure({"kind": kind, "rows": rows, **shape},
                                                                                 code)}
                    if "peak_mb" in run and run.get("tokens"):
                        run["bytes_per_token"] = round(run["peak_mb"] * 2**20 / run["tokens"])
                    result["runs"].append(run)
                    print(json.dumps(run), file=sys.stderr, flush=True)
    return result


if __name__ == "__main__":
    out = main()
    if out:
        print(json.dumps(out))
