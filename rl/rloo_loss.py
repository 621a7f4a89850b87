"""The per-token clipped loss of diffusion RLOO with dense advantages.

TRL's RLOO loss is per sequence (one ratio of summed log-probs, one advantage per row). A dense advantage varies
along the row, so `DiffusionRLOOTrainer` scores it per token instead, PPO-style, with TRL's clipping bounds:

    r[i, j] = exp(logp[i, j] - old[i, j])
    loss    = mean_i ( sum_j m[i, j] * -min(r[i, j] A[i, j], clip(r[i, j], 1 - eps_low, 1 + eps_high) A[i, j])
                       / max(1, sum_j m[i, j]) )

i.e. a per-row mean over the loss tokens `m`, then a mean over rows (RLOO's row weighting: every rollout counts
the same). The KL penalty stays TRL's (folded into the rewards before the advantages).
"""

from __future__ import annotations

import torch


def per_token_clipped_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                           mask: torch.Tensor, epsilon_low: float, epsilon_high: float) -> tuple[torch.Tensor, dict]:
    """[B, G] log-probs, old log-probs, advantages and loss mask -> (scalar loss, {"clip_fraction": tensor}).

    `clip_fraction` is the share of loss tokens whose ratio left [1 - epsilon_low, 1 + epsilon_high].
    """
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)  # [B, G]
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * advantages, clipped * advantages)  # [B, G]
    loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    clip_fraction = ((ratio != clipped).to(logps.dtype) * mask).sum() / mask.sum().clamp(min=1.0)
    return loss, {"clip_fraction": clip_fraction.detach()}
