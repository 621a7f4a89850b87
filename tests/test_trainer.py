"""Diffusion GRPO/RLOO trainers on a tiny random model: they train, log, respect the loss mask and LoRA."""

import json

import pytest
import torch
from datasets import Dataset
from doubles import tiny_model, tiny_tokenizer

from rewards.intrinsic import phi_token_credit
from rl.advantages import standardise_credit
from rl.config import DiffusionGRPOConfig, DiffusionRLOOConfig
from rl.trainer import DiffusionGRPOTrainer, DiffusionRLOOTrainer
from rollout import decode_block

WORDS = "one two three four plus is The answer".split()


def answer_match(completions, answer_texts, answer, **kwargs):
    """Exact answer plus a small partial credit for mentioning it, so a random model sees reward variance."""
    return [float(t.strip() == a) + 0.1 * c.split().count(a) for c, t, a in zip(completions, answer_texts, answer)]


def setup(tmp_path, config_cls=DiffusionGRPOConfig, **overrides):
    tok = tiny_tokenizer(WORDS)
    model = tiny_model(len(tok), layers=2, hidden=32)
    rows = [{"prompt": f"{a} plus {b} is", "answer": "two"} for a in ("one", "two") for b in ("one", "two")]
    kwargs = dict(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, per_device_train_batch_size=4, num_generations=4,
        max_steps=2, logging_steps=1, reasoning_length=4, answer_length=2, delimiter="The answer is",
        learning_rate=1e-2, report_to=[], temperature=1.0, save_strategy="no", beta=0.0, seed=3,
    )
    kwargs.update(overrides)
    return tok, model, Dataset.from_list(rows * 4), config_cls(**kwargs)


@pytest.mark.parametrize("estimator", ["trajectory", "mean_field", "coupled"])
def test_grpo_trains_logs_metrics_and_rollouts(tmp_path, estimator):
    tok, model, ds, args = setup(tmp_path, logprob_estimator=estimator, exit_gamma=2.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = DiffusionGRPOTrainer(model=model, reward_funcs=[answer_match], args=args, train_dataset=ds,
                                   processing_class=tok)
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    logs = trainer.state.log_history[0]
    for key in ("rollout/nfe", "rollout/exit_rate", "rollout/tokens_per_nfe", "reward/phi_T", "reward",
                "reward/outcome"):
        assert key in logs, key
    assert logs["reward/outcome"] == pytest.approx(logs["reward"], abs=1e-6)  # one reward function, weight 1
    rows = [json.loads(x) for x in (tmp_path / "rollouts" / "step000000_rank0.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {"decode_step", "phi", "answer_text", "rewards", "nfe"} <= set(rows[0])


def test_loss_mask_is_the_decoded_positions_and_ratio_is_one_on_policy(tmp_path):
    tok, model, ds, args = setup(tmp_path, exit_gamma=2.5, dense_coef=0.5)
    trainer = DiffusionGRPOTrainer(model=model, reward_funcs=[answer_match], args=args, train_dataset=ds,
                                   processing_class=tok)
    batch = trainer._generate_and_score_completions([dict(x) for x in ds.select(range(4)) for _ in range(4)])
    out = trainer.generation.rollout
    assert torch.equal(batch["tool_mask"].bool(), out.generated)
    assert not batch["tool_mask"][:, 4:7].any()  # the delimiter is template, never in the loss
    # Dense advantages: outcome advantage + dense_coef * the phi credit standardised per group of 4, per token.
    credit = phi_token_credit(out.decode_step, out.phi, mode="return_to_go").float()
    assert batch["advantages"].shape == out.decode_step.shape
    outcome = batch["advantages"] - 0.5 * standardise_credit(credit, out.generated, 4, clip=args.dense_clip)
    assert torch.allclose(outcome, outcome[:, :1].expand_as(outcome), atol=1e-6)
    # Old (rollout time) and current log-probs agree exactly before an update.
    trainer._trace = {k: batch[k] for k in ("decode_step", "nfe", "mask_seed")}
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    am = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    with torch.no_grad():
        a, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, am, batch["completion_ids"].shape[1])
        b, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, am, batch["completion_ids"].shape[1])
    assert torch.equal(a, b)
    # The trajectory estimator with S >= NFE replays the sampler exactly.
    assert torch.allclose(a[out.generated], out.token_logprob[out.generated], atol=1e-5)


def test_dense_coef_zero_keeps_trl_outcome_advantages(tmp_path):
    tok, model, ds, args = setup(tmp_path)
    trainer = DiffusionGRPOTrainer(model=model, reward_funcs=[answer_match], args=args, train_dataset=ds,
                                   processing_class=tok)
    batch = trainer._generate_and_score_completions([dict(x) for x in ds.select(range(4)) for _ in range(4)])
    assert batch["advantages"].dim() == 1


def test_rloo_with_lora_moves_only_adapter_weights(tmp_path):
    from peft import LoraConfig

    tok, model, ds, args = setup(tmp_path, config_cls=DiffusionRLOOConfig, dense_coef=0.5)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    trainer = DiffusionRLOOTrainer(model=model, reward_funcs=[answer_match], args=args, train_dataset=ds,
                                   processing_class=tok, peft_config=peft)
    trainer.train()
    named = dict(trainer.model.named_parameters())
    lora = {n: p for n, p in named.items() if "lora_" in n}
    assert lora and any(p.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)
    for n, p in named.items():
        if "lora_" not in n:
            key = n.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p, base[key]), n


