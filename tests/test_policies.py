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
