"""Dream as a transformers-native bidirectional Qwen2.

A Dream checkpoint (`model_type: Dream`) is Qwen2 (q/k/v biases, RMSNorm, SwiGLU, RoPE) run without a causal mask,
trained so that the logits at column i predict the token at column i + 1 (the adapter shifts them). Its weight
names already are Qwen2's, so the weights load unchanged into `Qwen2ForCausalLM` with `is_causal=False` and every
attention module's `is_causal` flag off. Nothing from the checkpoint's own code runs; the rotary frequencies are
transformers' own (and checked after loading, see `rollout.native.check_loaded`).
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import Qwen2Config, Qwen2ForCausalLM

from rollout.native.bidirectional import make_bidirectional, require_bidirectional

KEY_MAPPING: dict[str, str] = {}  # Dream's keys are Qwen2ForCausalLM's


@strict
class NativeDreamConfig(Qwen2Config):
    """`Qwen2Config` for a bidirectional Dream; `mask_token_id` comes from the Dream config."""

    model_type = "mdlm_dream"
    mask_token_id: int | None = None
    is_causal: bool = False


class NativeDreamForMaskedLM(Qwen2ForCausalLM):
    """`Qwen2ForCausalLM` run bidirectionally; logits at column i predict the token at column i + 1."""

    config_class = NativeDreamConfig

    def __init__(self, config: NativeDreamConfig):
        require_bidirectional(config, "NativeDreamForMaskedLM")
        super().__init__(config)
        make_bidirectional(self.model.layers)


MODEL = NativeDreamForMaskedLM


def native_config(raw: dict) -> NativeDreamConfig:
    """The native config of a Dream `config.json` dict; unsupported settings are an error naming them."""
    scaling = raw.get("rope_scaling")
    if scaling not in (None, {}) and scaling.get("rope_type", scaling.get("type")) != "default":
        raise ValueError(f"Dream config has rope_scaling={scaling}; the native Dream model supports plain RoPE only. "
                         "Load it with trust_remote_code: true.")
    if raw.get("use_sliding_window"):
        raise ValueError("Dream config has use_sliding_window: true; the native Dream model uses full attention only.")
    heads = raw["num_attention_heads"]
    return NativeDreamConfig(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=raw.get("num_key_value_heads") or heads,
        hidden_act=raw.get("hidden_act", "silu"),
        max_position_embeddings=raw.get("max_position_embeddings", 32768),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_parameters={"rope_type": "default", "rope_theta": float(raw.get("rope_theta", 10000.0))},
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        use_sliding_window=False,
        attention_dropout=raw.get("attention_dropout", 0.0),
        use_cache=False,
        pad_token_id=raw.get("pad_token_id"),
        eos_token_id=raw.get("eos_token_id"),
        bos_token_id=raw.get("bos_token_id"),
        mask_token_id=raw.get("mask_token_id"),
    )
