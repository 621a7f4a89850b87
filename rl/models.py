"""Loading models and tokenizers (hub id, local dir, LoRA adapter dir) and building the tiny default from scratch.

Published LLaDA (`model_type: llada`) and Dream (`model_type: Dream`) checkpoints load into the project's own
bidirectional transformers models (`rollout.native`: Llama / Qwen2 with the attention mask honoured), with no
remote code; `trust_remote_code: true` opts into the checkpoint's own code instead. Every other model (the tiny
bidirectional Gemma3, any transformers MDLM) goes through `AutoModelForCausalLM.from_pretrained`. A directory
holding a PEFT adapter (`adapter_config.json`) loads its base model and applies the adapter.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelConfig:
    """Which model and tokenizer. Field names are recipe keys."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub id or local model dir; a dir with adapter_config.json is a LoRA adapter on its base."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Tokenizer to load (None: the model's; with from_scratch: built from the task)."},
    )
    adapter_path: str | None = field(default=None, metadata={"help": "LoRA adapter dir applied on top of the model."})
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Run the model repo's own code. Opt-in only; LLaDA and Dream load natively without it."},
    )
    mask_token_id: int | None = field(
        default=None,
        metadata={"help": "Mask token id, for a checkpoint whose tokenizer and config name none (else unused)."},
    )
    dtype: str = field(default="auto", metadata={"help": f"Weights dtype: {', '.join(DTYPES)}."})
    cpu_threads: int = field(default=0, metadata={"help": "Torch threads on CPU (0: the machine's cores shared by the "
                                                          "local processes). Use 1 per job when running jobs side by "
                                                          "side on a small machine."})

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; use one of {', '.join(DTYPES)}.")
        if self.cpu_threads < 0:
            raise ValueError(f"cpu_threads must be >= 0 (0: all cores), got {self.cpu_threads}.")


@dataclass
class ScratchModelConfig:
    """The tiny default: a bidirectional Gemma3 built from scratch. Field names are recipe keys."""

    from_scratch: bool = field(
        default=False, metadata={"help": "Build a tiny bidirectional Gemma3 and a word-level tokenizer from the task."}
    )
    scratch_layers: int = field(default=4, metadata={"help": "from_scratch: transformer layers."})
    scratch_hidden: int = field(default=128, metadata={"help": "from_scratch: hidden size."})
    scratch_heads: int = field(default=4, metadata={"help": "from_scratch: attention heads (divide scratch_hidden)."})
    scratch_kv_heads: int = field(default=2, metadata={"help": "from_scratch: key/value heads (divides heads)."})
    scratch_max_length: int = field(default=512, metadata={"help": "from_scratch: context length."})
    scratch_rope_theta: float = field(
        default=10000.0, metadata={"help": "from_scratch: RoPE base (Gemma3's 1e6 suits long contexts, not ~100)."}
    )

    def __post_init__(self) -> None:
        if self.scratch_hidden % self.scratch_heads or self.scratch_heads % self.scratch_kv_heads:
            raise ValueError(
                f"scratch_hidden ({self.scratch_hidden}) must be divisible by scratch_heads ({self.scratch_heads}), "
                f"and scratch_heads by scratch_kv_heads ({self.scratch_kv_heads})."
            )


def build_scratch_model(config: ScratchModelConfig, tokenizer, seed: int = 0):
    """A randomly initialised bidirectional Gemma3 text model sized by the `scratch_*` fields.

    Initialisation draws from a forked RNG seeded with `seed`, so the global torch RNG is left alone.
    """
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    head_dim = config.scratch_hidden // config.scratch_heads
    model_config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=config.scratch_hidden, intermediate_size=4 * config.scratch_hidden,
        num_hidden_layers=config.scratch_layers, num_attention_heads=config.scratch_heads,
        num_key_value_heads=config.scratch_kv_heads, head_dim=head_dim, query_pre_attn_scalar=head_dim,
        max_position_embeddings=config.scratch_max_length, use_bidirectional_attention=True,
        layer_types=["full_attention"] * config.scratch_layers, final_logit_softcapping=None,
        rope_parameters={kind: {"rope_type": "default", "rope_theta": config.scratch_rope_theta}
                         for kind in ("full_attention", "sliding_attention")},
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Gemma3ForCausalLM(model_config)
    logger.info("Built a bidirectional Gemma3 from scratch: %.2fM parameters.",
                sum(p.numel() for p in model.parameters()) / 1e6)
    return model