def test_bad_diffusion_settings_are_rejected(tmp_path):
    for bad in ({"logprob_estimator": "exact"}, {"dense_credit": "x"}, {"dense_coef": -1.0},
                {"block_length": 3}, {"trajectory_buckets": 0}, {"policy": "nope"}, {"exit_gamma": -1.0},
                {"layout": "plain", "loss_on_answer": False}, {"answer_temperature": 0.0}):
        with pytest.raises(ValueError):
            setup(tmp_path, **bad)


def test_heldout_eval_callback_logs_accuracy_and_nfe_before_during_and_after(tmp_path):
    tok = tiny_tokenizer(WORDS + ["1", "2", "3"])
    model = tiny_model(len(tok), layers=2, hidden=32)
    rows = [{"prompt": f"{a} plus {b} is", "answer": str(int(a) + int(b))} for a in "12" for b in "12"]
    args = DiffusionGRPOConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, per_device_train_batch_size=4, num_generations=4,
        max_steps=2, logging_steps=1, reasoning_length=4, answer_length=2, delimiter="The answer is",
        learning_rate=1e-2, report_to=[], save_strategy="no", beta=0.0, seed=3, heldout_eval_steps=1,
        heldout_size=3, heldout_policy="left_to_right",
    )
    trainer = DiffusionGRPOTrainer(model=model, reward_funcs=[answer_match], args=args,
                                   train_dataset=Dataset.from_list(rows * 4), processing_class=tok,
                                   heldout_dataset=Dataset.from_list(rows))
    trainer.train()
    history = trainer.heldout.history
    assert [h["step"] for h in history] == [0, 1, 2] and all(h["n"] == 3 for h in history)
    for h in history:  # the logged accuracy is the fraction of correct samples written for that step
        records = [json.loads(x) for x in (tmp_path / "heldout" / f"step{h['step']:06d}_rank0.jsonl").open()]
        assert len(records) == 3 and {r["index"] for r in records} == {0, 1, 2}
        assert h["eval/accuracy"] == sum(r["correct"] for r in records) / 3
        assert h["eval/reasoning_accuracy"] == sum(r["reasoning_correct"] for r in records) / 3
        assert h["eval/answer_follows_reasoning"] == sum(r["answer_follows_reasoning"] for r in records) / 3
        assert h["eval/nfe"] == 4 + 2  # left to right: one NFE per reasoning and answer position
    logged = [x for x in trainer.state.log_history if "eval/accuracy" in x]
    assert len(logged) == 3 and all("eval/nfe" in x for x in logged)


def test_sampled_trajectory_steps_set_the_loss_mask_and_normaliser(tmp_path):
    tok, model, ds, args = setup(tmp_path, trajectory_sample_steps=True, trajectory_buckets=2)
    trainer = DiffusionGRPOTrainer(model=model, reward_funcs=[answer_match], args=args, train_dataset=ds,
                                   processing_class=tok)
    batch = trainer._generate_and_score_completions([dict(x) for x in ds.select(range(4)) for _ in range(4)])
    out, steps = trainer.generation.rollout, batch["score_steps"]
    chosen = out.generated & (out.decode_step[:, :, None] == steps[:, None, :]).any(-1)
    assert torch.equal(batch["tool_mask"].bool(), chosen) and (chosen != out.generated).any()
    # Each scored token stands for NFE_i / S_i tokens: the normaliser is the full replay's token count.
    assert int(batch["num_items_in_batch"]) == int(out.generated.sum())
    trainer._trace = {k: batch[k] for k in ("decode_step", "nfe", "mask_seed", "score_steps")}
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    am = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    with torch.no_grad():
        a, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, am, batch["completion_ids"].shape[1])
    weight = (out.nfe.float() / (steps >= 0).sum(-1).float())[:, None].expand_as(a)  # NFE_i / S_i
    assert torch.allclose(a[chosen], weight[chosen] * out.token_logprob[chosen], atol=1e-5)  # exact states
    assert (a[~chosen] == 0).all()
    trainer.train()
    assert trainer.state.global_step == 2


