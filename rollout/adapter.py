"""Model adapter: everything model-specific about a masked diffusion LM, held as data.

The sampler, the rewards and the trainers never branch on the model family; they read an `MDLMAdapter`:
the mask id, whether logits are shifted (Dream predicts token i from position i-1), the EOS/EoT ids, the
context length, and how to call the network. Any `nn.Module` whose `forward(input_ids, attention_mask)`
returns an object with `.logits` works: native transformers bidirectional models (including the project's own
LLaDA / Dream, `rollout.native`), LLaDA/Dream remote code (LLaDA's ignores attention masks: padded batches are
refused), and test doubles.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

logger = logging.getLogger(__name__)
SHIFTED_TYPES = frozenset({"dream", "mdlm_dream"})  # model types whose logits at column i predict column i + 1
CHUNK_BYTES = 1 << 26
"""Vocabulary-sized work is done this many bytes of fp32 logits at a time (64 MiB: 132 positions of LLaDA's)."""
# transformers models whose logits are exactly lm_head(final hidden state) (+ Gemma's soft-capping): the adapter may
# apply that head itself, at the positions it needs. The native LLaDA / Dream subclass Llama / Qwen2.
HEAD_READABLE = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM",
                 "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")
_LIBRARY_HOOKS = ("torch.", "deepspeed", "accelerate", "peft", "transformers")  # hooks that never rewrite logits


