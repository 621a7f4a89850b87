"""Masked-diffusion SFT: the loss against hand-computed values, the canvas batches, LoRA vs full fine-tuning,
bad input, atomic saving, and (slow) a CI-sized end-to-end run whose held-out accuracy must rise."""

import math
import os

import pytest
import torch

from rl.models import ScratchModelConfig, build_scratch_model
from rl.recipe import parse
from rl.sft.config import DiffusionSFTConfig, LoraArguments
from rl.sft.data import SFTCollator, corrupt_conclusion, fit_to_canvas
from rl.sft.loss import mask_answer_only, mdlm_loss, sample_noise
from rl.tasks import TaskConfig, load_task
from rl.tokenizer import build_tokenizer
from rollout.template import TemplateConfig, build_canvas

TEMPLATE = TemplateConfig(reasoning_length=48, answer_length=3, delimiter="\nThe answer is ")


def test_mdlm_loss_matches_hand_computation():
    ln3, ln4 = math.log(3), math.log(4)
    logits = torch.tensor([
        [[0.0, 0.0], [ln3, 0.0], [5.0, -5.0]],  # row 0: p(0) = 1/2, 3/4, -
        [[9.0, 0.0], [0.0, 0.0], [0.0, ln4]],  # row 1: p(1) = -, -, 4/5
    ])  # [B=2, G=3, V=2]
    targets = torch.tensor([[0, 0, 1], [0, 1, 1]])
    masked = torch.tensor([[True, True, False], [False, False, True]])
    t = torch.tensor([0.5, 0.25])
    n_response = torch.tensor([3, 2])
    loss, stats = mdlm_loss(logits, targets, masked, t, n_response)
    # row 0: (ln 2 + ln 4/3) / 0.5 / 3;  row 1: ln 5/4 / 0.25 / 2;  loss = mean of the rows.
    row0 = (math.log(2) + math.log(4 / 3)) / 0.5 / 3
    row1 = math.log(5 / 4) / 0.25 / 2
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    assert loss.item() == pytest.approx(math.log(8 / 3) / 3 + math.log(5 / 4), rel=1e-6)
    assert stats["masked_ce"] == pytest.approx((math.log(2) + math.log(4 / 3) + math.log(5 / 4)) / 3, rel=1e-6)
    assert stats["mask_rate"] == pytest.approx(3 / 5)


def test_mdlm_loss_nothing_masked_keeps_gradient_path():
    logits = torch.randn(2, 3, 4, requires_grad=True)
    loss, stats = mdlm_loss(logits, torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.bool),
                            torch.tensor([0.1, 0.2]), torch.tensor([3, 3]))
    loss.backward()
    assert loss.item() == 0 and logits.grad is not None and math.isnan(stats["masked_ce"])


def test_sample_noise_masks_only_maskable_at_rate_t():
    maskable = torch.zeros(64, 200, dtype=torch.bool)
    maskable[:, 50:] = True
    masked, t = sample_noise(maskable, 1e-3, torch.Generator().manual_seed(0))
    assert not masked[:, :50].any()
    assert ((t >= 1e-3) & (t <= 1)).all()
    strata = ((t.sort().values - 1e-3) / (1 - 1e-3) * 64).floor()  # stratified: one t per 1/B of the range
    assert strata.tolist() == list(range(64))
    rate = masked[:, 50:].float().mean(-1)  # [B] per-row masking rate ~ t
    assert (rate - t).abs().max() < 0.15
    again, t2 = sample_noise(maskable, 1e-3, torch.Generator().manual_seed(0))
    assert torch.equal(again, masked) and torch.equal(t, t2)


def test_answer_only_rows_mask_exactly_the_answer_and_score_its_mean_cross_entropy():
    maskable = torch.tensor([[1, 1, 1, 0, 1, 1], [1, 1, 1, 0, 1, 1]], dtype=torch.bool)  # R=3, delimiter, A=2
    answer_block = torch.tensor([[0, 0, 0, 0, 1, 1]] * 2, dtype=torch.bool)
    drawn = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 1, 0, 0, 1, 0]], dtype=torch.bool)
    t = torch.tensor([0.5, 0.3])
    masked, t2 = mask_answer_only(drawn, t, torch.tensor([True, False]), answer_block, maskable)
    assert masked[0].tolist() == [False, False, False, False, True, True]  # reasoning visible, answer masked
    assert torch.equal(masked[1], drawn[1]) and t2[1] == t[1]  # other rows keep their noise
    assert t2[0].item() == pytest.approx(2 / 5)
    # The loss of the answer-only row is the mean CE over its 2 answer tokens: (ln 2 + ln 4) / 2.
    logits = torch.zeros(2, 6, 4)  # row 0, first answer token: p(target 0) = 1/4
    logits[0, 5] = torch.tensor([0.0, math.log(3), 0.0, 0.0])  # second answer token: p(0) = 1/6
    targets = torch.zeros(2, 6, dtype=torch.long)
    loss, _ = mdlm_loss(logits[:1], targets[:1], masked[:1], t2[:1], maskable[:1].sum(-1))
    assert loss.item() == pytest.approx((math.log(4) + math.log(6)) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="no answer block"):
        mask_answer_only(drawn, t, torch.tensor([True, False]), torch.zeros_like(answer_block), maskable)


