"""Unmasking policies: which masked positions to decode at this step.

Each policy is a pure function over [B, G] tensors (G = generation-region length) that returns a boolean
[B, G] selection. Rows are independent: every policy computes a per-row budget `n` and keeps the `n`
best-ranked candidates of that row (sort, compare rank with n, scatter back; no loop over rows). Every
policy decodes at least one position in a row that has a candidate, so sampling always terminates.

Scores come from the T=1 distribution (`token_stats`), whatever temperature the tokens are drawn at.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

POLICIES = ("left_to_right", "entropy", "confidence", "margin", "med", "eb", "threshold")


@dataclass
class TokenStats:
    """Per-position statistics of the T=1 predictive distribution, each [B, G]."""

    entropy: torch.Tensor
    confidence: torch.Tensor
    margin: torch.Tensor


def token_stats(logits: torch.Tensor, top: bool = True) -> TokenStats:
    """Entropy (nats), top-1 probability and top-1 minus top-2 probability of softmax(logits).

    Args:
        logits: [B, G, V]. Computed in float32; -inf logits (impossible tokens) are handled exactly.
        top: compute confidence and margin (a top-2 over the vocabulary); False leaves them 0.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # [B, G, V]
    p = logp.exp()
    entropy = torch.special.entr(p).sum(-1)  # entr(0) = 0, so impossible tokens add nothing
    if not top:
        return TokenStats(entropy=entropy, confidence=torch.zeros_like(entropy), margin=torch.zeros_like(entropy))
    top = p.topk(2, dim=-1).values if p.shape[-1] > 1 else torch.cat([p, torch.zeros_like(p)], -1)
    return TokenStats(entropy=entropy, confidence=top[..., 0], margin=top[..., 0] - top[..., 1])


