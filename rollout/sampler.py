"""The one batched sampler for masked diffusion LMs: training rollouts, evaluation, posterior traces, benchmarks.

One step = one forward pass (NFE) over the active rows. From its logits the sampler reads, for free:
the unmasking scores of every masked position (T=1 distribution), the answer block's entropy sum H_UB(t)
and, given gold answers, the potential phi(t) = sum_j log p_t(a_j = a*_j) over the gold's scored positions (its
own tokens and the first padding token, `Canvas.gold_scored`). Then:

1. Early exit: a row whose answer block is still fully masked and has H_UB(t) < exit_gamma fills the whole
   answer block at this step; reasoning positions never decoded stay masked ("not generated"). Pruning (training
   rollouts, gold answers known): a row with phi(t) < prune_phi - the gold answer has become nearly impossible,
   the row is confidently wrong - stops the same way, so no more forwards are spent on it.
2. Otherwise the policy picks positions inside the row's current block. Reasoning positions are decoded in
   semi-autoregressive blocks of `block_length` (None: the whole reasoning block, any order); the answer block
   is decoded last, so H_UB and phi are defined at every reasoning step.
3. Tokens are drawn from softmax(logits / T) by Gumbel-max with fp64 noise from the row's own generator, so a
   row's output does not depend on the rest of the batch. T = 0 is greedy.
4. Finished rows leave the batch (compaction), and all-padding leading columns are trimmed.

Deviation from the textbook: the log-prob recorded for greedy decoding (T = 0) is the T=1 log-prob of the
chosen token (the point mass would give 0 everywhere and carry no information).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from rollout.adapter import MDLMAdapter, Readout
from rollout.cache import CACHE_MODES, CachePlan, RolloutCache, cache_plan
from rollout.policies import PolicyConfig, TokenStats, token_stats
from rollout.template import Canvas

logger = logging.getLogger(__name__)


@dataclass
class SamplerConfig(PolicyConfig):
    """Unmasking policy plus the sampler's own settings. Field names match the recipe keys."""

    block_length: int | None = None
    """Semi-AR block length over the reasoning block; None (or R) decodes the reasoning in any order."""
    temperature: float = 0.0
    """Sampling temperature; 0 is greedy. Scores, H_UB and phi always use T = 1."""
    answer_temperature: float | None = None
    """Temperature of the answer block's tokens (None: `temperature`). 0 commits the answer the reasoning makes most
    likely, so an RL reward judges the reasoning rather than a draw of the answer."""
    exit_gamma: float | None = None
    """Early exit when the answer block's entropy sum H_UB < exit_gamma (nats). None disables it."""
    prune_phi: float | None = None
    """Stop a row (commit its answer block now) once phi(t) < prune_phi (nats, < 0); needs gold answers."""
    seed: int = 0
    """Base seed: row i of a batch uses seed + i unless explicit per-row seeds are passed."""
    kv_cache: str | None = None
    """Reuse keys/values across the steps of a semi-AR block (needs block_length; native transformers models only):
    'prefix' recomputes the current block and everything after it, 'dual' only the current block and the answer
    block. Each block's first step is a full forward. This changes the distribution sampled from (the context is read
    as it was at the block's first step, see `rollout.cache`); the trajectory estimator replays exactly that."""
    parallel_guard: bool = False
    """RL rollouts: tighten `max_per_step` as the policy grows confident (cap x the decoded tokens' NLL held at its
    first-round level) and log alarms when tokens per NFE or the answer entropy jump (`rollout.guard`)."""
    guard_alarm_ratio: float = 1.5
    """parallel_guard: alarm when tokens per NFE exceed, or the answer entropy falls below, its moving average by
    this factor."""
    record_answer_guess: bool = False
    """Record, at each step whose answer block is still fully masked, the answer block's greedy (argmax) tokens:
    the answer the model would give if it stopped reasoning now (`SampleOutput.answer_guess`; read from the step's
    own forward, no extra NFE). For the stepwise-verifier credit."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block_length is not None and self.block_length < 1:
            raise ValueError(f"block_length must be >= 1 or None, got {self.block_length}.")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}.")
        if self.answer_temperature is not None and not self.answer_temperature >= 0:
            raise ValueError(f"answer_temperature must be >= 0 or None, got {self.answer_temperature}.")
        if self.exit_gamma is not None and not self.exit_gamma > 0:
            raise ValueError(f"exit_gamma must be > 0 (an entropy in nats) or None, got {self.exit_gamma}.")
        if self.prune_phi is not None and not self.prune_phi < 0:
            raise ValueError(f"prune_phi must be < 0 (a log-likelihood in nats) or None, got {self.prune_phi}.")
        if not self.guard_alarm_ratio > 1:
            raise ValueError(f"guard_alarm_ratio must be > 1, got {self.guard_alarm_ratio}.")
        if self.kv_cache is not None and self.kv_cache not in CACHE_MODES:
            raise ValueError(f"kv_cache={self.kv_cache!r}; use one of {', '.join(CACHE_MODES)} or None.")
        if self.kv_cache is not None and self.block_length is None:
            raise ValueError(f"kv_cache={self.kv_cache!r} needs semi-autoregressive blocks (block_length): without "
                             "them no context stays fixed while a block is decoded. Set block_length, or kv_cache: "
                             "null.")


@dataclass
class SampleOutput:
    """Result of one sampler call. Generation-region tensors are [B, G]; steps are per row, 0-based.

    Attributes:
        sequences: [B, L] final canvas; never-generated positions still hold the mask id.
        attention_mask: [B, L].
        gen_start, reasoning, answer, mask_id: canvas geometry (see `Canvas`).
        decode_step: [B, G] step at which each position was decoded; -1 = never (prefilled or not generated).
        token_logprob: [B, G] log-prob of each decoded token under the distribution it was drawn from (0 elsewhere).
        nfe: [B] forward passes the row took part in.
        exit_step: [B] step of the early exit (or prune), -1 if the row did not stop early.
        pruned: [B] True for rows stopped by phi pruning (a subset of the rows with exit_step >= 0).
        h_ub: [B, S] answer-block entropy sum per step (NaN once the answer block is no longer fully masked).
        phi: [B, S] gold-answer log-likelihood per step (NaN likewise), or None without gold answers.
        answer_guess: [B, S, A] the answer block's argmax tokens at the input of each step (-1 where H_UB is NaN),
            or None unless `record_answer_guess`.
        cache_plan: which columns the KV cache recomputed (`rollout.cache.CachePlan`), None without a cache: the
            trajectory estimator needs it to replay the cached conditionals.
        stats: batch accounting (forward calls, wall and forward seconds, tokens decoded).
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    gen_start: int
    reasoning: slice
    answer: slice | None
    mask_id: int
    decode_step: torch.Tensor
    token_logprob: torch.Tensor
    nfe: torch.Tensor
    exit_step: torch.Tensor
    h_ub: torch.Tensor
    phi: torch.Tensor | None
    stats: dict = field(default_factory=dict)
    pruned: torch.Tensor | None = None
    answer_guess: torch.Tensor | None = None
    cache_plan: CachePlan | None = None

    @property
    def generation(self) -> torch.Tensor:
        """[B, G] final tokens of the generation region."""
        return self.sequences[:, self.gen_start :]

    @property
    def generated(self) -> torch.Tensor:
        """[B, G] True for positions the sampler decoded (excludes prefilled and never-generated ones)."""
        return self.decode_step >= 0

    @property
    def exited(self) -> torch.Tensor:
        return self.exit_step >= 0

    def final_index(self, values: torch.Tensor) -> torch.Tensor:
        """[B] value at each row's last non-NaN step of a [B, S] per-step tensor (NaN if none)."""
        valid = ~torch.isnan(values)
        last = (valid.cumsum(-1) == valid.sum(-1, keepdim=True)) & valid
        idx = last.float().argmax(-1)
        out = values.gather(-1, idx[:, None]).squeeze(-1)
        return torch.where(valid.any(-1), out, torch.full_like(out, float("nan")))

    @property
    def phi_final(self) -> torch.Tensor | None:
        """[B] phi_T: the gold answer's log-likelihood given the finished (or exited) reasoning."""
        return None if self.phi is None else self.final_index(self.phi)

    def state_at(self, step: int | torch.Tensor) -> torch.Tensor:
        """[B, G] generation region as the model saw it at the input of forward `step` (per row if a tensor)."""
        step = torch.as_tensor(step, device=self.decode_step.device)
        step = step[:, None] if step.dim() == 1 else step
        hidden = self.decode_step >= step
        return torch.where(hidden, torch.full_like(self.generation, self.mask_id), self.generation)

    def row(self, i: int) -> dict:
        """A JSON-ready trace of row i."""
        steps = int(self.nfe[i])
        out = {
            "nfe": steps,
            "exit_step": int(self.exit_step[i]),
            "pruned": bool(self.pruned[i]) if self.pruned is not None else False,
            "decode_step": self.decode_step[i].tolist(),
            "token_logprob": [round(x, 6) for x in self.token_logprob[i].tolist()],
            "h_ub": [None if x != x else round(x, 6) for x in self.h_ub[i, :steps].tolist()],
        }
        if self.phi is not None:
            out["phi"] = [None if x != x else round(x, 6) for x in self.phi[i, :steps].tolist()]
        return out