def test_loss_on_answer_false_keeps_the_answer_block_out_of_the_loss_but_not_the_reward(tmp_path):
    tok, model, ds, args = setup(tmp_path, loss_on_answer=False, trajectory_sample_steps=True, trajectory_buckets=3)
    def exact(completions, answer_texts, answer, **kwargs):
        return [float(t.strip() == a) for t, a in zip(answer_texts, answer)]

    trainer = DiffusionGRPOTrainer(model=model, reward_funcs=[exact], args=args, train_dataset=ds,
                                   processing_class=tok)
    inputs = [dict(x) for x in ds.select(range(4)) for _ in range(4)]
    batch = trainer._generate_and_score_completions(inputs)
    out, steps = trainer.generation.rollout, batch["score_steps"]
    assert out.generated[:, out.answer].all()  # the answer block was decoded ...
    assert not batch["tool_mask"][:, out.answer].any()  # ... but sits out of the loss
    reasoning = out.generated & (out.decode_step[:, :, None] == steps[:, None, :]).any(-1)
    reasoning[:, out.answer] = False
    assert torch.equal(batch["tool_mask"].bool(), reasoning) and reasoning.any()
    eligible = out.generated.clone()
    eligible[:, out.answer] = False
    assert int(batch["num_items_in_batch"]) == int(eligible.sum())  # the full replay's loss tokens
    texts = trainer.generation.answer_texts  # the reward still reads the decoded answer block
    expected = [float(t.strip() == x["answer"]) for t, x in zip(texts, inputs)]
    assert torch.allclose(trainer.generation.rewards[:, 0], torch.tensor(expected))


def test_rewards_see_the_decoded_reasoning_block(tmp_path):
    tok, model, ds, args = setup(tmp_path)
    seen = {}

    def record(completions, answer_texts, reasoning_texts, **kwargs):
        seen["reasoning"], seen["answers"] = list(reasoning_texts), list(answer_texts)
        return [0.0] * len(completions)

    trainer = DiffusionGRPOTrainer(model=model, reward_funcs=[record], args=args, train_dataset=ds,
                                   processing_class=tok)
    trainer._generate_and_score_completions([dict(x) for x in ds.select(range(4)) for _ in range(4)])
    out = trainer.generation.rollout
    assert seen["reasoning"] == trainer.generation.reasoning_texts and len(seen["reasoning"]) == 16
    assert seen["answers"] == trainer.generation.answer_texts
    decoded = [decode_block(tok, row, (tok.eos_token_id,), out.mask_id) for row in out.generation[:, out.reasoning]]
    assert seen["reasoning"] == decoded
    words = set(WORDS) | {"[MASK]"}
    assert all(set(t.split()) <= words for t in seen["reasoning"])  # decoded text of the reasoning columns only
    assert any(t.strip() for t in seen["reasoning"])


def test_skipping_zero_advantage_rows_leaves_loss_and_gradients_unchanged(tmp_path):
    def first_group_ties(completions, answer_texts, answer, **kwargs):  # group 0 (rows 0-3): identical rewards
        scores = answer_match(completions, answer_texts, answer)
        return [1.0 if i < 4 else r for i, r in enumerate(scores)]

    tok, model, ds, args = setup(tmp_path, loss_type="dapo", dense_coef=0.0)
    trainer = DiffusionGRPOTrainer(model=model, reward_funcs=[first_group_ties], args=args, train_dataset=ds,
                                   processing_class=tok)
    batch = trainer._generate_and_score_completions([dict(x) for x in ds.select(range(4)) for _ in range(4)])
    assert (batch["advantages"][:4] == 0).all() and (batch["advantages"][4:] != 0).any()
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    results = []
    for skip in (False, True):
        trainer.args.skip_zero_advantage_rows = skip
        model.zero_grad()
        loss = trainer._compute_loss(model, dict(batch))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (full, grads_full), (skipped, grads_skip) = results
    assert torch.allclose(full, skipped, atol=1e-7) and len(grads_full) == len(grads_skip)
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(grads_full, grads_skip))
    assert any(a.abs().sum() > 0 for a in grads_full)
    skipped_share = (batch["advantages"] == 0).float().mean().item()  # group 0, and any other tied group
    assert skipped_share >= 4 / 16
    assert trainer._metrics["train"]["loss/rows_skipped"][-1] == pytest.approx(skipped_share)
    trainer.args.beta = 0.1  # not exact any more (the KL term of a zero-advantage row is not 0): nothing skipped
    trainer.beta = 0.1
    assert not trainer._skip_is_exact()