def select_ranked(key: torch.Tensor, candidates: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Select, per row, the `n` candidates with the smallest key (ties broken by column).

    Args:
        key: [B, G] ranking key, lower is decoded first.
        candidates: [B, G] bool, positions that may be decoded now.
        n: [B] per-row budget; clipped to the number of candidates.
    Returns:
        [B, G] bool selection.
    """
    masked_key = torch.where(candidates, key.double(), torch.full_like(key, math.inf, dtype=torch.float64))
    order = torch.sort(masked_key, dim=-1, stable=True).indices  # [B, G]
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(key.shape[-1], device=key.device).expand_as(order))
    return candidates & (ranks < n[:, None])


def _count(mask: torch.Tensor) -> torch.Tensor:
    return mask.sum(-1)


def left_to_right(candidates: torch.Tensor, k: int) -> torch.Tensor:
    """The k leftmost candidates."""
    cols = torch.arange(candidates.shape[-1], device=candidates.device).expand(candidates.shape)
    return top_k(cols.float(), candidates, k)


def top_k(key: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """Fixed k per step, ranked by `key` (entropy ascending, or -confidence, or -margin)."""
    return select_ranked(key, candidates, torch.full_like(_count(candidates), k))


def med(entropy: torch.Tensor, candidates: torch.Tensor, lam: float, k_max: int) -> torch.Tensor:
    """Multi-token entropy decoding: every candidate with H < lam (at most k_max, lowest first), else the
    single lowest-entropy one. The factorisation error is bounded by lam * k_max."""
    n = _count(candidates & (entropy < lam)).clamp(min=1, max=k_max)
    return select_ranked(entropy, candidates, n)


def entropy_bounded(entropy: torch.Tensor, proxy: torch.Tensor, candidates: torch.Tensor, gamma: float):
    """EB-Sampler: sort by `proxy` (lower first); take the largest prefix with cumsum(H) - cummax(H) <= gamma.

    cumsum - cummax is non-decreasing along the sorted order, so the prefix length is a count. At least one.
    """
    masked_proxy = torch.where(candidates, proxy.double(), torch.full_like(proxy, math.inf, dtype=torch.float64))
    order = torch.sort(masked_proxy, dim=-1, stable=True).indices
    h_sorted = torch.where(candidates, entropy, torch.zeros_like(entropy)).double().gather(-1, order)
    c_sorted = candidates.gather(-1, order)
    excess = h_sorted.cumsum(-1) - h_sorted.cummax(-1).values  # [B, G]
    n = (c_sorted & (excess <= gamma)).sum(-1).clamp(min=1)
    return select_ranked(proxy, candidates, n)


def threshold(confidence: torch.Tensor, candidates: torch.Tensor, tau: float) -> torch.Tensor:
    """Fast-dLLM confidence threshold: every candidate with p_max >= tau, else the most confident one."""
    n = _count(candidates & (confidence >= tau)).clamp(min=1)
    return select_ranked(-confidence, candidates, n)


@dataclass
class PolicyConfig:
    """Which unmasking policy and its parameters. Field names match the recipe keys."""

    policy: str = "med"
    """One of left_to_right, entropy, confidence, margin (fixed-k baselines), med, eb, threshold."""
    k: int = 1
    """Tokens per step for left_to_right and the fixed-k policies."""
    med_lambda: float = 0.2
    """MED entropy threshold lambda (nats), > 0."""
    med_k_max: int = 8
    """MED: most tokens decoded in one step."""
    eb_gamma: float = 0.1
    """EB-Sampler error budget gamma (nats), >= 0."""
    eb_proxy: str = "entropy"
    """EB ordering proxy: 'entropy' or 'confidence'."""
    tau: float = 0.9
    """Confidence threshold in (0, 1]."""
    max_per_step: int | None = None
    """Most positions a row decodes in one step, whatever the policy (it keeps the policy's best-ranked ones): a cap
    on the parallelism of med / eb / threshold. None: the policy's own limit. `parallel_guard` moves it in RL."""

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"Unknown unmasking policy {self.policy!r}; choose one of {', '.join(POLICIES)}.")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}.")
        if not self.med_lambda > 0:
            raise ValueError(f"med_lambda must be > 0 (an entropy in nats), got {self.med_lambda}.")
        if self.med_k_max < 1:
            raise ValueError(f"med_k_max must be >= 1, got {self.med_k_max}.")
        if not self.eb_gamma >= 0:
            raise ValueError(f"eb_gamma must be >= 0, got {self.eb_gamma}.")
        if self.eb_proxy not in ("entropy", "confidence"):
            raise ValueError(f"eb_proxy={self.eb_proxy!r}; use 'entropy' or 'confidence'.")
        if not 0 < self.tau <= 1:
            raise ValueError(f"tau must be in (0, 1], got {self.tau}.")
        if self.max_per_step is not None and self.max_per_step < 1:
            raise ValueError(f"max_per_step must be >= 1 or None, got {self.max_per_step}.")

    def select(self, stats: TokenStats | None, candidates: torch.Tensor) -> torch.Tensor:
        """[B, G] bool: the positions to decode this step (at most `max_per_step` per row). `stats` may be None for
        left_to_right, which ranks by column alone."""
        key = self.key(stats, candidates)
        if self.policy in ("left_to_right", "entropy", "confidence", "margin"):
            chosen = top_k(key, candidates, self.k)
        elif self.policy == "med":
            chosen = med(stats.entropy, candidates, self.med_lambda, self.med_k_max)
        elif self.policy == "eb":
            chosen = entropy_bounded(stats.entropy, key, candidates, self.eb_gamma)
        else:
            chosen = threshold(stats.confidence, candidates, self.tau)
        if self.max_per_step is None:
            return chosen
        return top_k(key, chosen, self.max_per_step)

    @property
    def reads_top(self) -> bool:
        """Whether the policy reads confidence or margin (a top-2 over the vocabulary per position)."""
        return self.policy in ("confidence", "margin", "threshold") or (self.policy == "eb" and
                                                                        self.eb_proxy == "confidence")

    def key(self, stats: TokenStats | None, candidates: torch.Tensor) -> torch.Tensor:
        """[B, G] the policy's ranking key (lower is decoded first)."""
        if self.policy == "left_to_right":
            return torch.arange(candidates.shape[-1], device=candidates.device).expand(candidates.shape).float()
        if self.policy in ("entropy", "med") or (self.policy == "eb" and self.eb_proxy == "entropy"):
            return stats.entropy
        if self.policy == "margin":
            return -stats.margin
        return -stats.confidence  # confidence, threshold, eb by confidence
