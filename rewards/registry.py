"""Rewards by name, with a dotted-path fallback for user rewards.

Outcome rewards follow TRL: `f(completions, **columns) -> list[float | None]`. Intrinsic rewards take the sampler's
trace (`rollout.sampler.SampleOutput`, or anything with `decode_step`, `phi`, `h_ub`) and return tensors:
[B, G] per-token credit or [B] per-sequence rewards.

    >>> get_reward("math") is math_accuracy
    True
    >>> get_reward("operator:add")  # any importable callable, "module:attr" or "module.attr"
    <built-in function add>
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from rewards.code_reward import code_tests
from rewards.format_reward import answer_format
from rewards.intrinsic import answer_likelihood, neg_h_ub, phi_final, phi_token_credit
from rewards.math_reward import math_accuracy, reasoning_accuracy, supported_accuracy

REWARDS: dict[str, Callable] = {
    "math": math_accuracy,
    "math_accuracy": math_accuracy,
    "format": answer_format,
    "answer_format": answer_format,
    "code": code_tests,
    "code_tests": code_tests,
    "reasoning_math": reasoning_accuracy,  # the reasoning block's own conclusion (its last number or boxed value)
    "reasoning_accuracy": reasoning_accuracy,
    "supported_math": supported_accuracy,  # 1 only if the answer block and the reasoning's conclusion are both right
    "supported_accuracy": supported_accuracy,
    "answer_likelihood": answer_likelihood,  # exp(phi_T): the gold answer's probability given the reasoning
}


def _phi(trace) -> torch.Tensor:
    if getattr(trace, "phi", None) is None:
        raise ValueError("phi rewards need a trace sampled with gold answers (Canvas.gold); this trace has phi=None.")
    return trace.phi


def phi_return_to_go(trace) -> torch.Tensor:
    """[B, G] phi_T - phi(s_i) for each decoded token i."""
    return phi_token_credit(trace.decode_step, _phi(trace), "return_to_go")


def phi_immediate(trace) -> torch.Tensor:
    """[B, G] r_{s_i} = phi(s_i + 1) - phi(s_i) for each decoded token i."""
    return phi_token_credit(trace.decode_step, _phi(trace), "immediate")


def phi_outcome(trace) -> torch.Tensor:
    """[B] phi_T."""
    return phi_final(_phi(trace))


def neg_h_ub_final(trace) -> torch.Tensor:
    """[B] -H_UB at the last defined step."""
    return neg_h_ub(trace.h_ub, "final")


def neg_h_ub_mean(trace) -> torch.Tensor:
    """[B] -mean H_UB over the defined steps."""
    return neg_h_ub(trace.h_ub, "mean")


INTRINSIC_REWARDS: dict[str, Callable] = {
    "phi_return_to_go": phi_return_to_go,
    "phi_immediate": phi_immediate,
    "phi_final": phi_outcome,
    "neg_h_ub_final": neg_h_ub_final,
    "neg_h_ub_mean": neg_h_ub_mean,
}


def register_reward(name: str, fn: Callable | None = None, intrinsic: bool = False):
    """Register `fn` under `name` (usable as a decorator). Re-registering a name is an error."""
    table = INTRINSIC_REWARDS if intrinsic else REWARDS

    def add(f: Callable) -> Callable:
        if name in table and table[name] is not f:
            raise ValueError(f"A reward named {name!r} is already registered ({table[name]!r}).")
        table[name] = f
        return f

    return add if fn is None else add(fn)


def _import(path: str) -> Callable:
    module, sep, attr = path.partition(":")
    if not sep:
        module, _, attr = path.rpartition(".")
    obj = getattr(importlib.import_module(module), attr)
    if not callable(obj):
        raise TypeError(f"{path!r} resolves to {obj!r}, which is not callable.")
    return obj


def _lookup(name: str, table: dict[str, Callable], kind: str) -> Callable:
    if name in table:
        return table[name]
    if ":" in name or "." in name:
        try:
            return _import(name)
        except (ImportError, AttributeError, ValueError) as e:
            raise ValueError(
                f"Unknown {kind} reward {name!r}: not registered, and importing it failed ({type(e).__name__}: {e}). "
                f"Registered: {', '.join(sorted(table))}."
            ) from e
    raise ValueError(
        f"Unknown {kind} reward {name!r}. Registered: {', '.join(sorted(table))}; "
        "or give an importable path such as 'mypkg.rewards:my_reward'."
    )


def get_reward(name: str) -> Callable:
    """An outcome reward by registered name or import path ("pkg.mod:fn" or "pkg.mod.fn")."""
    return _lookup(name, REWARDS, "outcome")


def get_rewards(names: list[str]) -> list[Callable]:
    return [get_reward(n) for n in names]


def get_intrinsic_reward(name: str) -> Callable:
    """An intrinsic (trace) reward by registered name or import path."""
    return _lookup(name, INTRINSIC_REWARDS, "intrinsic")
