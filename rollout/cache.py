"""KV cache for semi-autoregressive rollouts, and the replay of its conditionals for the trainer.

With semi-AR blocks, a row decodes one block at a time; everything before the block (the prompt and the finished
blocks) no longer changes. At the first step of each block (a *refresh*) the row runs a full forward and keeps the
keys and values of every column; the other steps of the block recompute only the *fresh* columns and read the
rest from that snapshot (transformers' cache classes: `DynamicCache` records the refresh, `FrozenContext` serves
the snapshot to the attention layers):

- `prefix`: fresh = the current block and everything after it (answer block and template included).
- `dual`: fresh = the current block and the answer block; the later reasoning blocks and the template are read from
  the snapshot too. The answer block stays fresh, so H_UB and phi are still read at every step, at no extra NFE.

How this changes the conditionals. Without a cache, step t of a row samples from p(x | s_t), a function of the
state s_t alone. With a cache, the snapshot columns' keys and values at every layer above the first were computed
from the state s_r at the block's refresh step r <= t (then the current block was fully masked), not from s_t:
step t samples from q(x | s_r, s_t), in which the fresh columns see the snapshot columns as they were at s_r
(their tokens are unchanged, but their hidden states have not seen the tokens decoded since r). At a refresh step
(t = r) q equals p. q is a different, well-defined policy; the trainer stays consistent with it by replaying it
exactly (`replay_readout`: the trajectory estimator scores step t's tokens under q(. | s_r, s_t), with gradients
through both), so the on-policy ratio stays exactly 1 and the scored log-probs equal the sampler's.

The replay runs one forward over [s_r (all L columns)] ++ [s_t at its fresh columns] with a mask that lets the
first part attend only to itself (the refresh) and the second part attend to the first part's non-fresh columns and
to itself - the same numbers as the sampler's cached step, in one ordinary forward (so gradient checkpointing, DDP
and DeepSpeed see nothing unusual).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

from rollout.adapter import MDLMAdapter, Readout, positions, unwrap

CACHE_MODES = ("prefix", "dual")
_MASKS = ("sdpa", "eager")  # attention implementations that take an arbitrary [B, 1, Q, K] mask


@dataclass(frozen=True)
class CachePlan:
    """Which generation columns a cached step recomputes, from the canvas geometry.

    Attributes:
        mode: 'prefix' or 'dual'.
        block: [G] block id of each generation column (reasoning blocks in order, then the answer block with the
            template columns).
        answer: [G] bool, the answer block's columns.
    """

    mode: str
    block: torch.Tensor
    answer: torch.Tensor

    def fresh(self, current: torch.Tensor) -> torch.Tensor:
        """[b] current block of each row -> [b, G] generation columns recomputed at a cached step."""
        block = self.block.to(current.device)[None]
        if self.mode == "prefix":
            return block >= current[:, None]
        return (block == current[:, None]) | self.answer.to(current.device)[None]


def cache_plan(mode: str | None, block: torch.Tensor, answer: torch.Tensor) -> CachePlan | None:
    if mode is None:
        return None
    if mode not in CACHE_MODES:
        raise ValueError(f"kv_cache={mode!r}; use one of {', '.join(CACHE_MODES)} or None.")
    return CachePlan(mode, block.cpu(), answer.cpu())


def require_cache_support(adapter: MDLMAdapter) -> None:
    """Raise unless `adapter`'s model can serve cached steps: a transformers model read through its head, with
    full bidirectional attention, a key padding mask, and an attention kernel that takes arbitrary masks."""
    inner = unwrap(adapter.model)
    config = getattr(inner, "config", None)
    why = None
    if not adapter.reads_hidden or adapter._cache_kwarg is None or not adapter._takes_position_ids:
        why = ("it is not a transformers model whose forward takes position_ids and a cache and whose logits are "
               "its lm_head's (remote code and test doubles are not)")
    elif adapter.attention_mask_style != "keys":
        why = f"its attention mask style is {adapter.attention_mask_style!r}"
    elif any(t != "full_attention" for t in getattr(config, "layer_types", None) or ["full_attention"]) or getattr(
            config, "use_sliding_window", False):
        why = "it has sliding-window attention layers"
    elif getattr(config, "_attn_implementation", "sdpa") not in _MASKS:
        why = f"its attention implementation {config._attn_implementation!r} takes no arbitrary mask (use sdpa)"
    if why:
        raise ValueError(f"kv_cache needs a native bidirectional transformers model (LLaDA / Dream loaded natively, "
                         f"the tiny Gemma3 default); {type(inner).__name__} cannot use it: {why}. Set kv_cache: null.")


def _attention_mask(visible: torch.Tensor, adapter: MDLMAdapter) -> torch.Tensor:
    """[B, Q, K] bool (True = query may attend key) -> the [B, 1, Q, K] mask the model's attention takes."""
    mask = visible[:, None]
    if unwrap(adapter.model).config._attn_implementation == "eager":
        dtype = unwrap(adapter.model).get_input_embeddings().weight.dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


