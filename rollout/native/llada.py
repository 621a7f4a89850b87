"""LLaDA as a transformers-native bidirectional Llama.

A LLaDA checkpoint (`model_type: llada`, `block_type: llama`) is a Llama stack with RMSNorm, SwiGLU and RoPE whose
attention is not causal. Its weights load, renamed, into `LlamaForCausalLM` with `is_causal=False` (transformers'
mask builder then makes a bidirectional mask that still honours key padding) and every attention module's
`is_causal` flag off (so SDPA is never asked for a causal kernel when no mask is built). Nothing from the
checkpoint's own code runs; LoRA targets get the standard names.

| LLaDA checkpoint key (under `model.transformer.`) | native key |
|---|---|
| `wte` / `ln_f` / `ff_out` (output head) | `model.embed_tokens` / `model.norm` / `lm_head` |
| `blocks.N.q_proj`, `k_proj`, `v_proj` / `attn_out` | `model.layers.N.self_attn.{q,k,v}_proj` / `o_proj` |
| `blocks.N.ff_proj` / `up_proj` / `ff_out` | `model.layers.N.mlp.gate_proj` / `up_proj` / `down_proj` |
| `blocks.N.attn_norm` / `ff_norm` | `model.layers.N.input_layernorm` / `post_attention_layernorm` |
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig, LlamaForCausalLM

from rollout.native.bidirectional import make_bidirectional, require_bidirectional

# Checkpoint key regex -> native key (transformers' `key_mapping`, applied to each key once, first match wins).
KEY_MAPPING = {
    r"^model\.transformer\.wte\.": "model.embed_tokens.",
    r"^model\.transformer\.ln_f\.": "model.norm.",
    r"^model\.transformer\.ff_out\.": "lm_head.",
    r"^model\.transformer\.blocks\.(\d+)\.q_proj\.": r"model.layers.\1.self_attn.q_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.k_proj\.": r"model.layers.\1.self_attn.k_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.v_proj\.": r"model.layers.\1.self_attn.v_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.attn_out\.": r"model.layers.\1.self_attn.o_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.ff_proj\.": r"model.layers.\1.mlp.gate_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.up_proj\.": r"model.layers.\1.mlp.up_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.ff_out\.": r"model.layers.\1.mlp.down_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.attn_norm\.": r"model.layers.\1.input_layernorm.",
    r"^model\.transformer\.blocks\.(\d+)\.ff_norm\.": r"model.layers.\1.post_attention_layernorm.",
}

# Settings of the LLaDA config the native model does not implement: key -> (value it must have, default when absent).
# The defaults are those of LLaDA's published config class, so a config that omits a key means the same here.
_REQUIRED = {
    "block_type": ("llama", "sequential"),
    "rope": (True, False),
    "alibi": (False, False),
    "layer_norm_type": ("rms", "default"),
    "layer_norm_with_affine": (True, True),
    "activation_type": ("silu", "swiglu"),
    "attention_layer_norm": (False, False),
    "include_bias": (False, False),
    "include_qkv_bias": (False, False),
    "input_emb_norm": (False, False),
    "scale_logits": (False, False),
    "block_group_size": (1, 1),
    "clip_qkv": (None, None),
    "multi_query_attention": (None, None),
}


@strict
class NativeLLaDAConfig(LlamaConfig):
    """`LlamaConfig` for a bidirectional LLaDA; `mask_token_id` comes from the LLaDA config."""

    model_type = "mdlm_llada"
    mask_token_id: int | None = None
    is_causal: bool = False


class NativeLLaDAForMaskedLM(LlamaForCausalLM):
    """`LlamaForCausalLM` run bidirectionally: logits at column i predict the token at column i (no shift)."""

    config_class = NativeLLaDAConfig

    def __init__(self, config: NativeLLaDAConfig):
        require_bidirectional(config, "NativeLLaDAForMaskedLM")
        super().__init__(config)
        make_bidirectional(self.model.layers)


MODEL = NativeLLaDAForMaskedLM


def native_config(raw: dict) -> NativeLLaDAConfig:
    """The native config of a LLaDA `config.json` dict; unsupported settings are an error naming them."""
    bad = {k: raw.get(k, default) for k, (want, default) in _REQUIRED.items() if raw.get(k, default) != want}
    if bad:
        raise ValueError(
            f"This LLaDA config uses settings the native LLaDA model does not implement: {bad} (supported: "
            f"{ {k: v for k, (v, _) in _REQUIRED.items() if k in bad} }). Load it with trust_remote_code: true "
            "(single rows only: LLaDA's own code ignores the attention mask)."
        )
    d_model, n_heads = raw["d_model"], raw["n_heads"]
    hidden = raw.get("mlp_hidden_size") or raw.get("mlp_ratio", 4) * d_model
    return NativeLLaDAConfig(
        vocab_size=raw.get("embedding_size") or raw["vocab_size"],
        hidden_size=d_model,
        intermediate_size=hidden,
        num_hidden_layers=raw["n_layers"],
        num_attention_heads=n_heads,
        num_key_value_heads=raw.get("n_kv_heads") or n_heads,
        head_dim=d_model // n_heads,
        hidden_act="silu",
        max_position_embeddings=raw.get("max_sequence_length", 1024),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-5),
        rope_parameters={"rope_type": "default", "rope_theta": float(raw.get("rope_theta", 10000.0))},
        tie_word_embeddings=bool(raw.get("weight_tying", True)),
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
        use_cache=False,
        pad_token_id=raw.get("pad_token_id"),
        eos_token_id=raw.get("eos_token_id"),
        bos_token_id=raw.get("bos_token_id"),
        mask_token_id=raw.get("mask_token_id"),
    )
