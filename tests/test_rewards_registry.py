"""Reward registry: names, dotted-path fallback, helpful errors, TRL's calling convention."""

import operator

import pytest

from rewards import registry
from rewards.registry import get_intrinsic_reward, get_reward, get_rewards, register_reward


def test_names_resolve():
    assert get_reward("math") is get_reward("math_accuracy")
    names = [f.__name__ for f in get_rewards(["math", "format", "code"])]
    assert names == ["math_accuracy", "answer_format", "code_tests"]
    assert get_intrinsic_reward("phi_return_to_go") is registry.phi_return_to_go
    assert get_reward("reasoning_math") is get_reward("reasoning_accuracy")
    assert get_reward("reasoning_math").read == "reasoning" and get_reward("math").read == "answer"
    assert get_reward("supported_math") is get_reward("supported_accuracy")
    assert get_reward("supported_math").read == "both"


def test_dotted_paths():
    assert get_reward("operator:add") is operator.add
    assert get_reward("operator.add") is operator.add
    assert get_intrinsic_reward("rewards.intrinsic:phi_final").__name__ == "phi_final"


def test_unknown_names_list_the_valid_ones():
    listed = r"Unknown outcome reward 'acuracy'.*answer_format, answer_likelihood, code, .*math"
    with pytest.raises(ValueError, match=listed):
        get_reward("acuracy")
    with pytest.raises(ValueError, match=r"importing it failed \(ModuleNotFoundError.*Registered: answer_format"):
        get_reward("no_such_pkg.rewards:fn")
    with pytest.raises(ValueError, match="Unknown intrinsic reward 'phi'.*phi_return_to_go"):
        get_intrinsic_reward("phi")
    with pytest.raises(TypeError, match="not callable"):
        get_reward("math.pi")


def test_register(monkeypatch):
    monkeypatch.setattr(registry, "REWARDS", dict(registry.REWARDS))

    @register_reward("length")
    def length(completions, **kwargs):
        return [float(len(c)) for c in completions]

    assert get_reward("length")(["ab", "c"]) == [2.0, 1.0]
    with pytest.raises(ValueError, match="already registered"):
        register_reward("length", len)


def test_trl_calling_convention():
    from trl.trainer.utils import get_callable_name

    kwargs = dict(
        prompts=["q"], completion_ids=[[1, 2]], trainer_state=None, log_extra=lambda *a: None,
        log_metric=lambda *a: None, answer=["#### 4"], question=["q"],
    )
    assert get_reward("math")(completions=[r"\boxed{4}"], **kwargs) == [1.0]
    assert get_reward("format")(completions=[r"\boxed{4}"], **kwargs) == [1.0]
    assert [get_callable_name(get_reward(n)) for n in ("math", "format", "code")] == [
        "math_accuracy", "answer_format", "code_tests",
    ]