def _row_seeds(seeds, batch: int, config: SamplerConfig) -> list[int]:
    if seeds is None:
        return [config.seed + i for i in range(batch)]
    seeds = [int(s) for s in (seeds.tolist() if torch.is_tensor(seeds) else seeds)]
    if len(seeds) != batch:
        raise ValueError(f"{len(seeds)} seeds for a batch of {batch} rows.")
    return seeds


def _block_ids(canvas: Canvas, block_length: int | None) -> torch.Tensor:
    """[G] block index of each generation column: reasoning blocks first, then the answer block."""
    R = canvas.reasoning.stop - canvas.reasoning.start
    if block_length is not None and R % block_length:
        divisors = [d for d in range(1, R + 1) if R % d == 0]
        raise ValueError(
            f"block_length={block_length} does not divide the reasoning block of {R} tokens. "
            f"Use a divisor of {R} (for example {', '.join(map(str, divisors[-6:]))}) or None for any order."
        )
    b = block_length or R
    ids = torch.full((canvas.gen_length,), R // b, dtype=torch.long)  # answer and template columns
    ids[canvas.reasoning] = torch.arange(R) // b
    return ids


def _draw(logits: torch.Tensor, rows: torch.Tensor, generators: list[torch.Generator], temperature: float):
    """Draw one token per selected position.

    Args:
        logits: [N, V] logits of the selected positions, ordered by (row, column).
        rows: [N] original row index of each selection; noise for row r comes from generators[r] only.
    Returns:
        tokens [N] and their log-probs [N] under the distribution they were drawn from.
    """
    if temperature == 0:
        logp = torch.log_softmax(logits.float(), -1)
        tokens = logp.argmax(-1)
        return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)
    scaled = logits.double() / temperature
    noise = torch.empty_like(scaled)
    bounds = torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(rows.cpu()).cumsum(0)])
    for r in torch.unique(rows).tolist():  # RNG only: each row draws from its own stream
        lo, hi = bounds[r].item(), bounds[r + 1].item()
        noise[lo:hi].uniform_(generator=generators[r])
    gumbel = -torch.log(-torch.log(noise.clamp_(min=torch.finfo(torch.float64).tiny)))
    tokens = (scaled + gumbel).argmax(-1)
    logp = torch.log_softmax(scaled, -1).gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, logp.float()