def adapter_base(path: str) -> str | None:
    """Base model of a PEFT adapter dir, or None if `path` is not one."""
    cfg = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(cfg):
        return None
    with open(cfg) as f:
        return json.load(f)["base_model_name_or_path"]


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """AutoTokenizer; a repo that names its own tokenizer class (remote code) loads, without running that code,
    from its `tokenizer.json`, else as a Qwen2 byte-level BPE from `vocab.json` / `merges.txt` (Dream's tokenizer
    is Qwen2's with a mask token). Special tokens and the chat template come from the repo's files either way."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2Tokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except ValueError as err:
        if trust_remote_code or "trust_remote_code" not in str(err):
            raise
        failure = err
    for cls in (PreTrainedTokenizerFast, Qwen2Tokenizer):
        try:
            tokenizer = cls.from_pretrained(name_or_path)
        except (OSError, ValueError, TypeError):
            continue
        logger.info("%s names its own tokenizer code; loaded its files as %s instead (no remote code).",
                    name_or_path, type(tokenizer).__name__)
        return tokenizer
    raise failure


def quantization_config(load_in_4bit: bool, dtype: str = "auto"):
    """bitsandbytes NF4 config for QLoRA-style training of 8B policies (None when off). Needs CUDA and the
    `bitsandbytes` package; the error says which is missing."""
    if not load_in_4bit:
        return None
    if not torch.cuda.is_available():
        raise ValueError("load_in_4bit needs a CUDA GPU (bitsandbytes 4-bit kernels); set load_in_4bit: false on CPU.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ValueError("load_in_4bit needs bitsandbytes: pip install bitsandbytes") from err
    from transformers import BitsAndBytesConfig

    compute = DTYPES[dtype] if dtype not in ("auto", "float32") else torch.bfloat16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def load_config_dict(name_or_path: str) -> dict:
    """The `config.json` of a hub id or local dir, as a dict (no config class, no remote code)."""
    from transformers import PretrainedConfig

    return PretrainedConfig.get_config_dict(name_or_path)[0]


def load_pretrained(name_or_path: str, trust_remote_code: bool = False, dtype: str = "auto",
                    load_in_4bit: bool = False, mask_token_id: int | None = None):
    """The model at `name_or_path`.

    LLaDA / Dream checkpoints (and native models saved by this project) load into `rollout.native` unless
    `trust_remote_code` is set; everything else through AutoModelForCausalLM, falling back to AutoModel (Dream's
    remote code registers only that). `mask_token_id` fills `config.mask_token_id` when the checkpoint has none.
    """
    from transformers import AutoModel, AutoModelForCausalLM

    from rollout.native import FAMILIES, load_native, native_family

    kwargs = {"dtype": DTYPES[dtype]}
    quant = quantization_config(load_in_4bit, dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
    raw = load_config_dict(name_or_path)
    family = native_family(raw)
    if family is not None and not (trust_remote_code and family in FAMILIES):
        return load_native(name_or_path, raw, mask_token_id=mask_token_id, **kwargs)
    kwargs["trust_remote_code"] = trust_remote_code
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except ValueError as err:
        if "Unrecognized configuration class" not in str(err):
            raise
        model = AutoModel.from_pretrained(name_or_path, **kwargs)
    if mask_token_id is not None and getattr(model.config, "mask_token_id", None) is None:
        model.config.mask_token_id = int(mask_token_id)
    return model


def set_cpu_threads(requested: int, use_cpu: bool) -> None:
    """On CPU, use `requested` torch threads (0: cores / local processes). `accelerate launch` exports
    OMP_NUM_THREADS=1 unless told otherwise, which leaves all but one core idle in a one-process CPU run."""
    if requested < 0:
        raise ValueError(f"cpu_threads must be >= 0, got {requested}.")
    if not use_cpu and torch.cuda.is_available():
        return
    threads = requested or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if threads != torch.get_num_threads():
        logger.info("Using %d torch CPU threads per process (was %d).", threads, torch.get_num_threads())
        torch.set_num_threads(threads)


def load_for_inference(config: ModelConfig, device: str | torch.device):
    """(model, tokenizer) ready for sampling: adapters merged into the base, eval mode, on `device`."""
    if not config.model_name_or_path:
        raise ValueError("Set model_name_or_path to the model directory (or hub id) to evaluate.")
    set_cpu_threads(config.cpu_threads, use_cpu=torch.device(device).type == "cpu")
    path, adapter = config.model_name_or_path, config.adapter_path
    base = adapter_base(path)
    if base is not None:
        if adapter is not None:
            raise ValueError(f"{path} is itself a LoRA adapter; do not also pass adapter_path.")
        path, adapter = base, path
    tok_source = config.tokenizer_name_or_path
    if tok_source is None:
        has_tokenizer = adapter is not None and os.path.isfile(os.path.join(adapter, "tokenizer_config.json"))
        tok_source = adapter if has_tokenizer else path
    tokenizer = load_tokenizer(tok_source, config.trust_remote_code)
    model = load_pretrained(path, config.trust_remote_code, config.dtype, mask_token_id=config.mask_token_id)
    if adapter is not None:
        from peft import PeftModel

        # Merged, the network is a plain module again: one forward signature for the sampler, no adapter overhead.
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        logger.info("Merged LoRA adapter %s into %s.", adapter, path)
    return model.to(device).eval(), tokenizer
