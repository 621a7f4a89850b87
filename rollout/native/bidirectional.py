"""What turns a transformers causal LM into the bidirectional model an MDLM checkpoint was trained as."""

from __future__ import annotations

from torch import nn


def require_bidirectional(config, cls_name: str) -> None:
    """The config must say `is_causal=False`: transformers' mask builder then attends both ways (padding kept out)."""
    if getattr(config, "is_causal", True):
        raise ValueError(f"{cls_name} is bidirectional: its config must have is_causal=False.")


def make_bidirectional(decoder_layers: nn.ModuleList) -> None:
    """Mark every attention non-causal too: without a padding mask SDPA would otherwise run its causal kernel."""
    for layer in decoder_layers:
        layer.self_attn.is_causal = False
