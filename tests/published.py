"""Tiny random checkpoints in the published LLaDA / Dream hub layout, and their published code as a reference.

A checkpoint dir holds what a user downloads: `config.json` (with `auto_map`, `model_type` llada / Dream), the
published modeling files beside it (copied from `../shared/models`, read-only fixtures), `model.safetensors` with
the published weight names, and a tokenizer configured like the real one (LLaDA: no registered mask token,
`<|mdm_mask|>` only an added token, pad == eos == `<|endoftext|>`, turns end with `<|eot_id|>`; Dream: mask token
`<|mask|>`, pad == eos == `<|endoftext|>`, turns end with `<|im_end|>`). Sizes are tiny and weights random.

`reference_model` builds the published code eagerly (the only way it runs under transformers 5) and loads the
same weights, so tests can compare the native models against it.
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "models"
CORPUS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May? The answer is 72.",
    "Weng earns 12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
    "Betty is saving money for a new wallet which costs 100 dollars. The answer is \\boxed{5}.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 + - * / = ( ) . , ? ! { } \\boxed{ } #### The answer is",
]
LLADA_CHAT = (
    "{% for m in messages %}{% if loop.first %}{{ bos_token }}{% endif %}<|start_header_id|>{{ m['role'] }}"
    "<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
DREAM_CHAT = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def require_shared() -> Path:
    if not all((SHARED / f).is_file() for f in ("llada/modeling_llada.py", "dream/modeling_dream.py")):
        pytest.skip("../shared/models (the published LLaDA / Dream code) is absent")
    return SHARED


def _tokenizer(family: str, vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if family == "llada":
        specials = ["<|startoftext|>", "<|endoftext|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    else:
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    if family == "llada":
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                       pad_token="<|endoftext|>")
        fast.add_tokens(["<|mdm_mask|>"], special_tokens=True)  # an added token, NOT registered as mask_token
        fast.chat_template = LLADA_CHAT
    else:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
        fast.add_special_tokens({"mask_token": "<|mask|>"})
        fast.chat_template = DREAM_CHAT
    return fast


def _random(shape, gen, std=0.2, center=0.0):
    return center + std * torch.randn(shape, generator=gen)


def build_llada(path: Path, seed: int = 0, n_kv_heads: int = 2, d_model: int = 32, n_layers: int = 2) -> Path:
    """A tiny LLaDA-8B-Instruct look-alike in the hub layout."""
    shared = require_shared()
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer("llada")
    tok.save_pretrained(path)
    n_heads, hidden = 4, 64
    vocab = len(tok) + 12  # the embedding has more rows than the tokenizer, like the real one
    config = {
        "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
        "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
                     "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
        "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": d_model,
        "embedding_dropout": 0.0, "embedding_size": vocab, "eos_token_id": tok.eos_token_id, "flash_attention": False,
        "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
        "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
        "layer_norm_with_affine": True, "mask_token_id": tok.convert_tokens_to_ids("<|mdm_mask|>"),
        "max_sequence_length": 1024, "mlp_hidden_size": hidden, "mlp_ratio": 4, "model_type": "llada",
        "multi_query_attention": None, "n_heads": n_heads, "n_kv_heads": n_kv_heads, "n_layers": n_layers,
        "pad_token_id": tok.pad_token_id, "precision": "amp_bf16", "residual_dropout": 0.0, "rms_norm_eps": 1e-05,
        "rope": True, "rope_full_precision": True, "rope_theta": 500000.0, "scale_logits": False,
        "torch_dtype": "float32", "transformers_version": "4.46.3", "use_cache": False, "vocab_size": vocab,
        "weight_tying": False,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("configuration_llada.py", "modeling_llada.py"):
        shutil.copy(shared / "llada" / name, path / name)
    gen = torch.Generator().manual_seed(seed)
    kv = d_model // n_heads * n_kv_heads
    state = {"model.transformer.wte.weight": _random((vocab, d_model), gen, 1.0),
             "model.transformer.ln_f.weight": _random((d_model,), gen, 0.1, 1.0),
             "model.transformer.ff_out.weight": _random((vocab, d_model), gen, 0.3)}
    for i in range(n_layers):
        b = f"model.transformer.blocks.{i}."
        for name, shape in [("q_proj", (d_model, d_model)), ("k_proj", (kv, d_model)), ("v_proj", (kv, d_model)),
                            ("attn_out", (d_model, d_model)), ("ff_proj", (hidden, d_model)),
                            ("up_proj", (hidden, d_model)), ("ff_out", (d_model, hidden))]:
            state[b + name + ".weight"] = _random(shape, gen)
        for name in ("attn_norm", "ff_norm"):
            state[b + name + ".weight"] = _random((d_model,), gen, 0.1, 1.0)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return path


def build_dream(path: Path, seed: int = 0, hidden_size: int = 32, layers: int = 2) -> Path:
    """A tiny Dream-v0-Instruct-7B look-alike in the hub layout."""
    shared = require_shared()
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer("dream")
    tok.save_pretrained(path)
    heads, kv_heads, inter = 4, 2, 64
    vocab = len(tok) + 10
    config = {
        "architectures": ["DreamModel"], "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
        "bos_token_id": tok.eos_token_id, "eos_token_id": tok.eos_token_id, "hidden_act": "silu",
        "hidden_size": hidden_size, "initializer_range": 0.02, "intermediate_size": inter,
        "mask_token_id": tok.mask_token_id, "max_position_embeddings": 1024, "max_window_layers": layers,
        "model_type": "Dream", "num_attention_heads": heads, "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads, "pad_token_id": tok.pad_token_id, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
        "torch_dtype": "float32", "transformers_version": "4.46.2", "use_cache": False, "use_sliding_window": False,
        "vocab_size": vocab,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tok.eos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
         "transformers_version": "4.46.2"}))
    for name in ("configuration_dream.py", "modeling_dream.py", "generation_utils.py"):
        shutil.copy(shared / "dream" / name, path / name)
    gen = torch.Generator().manual_seed(seed)
    hd = hidden_size // heads
    state = {"model.embed_tokens.weight": _random((vocab, hidden_size), gen, 1.0),
             "model.norm.weight": _random((hidden_size,), gen, 0.1, 1.0),
             "lm_head.weight": _random((vocab, hidden_size), gen, 0.3)}
    for i in range(layers):
        b = f"model.layers.{i}."
        for name, shape in [("self_attn.q_proj", (hidden_size, hidden_size)),
                            ("self_attn.k_proj", (hd * kv_heads, hidden_size)),
                            ("self_attn.v_proj", (hd * kv_heads, hidden_size))]:
            state[b + name + ".weight"] = _random(shape, gen)
            state[b + name + ".bias"] = _random(shape[:1], gen)
        for name, shape in [("self_attn.o_proj", (hidden_size, hidden_size)), ("mlp.gate_proj", (inter, hidden_size)),
                            ("mlp.up_proj", (inter, hidden_size)), ("mlp.down_proj", (hidden_size, inter))]:
            state[b + name + ".weight"] = _random(shape, gen)
        for name in ("input_layernorm", "post_attention_layernorm"):
            state[b + name + ".weight"] = _random((hidden_size,), gen, 0.1, 1.0)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return path


def _import_published(path: Path, family: str):
    """Import the checkpoint's modeling module as a package (its relative imports need one)."""
    pkg = f"_published_{family}_{abs(hash(str(path)))}"
    if pkg not in sys.modules:
        root = path.parent / f"{pkg}_src"
        (root / pkg).mkdir(parents=True, exist_ok=True)
        for f in path.glob("*.py"):
            shutil.copy(f, root / pkg / f.name)
        (root / pkg / "__init__.py").write_text("")
        sys.path.insert(0, str(root))
        importlib.invalidate_caches()
    return importlib.import_module(f"{pkg}.modeling_{family}")


