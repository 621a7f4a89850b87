"""Rewards: outcome verifiers (math, format, code) with TRL's signature, and intrinsic rewards from the trace.

Names are imported lazily (PEP 562), so worker processes that import `rewards.math_answer` or `rewards.pool`
do not pay for torch and the rest of the package.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "rewards.code_reward": ("CodeReward", "build_program", "code_tests", "run_tests"),
    "rewards.common": ("close_pools", "completion_text"),
    "rewards.format_reward": ("FormatReward", "answer_format"),
    "rewards.intrinsic": ("neg_h_ub", "phi_final", "phi_step_rewards", "phi_token_credit"),
    "rewards.math_reward": ("MathReward", "math_accuracy"),
    "rewards.pool": ("TaskResult", "WorkerPool"),
    "rewards.registry": (
        "INTRINSIC_REWARDS", "REWARDS", "get_intrinsic_reward", "get_reward", "get_rewards", "register_reward",
    ),
    "rewards.sandbox": ("SandboxLimits", "SandboxResult", "run_test"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'rewards' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
