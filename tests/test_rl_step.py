"""One RL step, checked against what the docs promise: the loss mask in RLOO, an exact on-policy ratio with LoRA
dropout, refused TRL options, and every trainable parameter moving."""

import pytest
import torch
from doubles import tiny_model, tiny_tokenizer
from test_trainer import WORDS, answer_match, setup

from rl.config import REFUSED_TRL_OPTIONS, DiffusionGRPOConfig, DiffusionRLOOConfig
from rl.trainer import DiffusionGRPOTrainer, DiffusionRLOOTrainer


def _inputs(ds):
    return [dict(x) for x in ds.select(range(4)) for _ in range(4)]


def _grads(trainer, batch):
    model = trainer.model
    model.zero_grad()
    trainer.current_gradient_accumulation_steps = 1
    trainer._compute_loss(model, dict(batch)).backward()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def test_rloo_answer_out_of_the_loss_equals_answer_log_probs_detached(tmp_path):
    """loss_on_answer false must give the gradient of the loss whose answer log-probs pass no gradient."""
    def trainer_for(loss_on_answer):
        tok, model, ds, args = setup(tmp_path, config_cls=DiffusionRLOOConfig, loss_on_answer=loss_on_answer)
        trainer = DiffusionRLOOTrainer(model=model, reward_funcs=[answer_match], args=args, train_dataset=ds,
                                       processing_class=tok)
        trainer.model.train()
        return trainer, ds

    out_of_loss, ds = trainer_for(False)
    grads_out = _grads(out_of_loss, out_of_loss._generate_and_score_completions(_inputs(ds)))

    detached, _ = trainer_for(True)
    batch = detached._generate_and_score_completions(_inputs(ds))  # the same rollouts: same seeds, same weights
    assert torch.equal(batch["completion_ids"], out_of_loss.generation.rollout.generation)
    grads_in = _grads(detached, batch)
    answer = detached.generation.rollout.answer
    full = detached._get_per_token_logps_and_entropies

    def answer_detached(*args, **kwargs):
        logps, ents, aux = full(*args, **kwargs)
        keep = torch.ones_like(logps, dtype=torch.bool)
        keep[:, answer] = False
        return torch.where(keep, logps, logps.detach()), ents, aux

    detached._get_per_token_logps_and_entropies = answer_detached
    grads_detached = _grads(detached, batch)
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_in, grads_detached))  # the answer matters
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_out, grads_detached))
    assert any(g.abs().sum() > 0 for g in grads_out)


@pytest.mark.parametrize("config_cls,trainer_cls", [(DiffusionGRPOConfig, DiffusionGRPOTrainer),
                                                    (DiffusionRLOOConfig, DiffusionRLOOTrainer)])
def test_ratio_is_exactly_one_through_trls_old_log_probs_with_lora_dropout(tmp_path, config_cls, trainer_cls):
    from peft import LoraConfig

    tok, model, ds, args = setup(tmp_path, config_cls=config_cls, num_iterations=2)  # disable_dropout: the default
    peft = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj", "v_proj"])
    trainer = trainer_cls(model=model, reward_funcs=[answer_match], args=args, train_dataset=ds,
                          processing_class=tok, peft_config=peft)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained adapter: LoRA's B starts at 0, which would hide its dropout
        for n, p in trainer.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    trainer.model.train()  # as in training: TRL computes the old log-probs in train mode
    batch = trainer._generate_and_score_completions(_inputs(ds))
    trainer._trace = {k: batch[k] for k in ("decode_step", "nfe", "mask_seed", "loss_mask") if k in batch}
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    am = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    keep = batch["completion_ids"].shape[1]
    current, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, am, keep)
    if config_cls is DiffusionGRPOConfig:
        assert torch.equal(current.detach(), batch["old_per_token_logps"])
    else:  # RLOO keeps the per-sequence sum
        old = batch["old_logps"]
        assert torch.equal((current.detach() * batch["completion_mask"]).sum(1), old)
    assert (current != 0).any() and args.disable_dropout


