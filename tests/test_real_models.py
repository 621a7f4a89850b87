"""LLaDA and Dream as published: tiny random checkpoints in the hub layout load into the native bidirectional models,
match the published code's logits, resolve the mask id, batch exactly, train (LoRA, gradient checkpointing) and
refuse to be silently wrong. Skipped when ../shared/models (the published code) is absent."""

from __future__ import annotations

import importlib.util
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from published import SHARED, build_dream, build_llada, reference_model, require_shared

from rl.models import load_pretrained, load_tokenizer
from rollout import MDLMAdapter, SamplerConfig, sample
from rollout.native import check_loaded
from rollout.native.dream import NativeDreamForMaskedLM
from rollout.native.llada import NativeLLaDAForMaskedLM
from rollout.template import TemplateConfig, build_canvas

NATIVE = {"llada": NativeLLaDAForMaskedLM, "dream": NativeDreamForMaskedLM}
PROMPTS = ["How many clips did Natalia sell?",
           "Weng earns 12 an hour for babysitting. Yesterday, she just did 50 minutes. How much did she earn?",
           "Betty is saving money."]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    require_shared()
    root = tmp_path_factory.mktemp("published")
    return {"llada": build_llada(root / "llada"), "dream": build_dream(root / "dream")}


def _load(path, **kwargs):
    return load_pretrained(str(path), dtype="float32", **kwargs).eval(), load_tokenizer(str(path))


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_published_checkpoint_loads_natively_with_the_published_logits(checkpoints, family):
    model, tok = _load(checkpoints[family])
    assert type(model) is NATIVE[family]
    assert not model.config.is_causal and all(not m.self_attn.is_causal for m in model.model.layers)
    reference = reference_model(checkpoints[family], family)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, len(tok), (1, 23), generator=gen)
    ids[0, 5:15] = model.config.mask_token_id
    with torch.no_grad():
        want = reference(input_ids=ids).logits
        got = model(input_ids=ids).logits
        got_sdpa = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_sdpa, want, rtol=1e-5, atol=1e-5)
    # Bidirectional: the first column's logits depend on the last token.
    other = ids.clone()
    other[0, -1] = (other[0, -1] + 1) % len(tok)
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=other).logits[0, 0], got[0, 0])


def test_mask_id_from_tokenizer_else_config_else_the_recipe_key(checkpoints, tmp_path):
    llada, llada_tok = _load(checkpoints["llada"])
    assert llada_tok.mask_token_id is None  # as published: <|mdm_mask|> is only an added token
    adapter = MDLMAdapter.from_pretrained(llada, llada_tok)
    assert adapter.mask_id == llada.config.mask_token_id == llada_tok.convert_tokens_to_ids("<|mdm_mask|>")
    assert not adapter.shift_logits and adapter.attention_mask_style == "keys"
    assert llada_tok.convert_tokens_to_ids("<|eot_id|>") in adapter.eos_ids
    assert adapter.pad_id == llada_tok.eos_token_id
    dream, dream_tok = _load(checkpoints["dream"])
    adapter = MDLMAdapter.from_pretrained(dream, dream_tok)
    assert adapter.mask_id == dream_tok.mask_token_id == dream.config.mask_token_id
    assert adapter.shift_logits and adapter.attention_mask_style == "keys"
    assert dream_tok.convert_tokens_to_ids("<|im_end|>") in adapter.eos_ids
    # A checkpoint with no mask id anywhere: a clear error naming the recipe key, or the key supplies it.
    bare = tmp_path / "bare"
    shutil.copytree(checkpoints["llada"], bare)
    config = json.loads((bare / "config.json").read_text())
    mask_id = config.pop("mask_token_id")
    (bare / "config.json").write_text(json.dumps(config))
    model, tok = _load(bare)
    with pytest.raises(ValueError, match="mask_token_id"):
        MDLMAdapter.from_pretrained(model, tok)
    model, tok = _load(bare, mask_token_id=mask_id)
    assert MDLMAdapter.from_pretrained(model, tok).mask_id == mask_id