def _input_columns(fresh: torch.Tensor, adapter: MDLMAdapter, length: int) -> torch.Tensor:
    """[b, G] fresh generation columns -> [b, L] canvas columns run as queries (a shifted model reads column i's
    prediction at column i - 1, so that column is run too)."""
    cols = torch.zeros(fresh.shape[0], length, dtype=torch.bool, device=fresh.device)
    cols[:, length - fresh.shape[1] :] = fresh
    if adapter.shift_logits:
        cols[:, :-1] |= cols[:, 1:].clone()
    return cols


def _gather_queries(run: torch.Tensor):
    """[b, L] bool columns to run -> [b, Q] their indices (padded with 0) and [b, Q] validity."""
    counts = run.sum(-1)
    Q = max(1, int(counts.max()))
    order = torch.sort((~run).to(torch.int8), dim=-1, stable=True).indices[:, :Q]  # run columns first, in order
    valid = torch.arange(Q, device=run.device)[None] < counts[:, None]
    return torch.where(valid, order, torch.zeros_like(order)), valid


def _readout(adapter: MDLMAdapter, hidden: torch.Tensor, keep_last: int) -> Readout:
    """[b, L, H] hidden states of the canvas columns -> the readout of the last `keep_last` generation columns."""
    need = keep_last + (1 if adapter.shift_logits else 0)
    hidden = hidden[:, -need:]
    if adapter.shift_logits:
        hidden = hidden[:, :-1]
    return Readout(mask_id=adapter.mask_id, vocab=adapter._vocab, hidden=hidden, head=adapter.head,
                   one_head_call=adapter._sharded_head)


class _FrozenLayer(CacheLayerMixin):
    """One layer's snapshot: `update` returns the snapshot's keys/values with the step's own appended, and stores
    nothing (so the same snapshot serves every step of a block)."""

    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.keys, self.values, self.is_initialized = keys, values, True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[-2] + query_length, 0

    def get_seq_length(self) -> int:
        return self.keys.shape[-2]

    def get_max_length(self) -> int:
        return -1


class FrozenContext(Cache):
    """A transformers `Cache` holding, per layer, [b, heads, K, d] keys/values of context columns."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        super().__init__(layers=[_FrozenLayer(k, v) for k, v in zip(keys, values)])


class RolloutCache:
    """The sampler's cache: per row, the keys/values of every canvas column from its last refresh, and the block
    that refresh was for. `readout` runs one step for the active rows (a full forward for rows entering a new block,
    a cached one for the rest) and returns the step's readout of the generation columns."""

    def __init__(self, adapter: MDLMAdapter, plan: CachePlan, batch: int, length: int):
        require_cache_support(adapter)
        self.adapter, self.plan, self.length = adapter, plan, length
        self.block_of = torch.full((batch,), -1, dtype=torch.long, device=adapter.device)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.refreshes = self.cached_steps = 0
        self.query_tokens = 0  # columns run through the model, summed over rows (the compute the cache saves)

    def readout(self, active: torch.Tensor, x: torch.Tensor, attention_mask: torch.Tensor, current: torch.Tensor,
                keep_last: int) -> Readout:
        """One step of the rows `active` ([b]; x, attention_mask [b, L - c0] trimmed of c0 leading padding columns;
        current [b] their current blocks)."""
        adapter, c0 = self.adapter, self.length - x.shape[1]
        refresh = self.block_of[active] != current
        hidden = None
        if refresh.any():
            rows = torch.nonzero(refresh).squeeze(-1)
            h = self._refresh(active[rows], x[rows], attention_mask[rows], c0)
            hidden = h.new_zeros(len(active), *h.shape[1:])
            hidden[rows] = h
            self.block_of[active[rows]] = current[rows]
        if (~refresh).any():
            rows = torch.nonzero(~refresh).squeeze(-1)
            h = self._cached(active[rows], x[rows], attention_mask[rows], current[rows], c0)
            hidden = h.new_zeros(len(active), *h.shape[1:]) if hidden is None else hidden
            hidden[rows] = h
        return adapter.checked(_readout(adapter, hidden, keep_last), x, attention_mask)

    def _forward(self, input_ids, visible, position_ids, cache) -> torch.Tensor:
        adapter = self.adapter
        begin = time.perf_counter()
        kwargs = {adapter._cache_kwarg: cache, "use_cache": True} if adapter._takes_use_cache else {
            adapter._cache_kwarg: cache}
        hidden = adapter.hidden_states(input_ids, attention_mask=_attention_mask(visible, adapter),
                                       position_ids=position_ids, logits_to_keep=1, **kwargs)
        adapter._account(begin, hidden)
        self.query_tokens += input_ids.numel()
        return hidden

    def _refresh(self, rows, x, attention_mask, c0) -> torch.Tensor:
        """Full forward of `rows` ([n] batch rows, x [n, L - c0]); records every column's keys/values."""
        keys_ok = attention_mask.bool()
        cache = DynamicCache()
        hidden = self._forward(x, keys_ok[:, None, :].expand(-1, x.shape[1], -1), positions(attention_mask), cache)
        if not self.keys:
            for layer in cache.layers:
                shape = (len(self.block_of), layer.keys.shape[1], self.length, layer.keys.shape[-1])
                self.keys.append(layer.keys.new_zeros(shape))
                self.values.append(layer.values.new_zeros(shape))
        for store_k, store_v, layer in zip(self.keys, self.values, cache.layers):
            store_k[rows, :, c0:] = layer.keys
            store_v[rows, :, c0:] = layer.values
        self.refreshes += 1
        return hidden

    def _cached(self, rows, x, attention_mask, current, c0) -> torch.Tensor:
        """Forward of the fresh columns of `rows` against their snapshots; [n, L - c0, H] (0 at snapshot columns)."""
        run = _input_columns(self.plan.fresh(current), self.adapter, x.shape[1]) & attention_mask.bool()  # [n, L']
        cols, valid = _gather_queries(run)  # [n, Q]
        context = attention_mask.bool() & ~run  # [n, L'] snapshot columns the queries read
        visible = torch.cat([context[:, None, :].expand(-1, cols.shape[1], -1),
                             valid[:, None, :].expand(-1, cols.shape[1], -1)], -1)  # [n, Q, L' + Q]
        cache = FrozenContext([k[rows, :, c0:] for k in self.keys], [v[rows, :, c0:] for v in self.values])
        h = self._forward(x.gather(1, cols), visible, positions(attention_mask).gather(1, cols), cache)  # [n, Q, H]
        hidden = h.new_zeros(x.shape[0], x.shape[1], h.shape[-1])
        r = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(cols)
        hidden[r[valid], cols[valid]] = h[valid]
        self.cached_steps += 1
        return hidden