@dataclass
class MDLMAdapter:
    """How to run one masked diffusion model.

    Attributes:
        model: the network; `forward(input_ids, attention_mask)` must return `.logits` of shape [B, L, V].
        mask_id: id of the mask token (read from the tokenizer, never hard-coded).
        pad_id: id used for left padding of prompts.
        eos_ids: end-of-sequence / end-of-turn ids (used to pad gold answers and to cut decoded text).
        shift_logits: True for models that predict token i from position i-1 (Dream); logits are shifted
            right by one before any entropy, likelihood or sampling.
        max_length: the model's context length, or None when unknown.
        attention_mask_style: "keys" passes the [B, L] key padding mask; "pairwise" passes a boolean
            [B, 1, L, L] mask (Dream's remote code); "none" passes no mask (only valid without padding).
        read_hidden: whether `readout` keeps hidden states and applies the output layer only where logits are
            read (None: wherever the model allows it, see `reads_hidden`; False: always read whole logits).
    """

    model: nn.Module
    mask_id: int
    pad_id: int
    eos_ids: tuple[int, ...] = ()
    shift_logits: bool = False
    max_length: int | None = None
    attention_mask_style: str = "keys"
    read_hidden: bool | None = None
    forward_seconds: float = field(default=0.0, init=False)
    forward_calls: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.attention_mask_style not in ("keys", "pairwise", "none"):
            raise ValueError(
                f"attention_mask_style={self.attention_mask_style!r}; use 'keys', 'pairwise' or 'none'."
            )
        # PEFT / DDP wrappers hide the network's forward signature (they pass keyword arguments through).
        params = inspect.signature(unwrap(self.model).forward).parameters
        # Only pass optional arguments a forward explicitly names: remote code often swallows **kwargs.
        self._takes_position_ids = "position_ids" in params
        self._takes_logits_to_keep = "logits_to_keep" in params
        self._takes_use_cache = "use_cache" in params
        self._cache_kwarg = next((k for k in ("cache", "past_key_values") if k in params), None)
        self.reads_hidden = self.read_hidden is not False and self._head_readable()
        if self.read_hidden and not self.reads_hidden:
            raise ValueError(f"read_hidden=True but {type(unwrap(self.model)).__name__} is not a transformers model "
                             f"whose logits are lm_head(hidden) ({', '.join(HEAD_READABLE)}), or a forward hook may "
                             "rewrite its logits.")
        if self.reads_hidden:
            inner = unwrap(self.model)
            self._decoder = inner.get_decoder()
            self._lm_head = inner.get_output_embeddings()
            self._softcap = getattr(inner.config, "final_logit_softcapping", None)
            self._vocab = int(self._lm_head.weight.shape[0]) if hasattr(self._lm_head, "weight") else 0
            self._vocab = self._vocab or int(inner.config.vocab_size)
            self._sharded_head = hasattr(getattr(self._lm_head, "weight", None), "ds_id")  # DeepSpeed ZeRO-3

    def _head_readable(self) -> bool:
        """True when the network's logits are exactly its `lm_head` (+ soft-capping) of the decoder's output and no
        user forward hook sits on the model or its head (tests rewrite logits that way; DeepSpeed's hooks do not)."""
        inner = unwrap(self.model)
        if not self._takes_logits_to_keep or not any(c.__name__ in HEAD_READABLE for c in type(inner).__mro__):
            return False
        head = inner.get_output_embeddings()
        for module in {id(m): m for m in (self.model, inner, head)}.values():
            hooks = list(module._forward_hooks.values())
            if any(not getattr(h, "__module__", "").startswith(_LIBRARY_HOOKS) for h in hooks):
                return False
        return True

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        tokenizer,
        shift_logits: bool | None = None,
        attention_mask_style: str | None = None,
    ) -> MDLMAdapter:
        """Build an adapter from a model and its tokenizer.

        The mask token comes from the tokenizer, else from `config.mask_token_id` (LLaDA's published tokenizer
        registers none), else it is an error naming the recipe key `mask_token_id`. `shift_logits` and the mask
        style default from the model: Dream (native or remote code) is shifted; the native models and other
        transformers models take the key padding mask, Dream's remote code a pairwise one, and LLaDA's remote code
        none (it ignores masks, so padded batches are refused, see `logits`).
        """
        config = getattr(model, "config", None)
        mask_id = resolve_mask_id(tokenizer, config)
        model_type = str(getattr(config, "model_type", "")).lower()
        is_dream = model_type in SHIFTED_TYPES
        native = type(unwrap(model)).__module__.startswith("rollout.native")
        eos = []
        for name in ("eos_token_id",):
            value = getattr(tokenizer, name, None)
            if value is not None:
                eos.append(int(value))
        for tok in ("<|eot_id|>", "<|im_end|>", "<|endoftext|>"):
            tid = tokenizer.convert_tokens_to_ids(tok) if hasattr(tokenizer, "convert_tokens_to_ids") else None
            if isinstance(tid, int) and tid != getattr(tokenizer, "unk_token_id", None) and tid not in eos:
                eos.append(tid)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else mask_id)
        max_length = getattr(config, "max_position_embeddings", None) or getattr(config, "max_sequence_length", None)
        return cls(
            model=model,
            mask_id=int(mask_id),
            pad_id=int(pad_id),
            eos_ids=tuple(eos),
            shift_logits=is_dream if shift_logits is None else shift_logits,
            max_length=int(max_length) if max_length else None,
            attention_mask_style=attention_mask_style or _mask_style(model_type, native),
        )

    @property
    def device(self) -> torch.device:
        try:
            return next(self.model.parameters()).device
        except StopIteration:
            return torch.device("cpu")

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep_last: int) -> torch.Tensor:
        """Logits for the last `keep_last` columns, already shifted for shifted models.

        Args:
            input_ids: [B, L] canvas, left padded.
            attention_mask: [B, L] 1 for real tokens, 0 for left padding.
            keep_last: number of trailing columns whose logits are returned (the generation region).

        Returns:
            [B, keep_last, V] float logits; column j predicts the token at canvas column L - keep_last + j.
            The mask token's logit is -inf: it is never a prediction, and every consumer (sampler, phi,
            log-prob estimators) must see the same distribution. This materialises [B, keep_last, V]: the sampler
            and the estimators read `readout` instead, which makes logits only at the positions they use.
        """
        need = self._check_call(input_ids, attention_mask, keep_last)
        kwargs = self._forward_kwargs(attention_mask)
        if self._takes_logits_to_keep:
            kwargs["logits_to_keep"] = need
        start = time.perf_counter()
        out = self.model(input_ids=input_ids, **kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        logits = logits[:, -need:]
        if self.shift_logits:
            logits = logits[:, :-1]
        logits = logits.clone()
        logits[..., self.mask_id] = float("-inf")
        self._account(start, logits)
        return logits

    def readout(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep_last: int) -> Readout:
        """One forward, read lazily: logits are made only at the positions a consumer asks for (`Readout.logits`).

        For transformers models whose output layer is `lm_head` (+ Gemma's final soft-capping) the forward keeps the
        final hidden states of the last `keep_last` columns and the head is applied per requested position, so no
        [B, keep_last, V] tensor exists; for any other module (remote code, test doubles, a model with a forward hook
        that may rewrite its logits) the readout wraps `logits` whole. Same arguments and column convention as
        `logits`.
        """
        if not self.reads_hidden:
            return Readout(mask_id=self.mask_id, full=self.logits(input_ids, attention_mask, keep_last))  # checked
        need = self._check_call(input_ids, attention_mask, keep_last)
        kwargs = self._forward_kwargs(attention_mask)
        start = time.perf_counter()
        hidden = self.hidden_states(input_ids, logits_to_keep=1, **kwargs)[:, -need:]  # [B, need, H]
        if self.shift_logits:
            hidden = hidden[:, :-1]
        self._account(start, hidden)
        read = Readout(mask_id=self.mask_id, vocab=self._vocab, hidden=hidden, head=self.head,
                       one_head_call=self._sharded_head)
        return self.checked(read, input_ids, attention_mask)

    def checked(self, read: Readout, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Readout:
        """Hook on every readout of hidden states (whole logits pass through `logits`): the trainer's guard against
        non-finite outputs overrides it (`rl.diagnostics.FiniteLogitsAdapter`)."""
        return read

    def hidden_states(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """[B, L, H] final (normed) hidden states of one forward of the whole model (wrappers included, so DDP,
        DeepSpeed and PEFT see an ordinary forward); `kwargs` go to the model (ask for `logits_to_keep=1`)."""
        captured = []

        def keep(module, args, output):
            captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

        handle = self._decoder.register_forward_hook(keep)
        try:
            self.model(input_ids=input_ids, **kwargs)
        finally:
            handle.remove()
        return captured[-1]

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] final hidden states -> [..., V] logits (the model's own output layer), mask logit -inf."""
        logits = self._lm_head(hidden)
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        logits[..., self.mask_id] = float("-inf")  # in place: no backward reads this output (a full copy is slow)
        return logits

    def _check_call(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep_last: int) -> int:
        """Validate one forward's arguments; the number of trailing columns to read (one more when shifted)."""
        batch, length = input_ids.shape
        if not 0 < keep_last <= length - (1 if self.shift_logits else 0):
            raise ValueError(f"keep_last={keep_last} must be in [1, {length}) for a canvas of length {length}")
        if self.attention_mask_style == "none" and not bool(attention_mask.all()):
            raise ValueError(
                f"{type(unwrap(self.model)).__name__} ignores attention masks, so a left-padded batch would give each "
                "row different logits than alone. Load LLaDA / Dream without trust_remote_code (the project's native "
                "implementation honours masks), or use batches of equal-length prompts (batch size 1)."
            )
        return keep_last + (1 if self.shift_logits else 0)  # a shifted model reads column i's prediction at i - 1

    def _forward_kwargs(self, attention_mask: torch.Tensor) -> dict:
        kwargs = {}
        if self.attention_mask_style == "keys":
            kwargs["attention_mask"] = attention_mask
        elif self.attention_mask_style == "pairwise":
            valid = attention_mask.bool()
            kwargs["attention_mask"] = (valid[:, None, :, None] & valid[:, None, None, :])  # [B, 1, L, L]
        if self._takes_position_ids:
            kwargs["position_ids"] = positions(attention_mask)
        if self._takes_use_cache:
            kwargs["use_cache"] = False
        return kwargs

    def _account(self, start: float, out: torch.Tensor) -> None:
        if out.device.type == "cuda":
            torch.cuda.synchronize(out.device)
        self.forward_seconds += time.perf_counter() - start
        self.forward_calls += 1


@dataclass
class Readout:
    """One forward's output over the trailing generation columns, turned into logits only where it is read.

    Either `hidden` [B, K, H] final hidden states with `head` (the adapter's output layer), or `full` [B, K, V]
    logits for models read whole. Column j predicts canvas column L - K + j (already shifted). Consumers take the
    logits of the positions they need `chunk` positions at a time (`chunks`), so no [B, K, V] fp32 tensor is made
    for positions nobody reads. With `one_head_call` (the head's weights are sharded, DeepSpeed ZeRO-3: every head
    call is a collective, so each process must make the same number of them) the head runs once per request and
    only the fp32 work is chunked. Rows in `uniform_rows` read uniform logits (mask logit -inf): the trainer's
    guard against non-finite model outputs.
    """

    mask_id: int
    vocab: int = 0
    hidden: torch.Tensor | None = None
    head: Callable[[torch.Tensor], torch.Tensor] | None = None
    full: torch.Tensor | None = None
    one_head_call: bool = False
    uniform_rows: torch.Tensor | None = None

    @property
    def chunk(self) -> int:
        """Positions per chunk: about CHUNK_BYTES of fp32 logits."""
        vocab = self.full.shape[-1] if self.full is not None else self.vocab
        return max(1, CHUNK_BYTES // (4 * vocab))

    @property
    def source(self) -> torch.Tensor:
        """The tensor positions are read from: `full` logits or `hidden` states."""
        return self.full if self.full is not None else self.hidden

    def spans(self, n: int) -> list[slice]:
        """`n` positions cut into consecutive slices of at most `chunk`."""
        return [slice(i, min(i + self.chunk, n)) for i in range(0, n, self.chunk)]

    def logits(self, rows: torch.Tensor, cols: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        """[N, V] logits (model dtype, mask logit -inf) at the positions (rows[n], cols[n]), in one head call.

        `source`: the tensor to read instead of `self.source` (the same one, passed through a checkpoint)."""
        picked = (self.source if source is None else source)[rows, cols]
        logits = picked if self.full is not None else self.head(picked)
        if self.uniform_rows is not None and self.uniform_rows.any():
            uniform = torch.zeros_like(logits[:1])
            uniform[:, self.mask_id] = float("-inf")
            logits = torch.where(self.uniform_rows[rows][:, None], uniform, logits)
        return logits

    def chunks(self, rows: torch.Tensor, cols: torch.Tensor):
        """Yield (span, [n, V] logits) over the positions, `chunk` at a time."""
        spans = self.spans(len(rows))
        if self.one_head_call and self.full is None:
            logits = self.logits(rows, cols)  # also when there are no positions: the collective count is fixed
            yield from ((s, logits[s]) for s in spans)
            return
        for s in spans:
            yield s, self.logits(rows[s], cols[s])

    def nonfinite_rows(self) -> torch.Tensor:
        """[B] rows whose forward gave non-finite numbers (NaN / inf hidden states, or logits without a finite max)."""
        if self.full is not None:
            return (~torch.isfinite(self.full.amax(-1))).any(-1)
        return (~torch.isfinite(self.hidden)).flatten(1).any(-1)

    def with_uniform_rows(self, rows: torch.Tensor) -> Readout:
        return dataclasses.replace(self, uniform_rows=rows)


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] position ids that count real tokens only, so a row's logits do not depend on its left padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside PEFT (`get_base_model`) and DDP / DeepSpeed (`module`) wrappers."""
    for _ in range(4):
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            break
    return model


def resolve_mask_id(tokenizer, config) -> int:
    """The mask token id: the tokenizer's, else `config.mask_token_id`; neither is an error naming the recipe key."""
    from_tokenizer = getattr(tokenizer, "mask_token_id", None)
    from_config = getattr(config, "mask_token_id", None)
    if from_tokenizer is not None:
        if from_config is not None and int(from_config) != int(from_tokenizer):
            logger.warning("The tokenizer's mask token id %d differs from config.mask_token_id %d; using the "
                           "tokenizer's.", from_tokenizer, from_config)
        return int(from_tokenizer)
    if from_config is not None:
        return int(from_config)
    raise ValueError(
        f"The model has no mask token: neither its tokenizer ({type(tokenizer).__name__}) nor its config "
        "(mask_token_id) names one, so it cannot be run as a masked diffusion LM. Set the recipe key (or flag) "
        "mask_token_id to the id of the token the model was trained to fill (LLaDA: '<|mdm_mask|>', Dream: "
        "'<|mask|>'); a tokenizer with a mask token added by hand needs the embeddings resized and trained."
    )


def _mask_style(model_type: str, native: bool) -> str:
    if native or model_type not in ("llada", "dream"):
        return "keys"
    return "pairwise" if model_type == "dream" else "none"  # remote code: Dream takes [B,1,L,L], LLaDA ignores masks