def _canvas(tok, adapter, prompts, reasoning=12):
    template = TemplateConfig(reasoning_length=reasoning, answer_length=3, delimiter=" The answer is", suffix=".",
                              chat_template=True)
    messages = [[{"role": "user", "content": p}] for p in prompts]
    return build_canvas(tok, messages, template, adapter.mask_id)


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_rollouts_are_batch_invariant(checkpoints, family, temperature):
    model, tok = _load(checkpoints[family])
    adapter = MDLMAdapter.from_pretrained(model, tok)
    config = SamplerConfig(policy="confidence", k=2, block_length=4, temperature=temperature, seed=3)
    batch = _canvas(tok, adapter, PROMPTS)
    assert len(set(batch.attention_mask.sum(-1).tolist())) == len(PROMPTS)  # different prompt lengths, left padded
    together = sample(adapter, batch, config, seeds=[10, 11, 12])
    for i, prompt in enumerate(PROMPTS):
        alone = sample(adapter, _canvas(tok, adapter, [prompt]), config, seeds=[10 + i])
        assert torch.equal(alone.generation[0], together.generation[i])
        assert torch.equal(alone.decode_step[0], together.decode_step[i])
        assert alone.nfe[0] == together.nfe[i]
        torch.testing.assert_close(alone.token_logprob[0], together.token_logprob[i], atol=1e-5, rtol=1e-5)
        steps = int(alone.nfe[0])
        torch.testing.assert_close(alone.h_ub[0, :steps], together.h_ub[i, :steps], atol=1e-4, rtol=1e-5,
                                   equal_nan=True)


