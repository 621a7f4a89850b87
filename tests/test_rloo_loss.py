"""The dense RLOO loss against hand-computed numbers."""

import math

import pytest
import torch

from rl.rloo_loss import per_token_clipped_loss


def test_per_token_clipped_loss_hand_computed():
    # Row 0: ratios e^0.1, 1, e^-0.2 with advantages +1, -2, -1; row 1: ratios 1, e^0.3, 1 (the last out of the loss).
    logps = torch.tensor([[0.1, 0.0, -0.2], [0.0, 0.3, 0.0]])
    old = torch.zeros(2, 3)
    adv = torch.tensor([[1.0, -2.0, -1.0], [0.5, 0.5, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, stats = per_token_clipped_loss(logps, old, adv, mask, epsilon_low=0.05, epsilon_high=0.05)
    r = [math.exp(0.1), 1.0, math.exp(-0.2)]
    # token 0: -min(1.105 * 1, 1.05 * 1) = -1.05; token 1: -min(-2, -2) = 2;
    # token 2: r = 0.819, clipped 0.95: -min(-0.819, -0.95) = 0.95
    row0 = (-min(r[0], 1.05) + 2.0 + -min(-r[2], -0.95)) / 3
    # row 1: token 0: -0.5; token 1: r = 1.35 -> -min(0.675, 0.525) = -0.525; token 2 out of the loss
    row1 = (-0.5 - min(math.exp(0.3) * 0.5, 1.05 * 0.5)) / 2
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    assert stats["clip_fraction"].item() == pytest.approx(3 / 5)  # tokens 0 and 2 of row 0, token 1 of row 1


def test_gradient_at_ratio_one_is_minus_the_advantage_per_row_mean():
    logps = torch.zeros(1, 4, requires_grad=True)
    adv = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.tensor([[1, 1, 0, 1]])
    loss, _ = per_token_clipped_loss(logps, logps.detach(), adv, mask, 0.2, 0.2)
    loss.backward()
    assert torch.allclose(logps.grad, torch.tensor([[-1 / 3, -2 / 3, 0.0, -4 / 3]]))
