"""Logits only where they are read: the readout equals the model's own logits, and the sampler and estimators give
the same results (values and gradients) reading hidden states chunk by chunk as reading whole logits."""

import dataclasses

import pytest
import torch
from doubles import MASK, oracle_canvas, tiny_model

import rollout.adapter
from rl.logprobs import trajectory_logps
from rollout import MDLMAdapter, SamplerConfig, sample

V = 23


@pytest.fixture
def small_chunks(monkeypatch):
    """Three positions per chunk, so every path crosses chunk boundaries."""
    monkeypatch.setattr(rollout.adapter, "CHUNK_BYTES", 4 * V * 3)


def _adapter(read_hidden=None, softcap=None, shift=False, seed=1):
    model = tiny_model(V, layers=2, hidden=32, seed=seed)
    model.config.final_logit_softcapping = softcap
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    return MDLMAdapter(model, mask_id=MASK, pad_id=0, eos_ids=(1,), shift_logits=shift, read_hidden=read_hidden)


@pytest.mark.parametrize("softcap,shift", [(None, False), (3.0, False), (None, True)])
def test_readout_gives_the_models_own_logits_at_the_positions_asked(small_chunks, softcap, shift):
    adapter = _adapter(softcap=softcap, shift=shift)
    assert adapter.reads_hidden
    canvas, _ = oracle_canvas(3, 6, 2, [1, 3, 2])
    with torch.no_grad():
        full = adapter.logits(canvas.input_ids, canvas.attention_mask, canvas.gen_length)  # [B, G, V]
        read = adapter.readout(canvas.input_ids, canvas.attention_mask, canvas.gen_length)
        rows, cols = torch.tensor([0, 0, 1, 2, 2]), torch.tensor([0, 5, 3, 8, 1])
        assert torch.allclose(read.logits(rows, cols), full[rows, cols], atol=1e-5)
        spans = [s for s, _ in read.chunks(rows, cols)]
    assert [(s.start, s.stop) for s in spans] == [(0, 3), (3, 5)]
    assert read.hidden.shape[:2] == full.shape[:2] and read.full is None


def test_a_forward_hook_on_the_model_makes_the_adapter_read_whole_logits():
    adapter = _adapter()
    adapter.model.register_forward_hook(lambda module, args, out: out)
    assert not dataclasses.replace(adapter).reads_hidden
    with pytest.raises(ValueError, match="read_hidden=True"):
        dataclasses.replace(adapter, read_hidden=True)


@pytest.mark.parametrize("temperature,exit_gamma", [(0.0, None), (0.8, 2.5)])
def test_sampler_reading_hidden_states_in_chunks_equals_reading_whole_logits(small_chunks, temperature, exit_gamma):
    canvas, _ = oracle_canvas(4, 8, 3, [1, 3, 2, 1], gold=[[4, 5, 1]] * 4)
    config = SamplerConfig(policy="med", med_lambda=1.5, block_length=4, temperature=temperature,
                           exit_gamma=exit_gamma, record_answer_guess=True)
    hidden = sample(_adapter(), canvas, config, seeds=[3, 4, 5, 6])
    whole = sample(_adapter(read_hidden=False), canvas, config, seeds=[3, 4, 5, 6])
    assert torch.equal(hidden.sequences, whole.sequences) and torch.equal(hidden.decode_step, whole.decode_step)
    assert torch.equal(hidden.answer_guess, whole.answer_guess)
    assert torch.allclose(hidden.token_logprob, whole.token_logprob, atol=1e-5)
    for a, b in ((hidden.h_ub, whole.h_ub), (hidden.phi, whole.phi)):
        assert torch.equal(a.isnan(), b.isnan()) and torch.allclose(a.nan_to_num(), b.nan_to_num(), atol=1e-5)


def test_estimator_values_and_gradients_are_the_same_through_chunked_checkpointed_reads(small_chunks):
    canvas, _ = oracle_canvas(3, 8, 2, [1, 3, 2])
    out = sample(_adapter(), canvas, SamplerConfig(policy="med", med_lambda=1.5, temperature=0.8), seeds=[0, 1, 2])
    results = []
    for read_hidden in (None, False):
        adapter = _adapter(read_hidden=read_hidden)
        lp, ent = trajectory_logps(adapter.logits, out.sequences, out.attention_mask, out.gen_start,
                                   out.decode_step, out.nfe, MASK, buckets=3, temperature=0.8)
        lp.sum().backward()  # (the entropy has no finite gradient at the -inf mask logit)
        results.append((lp.detach(), [p.grad.clone() for p in adapter.model.parameters()]))
    (lp_h, grads_h), (lp_w, grads_w) = results
    assert torch.allclose(lp_h, lp_w, atol=1e-5) and (lp_h[out.generated] < 0).all()
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(grads_h, grads_w))