def _draw_split(logits, rows, in_answer, generators, config: SamplerConfig):
    """`_draw` at `config.temperature`, and at `config.answer_temperature` for answer-block selections."""
    answer_t = config.answer_temperature
    if answer_t is None or answer_t == config.temperature or not in_answer.any():
        return _draw(logits, rows, generators, config.temperature)
    tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    logps = torch.empty(len(rows), dtype=torch.float32, device=logits.device)
    for part, temperature in ((~in_answer, config.temperature), (in_answer, answer_t)):
        if part.any():
            tokens[part], logps[part] = _draw(logits[part], rows[part], generators, temperature)
    return tokens, logps


def _position_stats(read: Readout, need: torch.Tensor, fresh: torch.Tensor, answer_cols: torch.Tensor,
                    gold_cols: torch.Tensor | None, top: bool = True, guess: bool = True):
    """The T=1 statistics of one forward at the positions that are read, a chunk of positions at a time.

    Args:
        need: [b, G] positions whose logits are read (the current block's candidates, the answer block while fresh).
        fresh: [b] rows whose answer block is still fully masked; answer_cols: [G].
        gold_cols: [b, G] gold answer ids at the answer columns (phi), or None.
        top, guess: whether confidence / margin and the answer block's argmax are needed.
    Returns:
        TokenStats of [b, G] tensors (0 where not read), [b, G] float64 log p(gold) at the fresh rows' answer
        columns (or None), and [b, G] argmax ids at those columns (for `record_answer_guess`).
    """
    r, c = torch.nonzero(need, as_tuple=True)
    entropy = torch.zeros(need.shape, dtype=torch.float32, device=need.device)
    confidence, margin = entropy.clone(), entropy.clone()
    argmax = torch.zeros(need.shape, dtype=torch.long, device=need.device)
    gold_logp = torch.zeros(need.shape, dtype=torch.float64, device=need.device) if gold_cols is not None else None
    at_answer = fresh[r] & answer_cols[c]  # [N] positions H_UB, phi and the guess read
    for span, logits in read.chunks(r, c):  # logits [n, V]
        rs, cs = r[span], c[span]
        s = token_stats(logits, top=top)
        entropy[rs, cs], confidence[rs, cs], margin[rs, cs] = s.entropy, s.confidence, s.margin
        a = at_answer[span]
        if a.any():
            if guess:
                argmax[rs[a], cs[a]] = logits[a].argmax(-1)
            if gold_logp is not None:
                logp = torch.log_softmax(logits[a].double(), -1)  # [n_a, V]
                gold_logp[rs[a], cs[a]] = logp.gather(-1, gold_cols[rs[a], cs[a]][:, None]).squeeze(-1)
    return TokenStats(entropy=entropy, confidence=confidence, margin=margin), gold_logp, argmax