@pytest.mark.parametrize("name,value", [(n, v) for n, v in [
    ("max_completion_length", 64), ("top_p", 0.9), ("top_k", 20), ("min_p", 0.1), ("repetition_penalty", 1.1),
    ("generation_kwargs", {"do_sample": True}), ("cache_implementation", "static"), ("use_transformers_paged", True),
    ("use_transformers_continuous_batching", True), ("use_vllm", True), ("off_policy_mask_threshold", 0.5),
    ("mask_truncated_completions", True), ("loss_type", "dr_grpo"), ("temperature", 0.0)]])
def test_trl_options_the_diffusion_trainer_cannot_honour_are_refused_with_the_alternative(tmp_path, name, value):
    for config_cls in (DiffusionGRPOConfig, DiffusionRLOOConfig):
        if name not in {f for f in config_cls.__dataclass_fields__}:
            continue  # a GRPO-only option
        with pytest.raises(ValueError, match=name) as err:
            setup(tmp_path, config_cls=config_cls, **{name: value})
        message = str(err.value)
        assert "instead" in message or "leave it unset" in message, message
    assert set(REFUSED_TRL_OPTIONS) <= set(DiffusionGRPOConfig.__dataclass_fields__)


def test_trl_defaults_are_accepted(tmp_path):
    for config_cls in (DiffusionGRPOConfig, DiffusionRLOOConfig):
        args = setup(tmp_path, config_cls=config_cls)[3]
        assert args.disable_dropout and args.max_completion_length == 512


@pytest.mark.parametrize("trainer_cls,config_cls,dense", [(DiffusionGRPOTrainer, DiffusionGRPOConfig, 0.0),
                                                          (DiffusionRLOOTrainer, DiffusionRLOOConfig, 0.5)])
def test_every_trainable_parameter_moves(tmp_path, trainer_cls, config_cls, dense):
    tok = tiny_tokenizer(WORDS)
    _, _, ds, args = setup(tmp_path, config_cls=config_cls, dense_coef=dense, max_steps=2)
    model = tiny_model(len(tok), layers=2, hidden=32)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = trainer_cls(model=model, reward_funcs=[answer_match], args=args, train_dataset=ds,
                          processing_class=tok)
    trainer.train()
    still = [n for n, p in trainer.model.named_parameters() if p.requires_grad and torch.equal(before[n], p)]
    assert not still, f"parameters that did not move: {still}"


def test_dense_term_is_the_standardised_credit_in_grpo_and_rloo_whatever_the_answer_length(tmp_path):
    from rewards.intrinsic import phi_token_credit
    from rl.advantages import standardise_credit

    terms = {}
    for name, config_cls, trainer_cls, answer_length in (
            ("grpo", DiffusionGRPOConfig, DiffusionGRPOTrainer, 2),
            ("rloo", DiffusionRLOOConfig, DiffusionRLOOTrainer, 2),
            ("grpo_long", DiffusionGRPOConfig, DiffusionGRPOTrainer, 5)):
        tok, model, ds, args = setup(tmp_path, config_cls=config_cls, dense_coef=0.3, dense_clip=100.0,
                                     answer_length=answer_length)
        trainer = trainer_cls(model=model, reward_funcs=[answer_match], args=args, train_dataset=ds,
                              processing_class=tok)
        batch = trainer._generate_and_score_completions(_inputs(ds))
        out, mask = trainer.generation.rollout, batch["loss_mask"]
        dense = 0.3 * standardise_credit(phi_token_credit(out.decode_step, out.phi).float(), mask, 4, clip=100.0)
        outcome = batch["advantages"] - dense  # what remains is TRL's per-sequence outcome advantage
        assert torch.allclose(outcome, outcome[:, :1].expand_as(outcome), atol=1e-5)
        for d, m in zip(dense.view(4, 4, -1), mask.view(4, 4, -1)):  # 0.3 x unit std per group, any answer length
            assert d[m].std(unbiased=False) == pytest.approx(0.3, rel=1e-4) or (d == 0).all()
            assert (d[~m] == 0).all()
        assert dense.abs().sum() > 0
        terms[name] = batch["completion_ids"], dense
    assert torch.equal(terms["grpo"][0], terms["rloo"][0])  # the same rollouts ...
    assert torch.allclose(terms["grpo"][1], terms["rloo"][1], atol=1e-6)  # ... the same dense term


