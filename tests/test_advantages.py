"""Dense advantages against hand-computed values."""

import pytest
import torch

from rewards.intrinsic import phi_token_credit
from rl.advantages import dense_advantages


def test_dense_advantages_hand_computed():
    # Row 0: phi -2.0 -> -1.0 -> -0.5 over three steps; tokens decoded at steps 0, 1, 2, one never decoded.
    # Row 1: exits after step 0 (phi NaN afterwards); one token decoded at step 0, the rest never.
    phi = torch.tensor([[-2.0, -1.0, -0.5], [-3.0, float("nan"), float("nan")]])
    decode_step = torch.tensor([[0, 1, 2, -1], [0, -1, -1, -1]])
    credit = phi_token_credit(decode_step, phi)  # return to go: phi_T - phi(s_i)
    assert torch.allclose(credit, torch.tensor([[1.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    outcome = torch.tensor([1.0, -1.0])
    adv, share = dense_advantages(outcome, credit, decode_step >= 0, dense_coef=0.5)
    expected = torch.tensor([[1.75, 1.25, 1.0, 1.0], [-1.0, -1.0, -1.0, -1.0]])
    assert torch.allclose(adv, expected)
    # |dense| = 0.75 + 0.25 = 1.0 over decoded tokens; |outcome| over decoded tokens = 3 * 1 + 1 * 1 = 4.
    assert share == pytest.approx(1.0 / 5.0)
    immediate = phi_token_credit(decode_step, phi, mode="immediate")
    assert torch.allclose(immediate, torch.tensor([[1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))


def test_dense_coef_zero_returns_the_outcome_advantage_itself():
    outcome = torch.tensor([0.3, -0.3])
    adv, share = dense_advantages(outcome, torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool), 0.0)
    assert adv is outcome and share == 0.0


def test_bad_shapes_and_coefficients_are_rejected():
    with pytest.raises(ValueError, match="dense_coef"):
        dense_advantages(torch.zeros(2), torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), -1.0)
    with pytest.raises(ValueError, match="Expected"):
        dense_advantages(torch.zeros(3), torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), 1.0)