def test_corrupt_conclusion_moves_the_last_number_and_the_answer_together():
    import random

    row = {"prompt": "p", "reasoning": "Start with 7. Add 5 to get 12. Subtract 3 to get 9.", "answer": "9"}
    seen = set()
    for seed in range(40):
        new = corrupt_conclusion(row, random.Random(seed), lambda r: True)
        assert new["reasoning"] == f"Start with 7. Add 5 to get 12. Subtract 3 to get {new['answer']}."
        seen.add(int(new["answer"]))
    assert seen == {6, 7, 8, 10, 11, 12}
    assert row["answer"] == "9"  # the input row is not modified
    low = dict(row, reasoning="Subtract 3 to get 1.", answer="1")
    answers = {corrupt_conclusion(low, random.Random(s), lambda r: True)["answer"] for s in range(40)}
    assert answers == {"0", "2", "3", "4"}  # never negative
    assert corrupt_conclusion(dict(row, answer="8"), random.Random(0), lambda r: True) is None  # not the conclusion
    assert corrupt_conclusion(row, random.Random(0), lambda r: r["answer"] == "11")["answer"] == "11"
    assert corrupt_conclusion(row, random.Random(0), lambda r: False) is None


@pytest.fixture(scope="module")
def tiny():
    """(tokenizer, train rows) for the generated task at an easy setting."""
    data = load_task(TaskConfig(train_size=64, min_ops=1, max_ops=2), split="train").dataset
    tok = build_tokenizer([*data["prompt"], *data["reasoning"], *data["answer"], TEMPLATE.delimiter])
    return tok, data


def test_collator_lays_gold_text_on_the_sampler_canvas(tiny):
    tok, data = tiny
    rows = [data[i] for i in range(4)]
    batch = SFTCollator(tok, TEMPLATE, tok.mask_token_id)(rows)
    canvas = build_canvas(tok, [r["prompt"] for r in rows], TEMPLATE, tok.mask_token_id)
    ids, maskable = batch["input_ids"], batch["maskable"]  # [B, L], [B, G]
    G = canvas.gen_length
    assert ids.shape == canvas.input_ids.shape and maskable.shape == (4, G)
    # Prompt, padding and template tokens are exactly the sampler's canvas; only the blocks differ.
    fixed = torch.ones_like(ids, dtype=torch.bool)
    fixed[:, -G:] = ~maskable
    assert torch.equal(ids[fixed], canvas.input_ids[fixed])
    assert torch.equal(batch["attention_mask"], canvas.attention_mask)
    assert maskable.sum(-1).tolist() == [48 + 3] * 4
    assert not (ids == tok.mask_token_id).any()
    gen = ids[:, -G:]
    for i, r in enumerate(rows):
        reasoning = tok.decode(gen[i, :48], skip_special_tokens=True)
        answer = tok.decode(gen[i, canvas.answer], skip_special_tokens=True)
        assert (reasoning, answer) == (r["reasoning"], r["answer"])
        n = len(tok(r["reasoning"], add_special_tokens=False)["input_ids"])
        assert (gen[i, n:48] == tok.eos_token_id).all()  # padded with EOS inside the block


