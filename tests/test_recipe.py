"""Recipes: flat YAML = dataclass fields, CLI overrides, unknown keys rejected, every shipped recipe parses."""

import dataclasses
import glob
import importlib.util
import os
import subprocess
import sys
import time

import pytest

from rl.recipe import load_recipe, parse, recipe_yaml
from rl.tasks import TaskConfig
from rollout import SamplerConfig, TemplateConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name):
    spec = importlib.util.spec_from_file_location(f"script_{name}", os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return str(path)


def test_recipe_values_then_flags(tmp_path):
    path = _write(tmp_path, "task: arithmetic\nmax_ops: 4\nreasoning_length: 32\nmed_lambda: 0.5\nexit_gamma: 1e-1\n")
    task, template, sampler = parse([TaskConfig, TemplateConfig, SamplerConfig], [path, "--max_ops", "5"])
    assert task.max_ops == 5 and template.reasoning_length == 32
    assert sampler.med_lambda == 0.5 and sampler.exit_gamma == 0.1  # YAML 1.1 reads 1e-1 as a string
    task, template, sampler = parse([TaskConfig, TemplateConfig, SamplerConfig], ["--block_length", "8"])
    assert task.max_ops == 3 and sampler.block_length == 8


def test_null_sets_optional_fields_to_none(tmp_path):
    path = _write(tmp_path, "block_length: 8\nexit_gamma: 0.1\nsystem_prompt: hi\n")
    template, sampler = parse([TemplateConfig, SamplerConfig],
                              [path, "--block_length", "none", "--exit_gamma", "null", "--system_prompt", "null"])
    assert sampler.block_length is None and sampler.exit_gamma is None and template.system_prompt is None


def test_unknown_recipe_key_is_an_error_with_a_suggestion(tmp_path):
    path = _write(tmp_path, "task: arithmetic\nmax_op: 4\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\): 'max_op' \(did you mean max_ops"):
        parse([TaskConfig, TemplateConfig], [path])
    assert parse([TaskConfig], [path], allow_unknown=True)[0].max_ops == 3
    with pytest.raises(ValueError, match=r"Unknown option\(s\): --max_opz \(did you mean --max_ops"):
        parse([TaskConfig], ["--max_opz", "4"])


def test_nested_recipe_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="flat"):
        load_recipe(_write(tmp_path, "task:\n  name: arithmetic\n"))


def test_bad_values_fail_in_post_init(tmp_path):
    with pytest.raises(ValueError, match="Unknown task 'gsm'"):
        parse([TaskConfig], [_write(tmp_path, "task: gsm\n")])


# Accelerate configs are checked below; ablation recipes (nested: base + arms) in tests/test_ablate.py; the
# lm-evaluation-harness task files (recipes/lm_eval/) in tests/test_lm_eval.py.
RECIPES = sorted(p for p in glob.glob(os.path.join(ROOT, "recipes", "**", "*.yaml"), recursive=True)
                 if not any(os.sep + d + os.sep in p for d in ("accelerate", "ablations", "lm_eval")))


def _entry_point(path: str) -> str:
    """Which script a recipe is for: evaluation, frontier, posterior sampling, RL (it lists rewards) or SFT."""
    name = os.path.basename(path)
    for kind in ("eval", "frontier", "posterior"):
        if name.startswith(kind):
            return "evaluate" if kind == "eval" else kind
    if "rewards" in load_recipe(path):
        return "rloo" if "rloo" in name else "grpo"
    return "sft"


@pytest.mark.parametrize("path", RECIPES, ids=[os.path.relpath(p, ROOT) for p in RECIPES])
def test_every_shipped_recipe_parses(path):
    kind = _entry_point(path)
    script = _script(kind)
    sampling = kind in ("evaluate", "frontier", "posterior")  # no TrainingArguments
    configs = parse(script.configs(), [path] if sampling else [path, "--use_cpu", "true", "--bf16", "false"])
    assert len(configs) == len(script.configs())


def test_rl_recipes_are_found_and_the_8b_ones_match_the_paper_setting():
    kinds = {os.path.relpath(p, ROOT): _entry_point(p) for p in RECIPES}
    assert {"recipes/gsm8k.yaml", "recipes/math.yaml", "recipes/gsm8k_dream.yaml", "recipes/tiny/grpo.yaml"} <= {
        p for p, k in kinds.items() if k == "grpo"}
    for name in ("gsm8k.yaml", "math.yaml", "gsm8k_dream.yaml"):
        r = load_recipe(os.path.join(ROOT, "recipes", name))
        setting = (r["use_peft"], r["lora_r"], r["lora_alpha"], r["policy"], r["med_lambda"])
        assert setting == (True, 128, 64, "med", 0.2)
        assert r["exit_gamma"] > 0 and r["dense_coef"] > 0
        # LLaDA / Dream load natively (rollout.native): no remote code, standard LoRA target names.
        assert not r.get("trust_remote_code", False)
        assert r["lora_target_modules"] == [f"{n}_proj" for n in ("q", "k", "v", "o", "gate", "up", "down")]


@pytest.mark.parametrize("name,kind", [("ddp", "MULTI_GPU"), ("zero2", "DEEPSPEED"), ("zero3", "DEEPSPEED")])
def test_accelerate_configs_load(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(os.path.join(ROOT, "recipes", "accelerate", f"{name}.yaml"))
    assert config.distributed_type.value == kind
    if kind == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == int(name[-1])


def test_tiny_eval_recipes_match_their_sft_recipes():
    for sft, ev in [("sft.yaml", "sft_answer.yaml"), ("sft_answer.yaml", "eval.yaml"), ("sft_ci.yaml", "eval_ci.yaml"),
                    ("sft_answer.yaml", "grpo.yaml"), ("sft_answer.yaml", "rloo.yaml")]:
        a = load_recipe(os.path.join(ROOT, "recipes", "tiny", sft))
        b = load_recipe(os.path.join(ROOT, "recipes", "tiny", ev))
        data_and_canvas = {f.name for f in dataclasses.fields(TaskConfig)} | {
            f.name for f in dataclasses.fields(TemplateConfig)}
        shared = (set(a) & set(b) & data_and_canvas) - {"split"}
        assert shared >= {"task", "max_ops", "reasoning_length", "answer_length", "delimiter"}
        assert {k: a[k] for k in shared} == {k: b[k] for k in shared}
        assert b["model_name_or_path"] == a["output_dir"] + "/final"


def test_recipe_yaml_keeps_changed_values():
    text = recipe_yaml(TaskConfig(max_ops=5), SamplerConfig(policy="left_to_right"))
    assert load_recipe_text(text) == {"max_ops": 5, "policy": "left_to_right"}


def load_recipe_text(text):
    import yaml

    return yaml.safe_load(text)


@pytest.mark.parametrize("name", ["sft", "evaluate"])
def test_help_is_fast_and_lists_the_keys(name):
    start = time.perf_counter()
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", f"{name}.py"), "--help"],
                         capture_output=True, text=True, check=True)
    assert time.perf_counter() - start < 30
    assert "--reasoning_length" in out.stdout and "--task" in out.stdout
    assert ("--learning_rate" in out.stdout) == (name == "sft")
    assert ("--med_lambda" in out.stdout) == (name == "evaluate")
