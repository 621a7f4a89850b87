"""Diffusion log-prob estimators for the RL loss.

A masked diffusion model has no exact sequence likelihood; the RL ratio pi/pi_old needs a per-token surrogate.
Every estimator returns [B, G] log-probs of the completion tokens and [B, G] entropies of the distributions
they were scored under (both 0 where `generated` is False), and is a
deterministic function of (parameters, tokens, per-row seeds), so old, reference and current log-probs agree
exactly on-policy (ratio 1).

- `mean_field` (d1): every generated token masked at once, prompt tokens masked with probability
  `prompt_mask_prob`; one forward.
- `coupled`: a random mask over the generated tokens and its complement; each token is scored once, in the pass
  where it is masked (the other pass conditions on it); two forwards.
- `trajectory`: replays the sampler's own states. The row's decode steps are cut into S contiguous buckets; each
  bucket's tokens are scored from the state at the bucket's first step. S >= the row's NFE reproduces the
  sampler's own log-probs exactly.
- `trajectory` with sampled steps (`trajectory_steps`): S of the row's decode steps drawn at random (seeded per
  row and round); each drawn step's tokens are scored from that step's exact state and the other tokens are left
  out of the loss. Every scored token sees the context it was sampled in (buckets score later tokens of a bucket
  from an earlier, more-masked state), at the cost of scoring a random S/NFE share of the tokens per update. The
  trainer multiplies row i's scored log-probs by `step_weights` = NFE_i / S_i (S_i = steps drawn), so their sum is
  an unbiased estimate of the full replay's sum and a row needing more steps does not count less.

Every estimator runs a fixed number of forwards per call, whatever the data (mean_field 1, coupled 2, trajectory
S), so processes under ZeRO-3 (which gathers parameters per forward) never wait on each other.

`logits_fn(input_ids, attention_mask, keep_last)` is `MDLMAdapter.logits` (mask logit -inf, shift handled). The
estimators read it through the adapter's `readout`: logits, softmax and entropy are made only at the positions a
forward scores (a trajectory bucket's tokens: about G/S per row), a chunk at a time under activation checkpointing,
so neither [B, G, V] logits nor their fp32 softmax are ever kept for the backward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from rollout.adapter import MDLMAdapter, Readout
from rollout.cache import CachePlan, refresh_steps, replay_readout

LogitsFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def _row_bernoulli(seeds: torch.Tensor, shape: tuple[int, int], p: float, device) -> torch.Tensor:
    """[B, N] Bernoulli(p) draws; row i depends only on seeds[i] (batch invariant)."""
    out = torch.empty(shape, dtype=torch.float64)
    for i, s in enumerate(seeds.tolist()):  # RNG only: one stream per row
        out[i].uniform_(generator=torch.Generator().manual_seed(int(s)))
    return (out < p).to(device)


def trajectory_steps(seeds: torch.Tensor, nfe: torch.Tensor, count: int) -> torch.Tensor:
    """[B, count] decode steps drawn without replacement from each row's range(nfe) (sorted; -1 pads rows with
    fewer steps than `count`). Row i depends only on (seeds[i], nfe[i])."""
    out = torch.full((len(nfe), count), -1, dtype=torch.long)
    for i, (s, n) in enumerate(zip(seeds.tolist(), nfe.tolist())):  # RNG only: one stream per row
        picked = torch.randperm(int(n), generator=torch.Generator().manual_seed(int(s)))[:count]
        out[i, : len(picked)] = picked.sort().values
    return out.to(nfe.device)


def step_weights(steps: torch.Tensor, nfe: torch.Tensor) -> torch.Tensor:
    """[B, S] drawn steps (-1 = none), [B] NFE -> [B] NFE_i / (steps drawn in row i): the inverse probability that a
    given step of row i is drawn (1 for rows with no step drawn)."""
    drawn = (steps >= 0).sum(-1).clamp(min=1).to(torch.float32)
    return nfe.to(drawn.device, torch.float32).clamp(min=1) / drawn


def readout_fn(logits_fn: LogitsFn):
    """`(input_ids, attention_mask, keep_last) -> Readout`: the adapter's own readout for `MDLMAdapter.logits` (logits
    made only at the scored positions), else the callable's [B, K, V] logits read whole."""
    owner = getattr(logits_fn, "__self__", None)
    if getattr(logits_fn, "__name__", "") == "logits" and hasattr(owner, "readout"):
        return owner.readout
    return lambda input_ids, attention_mask, keep_last: Readout(
        mask_id=-1, full=logits_fn(input_ids, attention_mask, keep_last))