def _draw_positions(read: Readout, r_idx, c_idx, rows, in_answer, generators, config: SamplerConfig):
    """`_draw_split` at the chosen positions, a few rows at a time (whole rows: each row's noise stream stays one
    draw), so the fp64 noise and logits never span the whole batch."""
    tokens = torch.empty(len(r_idx), dtype=torch.long, device=r_idx.device)
    logps = torch.empty(len(r_idx), dtype=torch.float32, device=r_idx.device)
    limit = max(1, read.chunk // 4)  # fp64 noise, Gumbel and log-softmax: several [n, V] doubles live at once
    parts, lo, size = [], 0, 0
    for n in torch.unique_consecutive(r_idx, return_counts=True)[1].tolist():  # r_idx is sorted: one count per row
        if size and size + n > limit:
            parts, lo, size = parts + [slice(lo, lo + size)], lo + size, 0
        size += n
    for part in parts + ([slice(lo, lo + size)] if size else []):
        tokens[part], logps[part] = _draw_split(read.logits(r_idx[part], c_idx[part]), rows[part], in_answer[part],
                                                generators, config)
    return tokens, logps


@torch.no_grad()
def sample(
    adapter: MDLMAdapter,
    canvas: Canvas,
    config: SamplerConfig,
    seeds: list[int] | torch.Tensor | None = None,
) -> SampleOutput:
    """Decode every masked position of `canvas` (or exit early) and return the tokens with their trace."""
    if config.exit_gamma is not None and canvas.answer is None:
        raise ValueError("exit_gamma needs the 'infill' layout: the 'plain' layout has no answer block to exit to.")
    if config.prune_phi is not None and canvas.gold is None:
        raise ValueError("prune_phi needs gold answers on the canvas (build_canvas(..., answers=...)).")
    if canvas.mask_id != adapter.mask_id:
        raise ValueError(f"Canvas built with mask id {canvas.mask_id} but the model's mask id is {adapter.mask_id}.")
    start_time, fwd_start = time.perf_counter(), adapter.forward_seconds
    device = adapter.device
    canvas = canvas.to(device)
    B, L = canvas.input_ids.shape
    G, g0 = canvas.gen_length, canvas.gen_start
    ids = canvas.input_ids.clone()
    n_pads = (canvas.attention_mask == 0).sum(-1)  # [B] left padding per row
    block = _block_ids(canvas, config.block_length).to(device)  # [G]
    answer_cols = torch.zeros(G, dtype=torch.bool, device=device)
    if canvas.answer is not None:
        answer_cols[canvas.answer] = True
    max_steps = int(canvas.masked().sum(-1).max().item()) + 1
    seeds = _row_seeds(seeds, B, config)
    generators = []
    for s in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(s)
        generators.append(g)

    decode_step = torch.full((B, G), -1, dtype=torch.long, device=device)
    token_logprob = torch.zeros((B, G), dtype=torch.float32, device=device)
    nfe = torch.zeros(B, dtype=torch.long, device=device)
    exit_step = torch.full((B,), -1, dtype=torch.long, device=device)
    pruned = torch.zeros(B, dtype=torch.bool, device=device)
    h_ub = torch.full((B, max_steps), float("nan"), dtype=torch.float64, device=device)
    phi = h_ub.clone() if canvas.gold is not None else None
    phi_w = canvas.phi_weights().double() if phi is not None else None  # [B, A] gold positions phi sums
    guess = None
    if config.record_answer_guess:
        if canvas.answer is None:
            raise ValueError("record_answer_guess needs the 'infill' layout: the 'plain' layout has no answer block.")
        A = canvas.answer.stop - canvas.answer.start
        guess = torch.full((B, max_steps, A), -1, dtype=torch.long, device=device)
    active = torch.nonzero(canvas.masked().any(-1)).squeeze(-1)  # rows with something to decode
    forwards = columns = 0
    plan = cache_plan(config.kv_cache, block, answer_cols)
    kv = RolloutCache(adapter, plan, B, L) if plan is not None else None

    while active.numel():
        c0 = int(n_pads[active].min())  # trim columns that are padding in every active row
        x = ids[active, c0:]  # [b, L - c0]
        masked = x[:, g0 - c0 :] == canvas.mask_id  # [b, G]
        # Candidates: the row's earliest block with a masked position (the answer block comes last).
        blk = torch.where(masked, block.expand_as(masked), torch.full_like(masked, G, dtype=torch.long))
        current = blk.min(-1, keepdim=True).values  # [b, 1]
        candidates = masked & (blk == current)
        fresh = masked[:, canvas.answer].all(-1) if canvas.answer is not None else masked[:, 0] & False  # [b]
        if kv is None:
            read = adapter.readout(x, canvas.attention_mask[active, c0:], keep_last=G)  # logits on demand, [b, G, .]
            columns += x.numel()
        else:
            read = kv.readout(active, x, canvas.attention_mask[active, c0:], current.squeeze(-1), keep_last=G)
        forwards += 1
        # Logits only where they are read: this block's candidates, and the answer block while H_UB / phi exist.
        gold_cols = None
        if phi is not None:
            gold_cols = torch.zeros_like(masked, dtype=torch.long)
            gold_cols[:, canvas.answer] = canvas.gold[active]
        # Left-to-right chooses by column alone: it reads logits only at the positions it decodes.
        chosen = config.select(None, candidates) if config.policy == "left_to_right" else None
        need = (candidates if chosen is None else chosen) | (answer_cols & fresh[:, None])
        stats, gold_logp, argmax = _position_stats(read, need, fresh, answer_cols, gold_cols, top=config.reads_top,
                                                   guess=guess is not None)
        t = nfe[active]  # [b] this forward's step index per row
        exiting = torch.zeros_like(t, dtype=torch.bool)
        reasoning_left = (masked & ~answer_cols).any(-1)  # [b]

        if canvas.answer is not None:
            hub = stats.entropy[:, canvas.answer].double().sum(-1)  # [b]
            h_ub[active[fresh], t[fresh]] = hub[fresh]
            if phi is not None:
                phi_t = (gold_logp[:, canvas.answer] * phi_w[active]).sum(-1)  # [b]
                phi[active[fresh], t[fresh]] = phi_t[fresh]
            if guess is not None:
                guess[active[fresh], t[fresh]] = argmax[fresh][:, canvas.answer]
            if config.exit_gamma is not None:
                exiting = fresh & (hub < config.exit_gamma)
            if config.prune_phi is not None:
                pruning = fresh & ~exiting & (phi_t < config.prune_phi) & reasoning_left
                pruned[active[pruning]] = True
                exiting = exiting | pruning

        chosen = config.select(stats, candidates) if chosen is None else chosen
        chosen = torch.where(exiting[:, None], masked & answer_cols, chosen)
        exit_step[active[exiting & reasoning_left]] = t[exiting & reasoning_left]

        r_idx, c_idx = torch.nonzero(chosen, as_tuple=True)  # row-major: grouped by row, columns ascending
        tokens, logps = _draw_positions(read, r_idx, c_idx, active[r_idx], answer_cols[c_idx], generators, config)
        rows = active[r_idx]
        ids[rows, g0 + c_idx] = tokens
        decode_step[rows, c_idx] = t[r_idx]
        token_logprob[rows, c_idx] = logps
        nfe[active] += 1

        done = exiting | ~(masked & ~chosen).any(-1)
        active = active[~done]

    wall = time.perf_counter() - start_time
    stats = {
        "forwards": forwards,
        "row_forwards": int(nfe.sum()),
        "tokens_decoded": int((decode_step >= 0).sum()),
        "wall_seconds": wall,
        "forward_seconds": adapter.forward_seconds - fwd_start,
        "columns_run": columns if kv is None else kv.query_tokens,  # canvas columns run through the model
    }
    if kv is not None:
        stats.update(refreshes=kv.refreshes, cached_steps=kv.cached_steps)
    return SampleOutput(
        sequences=ids, attention_mask=canvas.attention_mask, gen_start=g0, reasoning=canvas.reasoning,
        answer=canvas.answer, mask_id=canvas.mask_id, decode_step=decode_step, token_logprob=token_logprob,
        nfe=nfe, exit_step=exit_step, h_ub=h_ub, phi=phi, stats=stats, pruned=pruned, answer_guess=guess,
        cache_plan=plan,
    )
