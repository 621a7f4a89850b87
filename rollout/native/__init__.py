"""The project's own bidirectional implementations of the published MDLM checkpoints.

`model_type: llada` (LLaDA-8B-Base/Instruct) loads into `NativeLLaDAForMaskedLM` (a bidirectional Llama) and
`model_type: Dream` (Dream-v0-7B) into `NativeDreamForMaskedLM` (a bidirectional Qwen2), straight from the published
`config.json` and weights, with no remote code: attention masks are honoured (left-padded batches give each row its
own logits), SDPA, gradient checkpointing, `logits_to_keep`, transformers' caches and quantisation work, and LoRA
targets are the standard `q_proj ... down_proj`. A model saved after full fine-tuning keeps the native type
(`mdlm_llada` / `mdlm_dream`), registered with the transformers Auto classes on import.

Every load ends with `check_loaded`: no checkpoint weight left unused or missing, rotary frequencies equal to their
formula, a finite probe forward. A failure is an error, never silently wrong logits.
"""

from __future__ import annotations

import logging

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from rollout.native import dream, llada

logger = logging.getLogger(__name__)

# config.json model_type (lower case) -> the module with the family's native_config, KEY_MAPPING and MODEL
FAMILIES = {"llada": llada, "dream": dream}  # published checkpoints
NATIVE_TYPES = {"mdlm_llada": llada, "mdlm_dream": dream}  # saved by this project after full fine-tuning

for _module in FAMILIES.values():  # a saved native model also loads through the Auto classes
    AutoConfig.register(_module.MODEL.config_class.model_type, _module.MODEL.config_class, exist_ok=True)
    AutoModelForCausalLM.register(_module.MODEL.config_class, _module.MODEL, exist_ok=True)


def native_family(raw_config: dict) -> str | None:
    """'llada', 'dream', 'mdlm_llada', 'mdlm_dream' for a config the native path serves, else None."""
    model_type = str(raw_config.get("model_type", "")).lower()
    return model_type if model_type in FAMILIES or model_type in NATIVE_TYPES else None


def load_native(name_or_path: str, raw_config: dict, mask_token_id: int | None = None, **kwargs):
    """Load a published LLaDA / Dream checkpoint (or a saved native one) into its native model.

    Args:
        name_or_path: hub id or local dir.
        raw_config: its `config.json` as a dict.
        mask_token_id: fills the config's mask id when the checkpoint has none (recipe key `mask_token_id`).
        **kwargs: passed to `from_pretrained` (dtype, quantization_config, device_map, attn_implementation, ...).
    """
    family = native_family(raw_config)
    if family in NATIVE_TYPES:
        module = NATIVE_TYPES[family]
        config = module.MODEL.config_class.from_pretrained(name_or_path)
    else:
        module = FAMILIES[family]
        config = module.native_config(raw_config)
    if config.mask_token_id is None and mask_token_id is not None:
        config.mask_token_id = int(mask_token_id)
    # transformers saves a model loaded through a key mapping under the checkpoint's own names again, so a saved
    # native model goes through the same mapping (native names pass through it unchanged).
    model, info = module.MODEL.from_pretrained(name_or_path, config=config, key_mapping=module.KEY_MAPPING or None,
                                               output_loading_info=True, **kwargs)
    check_loaded(model, info, name_or_path)
    logger.info("Loaded %s as %s (native bidirectional, no remote code).", name_or_path, module.MODEL.__name__)
    return model


def _expected_inv_freq(config, device) -> torch.Tensor:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    theta = config.rope_parameters["rope_theta"]
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))


def check_loaded(model, info: dict | None = None, source: str = "the model") -> None:
    """Raise if the load left the model wrong: missing or unused weights, wrong rotary frequencies, bad logits."""
    if info is not None:
        missing = [k for k in info.get("missing_keys", []) if "rotary_emb" not in k]
        unused = list(info.get("unexpected_keys", []))
        mismatched = list(info.get("mismatched_keys", []))
        if missing or unused or mismatched:
            raise ValueError(
                f"Loading {source} did not map every weight: missing {missing[:5]}, unused {unused[:5]}, "
                f"mismatched {mismatched[:5]} ({len(missing)} / {len(unused)} / {len(mismatched)}). The checkpoint "
                "does not have the published layout; its weights would be random or ignored."
            )
    config = model.config
    for name, module in model.named_modules():
        inv_freq = getattr(module, "inv_freq", None)
        if not isinstance(inv_freq, torch.Tensor) or config.rope_parameters.get("rope_type", "default") != "default":
            continue
        want = _expected_inv_freq(config, inv_freq.device)
        rtol = 1e-5 if inv_freq.dtype in (torch.float32, torch.float64) else 1e-2  # a model cast to bf16 casts it too
        if inv_freq.shape != want.shape or not torch.allclose(inv_freq.float(), want, rtol=rtol, atol=0):
            raise ValueError(f"{source}: rotary buffer {name}.inv_freq does not equal 1 / theta^(2i/d) after loading "
                             "(uninitialised memory?); its logits would be silently wrong.")
    param = next(model.parameters())
    if param.device.type == "meta":
        raise ValueError(f"{source}: parameters are still on the meta device after loading.")
    probe = torch.tensor([[min(1, config.vocab_size - 1)] * 4], device=param.device)
    with torch.no_grad():
        logits = model(input_ids=probe, logits_to_keep=1).logits
    if not torch.isfinite(logits).all():
        raise ValueError(f"{source}: a probe forward gave non-finite logits; the weights or buffers are corrupt.")