def refresh_steps(decode_step: torch.Tensor, generation: torch.Tensor, mask_id: int, block: torch.Tensor,
                  step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row at decode step `step` [B]: its current block [B] and the step [B] at which it entered that block
    (its refresh), from the trace (decode_step [B, G]; generation [B, G] final tokens, mask = never decoded)."""
    block = block.to(decode_step.device)[None].expand_as(decode_step)
    masked = (decode_step >= step[:, None]) | ((decode_step < 0) & (generation == mask_id))  # at the input of step
    G = int(block.max()) + 1
    current = torch.where(masked, block, torch.full_like(block, G)).min(-1).values  # [B]
    before = (block < current[:, None]) & (decode_step >= 0)
    entered = torch.where(before, decode_step + 1, torch.zeros_like(decode_step)).amax(-1)  # [B]
    return current, torch.minimum(entered, step)


def replay_readout(adapter: MDLMAdapter, plan: CachePlan, refresh_ids: torch.Tensor, step_ids: torch.Tensor,
                   attention_mask: torch.Tensor, current: torch.Tensor, keep_last: int) -> Readout:
    """The readout of a cached step, replayed in one ordinary forward (gradients flow through both parts).

    Args:
        refresh_ids: [B, L] canvas at each row's refresh step (the snapshot's state).
        step_ids: [B, L] canvas at the scored step.
        attention_mask: [B, L]; current: [B] each row's current block at that step.
    """
    require_cache_support(adapter)
    B, L = step_ids.shape
    run = _input_columns(plan.fresh(current), adapter, L) & attention_mask.bool()
    cols, valid = _gather_queries(run)  # [B, Q]
    Q = cols.shape[1]
    keys_ok = attention_mask.bool()
    first = torch.cat([keys_ok[:, None, :].expand(-1, L, -1), keys_ok.new_zeros(B, L, Q)], -1)  # the refresh
    second = torch.cat([(keys_ok & ~run)[:, None, :].expand(-1, Q, -1), valid[:, None, :].expand(-1, Q, -1)], -1)
    visible = torch.cat([first, second], 1)  # [B, L + Q, L + Q]
    pos = positions(attention_mask)
    ids = torch.cat([refresh_ids, step_ids.gather(1, cols)], 1)
    kwargs = {"use_cache": False} if adapter._takes_use_cache else {}
    begin = time.perf_counter()
    h = adapter.hidden_states(ids, attention_mask=_attention_mask(visible, adapter),
                              position_ids=torch.cat([pos, pos.gather(1, cols)], 1), logits_to_keep=1, **kwargs)
    adapter._account(begin, h)
    h = h[:, L:]  # [B, Q, H]
    r = torch.arange(B, device=cols.device)[:, None].expand_as(cols)
    hidden = h.new_zeros(B, L, h.shape[-1]).index_put((r[valid], cols[valid]), h[valid])
    return adapter.checked(_readout(adapter, hidden, keep_last), step_ids, attention_mask)
