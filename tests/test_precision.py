"""Mixed precision chosen by the machine: bf16 only where the hardware has it natively; explicit bf16 without it
warns once; the resolved value is what the run's recipe.yaml records."""

import logging

import pytest
import torch

from rl import precision
from rl.config import DiffusionGRPOConfig
from rl.recipe import load_recipe, to_dict
from rl.sft.config import DiffusionSFTConfig

NATIVE = {"cpu_name": "Test CPU", "avx2": True, "avx512_bf16": True, "amx_bf16": False}
AVX2_ONLY = {"cpu_name": "Test CPU", "avx2": True, "avx512_bf16": False, "amx_bf16": False}


@pytest.fixture
def cpu(monkeypatch):
    """Set the CPU's reported capabilities (and clear the oneDNN cap) for one test."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    precision._warn_emulated.cache_clear()

    def set_caps(caps):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: dict(caps))

    return set_caps


def test_auto_is_bf16_only_on_a_cpu_with_native_bf16(cpu, monkeypatch):
    cpu(NATIVE)
    assert precision.cpu_native_bf16()[0] and precision.resolve_bf16("auto", on_cpu=True) is True
    cpu(AVX2_ONLY)
    native, reason = precision.cpu_native_bf16()
    assert not native and "neither AVX512-BF16 nor AMX-BF16" in reason
    assert precision.resolve_bf16("auto", on_cpu=True) is False
    cpu(NATIVE)  # the hardware has it, but oneDNN is capped below its bf16 kernels: emulated
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert precision.resolve_bf16("auto", on_cpu=True) is False
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core_bf16")
    assert precision.resolve_bf16("auto", on_cpu=True) is True


def test_explicit_values_are_honoured_and_bad_ones_rejected(cpu):
    cpu(NATIVE)
    assert precision.resolve_bf16(False, on_cpu=True) is False
    assert precision.resolve_bf16("false", on_cpu=True) is False
    assert precision.resolve_bf16(True, on_cpu=True) is True
    with pytest.raises(ValueError, match="use auto"):
        precision.resolve_bf16("fp8", on_cpu=True)


def test_explicit_bf16_without_native_support_runs_and_warns_once_with_the_factor(cpu, monkeypatch, caplog):
    cpu(AVX2_ONLY)
    monkeypatch.setattr(precision, "emulation_factor", lambda: 41.0)
    with caplog.at_level(logging.WARNING, logger="rl.precision"):
        assert precision.resolve_bf16(True, on_cpu=True) is True
        assert precision.resolve_bf16("true", on_cpu=True) is True
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "without native bf16" in warnings[0] and "41x slower" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rl.precision"):
        precision.resolve_bf16("auto", on_cpu=True)  # auto never warns: it picks fp32
    assert not caplog.records


def test_emulation_factor_is_a_measured_ratio():
    factor = precision.emulation_factor(size=64, repeats=2)
    assert factor > 0 and factor == factor  # finite, positive


def test_configs_default_to_auto_and_record_the_resolved_value(cpu, tmp_path):
    cpu(AVX2_ONLY)
    sft = DiffusionSFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    grpo = DiffusionGRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    assert sft.bf16 is False and grpo.bf16 is False
    assert to_dict(sft, only_changed=True)["bf16"] is False  # recipe.yaml says what ran, not "auto"
    cpu(NATIVE)
    sft = DiffusionSFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    assert sft.bf16 is True and to_dict(sft, only_changed=True)["bf16"] is True
    assert DiffusionSFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], bf16="false").bf16 is False


def test_tiny_sft_recipes_let_the_machine_choose():
    import glob
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sft_recipes = sorted(glob.glob(os.path.join(root, "recipes", "tiny", "sft*.yaml")))
    assert sft_recipes
    for path in sft_recipes:
        assert load_recipe(path).get("bf16") == "auto", path