def _default_rope(config, device=None, **_):
    """transformers 5 dropped 'default' from ROPE_INIT_FUNCTIONS; Dream's code looks it up. Plain RoPE."""
    dim = config.hidden_size // config.num_attention_heads
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float().to(device) / dim))
    return inv, 1.0


def reference_model(path: Path, family: str):
    """The published code, built eagerly on CPU in fp32 with the checkpoint's weights (test-only workarounds)."""
    from safetensors.torch import load_file

    path = Path(path)
    module = _import_published(path, family)
    raw = json.loads((path / "config.json").read_text())
    raw = {k: v for k, v in raw.items() if k not in ("auto_map", "transformers_version", "torch_dtype")}
    if family == "llada":
        config = importlib.import_module(module.__package__ + ".configuration_llada").LLaDAConfig(**raw)
        config.use_cache = False  # transformers 5 no longer keeps the unknown kwarg the published code reads
        model = module.LLaDAModelLM(config)
    else:
        module.ROPE_INIT_FUNCTIONS = {**module.ROPE_INIT_FUNCTIONS, "default": _default_rope}
        config = importlib.import_module(module.__package__ + ".configuration_dream").DreamConfig(**raw)
        config._attn_implementation = "sdpa"
        model = module.DreamModel(config)
    missing, unexpected = model.load_state_dict(load_file(path / "model.safetensors"), strict=False)
    assert not unexpected and not [k for k in missing if "inv_freq" not in k], (missing, unexpected)
    return model.float().eval()
