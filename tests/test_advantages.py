"""Dense advantages against hand-computed values."""

import math

import pytest
import torch

from rewards.intrinsic import phi_token_credit
from rl.advantages import dense_advantages, standardise_credit


def test_dense_advantages_hand_computed():
    # Row 0: phi -2.0 -> -1.0 -> -0.5 over three steps; tokens decoded at steps 0, 1, 2, one never decoded.
    # Row 1: exits after step 0 (phi NaN afterwards); one token decoded at step 0, the rest never.
    phi = torch.tensor([[-2.0, -1.0, -0.5], [-3.0, float("nan"), float("nan")]])
    decode_step = torch.tensor([[0, 1, 2, -1], [0, -1, -1, -1]])
    credit = phi_token_credit(decode_step, phi)  # return to go: phi_T - phi(s_i)
    assert torch.allclose(credit, torch.tensor([[1.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    outcome = torch.tensor([1.0, -1.0])
    # One group of two rows; loss tokens: credits 1.5, 0.5, 0.0 (row 0) and 0.0 (row 1): mean 0.5,
    # population std sqrt((1 + 0 + 0.25 + 0.25) / 4) = sqrt(0.375).
    adv, share = dense_advantages(outcome, credit, decode_step >= 0, dense_coef=0.5, group_size=2)
    sd = math.sqrt(0.375)
    z = [1.0 / sd, 0.0, -0.5 / sd, -0.5 / sd]
    expected = torch.tensor([[1 + 0.5 * z[0], 1.0, 1 + 0.5 * z[2], 1.0], [-1 + 0.5 * z[3], -1.0, -1.0, -1.0]])
    assert torch.allclose(adv, expected, atol=1e-6)
    dense = 0.5 * (abs(z[0]) + abs(z[2]) + abs(z[3]))  # over loss tokens; outcome: 3 * 1 + 1 * 1
    assert share == pytest.approx(dense / (dense + 4.0), rel=1e-5)
    immediate = phi_token_credit(decode_step, phi, mode="immediate")
    assert torch.allclose(immediate, torch.tensor([[1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))


def test_standardised_credit_is_clipped_and_zero_out_of_the_loss_and_in_constant_groups():
    credit = torch.tensor([[10.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [2.0] * 10])
    in_loss = torch.ones(2, 10, dtype=torch.bool)
    in_loss[0, -1] = False
    z = standardise_credit(credit, in_loss, group_size=1, clip=2.0)
    assert z[0, 0] == 2.0 and z[0, -1] == 0.0  # clipped; out of the loss
    assert (z[1] == 0).all()  # a constant group: no dense term


def test_dense_term_is_invariant_to_the_credit_scale_and_uses_only_loss_tokens():
    """A longer answer block scales phi (more summed positions); the dense term must not move with it."""
    g = torch.Generator().manual_seed(0)
    credit = torch.randn(8, 12, generator=g)
    in_loss = torch.rand(8, 12, generator=g) < 0.7
    outcome = torch.randn(8, generator=g)
    a, share = dense_advantages(outcome, credit, in_loss, 0.2, group_size=4, clip=10.0)
    for scale in (0.1, 7.0):
        b, share_b = dense_advantages(outcome, credit * scale, in_loss, 0.2, group_size=4, clip=10.0)
        assert torch.allclose(a, b, atol=1e-5) and share == pytest.approx(share_b, rel=1e-5)
    dense = a - outcome[:, None]
    for k in range(2):  # std = dense_coef over each group's loss tokens, 0 elsewhere
        d, m = dense[4 * k : 4 * k + 4], in_loss[4 * k : 4 * k + 4]
        assert d[m].std(unbiased=False) == pytest.approx(0.2, rel=1e-4) and (d[~m] == 0).all()
    changed = credit.clone()
    changed[~in_loss] = 1e6  # tokens out of the loss do not enter the statistics
    c, _ = dense_advantages(outcome, changed, in_loss, 0.2, group_size=4, clip=10.0)
    assert torch.allclose(a, c, atol=1e-6)


def test_groups_are_standardised_across_processes_as_on_one():
    g = torch.Generator().manual_seed(1)
    credit, in_loss = torch.randn(8, 5, generator=g), torch.rand(8, 5, generator=g) < 0.8
    outcome = torch.zeros(8)
    whole, _ = dense_advantages(outcome, credit, in_loss, 1.0, group_size=4)  # groups straddle the halves below
    shards = [(credit[:2], in_loss[:2]), (credit[2:6], in_loss[2:6]), (credit[6:], in_loss[6:])]
    from rl.advantages import credit_row_stats

    everyone = torch.cat([credit_row_stats(c, m) for c, m in shards])
    parts, offset = [], 0
    for c, m in shards:
        parts.append(dense_advantages(outcome[offset : offset + len(c)], c, m, 1.0, group_size=4,
                                      gather=lambda x: everyone, offset=offset)[0])
        offset += len(c)
    assert torch.allclose(torch.cat(parts), whole, atol=1e-6)


def test_dense_coef_zero_returns_the_outcome_advantage_itself():
    outcome = torch.tensor([0.3, -0.3])
    adv, share = dense_advantages(outcome, torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool), 0.0, group_size=2)
    assert adv is outcome and share == 0.0


def test_bad_shapes_and_coefficients_are_rejected():
    with pytest.raises(ValueError, match="dense_coef"):
        dense_advantages(torch.zeros(2), torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), -1.0, group_size=2)
    with pytest.raises(ValueError, match="Expected"):
        dense_advantages(torch.zeros(3), torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), 1.0, group_size=2)
    with pytest.raises(ValueError, match="groups"):
        dense_advantages(torch.zeros(3), torch.zeros(3, 3), torch.ones(3, 3, dtype=torch.bool), 1.0, group_size=2)
