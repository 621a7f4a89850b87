"""Model adapter: everything model-specific about a masked diffusion LM, held as data.

The sampler, the rewards and the trainers never branch on the model family; they read an `MDLMAdapter`:
the mask id, whether logits are shifted (Dream predicts token i from position i-1), the EOS/EoT ids, the
context length, and how to call the network. Any `nn.Module` whose `forward(input_ids, attention_mask)`
returns an object with `.logits` works: native transformers bidirectional models (including the project's own
LLaDA / Dream, `rollout.native`), LLaDA/Dream remote code (LLaDA's ignores attention masks: padded batches are
refused), and test doubles.
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

logger = logging.getLogger(__name__)
SHIFTED_TYPES = frozenset({"dream", "mdlm_dream"})  # model types whose logits at column i predict column i + 1


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
    """

    model: nn.Module
    mask_id: int
    pad_id: int
    eos_ids: tuple[int, ...] = ()
    shift_logits: bool = False
    max_length: int | None = None
    attention_mask_style: str = "keys"
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
            log-prob estimators) must see the same distribution.
        """
        batch, length = input_ids.shape
        if not 0 < keep_last <= length - (1 if self.shift_logits else 0):
            raise ValueError(f"keep_last={keep_last} must be in [1, {length}) for a canvas of length {length}")
        if self.attention_mask_style == "none" and not bool(attention_mask.all()):
            raise ValueError(
                f"{type(unwrap(self.model)).__name__} ignores attention masks, so a left-padded batch would give each "
                "row different logits than alone. Load LLaDA / Dream without trust_remote_code (the project's native "
                "implementation honours masks), or use batches of equal-length prompts (batch size 1)."
            )
        kwargs = {}
        if self.attention_mask_style == "keys":
            kwargs["attention_mask"] = attention_mask
        elif self.attention_mask_style == "pairwise":
            valid = attention_mask.bool()
            kwargs["attention_mask"] = (valid[:, None, :, None] & valid[:, None, None, :])  # [B, 1, L, L]
        if self._takes_position_ids:
            # Positions count real tokens only, so a row's logits do not depend on how much padding it got.
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        # A shifted model reads the prediction for column i at column i-1: keep one more column.
        need = keep_last + (1 if self.shift_logits else 0)
        if self._takes_logits_to_keep:
            kwargs["logits_to_keep"] = need
        if self._takes_use_cache:
            kwargs["use_cache"] = False
        start = time.perf_counter()
        out = self.model(input_ids=input_ids, **kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        logits = logits[:, -need:]
        if self.shift_logits:
            logits = logits[:, :-1]
        logits = logits.clone()
        logits[..., self.mask_id] = float("-inf")
        if logits.device.type == "cuda":
            torch.cuda.synchronize(logits.device)
        self.forward_seconds += time.perf_counter() - start
        self.forward_calls += 1
        return logits


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
