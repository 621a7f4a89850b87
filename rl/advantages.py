"""Advantages: the trainer's outcome advantage plus a normalised per-token phi credit.

TRL computes the outcome advantage per sequence (group-normalised for GRPO, leave-one-out for RLOO). The dense term
adds, to every token in the loss, `dense_coef` x its phi credit (`rewards.intrinsic.phi_token_credit`: return-to-go
`phi_T - phi(s_i)` from the token's decode step, or the immediate step reward) after standardising that credit
within its group of `num_generations` rollouts over the group's loss tokens and clipping it to +-`clip`:

    z[i, j] = clip((credit[i, j] - mean_group(i)) / std_group(i), -clip, clip)      (j in the loss)
    A[i, j] = A_outcome[i] + dense_coef * z[i, j]

So `dense_coef` is in units of the credit's within-group standard deviation, whatever the answer length, the task
or the trainer: GRPO and RLOO add the same dense term for the same rollouts (their outcome terms differ as TRL's
do: GRPO's is group-normalised, RLOO's is in reward units unless `normalize_advantages`). A group whose credit is
constant over its loss tokens (e.g. no gold answers: credit 0) gets no dense term. Tokens out of the loss get none
and do not enter the statistics. With `dense_coef = 0` the outcome advantage is returned unchanged ([B], TRL's own
loss path).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

EPS = 1e-6


def credit_row_stats(credit: torch.Tensor, in_loss: torch.Tensor) -> torch.Tensor:
    """[B, G] credit, [B, G] bool -> [B, 3] per-row (count, sum, sum of squares) over the loss tokens (float64)."""
    m = in_loss.to(torch.float64)
    c = credit.to(torch.float64) * m
    return torch.stack([m.sum(-1), c.sum(-1), (c * c).sum(-1)], dim=-1)


def standardise_credit(credit: torch.Tensor, in_loss: torch.Tensor, group_size: int, clip: float,
                       gather: Callable[[torch.Tensor], torch.Tensor] | None = None, offset: int = 0) -> torch.Tensor:
    """Credit standardised within each group of `group_size` consecutive rows over its loss tokens, then clipped.

    Args:
        credit: [B, G] per-token credit of this process's rows.
        in_loss: [B, G] bool, the tokens in the loss.
        group_size: rows per group (TRL's num_generations); groups are consecutive rows of the global batch.
        clip: bound on |z|.
        gather: concatenates a [B, 3] tensor over processes into [B_global, 3] (None: one process).
        offset: index of this process's first row in the global batch.
    Returns:
        [B, G] z-scores (0 out of the loss and in groups whose credit does not vary).
    """
    stats = credit_row_stats(credit, in_loss)  # [B, 3]
    everyone = gather(stats) if gather is not None else stats  # [B_global, 3]
    if everyone.shape[0] % group_size:
        raise ValueError(f"{everyone.shape[0]} rows do not form groups of {group_size}.")
    groups = everyone.view(-1, group_size, 3).sum(1)  # [groups, 3]
    count = groups[:, 0].clamp(min=1.0)
    mean = groups[:, 1] / count
    std = (groups[:, 2] / count - mean * mean).clamp(min=0.0).sqrt()  # [groups]
    rows = torch.arange(offset, offset + credit.shape[0], device=credit.device) // group_size  # [B] group index
    mean, std = mean.to(credit.device)[rows, None], std.to(credit.device)[rows, None]  # [B, 1]
    z = (credit.to(torch.float64) - mean) / std.clamp(min=EPS)
    z = torch.where((std > EPS) & in_loss, z.clamp(-clip, clip), torch.zeros_like(z))
    return z.to(credit.dtype)


def dense_advantages(outcome: torch.Tensor, credit: torch.Tensor, in_loss: torch.Tensor, dense_coef: float,
                     group_size: int, clip: float = 3.0, gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     offset: int = 0) -> tuple[torch.Tensor, float]:
    """Combine the outcome advantage with the standardised dense phi credit.

    Args:
        outcome: [B] outcome advantages.
        credit: [B, G] per-token phi credit.
        in_loss: [B, G] bool, the tokens in the loss.
        dense_coef: weight of the standardised credit (>= 0).
        group_size, clip, gather, offset: see `standardise_credit`.
    Returns:
        ([B, G] advantages, or `outcome` itself when dense_coef == 0; dense share: the dense term's fraction of
        the total absolute advantage over this process's loss tokens, 0.0 when dense_coef == 0).
    """
    if dense_coef < 0:
        raise ValueError(f"dense_coef must be >= 0, got {dense_coef}.")
    if outcome.dim() != 1 or credit.shape != in_loss.shape or credit.shape[0] != outcome.shape[0]:
        raise ValueError(f"Expected outcome [B], credit and in_loss [B, G]; got {tuple(outcome.shape)}, "
                         f"{tuple(credit.shape)}, {tuple(in_loss.shape)}.")
    if dense_coef == 0:
        return outcome, 0.0
    z = standardise_credit(credit.to(outcome.dtype), in_loss, group_size, clip, gather, offset)
    dense = dense_coef * z  # [B, G], 0 out of the loss
    mask = in_loss.to(outcome.dtype)
    total = dense.abs().sum() + (outcome.abs()[:, None] * mask).sum()
    share = float(dense.abs().sum() / total) if total > 0 else 0.0
    return outcome[:, None] + dense, share