def test_no_gold_answers_warn_once_and_train_outcome_only(tmp_path, caplog):
    from datasets import Dataset
    from doubles import text_hash

    tok, model, _, args = setup(tmp_path, dense_coef=0.5)
    ds = Dataset.from_list([{"prompt": f"{a} plus {b} is"} for a in ("one", "two") for b in ("one", "two")] * 4)
    trainer = DiffusionGRPOTrainer(model=model, reward_funcs=[text_hash], args=args, train_dataset=ds,
                                   processing_class=tok)
    with caplog.at_level("WARNING", logger="rl.trainer"):
        for _ in range(2):
            batch = trainer._generate_and_score_completions(_inputs(ds))
            assert batch["advantages"].dim() == 1  # outcome only
    assert sum("has a gold answer" in r.getMessage() for r in caplog.records) == 1


def guess_starts_with_the(completions, answer, answer_texts, **kwargs):
    """A verifier whose verdicts vary on the untrained model below: does the answer block start with 'The'?"""
    return [float(text.split()[:1] == ["The"]) for text in answer_texts]


def test_stepwise_verifier_credit_adds_no_forward_and_credits_the_steps_that_change_the_answer(tmp_path):
    from rewards.intrinsic import phi_token_credit
    from rl.advantages import standardise_credit

    forwards, batches, trainers = {}, {}, {}
    for name, extra in (("outcome", {"dense_coef": 0.0}),
                        ("verifier", {"dense_coef": 0.5, "dense_credit": "verifier_step", "dense_clip": 100.0,
                                      "step_verifier": "test_rl_step:guess_starts_with_the"})):
        tok, model, ds, args = setup(tmp_path, **extra)
        with torch.no_grad():
            model.lm_head.weight.mul_(4.0)  # sharper logits: the greedy guesses change along the rollouts
        trainer = DiffusionGRPOTrainer(model=model, reward_funcs=[answer_match], args=args, train_dataset=ds,
                                       processing_class=tok)
        calls = []
        hook = model.register_forward_hook(lambda *_, seen=calls: seen.append(1))  # every forward, whoever calls
        batches[name] = trainer._generate_and_score_completions(_inputs(ds))
        hook.remove()
        forwards[name], trainers[name] = len(calls), trainer
    assert forwards["verifier"] == forwards["outcome"] > 0  # the guesses come from the sampler's own forwards
    assert torch.equal(batches["verifier"]["completion_ids"], batches["outcome"]["completion_ids"])
    gen = trainers["verifier"].generation
    out = gen.rollout
    # v(t) by hand: the greedy guess at each step's input, decoded and judged by guess_starts_with_the
    tok = trainers["verifier"].processing_class
    B, S, _ = out.answer_guess.shape
    v = torch.full((B, S), float("nan"), dtype=torch.float64)
    for b in range(B):
        for t in range(S):
            if out.answer_guess[b, t, 0] >= 0:
                text = tok.decode([i for i in out.answer_guess[b, t].tolist() if i != tok.eos_token_id],
                                  skip_special_tokens=True)
                v[b, t] = float(text.split()[:1] == ["The"])
    credit = phi_token_credit(out.decode_step, v, "immediate").float()
    dense = 0.5 * standardise_credit(credit, batches["verifier"]["loss_mask"].bool(), 4, clip=100.0)
    outcome = batches["outcome"]["advantages"][:, None]
    assert torch.allclose(batches["verifier"]["advantages"], outcome + dense, atol=1e-5)
    assert (v == 1).any() and (v == 0).any() and dense.abs().sum() > 0  # some steps changed the answer's verdict


def test_unknown_dense_credit_and_verifier_without_answer_block_are_refused(tmp_path):
    with pytest.raises(ValueError, match="return_to_go, immediate, verifier_step"):
        setup(tmp_path, dense_credit="verifier")
    with pytest.raises(ValueError, match="needs layout infill"):
        setup(tmp_path, dense_credit="verifier_step", layout="plain")