def test_published_llada_code_refuses_padded_batches(checkpoints):
    _, tok = _load(checkpoints["llada"])
    reference = reference_model(checkpoints["llada"], "llada")  # what trust_remote_code would run
    adapter = MDLMAdapter.from_pretrained(reference, tok)
    assert adapter.attention_mask_style == "none"
    batch = _canvas(tok, adapter, PROMPTS[:2])
    with pytest.raises(ValueError, match="ignores attention masks"):
        sample(adapter, batch, SamplerConfig(policy="confidence"))
    sample(adapter, _canvas(tok, adapter, PROMPTS[:1]), SamplerConfig(policy="confidence"))  # one row: fine


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_load_checks_catch_missing_weights_and_bad_rotary_buffers(checkpoints, family, tmp_path):
    model, _ = _load(checkpoints[family])
    check_loaded(model.to(torch.bfloat16))  # a cast to bf16 rounds the rotary buffer: still accepted
    model, _ = _load(checkpoints[family])
    rotary = model.model.rotary_emb
    rotary.inv_freq.copy_(torch.empty_like(rotary.inv_freq).uniform_(2, 3))
    with pytest.raises(ValueError, match="inv_freq"):
        check_loaded(model)
    from safetensors.torch import load_file, save_file

    broken = tmp_path / family
    shutil.copytree(checkpoints[family], broken)
    state = load_file(broken / "model.safetensors")
    state.pop(sorted(k for k in state if "layers.1" in k or "blocks.1" in k)[0])
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="did not map every weight"):
        _load(broken)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_training_paths_lora_gradient_checkpointing_and_logits_to_keep(checkpoints, family):
    from peft import get_peft_model

    from rl.sft.config import LoraArguments

    model, tok = _load(checkpoints[family])
    batch = _canvas(tok, MDLMAdapter.from_pretrained(model, tok), PROMPTS[:2])
    ids, am, keep = batch.input_ids, batch.attention_mask, batch.gen_length

    def grads(net):
        net.train()
        adapter = MDLMAdapter.from_pretrained(net, tok)
        assert adapter._takes_logits_to_keep and adapter._takes_position_ids
        calls = []
        hook = adapter.model.register_forward_hook(lambda m, a, kw, out: calls.append(out.logits.shape[1]),
                                                   with_kwargs=True)
        logits = adapter.logits(ids, am, keep)  # [B, keep, V]
        hook.remove()
        assert calls == [keep + (1 if adapter.shift_logits else 0)]  # the model computed only the kept columns
        logits.masked_fill(~torch.isfinite(logits), 0).logsumexp(-1).sum().backward()
        return {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad and p.grad is not None}

    plain = grads(model)
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = grads(model)
    assert plain.keys() == checkpointed.keys() and len(plain) == sum(1 for _ in model.parameters())
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = LoraArguments(use_peft=True, lora_r=4, lora_target_modules=targets).peft_config()
    assert lora.task_type is None
    peft_model = get_peft_model(model, lora)
    wrapped = {n.split(".")[-1] for n, _ in peft_model.named_modules() if hasattr(_, "lora_A")}
    assert wrapped == set(targets)
    lora_grads = grads(peft_model)
    assert lora_grads and all("lora_" in n for n in lora_grads)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_a_saved_native_model_reloads_natively(checkpoints, family, tmp_path):
    model, tok = _load(checkpoints[family])
    model.save_pretrained(tmp_path / "saved")
    tok.save_pretrained(tmp_path / "saved")
    again, _ = _load(tmp_path / "saved")
    assert type(again) is NATIVE[family] and again.config.model_type == f"mdlm_{family}"
    ids = torch.randint(0, len(tok), (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits)
    assert MDLMAdapter.from_pretrained(again, tok).shift_logits == (family == "dream")


class _MaskExcluded(torch.nn.Module):
    """The published model with the mask token's logit at -inf (the project never predicts the mask token)."""

    def __init__(self, inner, mask_id: int):
        super().__init__()
        self.inner, self.mask_id = inner, mask_id

    @property
    def device(self):
        return next(self.inner.parameters()).device

    def forward(self, input_ids, attention_mask=None):
        logits = self.inner(input_ids=input_ids).logits.clone()
        logits[..., self.mask_id] = float("-inf")
        return SimpleNamespace(logits=logits)


def _published_llada_generate(model, prompt, mask_id: int, gen_length: int, block_length: int):
    """LLaDA's generate.py: low-confidence remasking, one token per step, semi-AR blocks, greedy."""
    spec = importlib.util.spec_from_file_location("llada_generate", SHARED / "llada" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.generate(_MaskExcluded(model, mask_id), prompt, steps=gen_length, gen_length=gen_length,
                           block_length=block_length, temperature=0.0, remasking="low_confidence", mask_id=mask_id)


def _published_dream_generate(model, prompt, mask_id: int, gen_length: int):
    """Dream's diffusion_generate sampling loop (`_sample`, alg='entropy', greedy). Its front end needs
    transformers 4 generation configs, so the loop gets a plain namespace with the same fields. eps < 0 makes its
    schedule transfer exactly one token per step (int(n * (1 - s/t)) = 1), the project's k = 1."""
    config = SimpleNamespace(output_history=False, return_dict_in_generate=False,
                             max_length=prompt.shape[1] + gen_length, mask_token_id=mask_id, steps=gen_length,
                             eps=-1e-4, alg="entropy", alg_temp=None, temperature=0.0, top_p=None, top_k=None)

    def exclude_mask(step, x, logits):
        logits = logits.clone()
        logits[..., mask_id] = float("-inf")
        return logits

    return model._sample(prompt, attention_mask=None, generation_config=config,
                         generation_tokens_hook_func=lambda step, x, logits: x,
                         generation_logits_hook_func=exclude_mask)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_greedy_rollouts_equal_the_published_samplers_token_for_token(checkpoints, family):
    model, tok = _load(checkpoints[family])
    adapter = MDLMAdapter.from_pretrained(model, tok)
    gen_length, block = 12, 4
    template = TemplateConfig(layout="plain", reasoning_length=gen_length, chat_template=True)
    if family == "llada":  # low-confidence remasking in semi-AR blocks
        config = SamplerConfig(policy="confidence", k=1, block_length=block, temperature=0.0)
    else:  # lowest entropy first over the whole generation
        config = SamplerConfig(policy="entropy", k=1, block_length=None, temperature=0.0)
    messages = [[{"role": "user", "content": p}] for p in PROMPTS]
    ours = sample(adapter, build_canvas(tok, messages, template, adapter.mask_id), config)  # one padded batch
    reference = reference_model(checkpoints[family], family)
    for i, message in enumerate(messages):
        canvas = build_canvas(tok, [message], template, adapter.mask_id)
        prompt = canvas.input_ids[:, : canvas.gen_start]
        with torch.no_grad():
            if family == "llada":
                theirs = _published_llada_generate(reference, prompt, adapter.mask_id, gen_length, block)
            else:
                theirs = _published_dream_generate(reference, prompt, adapter.mask_id, gen_length)
        assert theirs[0, : prompt.shape[1]].tolist() == prompt[0].tolist()
        assert ours.generation[i].tolist() == theirs[0, prompt.shape[1]:].tolist()


def test_a_tokenizer_that_names_remote_code_loads_without_running_it(checkpoints, tmp_path):
    path = tmp_path / "dream"
    shutil.copytree(checkpoints["dream"], path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="DreamTokenizer", auto_map={"AutoTokenizer": ["tokenization_dream.DreamTokenizer",
                                                                                 None]})
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "tokenization_dream.py").write_text("raise RuntimeError('remote tokenizer code ran')\n")
    want = load_tokenizer(str(checkpoints["dream"]))
    got = load_tokenizer(str(path))
    assert (got.mask_token_id, got.pad_token_id, got.eos_token_id, len(got)) == (
        want.mask_token_id, want.pad_token_id, want.eos_token_id, len(want))
    messages = [{"role": "user", "content": PROMPTS[1]}]
    assert got.apply_chat_template(messages, add_generation_prompt=True) == want.apply_chat_template(
        messages, add_generation_prompt=True)