def test_collator_answer_only_rows_and_corrupted_conclusions(tiny):
    tok, data = tiny
    rows = [data[i] for i in range(64)]
    plain = SFTCollator(tok, TEMPLATE, tok.mask_token_id)(rows)
    assert not plain["answer_only"].any() and plain["answer_block"].sum(-1).tolist() == [3] * 64
    batch = SFTCollator(tok, TEMPLATE, tok.mask_token_id, answer_only_rate=0.5, reasoning_corrupt_rate=0.5,
                        seed=1)(rows)
    only = batch["answer_only"]
    assert 16 <= int(only.sum()) <= 48
    changed = (batch["input_ids"] != plain["input_ids"]).any(-1)  # [B] rows whose text was corrupted
    assert changed.any() and not (changed & ~only).any()  # only answer-only rows are corrupted
    assert 0.2 < changed.sum() / only.sum() < 0.8
    G = batch["maskable"].shape[1]
    for i in changed.nonzero().flatten().tolist():
        gen = batch["input_ids"][i, -G:]
        reasoning = tok.decode(gen[:48], skip_special_tokens=True)
        answer = tok.decode(gen[batch["answer_block"][i]], skip_special_tokens=True)
        assert reasoning.rsplit(" ", 1)[-1] == f"{answer}." and answer != rows[i]["answer"]
        assert abs(int(answer) - int(rows[i]["answer"])) <= 3
    with pytest.raises(ValueError, match="infill"):
        SFTCollator(tok, TemplateConfig(layout="plain", reasoning_length=64), tok.mask_token_id, answer_only_rate=0.1)
    with pytest.raises(ValueError, match="answer_only_rate"):
        DiffusionSFTConfig(output_dir="x", answer_only_rate=1.5, use_cpu=True, report_to="none")


def test_fit_to_canvas_counts_or_rejects_long_reasoning(tiny):
    tok, data = tiny
    lengths = [len(tok(r, add_special_tokens=False)["input_ids"]) for r in data["reasoning"]]
    R = sorted(lengths)[len(lengths) // 2]
    template = TemplateConfig(reasoning_length=R, answer_length=3, delimiter=TEMPLATE.delimiter)
    kept, report = fit_to_canvas(data, tok, template, overflow="skip")
    n_long = sum(n > R for n in lengths)
    assert n_long > 0 and report["reasoning_too_long"] == n_long and len(kept) == len(data) - n_long
    with pytest.raises(ValueError, match=f"{n_long} row.*longer than R={R}"):
        fit_to_canvas(data, tok, template, overflow="error")
    with pytest.raises(ValueError, match="exceeds the model context"):
        fit_to_canvas(data, tok, TEMPLATE, max_length=60)


def _trainer(tmp_path, tok, data, model, **overrides):
    from rl.sft.trainer import DiffusionSFTTrainer

    settings = dict(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=8, learning_rate=1e-2,
                    report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=1)
    args = DiffusionSFTConfig(**{**settings, **overrides})
    return DiffusionSFTTrainer(model=model, args=args, template=TEMPLATE, processing_class=tok, train_dataset=data)


def _tiny_model(tok):
    return build_scratch_model(ScratchModelConfig(scratch_layers=1, scratch_hidden=32, scratch_heads=2,
                                                  scratch_kv_heads=1, scratch_max_length=256), tok)


def test_full_finetuning_moves_every_weight(tmp_path, tiny):
    tok, data = tiny
    model = _tiny_model(tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = _trainer(tmp_path, tok, data, model)
    trainer.train()
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) == len(before)
    assert any(k.startswith("sft/masked_ce") for log in trainer.state.log_history for k in log)


def test_reasoning_first_hides_the_answer_from_mdlm_rows_and_scores_it_only_from_the_full_reasoning(tmp_path, tiny):
    tok, data = tiny
    trainer = _trainer(tmp_path, tok, data, _tiny_model(tok), answer_only_rate=0.5, reasoning_first=True)
    batch = SFTCollator(tok, TEMPLATE, tok.mask_token_id, answer_only_rate=0.5, seed=2)([data[i] for i in range(32)])
    seen = {}
    real = trainer.mdlm.logits

    def spy(noisy, attention, keep_last):
        seen["noisy"] = noisy[:, -keep_last:].clone()
        seen["logits"] = real(noisy, attention, keep_last).detach().requires_grad_(True)
        return seen["logits"]

    trainer.mdlm.logits = spy
    loss = trainer.compute_loss(trainer.model, batch)
    hidden = seen["noisy"] == tok.mask_token_id  # [B, G]
    only, block = batch["answer_only"], batch["answer_block"]
    assert 0 < int(only.sum()) < 32
    assert hidden[block].all()  # every row's answer block is masked in the input
    assert not (hidden & ~block)[only].any()  # answer-only rows: the complete reasoning is visible
    assert (hidden & ~block)[~only].any()  # MDLM rows: the reasoning is noised
    loss.backward()
    grad = seen["logits"].grad.abs().sum(-1)  # [B, G] which positions the loss scores
    assert (grad[~only][:, block[0]] == 0).all()  # MDLM rows never score their (hidden) answer
    assert (grad[only][:, block[0]] > 0).all()  # answer-only rows score all of it
    with pytest.raises(ValueError, match="answer_only_rate"):
        DiffusionSFTConfig(output_dir="x", reasoning_first=True, use_cpu=True, report_to="none")


def test_lora_moves_only_the_adapter(tmp_path, tiny):
    from peft import get_peft_model

    tok, data = tiny
    lora = LoraArguments(use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                         lora_target_modules=["q_proj", "v_proj"])
    model = get_peft_model(_tiny_model(tok), lora.peft_config())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _trainer(tmp_path, tok, data, model).train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    adapter = {n for n in before if "lora_" in n}
    assert adapter and changed
    assert {n for n in adapter if "lora_B" in n} <= changed  # B starts at zero: it must have moved
    assert changed <= adapter  # base weights untouched


def test_tokenizer_without_mask_token_is_a_clear_error(tmp_path, tiny):
    from transformers import PreTrainedTokenizerFast

    tok, data = tiny
    no_mask = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, pad_token="<pad>", eos_token="<eos>")
    with pytest.raises(ValueError, match="no mask token"):
        _trainer(tmp_path, no_mask, data, _tiny_model(tok))