def score_positions(read: Readout, rows: torch.Tensor, cols: torch.Tensor, targets: torch.Tensor,
                    temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[N] log softmax(logits / T) of `targets` at (rows, cols) of one forward, and [N] entropies.

    A chunk of positions at a time; with gradients each chunk runs under activation checkpointing, so only its
    [n, H] inputs are kept for the backward pass, never its [n, V] logits and softmax (recomputed then)."""
    def fp32(logits, y):
        logp = torch.log_softmax(logits.float() / (temperature or 1.0), dim=-1)  # [n, V]
        return logp.gather(-1, y[:, None]).squeeze(-1), torch.special.entr(logp.exp()).sum(-1)

    spans = read.spans(len(rows))
    if not torch.is_grad_enabled():
        parts = [fp32(logits, targets[s]) for s, logits in read.chunks(rows, cols)]
    elif read.one_head_call or read.full is not None:  # checkpoint the fp32 work only (the head runs once)
        logits = read.logits(rows, cols)
        parts = [checkpoint(fp32, logits[s], targets[s], use_reentrant=False) for s in spans]
    else:  # checkpoint head and fp32 work: a chunk keeps only its [n, H] hidden states for the backward pass
        parts = [checkpoint(lambda src, r, c, y: fp32(read.logits(r, c, source=src), y), read.source, rows[s],
                            cols[s], targets[s], use_reentrant=False) for s in spans]
    if not parts:
        empty = read.source.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _score(logits_fn: LogitsFn, input_ids, attention_mask, gen_len: int, targets, temperature: float, scored,
           read: Readout | None = None):
    """[B, G] log softmax(logits / T) of `targets` at the `scored` generation columns, and [B, G] entropies (0
    elsewhere); logits are made only at the scored positions. `read`: a readout of this forward already made."""
    read = read or readout_fn(logits_fn)(input_ids, attention_mask, gen_len)
    r, c = torch.nonzero(scored, as_tuple=True)
    logp, ent = score_positions(read, r, c, targets[r, c], temperature)
    zero = torch.zeros(scored.shape, dtype=torch.float32, device=scored.device)
    return zero.index_put((r, c), logp), zero.index_put((r, c), ent)


def _cached_readout(logits_fn: LogitsFn, plan: CachePlan, input_ids, state, attention_mask, gen_start: int,
                    decode_step, step) -> Readout:
    """The readout the cached sampler had at decode step `step` [B] (state [B, L] = the canvas at that step): the
    row's context as it was when it entered its current block, its fresh columns as they are now."""
    adapter = getattr(logits_fn, "__self__", None)
    if not isinstance(adapter, MDLMAdapter):
        raise ValueError("Replaying a cached sampler needs the adapter (pass MDLMAdapter.logits as logits_fn).")
    current, entered = refresh_steps(decode_step, input_ids[:, gen_start:], adapter.mask_id, plan.block, step)
    refresh = input_ids.clone()
    refresh[:, gen_start:][(decode_step >= 0) & (decode_step >= entered[:, None])] = adapter.mask_id
    return replay_readout(adapter, plan, refresh, state, attention_mask, current, input_ids.shape[1] - gen_start)


def mean_field_logps(
    logits_fn: LogitsFn,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    gen_start: int,
    generated: torch.Tensor,
    seeds: torch.Tensor,
    mask_id: int,
    temperature: float = 1.0,
    prompt_mask_prob: float = 0.15,
) -> torch.Tensor:
    """d1's one-step estimator. input_ids [B, L] final canvas, generated [B, G] -> ([B, G], [B, G])."""
    gen_len = input_ids.shape[1] - gen_start
    x = input_ids.clone()
    x[:, gen_start:][generated] = mask_id
    if prompt_mask_prob > 0:
        hide = _row_bernoulli(seeds, (x.shape[0], gen_start), prompt_mask_prob, x.device)
        hide &= attention_mask[:, :gen_start].bool()
        x[:, :gen_start][hide] = mask_id
    return _score(logits_fn, x, attention_mask, gen_len, input_ids[:, gen_start:], temperature, generated)


def coupled_logps(
    logits_fn: LogitsFn,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    gen_start: int,
    generated: torch.Tensor,
    seeds: torch.Tensor,
    mask_id: int,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Complementary-mask estimator: two forwards, every generated token scored exactly once."""
    gen_len = input_ids.shape[1] - gen_start
    first = _row_bernoulli(seeds, tuple(generated.shape), 0.5, generated.device) & generated
    out = ent_out = torch.zeros(generated.shape, dtype=torch.float32, device=generated.device)
    targets = input_ids[:, gen_start:]
    for hidden in (first, generated & ~first):
        x = input_ids.clone()
        x[:, gen_start:][hidden] = mask_id
        logp, ent = _score(logits_fn, x, attention_mask, gen_len, targets, temperature, hidden)
        out, ent_out = torch.where(hidden, logp, out), torch.where(hidden, ent, ent_out)
    return out, ent_out


def trajectory_logps(
    logits_fn: LogitsFn,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    gen_start: int,
    decode_step: torch.Tensor,
    nfe: torch.Tensor,
    mask_id: int,
    buckets: int,
    temperature: float = 1.0,
    steps: torch.Tensor | None = None,
    cache: CachePlan | None = None,
) -> torch.Tensor:
    """Replay of the sampler's states in `buckets` forwards.

    Args:
        input_ids: [B, L] final canvas (never-generated positions hold the mask id).
        decode_step: [B, G] step each position was decoded at (-1: not decoded by the sampler).
        nfe: [B] the row's number of steps.
        buckets: S; bucket b of row i covers steps [floor(b n_i / S), floor((b+1) n_i / S)).
        steps: optional [B, S'] decode steps (`trajectory_steps`, -1 = none): then forward b scores exactly the
            tokens decoded at steps[:, b], from the state at that step, and `buckets` is ignored.
        cache: the sampler's cache plan (`rollout.cache`), if it ran with a KV cache: each state is then scored as
            the cached sampler saw it (the context as of the row's block entry), so S >= NFE still reproduces the
            sampler's log-probs.
    Returns:
        [B, G] log-probs of decoded tokens and [B, G] entropies (0 elsewhere).
    """
    if buckets < 1:
        raise ValueError(f"trajectory buckets must be >= 1, got {buckets}.")
    gen_len = input_ids.shape[1] - gen_start
    targets = input_ids[:, gen_start:]
    generated = decode_step >= 0
    out = ent_out = torch.zeros(generated.shape, dtype=torch.float32, device=generated.device)
    n = nfe.to(decode_step.device)[:, None]  # [B, 1]
    for b in range(buckets if steps is None else steps.shape[1]):
        if steps is None:
            lo, hi = (b * n) // buckets, ((b + 1) * n) // buckets  # [B, 1] step range of this bucket
        else:
            lo = steps[:, b : b + 1].to(decode_step.device)
            lo, hi = torch.where(lo < 0, n, lo), torch.where(lo < 0, n, lo + 1)  # -1: nothing scored
        scored = generated & (decode_step >= lo) & (decode_step < hi)
        # No skip when nothing is scored: the number of forwards must not depend on the data (ZeRO-3 would hang).
        x = input_ids.clone()
        x[:, gen_start:][generated & (decode_step >= lo)] = mask_id  # the state at the bucket's first step
        read = None if cache is None else _cached_readout(logits_fn, cache, input_ids, x, attention_mask, gen_start,
                                                          decode_step, lo.squeeze(-1))
        logp, ent = _score(logits_fn, x, attention_mask, gen_len, targets, temperature, scored, read)
        out, ent_out = torch.where(scored, logp, out), torch.where(scored, ent, ent_out)
    return out, ent_out


@dataclass(frozen=True)
class EstimatorOptions:
    """The recipe's estimator settings (`logprob_estimator`, `trajectory_buckets`, `prompt_mask_prob`)."""

    temperature: float = 1.0
    buckets: int = 8
    prompt_mask_prob: float = 0.15
    cache: CachePlan | None = None
    """The rollout sampler's KV-cache plan (`SampleOutput.cache_plan`); only `trajectory` can replay it."""


Estimator = Callable[[LogitsFn, torch.Tensor, torch.Tensor, int, dict, int, EstimatorOptions],
                     tuple[torch.Tensor, torch.Tensor]]


def _no_cache(options: EstimatorOptions, name: str) -> None:
    if options.cache is not None:
        raise ValueError(f"Rollouts sampled with kv_cache={options.cache.mode!r} come from the cached conditionals, "
                         f"which only the trajectory estimator replays; {name} would score another distribution. "
                         "Set logprob_estimator: trajectory (or kv_cache: null).")


def _mean_field(logits_fn, input_ids, attention_mask, gen_start, trace, mask_id, options):
    _no_cache(options, "mean_field")
    return mean_field_logps(logits_fn, input_ids, attention_mask, gen_start, trace["decode_step"] >= 0,
                            trace["mask_seed"], mask_id, options.temperature, options.prompt_mask_prob)


def _coupled(logits_fn, input_ids, attention_mask, gen_start, trace, mask_id, options):
    _no_cache(options, "coupled")
    return coupled_logps(logits_fn, input_ids, attention_mask, gen_start, trace["decode_step"] >= 0,
                         trace["mask_seed"], mask_id, options.temperature)


def _trajectory(logits_fn, input_ids, attention_mask, gen_start, trace, mask_id, options):
    return trajectory_logps(logits_fn, input_ids, attention_mask, gen_start, trace["decode_step"], trace["nfe"],
                            mask_id, options.buckets, options.temperature, steps=trace.get("score_steps"),
                            cache=options.cache)


ESTIMATORS: dict[str, Estimator] = {"mean_field": _mean_field, "coupled": _coupled, "trajectory": _trajectory}
"""Every estimator behind one signature: (logits_fn, input_ids [B, L], attention_mask [B, L], gen_start, trace,
mask_id, options) -> ([B, G] log-probs, [B, G] entropies). `trace` holds the rollout's per-row tensors:
decode_step [B, G], nfe [B], mask_seed [B] and, with sampled trajectory steps, score_steps [B, S]."""
