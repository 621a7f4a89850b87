"""The entry scripts on tiny random checkpoints in the published LLaDA / Dream layout, driven by the shipped 8B
recipes with only sizes, data and device overridden: evaluate, SFT with LoRA and gradient checkpointing, GRPO and
RLOO with LoRA and gradient checkpointing, then evaluating the saved adapters. Skipped without ../shared/models."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from published import build_dream, build_llada, require_shared

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CPU = ["--use_cpu", "true", "--bf16", "false", "--dtype", "float32", "--report_to", "none", "--cpu_threads", "1"]


def varied_reward(completions, **columns):
    """A reward with variance on a random model (so advantages, hence LoRA updates, are not all zero)."""
    return [float(len(c) % 3) for c in completions]


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    require_shared()
    if not (DATA / "gsm8k_train.jsonl").is_file():
        pytest.skip("../shared/data is absent")
    root = tmp_path_factory.mktemp("published")
    return {"llada": build_llada(root / "llada"), "dream": build_dream(root / "dream")}


def evaluate(model_dir, out: Path, *extra) -> dict:
    return script("evaluate").main([
        "--model_name_or_path", str(model_dir), "--task", "gsm8k", "--dataset_path", str(DATA / "gsm8k_test.jsonl"),
        "--num_samples", "3", "--chat_template", "true", "--reasoning_length", "8", "--answer_length", "3",
        "--block_length", "4", "--delimiter", "\nThe answer is \\boxed{", "--suffix", "}", "--policy", "med",
        "--exit_gamma", "0.1", "--device", "cpu", "--cpu_threads", "1", "--output_file", str(out), *extra])


def lora_moved(final: str) -> bool:
    from safetensors.torch import load_file

    state = load_file(Path(final) / "adapter_model.safetensors")
    return any("lora_B" in k and v.abs().sum() > 0 for k, v in state.items())


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_evaluate_script_on_the_published_checkpoint(checkpoints, family, tmp_path):
    summary = evaluate(checkpoints[family], tmp_path / "eval.jsonl")
    assert summary["n"] == 3, summary
    rows = [json.loads(x) for x in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert len(rows) == 3


def test_sft_recipe_with_lora_and_gradient_checkpointing_then_evaluate_the_adapter(checkpoints, tmp_path):
    final = script("sft").main([
        str(ROOT / "recipes" / "sft_llada_gsm8k.yaml"), "--model_name_or_path", str(checkpoints["llada"]),
        "--dataset_path", str(DATA / "gsm8k_train.jsonl"), "--num_samples", "6", "--reasoning_length", "256",
        "--max_steps", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
        "--lora_r", "4", "--learning_rate", "1e-2", "--warmup_steps", "0", "--gradient_checkpointing", "true",
        "--save_strategy", "no", "--logging_steps", "1", "--output_dir", str(tmp_path / "sft"), *CPU])
    config = json.loads((Path(final) / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"}
    assert config["task_type"] is None and lora_moved(final)
    assert evaluate(final, tmp_path / "eval.jsonl")["n"] == 3


RL_CASES = [("grpo", "gsm8k.yaml", "llada"), ("grpo", "gsm8k_dream.yaml", "dream"), ("grpo", "math.yaml", "llada"),
            ("rloo", "gsm8k.yaml", "llada"), ("rloo", "gsm8k_dream.yaml", "dream")]


@pytest.mark.parametrize("kind,recipe,family", RL_CASES)
def test_rl_recipes_train_two_lora_steps_with_gradient_checkpointing(checkpoints, kind, recipe, family, tmp_path):
    data = ["--dataset_path", str(DATA / ("math500_test.jsonl" if recipe == "math.yaml" else "gsm8k_train.jsonl"))]
    final = script(kind).main([
        str(ROOT / "recipes" / recipe), "--model_name_or_path", str(checkpoints[family]), *data, "--num_samples", "4",
        "--rewards", "test_real_models_scripts.varied_reward", "--reasoning_length", "8", "--answer_length", "3",
        "--block_length", "4", "--num_generations", "2", "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "1", "--max_steps", "2", "--heldout_eval_steps", "0", "--lora_r", "4",
        "--learning_rate", "1e-2", "--warmup_steps", "0", "--gradient_checkpointing", "true", "--save_strategy", "no",
        "--logging_steps", "1", "--output_dir", str(tmp_path / kind), *CPU])
    assert lora_moved(final)
    assert evaluate(final, tmp_path / "eval.jsonl")["n"] == 3


def test_full_fine_tuning_saves_a_native_model_that_evaluates(checkpoints, tmp_path):
    final = script("grpo").main([
        str(ROOT / "recipes" / "gsm8k_dream.yaml"), "--model_name_or_path", str(checkpoints["dream"]),
        "--dataset_path", str(DATA / "gsm8k_train.jsonl"), "--num_samples", "2", "--use_peft", "false", "--beta", "0",
        "--rewards", "test_real_models_scripts.varied_reward", "--reasoning_length", "8", "--answer_length", "3",
        "--block_length", "4", "--num_generations", "2", "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "1", "--max_steps", "1", "--heldout_eval_steps", "0",
        "--gradient_checkpointing", "true", "--save_strategy", "no", "--output_dir", str(tmp_path / "full"), *CPU])
    assert json.loads((Path(final) / "config.json").read_text())["model_type"] == "mdlm_dream"
    assert evaluate(final, tmp_path / "eval.jsonl")["n"] == 3
    torch.set_num_threads(1)


def test_full_fine_tuning_with_a_kl_reference_is_a_clear_error(checkpoints, tmp_path):
    with pytest.raises(ValueError, match="beta > 0 makes TRL load the reference"):
        script("grpo").main([
            str(ROOT / "recipes" / "gsm8k.yaml"), "--model_name_or_path", str(checkpoints["llada"]),
            "--dataset_path", str(DATA / "gsm8k_train.jsonl"), "--num_samples", "2", "--use_peft", "false",
            "--beta", "0.04", "--heldout_eval_steps", "0", "--output_dir", str(tmp_path / "x"), *CPU])
