"""Advantages: the trainer's outcome advantage plus the dense per-token phi term.

TRL computes the outcome advantage per sequence (group-normalised for GRPO, leave-one-out for RLOO). The dense
term adds, to every token the sampler decoded, `dense_coef` x its phi credit (`rewards.intrinsic.phi_token_credit`:
return-to-go `phi_T - phi(s_i)` from the token's decode step, or the immediate step reward). Positions never
decoded (prefilled template tokens, reasoning skipped by an early exit) get no dense term and are out of the loss.

    A[i, j] = A_outcome[i] + dense_coef * credit[i, j]       (j decoded by the sampler)

With `dense_coef = 0` the outcome advantage is returned unchanged ([B], TRL's own loss path).
"""

from __future__ import annotations

import torch


def dense_advantages(outcome: torch.Tensor, credit: torch.Tensor, generated: torch.Tensor,
                     dense_coef: float) -> tuple[torch.Tensor, float]:
    """Combine the outcome advantage with the dense phi credit.

    Args:
        outcome: [B] outcome advantages.
        credit: [B, G] per-token phi credit (0 where not decoded).
        generated: [B, G] bool, positions the sampler decoded.
        dense_coef: weight of the dense term (>= 0).
    Returns:
        ([B, G] advantages, or `outcome` itself when dense_coef == 0; dense share: the dense term's fraction of
        the total absolute advantage over decoded tokens, 0.0 when dense_coef == 0).
    """
    if dense_coef < 0:
        raise ValueError(f"dense_coef must be >= 0, got {dense_coef}.")
    if outcome.dim() != 1 or credit.shape != generated.shape or credit.shape[0] != outcome.shape[0]:
        raise ValueError(f"Expected outcome [B], credit and generated [B, G]; got {tuple(outcome.shape)}, "
                         f"{tuple(credit.shape)}, {tuple(generated.shape)}.")
    if dense_coef == 0:
        return outcome, 0.0
    mask = generated.to(outcome.dtype)  # [B, G]
    dense = dense_coef * credit.to(outcome.dtype) * mask  # [B, G]
    total = dense.abs().sum() + (outcome.abs()[:, None] * mask).sum()
    share = float(dense.abs().sum() / total) if total > 0 else 0.0
    return outcome[:, None] + dense, share
