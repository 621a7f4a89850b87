"""Mixed precision chosen by the machine: bf16 only where the hardware computes it natively, else fp32.

The diffusion configs' `bf16` field takes `auto` (the default), `true` or `false`. `auto` resolves to bf16 on a
CUDA device with bf16 support and on a CPU whose instruction set has native bf16 matmuls (AVX512-BF16 or AMX-BF16,
and oneDNN not capped below them by `ONEDNN_MAX_CPU_ISA`); everywhere else to fp32. On a CPU without native bf16
(e.g. AVX2 only) torch emulates bf16 matmuls, measured 25-55x slower than fp32, so an explicit `bf16: true` there
still runs but warns once with the factor measured on this machine.

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python ...   # behaves like a CPU without native bf16
"""

from __future__ import annotations

import functools
import logging
import os
import time

import torch

logger = logging.getLogger(__name__)

# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) under which its bf16 matmul kernels are still native.
_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "AVX512_CORE_FP16", "AVX10_1_512",
              "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2", "ALL", "DEFAULT")


def cpu_native_bf16() -> tuple[bool, str]:
    """(native, reason): whether this CPU runs bf16 matmuls natively, and why the answer is what it is."""
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    name = caps.get("cpu_name") or "this CPU"
    if not (caps.get("avx512_bf16") or caps.get("amx_bf16")):
        return False, f"{name} has neither AVX512-BF16 nor AMX-BF16"
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if isa and isa not in _BF16_ISAS:
        return False, f"ONEDNN_MAX_CPU_ISA={isa} caps oneDNN below its bf16 kernels"
    return True, f"{name} has {'AMX-BF16' if caps.get('amx_bf16') else 'AVX512-BF16'}"


def _to_setting(value) -> str:
    text = str(value).strip().lower()
    if text in ("auto", "none", "null", ""):
        return "auto"
    if text in ("true", "1", "yes", "y"):
        return "true"
    if text in ("false", "0", "no", "n"):
        return "false"
    raise ValueError(f"bf16={value!r}; use auto (bf16 where the hardware has it natively), true or false.")


def resolve_bf16(requested, on_cpu: bool) -> bool:
    """The `bf16` flag a TrainingArguments gets for the setting `requested` (auto / true / false).

    Logs the resolved precision with the reason; an explicit `true` on a CPU without native bf16 warns once.
    """
    setting = _to_setting(requested)
    if setting == "false":
        logger.info("Precision: fp32 (bf16: false).")
        return False
    if on_cpu:
        native, reason = cpu_native_bf16()
    elif torch.cuda.is_available():
        native, reason = torch.cuda.is_bf16_supported(), f"CUDA device {torch.cuda.get_device_name()}"
    else:
        native, reason = False, "no CUDA device"
    if setting == "auto":
        logger.info("Precision: %s (bf16: auto; %s).", "bf16 autocast" if native else "fp32", reason)
        return native
    if on_cpu and not native:
        _warn_emulated(reason)
    logger.info("Precision: bf16 autocast (bf16: true; %s).", reason)
    return True


def emulation_factor(size: int = 384, repeats: int = 3) -> float:
    """How many times slower a [size, size] bf16 matmul is than the same fp32 matmul on this CPU (measured)."""
    seconds = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(size, size, generator=torch.Generator().manual_seed(0)).to(dtype)
        a @ a  # warm-up: kernel selection
        start = time.perf_counter()
        for _ in range(repeats):
            a @ a
        seconds[dtype] = time.perf_counter() - start
    return seconds[torch.bfloat16] / max(seconds[torch.float32], 1e-9)


@functools.cache
def _warn_emulated(reason: str) -> None:
    logger.warning(
        "bf16: true on a CPU without native bf16 (%s): torch emulates bf16 matmuls, measured %.0fx slower than fp32 "
        "here. Set bf16: auto (or false) to train in fp32.", reason, emulation_factor())
