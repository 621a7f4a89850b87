"""Multi-process runs on CPU through accelerate (gloo): the entry script, 2 processes, 2 GRPO steps (slow).

`accelerate launch --cpu --num_processes 2` silently runs one process; `--multi_gpu --num_processes 2` gives real
2-process DDP over gloo on a machine without GPUs (DESIGN.md section 7), provided the training arguments say
`use_cpu: true` (otherwise each process runs alone, measured with transformers 5.24 / accelerate 1.15)."""

import glob
import json
import os
import socket
import subprocess
import sys

import pytest
import yaml
from doubles import save_scratch_policy

from rl.tasks import TaskConfig, load_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = dict(test_size=8, train_size=64, min_ops=1, max_ops=1, max_operand=5, max_multiplier=2, max_result=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    rows = [*load_task(TaskConfig(**TASK), split="train").dataset, *load_task(TaskConfig(**TASK), "test").dataset]
    texts = [t for r in rows for t in (r["prompt"], r["reasoning"], r["answer"])] + ["The answer is"]
    return save_scratch_policy(tmp_path_factory.mktemp("policy"), texts)


def _flags(model_dir, out) -> list[str]:
    return [f"--{k}={v}" for k, v in TASK.items()] + [
        f"--model_name_or_path={model_dir}", f"--output_dir={out}", "--max_steps=2", "--reasoning_length=8",
        "--answer_length=2", "--delimiter=The answer is", "--per_device_train_batch_size=4", "--num_generations=4",
        "--policy=med", "--exit_gamma=0.5", "--dense_coef=0.1", "--heldout_eval_steps=2", "--heldout_size=8",
        "--learning_rate=1e-3", "--beta=0", "--gradient_checkpointing=false", "--logging_steps=1",
        "--save_strategy=no", "--report_to=none", "--use_cpu=true", "--bf16=false",
        "--use_peft=true", "--lora_r=4", "--lora_alpha=8", "--gradient_accumulation_steps=1",
    ]


@pytest.mark.slow
def test_two_process_ddp_grpo_runs_two_steps(tmp_path, model_dir):
    out = tmp_path / "run"
    flags = _flags(model_dir, out)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), os.path.join(ROOT, "scripts", "grpo.py"),
           os.path.join(ROOT, "recipes", "tiny", "grpo.yaml"), *flags]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Both ranks generated and logged their own rollouts at both steps.
    logs = sorted(os.path.basename(p) for p in glob.glob(str(out / "rollouts" / "*.jsonl")))
    assert logs == [f"step{s:06d}_rank{r}.jsonl" for s in (0, 1) for r in (0, 1)], logs
    for name in logs:
        rows = [json.loads(x) for x in (out / "rollouts" / name).open()]
        assert len(rows) == 4 and all(r["nfe"] >= 1 for r in rows)
    # The held-out set was split between the ranks: 4 rows each, evaluated before, at step 2 (= the end).
    assert len([json.loads(x) for x in (out / "heldout" / "step000000_rank1.jsonl").open()]) == 4
    # LoRA (the 8B default) under DDP: the final directory holds the adapter (on the SFT base) and the recipe.
    assert os.path.exists(out / "final" / "adapter_model.safetensors")
    assert os.path.exists(out / "final" / "recipe.yaml")
    assert "eval/accuracy" in proc.stdout + proc.stderr
    assert "Distributed: MULTI_CPU, 2 process(es)." in proc.stdout + proc.stderr



def _launch_two_steps(cmd: list[str], out, timeout: int) -> subprocess.CompletedProcess:
    """Run a 2-process launch of 2 GRPO steps; it must succeed and each rank must log each step's rollouts."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    logs = sorted(os.path.basename(p) for p in glob.glob(str(out / "rollouts" / "*.jsonl")))
    assert logs == [f"step{s:06d}_rank{r}.jsonl" for s in (0, 1) for r in (0, 1)], logs
    return proc

@pytest.mark.slow
def test_two_process_deepspeed_zero2_grpo_runs_two_steps(tmp_path, model_dir):
    """The shipped ZeRO-2 accelerate config, with 2 processes and fp32, on CPU (gloo). DeepSpeed JIT-compiles its
    CPU ops on first use (about a minute, then cached)."""
    with open(os.path.join(ROOT, "recipes", "accelerate", "zero2.yaml")) as f:
        config = yaml.safe_load(f)
    config.update(num_processes=2, mixed_precision="no", main_process_port=_free_port())
    config_file = tmp_path / "zero2_cpu.yaml"
    config_file.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
           os.path.join(ROOT, "scripts", "grpo.py"), os.path.join(ROOT, "recipes", "tiny", "grpo.yaml"),
           *_flags(model_dir, out)]
    proc = _launch_two_steps(cmd, out, timeout=1200)
    assert "Distributed: DEEPSPEED (ZeRO stage 2), 2 process(es)." in proc.stdout + proc.stderr
    assert os.path.exists(out / "final" / "recipe.yaml")


@pytest.mark.slow
def test_two_process_deepspeed_zero3_grpo_runs_two_steps(tmp_path, model_dir):
    """ZeRO-3 gathers each layer's parameters at every forward, so every process must run the same number of
    forwards per micro-step: the estimators' forward count is fixed (mean_field 1, coupled 2, trajectory S) and
    generation gathers the whole model once (TRL's unwrap_model_for_generation)."""
    with open(os.path.join(ROOT, "recipes", "accelerate", "zero3.yaml")) as f:
        config = yaml.safe_load(f)
    # Shard even the tiny model's parameters (DeepSpeed keeps parameters under 100k elements whole by default, and
    # whole parameters need no gather, so a differing forward count would go unnoticed).
    ds_config = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                 "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                 "train_batch_size": "auto", "gradient_clipping": "auto", "bf16": {"enabled": False}}
    (tmp_path / "ds.json").write_text(json.dumps(ds_config))
    config["deepspeed_config"] = {"deepspeed_config_file": str(tmp_path / "ds.json"), "zero3_init_flag": True,
                                  "deepspeed_multinode_launcher": "standard"}
    config.pop("mixed_precision")  # the DeepSpeed file decides (fp32)
    config.update(num_processes=2, main_process_port=_free_port())
    config_file = tmp_path / "zero3_cpu.yaml"
    config_file.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    # Contiguous buckets: rows with fewer steps than buckets left buckets empty, and used to skip their forwards.
    flags = [*_flags(model_dir, out), "--trajectory_sample_steps=false", "--trajectory_buckets=16"]  # > NFE
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
           os.path.join(ROOT, "scripts", "grpo.py"), os.path.join(ROOT, "recipes", "tiny", "grpo.yaml"), *flags]
    proc = _launch_two_steps(cmd, out, timeout=600)
    assert "Distributed: DEEPSPEED (ZeRO stage 3), 2 process(es)." in proc.stdout + proc.stderr
