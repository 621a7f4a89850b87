"""Unmasking policies on hand-built score tensors."""

import math

import pytest
import torch

from rollout.policies import (
    PolicyConfig,
    entropy_bounded,
    left_to_right,
    med,
    select_ranked,
    threshold,
    token_stats,
    top_k,
)


def picks(mask: torch.Tensor) -> list[list[int]]:
    return [torch.nonzero(row).squeeze(-1).tolist() for row in mask]


def test_select_ranked_per_row_budget_and_candidates():
    key = torch.tensor([[0.3, 0.1, 0.2, 0.0], [0.5, 0.4, 0.3, 0.2]])
    cand = torch.tensor([[True, True, True, False], [True, True, True, True]])
    assert picks(select_ranked(key, cand, torch.tensor([2, 3]))) == [[1, 2], [1, 2, 3]]
    # A budget larger than the candidate count takes every candidate, never a non-candidate.
    assert picks(select_ranked(key, cand, torch.tensor([9, 0]))) == [[0, 1, 2], []]


def test_left_to_right_and_top_k():
    cand = torch.tensor([[False, True, True, True], [True, False, False, True]])
    assert picks(left_to_right(cand, 2)) == [[1, 2], [0, 3]]
    ent = torch.tensor([[0.0, 0.9, 0.1, 0.5], [0.2, 0.0, 0.0, 0.1]])
    assert picks(top_k(ent, cand, 1)) == [[2], [3]]
    assert picks(top_k(ent, cand, 2)) == [[2, 3], [0, 3]]


def test_med_takes_all_below_lambda_capped_else_single_lowest():
    ent = torch.tensor([[0.05, 0.5, 0.01, 0.3], [0.9, 0.7, 0.8, 0.6], [0.01, 0.02, 0.03, 0.04]])
    cand = torch.ones(3, 4, dtype=torch.bool)
    assert picks(med(ent, cand, lam=0.1, k_max=8)) == [[0, 2], [3], [0, 1, 2, 3]]
    assert picks(med(ent, cand, lam=0.1, k_max=2)) == [[0, 2], [3], [0, 1]]
    # Below-lambda positions that are not candidates do not count.
    cand[0, 2] = False
    assert picks(med(ent, cand, lam=0.1, k_max=8))[0] == [0]


def test_eb_prefix_rule_hand_computed():
    # Sorted by entropy: 0.1, 0.2, 0.3, 1.0. cumsum - cummax: 0, 0.1, 0.3, 0.6.
    ent = torch.tensor([[0.3, 0.1, 1.0, 0.2]])
    cand = torch.ones(1, 4, dtype=torch.bool)
    assert picks(entropy_bounded(ent, ent, cand, gamma=0.0)) == [[1]]
    assert picks(entropy_bounded(ent, ent, cand, gamma=0.15)) == [[1, 3]]
    assert picks(entropy_bounded(ent, ent, cand, gamma=0.35)) == [[0, 1, 3]]
    assert picks(entropy_bounded(ent, ent, cand, gamma=10.0)) == [[0, 1, 2, 3]]
    # Ordering by a different proxy (confidence): order 2, 0, 3, 1 -> excess 0, 0.3, 0.5, 0.6.
    proxy = -torch.tensor([[0.8, 0.1, 0.9, 0.5]])
    assert picks(entropy_bounded(ent, proxy, cand, gamma=0.31)) == [[0, 2]]


def test_threshold_all_confident_or_the_most_confident():
    conf = torch.tensor([[0.95, 0.5, 0.92, 0.1], [0.3, 0.6, 0.2, 0.1]])
    cand = torch.ones(2, 4, dtype=torch.bool)
    assert picks(threshold(conf, cand, tau=0.9)) == [[0, 2], [1]]


def test_token_stats_exact_and_handles_impossible_tokens():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25, 0.0]]]))
    s = token_stats(logits)
    assert s.entropy.item() == pytest.approx(-(0.5 * math.log(0.5) + 0.5 * math.log(0.25)), abs=1e-6)
    assert s.confidence.item() == pytest.approx(0.5)
    assert s.margin.item() == pytest.approx(0.25)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"policy": "nope"},
        {"k": 0},
        {"med_lambda": 0.0},
        {"med_lambda": -1.0},
        {"med_k_max": 0},
        {"eb_gamma": -0.1},
        {"eb_proxy": "margin"},
        {"tau": 0.0},
        {"tau": 1.5},
    ],
)
def test_policy_config_rejects_out_of_range(kwargs):
    with pytest.raises(ValueError):
        PolicyConfig(**kwargs)


@pytest.mark.parametrize("policy", ["med", "threshold", "eb", "entropy"])
def test_max_per_step_keeps_the_policys_best_ranked_positions(policy):
    ent = torch.tensor([[0.05, 0.5, 0.01, 0.03, 0.02]])
    conf = torch.tensor([[0.97, 0.6, 0.99, 0.98, 0.985]])
    stats = token_stats(torch.zeros(1, 5, 3))
    stats.entropy, stats.confidence = ent, conf
    cand = torch.ones(1, 5, dtype=torch.bool)
    kwargs = {"med_lambda": 0.1, "tau": 0.9, "eb_gamma": 0.1, "k": 4}
    free = PolicyConfig(policy=policy, **kwargs).select(stats, cand)
    capped = PolicyConfig(policy=policy, max_per_step=2, **kwargs).select(stats, cand)
    assert int(free.sum()) == 4 and picks(capped) == [[2, 4]]  # the two most confident / lowest entropy


def test_parallel_guard_tightens_its_cap_as_the_policy_grows_confident_and_alarms_on_jumps(caplog):
    from rollout import SamplerConfig
    from rollout.guard import ParallelismGuard

    assert ParallelismGuard.from_config(SamplerConfig(policy="med", med_k_max=8)) is None
    guard = ParallelismGuard.from_config(SamplerConfig(policy="med", med_k_max=8, parallel_guard=True))
    assert guard.cap0 == 8 and guard.cap() == 8
    for _ in range(4):  # steady rounds: reference NLL 1.0, no alarm
        metrics = guard.observe({"tokens_per_nfe": 2.0, "decode_nll": 1.0, "answer_entropy": 1.0})
        assert metrics["rollout/guard_alarm"] == 0 and metrics["rollout/guard_cap"] == 8
    for _ in range(12):  # the policy sharpens to NLL 0.25: the cap follows to 8 * 0.25 = 2
        guard.observe({"tokens_per_nfe": 2.5, "decode_nll": 0.25, "answer_entropy": 0.9})
    assert guard.cap() == 2 and guard.config(SamplerConfig(policy="med")).max_per_step == 2
    metrics = guard.observe({"tokens_per_nfe": 6.0, "decode_nll": 0.25, "answer_entropy": 0.2})
    assert metrics["rollout/guard_alarm"] == 1 and guard.alarms == 1
    assert "tokens per NFE jumped" in caplog.text and "answer entropy fell" in caplog.text
    restored = ParallelismGuard(cap0=8)
    restored.load_state_dict(guard.state_dict())
    assert restored.cap() == guard.cap() and restored.alarms == 1
    with pytest.raises(ValueError, match="needs max_per_step"):
        ParallelismGuard.from_config(SamplerConfig(policy="threshold", parallel_guard=True))