def test_final_model_is_written_atomically(tmp_path, tiny):
    from rl.checkpoint import save_final_model

    tok, data = tiny
    trainer = _trainer(tmp_path, tok, data, _tiny_model(tok), max_steps=1)
    final = tmp_path / "model"
    save_final_model(trainer, str(final), {"note.txt": "v1"})
    assert (final / "config.json").exists() and (final / "tokenizer.json").exists()
    assert (final / "note.txt").read_text() == "v1"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]

    def crash(*args, **kwargs):  # an interrupted save (killed, disk full) while writing the weights
        raise KeyboardInterrupt

    trainer.save_model = crash
    with pytest.raises(KeyboardInterrupt):
        save_final_model(trainer, str(final), {"note.txt": "v2"})
    assert (final / "note.txt").read_text() == "v1" and (final / "model.safetensors").exists()
    with pytest.raises(KeyboardInterrupt):
        save_final_model(trainer, str(tmp_path / "fresh"), {})
    assert not (tmp_path / "fresh").exists()


def test_lora_with_from_scratch_is_rejected(tmp_path):
    from rl.models import ModelConfig
    from rl.sft.run import run_sft

    with pytest.raises(ValueError, match="from_scratch"):
        run_sft(TaskConfig(), ModelConfig(), ScratchModelConfig(from_scratch=True), LoraArguments(use_peft=True),
                TEMPLATE, DiffusionSFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True))


@pytest.mark.slow
def test_ci_sized_sft_raises_held_out_accuracy(tmp_path):
    """recipes/tiny/sft_ci.yaml end to end through the entry scripts (about 2.5 min on 2 idle cores).

    Measured: 0.265 held-out left-to-right accuracy after 700 steps; the untrained model scores 0."""
    import importlib.util

    from rl.evaluate import EvalConfig, evaluate
    from rl.models import load_tokenizer
    from rollout import MDLMAdapter, SamplerConfig

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def script(name):
        spec = importlib.util.spec_from_file_location(name, os.path.join(root, "scripts", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    recipe = os.path.join(root, "recipes", "tiny", "sft_ci.yaml")
    final = script("sft").main([recipe, "--output_dir", str(tmp_path / "sft")])
    summary = script("evaluate").main([os.path.join(root, "recipes", "tiny", "eval_ci.yaml"), "--model_name_or_path",
                                       final, "--output_file", str(tmp_path / "trained.jsonl")])
    # The same architecture, untrained, on the same rows.
    task, scratch, template = parse([TaskConfig, ScratchModelConfig, TemplateConfig], [recipe], allow_unknown=True)
    tok = load_tokenizer(final)
    untrained = MDLMAdapter.from_pretrained(build_scratch_model(scratch, tok).eval(), tok)
    base = evaluate(untrained, tok, load_task(task, split="test").dataset, template,
                    SamplerConfig(policy="left_to_right"), EvalConfig(), str(tmp_path / "untrained.jsonl"),
                    progress=False)
    assert summary["n"] == base["n"] == 200
    assert base["accuracy"] < 0.05
    assert summary["accuracy"] >= 0.15 and summary["accuracy"] >= base["accuracy"] + 0.12, (summary, base)
