"""Degenerate and bad inputs (issue 7): the trainers never produce a NaN loss or crash; each case is counted in a
metric (per step, as logged with logging_steps=1) and warned about once. Tiny random model, a few steps each."""

import json
import logging
import math

import pytest
import torch
from datasets import Dataset
from doubles import EOS, one_thread, text_hash, tiny_model, tiny_tokenizer  # noqa: F401 (one_thread: autouse fixture)

from rl.config import DiffusionGRPOConfig, DiffusionRLOOConfig
from rl.tasks import TaskConfig, load_task
from rl.trainer import DiffusionGRPOTrainer, DiffusionRLOOTrainer

WORDS = "one two three four plus is The answer".split()
PROMPTS = [f"{a} plus {b} is" for a in ("one", "two") for b in ("one", "two")]



def constant(completions, **kwargs):
    return [1.0] * len(completions)


def nothing(completions, **kwargs):
    return [None] * len(completions)


def build(tmp_path, rewards, rows=None, cls=DiffusionGRPOTrainer, hook=None, rows_skipped=0, **overrides):
    """A trainer on a tiny random model: one prompt x 4 completions per step, max_steps 2 unless overridden."""
    tok = tiny_tokenizer(WORDS)
    model = tiny_model(len(tok), layers=2, hidden=32)
    if hook is not None:
        def forward_hook(module, args, kwargs, out):
            out.logits = hook(kwargs["input_ids"], out.logits, tok)
            return out

        model.register_forward_hook(forward_hook, with_kwargs=True)
    rows = rows or [{"prompt": p, "answer": "two"} for p in PROMPTS] * 4
    config_cls = DiffusionGRPOConfig if cls is DiffusionGRPOTrainer else DiffusionRLOOConfig
    kwargs = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, per_device_train_batch_size=4,
                  num_generations=4, max_steps=2, logging_steps=1, reasoning_length=4, answer_length=2,
                  delimiter="The answer is", learning_rate=1e-2, report_to=[], temperature=1.0, save_strategy="no",
                  beta=0.0, seed=3, disable_tqdm=True)
    kwargs.update(overrides)
    return cls(model=model, reward_funcs=rewards, args=config_cls(**kwargs), train_dataset=Dataset.from_list(rows),
               processing_class=tok, rows_skipped=rows_skipped)


def train(trainer) -> list[dict]:
    """Train; check every logged loss and every parameter is finite; return the per-step logs."""
    trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert len(steps) == trainer.args.max_steps
    assert all(math.isfinite(h["loss"]) for h in steps), [h["loss"] for h in steps]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    return steps


def rollouts(tmp_path, step: int) -> list[dict]:
    return [json.loads(x) for x in (tmp_path / "rollouts" / f"step{step:06d}_rank0.jsonl").open()]


def warnings_with(caplog, text: str) -> int:
    return sum(text in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_identical_rewards_give_zero_loss_and_one_warning(tmp_path, caplog):
    steps = train(build(tmp_path, [constant]))
    assert all(h["frac_reward_zero_std"] == 1 and h["loss"] == 0 and h["reward/none_rows"] == 0 for h in steps)
    assert warnings_with(caplog, "every group had identical rewards") == 1


@pytest.mark.parametrize("cls", [DiffusionGRPOTrainer, DiffusionRLOOTrainer])
def test_all_none_rewards_are_counted_and_give_no_outcome_signal(tmp_path, caplog, cls):
    overrides = {"dense_coef": 0.5} if cls is DiffusionRLOOTrainer else {}  # RLOO: its per-token loss too
    trainer = build(tmp_path, [nothing], cls=cls, **overrides)
    steps = train(trainer)
    assert all(h["reward/none_rows"] == 4 and h["reward/all_none_groups"] == 1 for h in steps)
    if cls is DiffusionGRPOTrainer:
        assert all(h["loss"] == 0 for h in steps)  # advantage 0 everywhere: no outcome term, no dense term
    assert all(h["reward/outcome"] is None for h in steps)  # NaN, logged as None: no reward is not a reward of 0
    assert all(r["rewards"] == [None] for s in range(2) for r in rollouts(tmp_path, s))
    assert warnings_with(caplog, "got no reward") == 1
    assert warnings_with(caplog, "All reward functions returned None") <= 1  # TRL's own, once per process


def test_unparsable_gold_answers_leave_their_rows_unscored(tmp_path):
    def gold_words_only(completions, answer, **kwargs):  # a verifier that cannot read the gold "2/0"
        return [None if a not in WORDS else float(c.endswith(a)) for c, a in zip(completions, answer)]

    rows = [{"prompt": p, "answer": "2/0" if i % 2 else "two"} for i, p in enumerate(PROMPTS)]
    steps = train(build(tmp_path, [gold_words_only], rows=rows, max_steps=4))
    for s, h in enumerate(steps):
        records = rollouts(tmp_path, s)
        unparsable = records[0]["gold"] == "2/0"
        assert all((r["rewards"] == [None]) == unparsable for r in records)
        assert (h["reward/none_rows"], h["reward/all_none_groups"]) == ((4, 1) if unparsable else (0, 0))
    assert sum(h["reward/all_none_groups"] for h in steps) == 2


def _eos_everywhere(input_ids, logits, tok):
    return logits + 100.0 * torch.nn.functional.one_hot(torch.tensor(EOS), logits.shape[-1])


def test_empty_completions_when_the_model_says_eos_everywhere(tmp_path, caplog):
    steps = train(build(tmp_path, [text_hash], hook=_eos_everywhere))
    assert all(h["rollout/empty_answers"] == 4 and h["rollout/empty_reasoning"] == 4 for h in steps)
    assert all(r["answer_text"] == "" and r["reasoning"] == "" for s in range(2) for r in rollouts(tmp_path, s))
    assert warnings_with(caplog, "empty answer block") == 1 and warnings_with(caplog, "empty reasoning") == 1


def test_every_row_exiting_at_step_zero_trains_only_the_answer_block(tmp_path, caplog):
    trainer = build(tmp_path, [text_hash], exit_gamma=1e6)
    batch = trainer._generate_and_score_completions([{"prompt": PROMPTS[0], "answer": "two"}] * 4)
    assert (trainer.generation.rollout.exit_step == 0).all() and (trainer.generation.rollout.nfe == 1).all()
    assert not batch["tool_mask"][:, :4].any() and batch["tool_mask"][:, -2:].all()  # reasoning [0, 4), answer last 2
    before = [p.detach().clone() for p in trainer.model.parameters()]
    steps = train(trainer)
    assert all(h["rollout/exit_at_step0"] == 4 and h["rollout/exit_rate"] == 1 for h in steps)
    assert all(h["rollout/empty_reasoning"] == 4 for h in steps)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert warnings_with(caplog, "exited at step 0") == 1


def test_gold_answers_longer_than_the_answer_block_are_counted_with_an_example(tmp_path, caplog):
    rows = [{"prompt": p, "answer": "one two three" if i % 2 else "two"} for i, p in enumerate(PROMPTS)]
    steps = train(build(tmp_path, [text_hash], rows=rows, max_steps=4))
    for s, h in enumerate(steps):
        long = rollouts(tmp_path, s)[0]["gold"] == "one two three"
        assert h["data/answers_truncated"] == (4 if long else 0)
    assert sum(h["data/answers_truncated"] for h in steps) == 8
    assert warnings_with(caplog, "longer than the answer block (answer_length=2), e.g. 'one two three'") == 1
    assert not [r for r in caplog.records if r.name == "rollout.template"]  # no per-step warning of its own


def _nan_after_four(input_ids, logits, tok):
    """NaN logits for every row whose input holds the token 'four' (so it turns bad once it decodes one)."""
    bad = (input_ids == tok.convert_tokens_to_ids("four")).any(-1)  # [B]
    return torch.where(bad[:, None, None], torch.full_like(logits, float("nan")), logits)


def test_nonfinite_logits_rows_are_replaced_counted_and_left_out(tmp_path, caplog):
    trainer = build(tmp_path, [text_hash], hook=_nan_after_four, max_steps=3, seed=1)
    batch = trainer._generate_and_score_completions([{"prompt": PROMPTS[0], "answer": "two"}] * 4)
    out, four = trainer.generation.rollout, trainer.processing_class.convert_tokens_to_ids("four")
    # A row met NaN logits iff it decoded 'four' at a step before its last forward.
    expected = ((out.generation == four) & (out.decode_step >= 0) & (out.decode_step < out.nfe[:, None] - 1)).any(-1)
    assert torch.equal(trainer.generation.nonfinite, expected) and 0 < int(expected.sum()) < 4
    assert not batch["tool_mask"][expected].any() and batch["tool_mask"][~expected].any()
    assert torch.isfinite(out.token_logprob).all() and torch.isfinite(out.phi[~torch.isnan(out.phi)]).all()
    assert torch.isnan(trainer.generation.rewards[expected]).all()  # not scored
    steps = train(trainer)
    counts = [h["rollout/nonfinite_logits_rows"] for h in steps]
    assert any(counts) and all(h["reward/none_rows"] == c for h, c in zip(steps, counts))
    assert warnings_with(caplog, "met non-finite (NaN/inf) logits") == 1


def test_dataset_rows_missing_fields_or_unparsable_are_skipped_and_counted(tmp_path, caplog):
    lines = [
        {"question": "Ann has 2 apples and gets 1 more. How many?", "answer": "2 + 1 = 3\n#### 3"},
        {"answer": "#### 4"},  # missing question
        {"question": ["not", "text"], "answer": "#### 4"},  # question of the wrong type
        {"question": "How many?", "answer": 4},  # answer of the wrong type (no '####' line)
        {"question": "How many?", "answer": "no final line"},
        {"question": "How many?", "answer": "#### four"},  # unparsable gold
        {"question": "Bob has 5 pens and loses 2. How many?", "answer": "5 - 2 = 3\n#### 3"},
    ]
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("\n".join([json.dumps(x) for x in lines] + ["{not json"]) + "\n")
    data = load_task(TaskConfig(task="gsm8k", dataset_path=str(path)), split="train")
    assert [r["answer"] for r in data.dataset] == ["3", "3"]
    assert dict(data.bad_rows.counts) == {"missing question": 2, "missing '####' answer line": 2,
                                          "non-numeric answer": 1, "not a JSON object": 1}

    # Rows that reach the trainer without a gold answer are not scored and get no phi; the loader's count is logged.
    rows = [{"prompt": p, "answer": a} for p, a in zip(PROMPTS, ["two", None, "", "two"])]
    steps = train(build(tmp_path / "run", [text_hash], rows=rows, max_steps=4, rows_skipped=data.bad_rows.total,
                        dense_coef=0.5))
    assert [h.get("data/rows_skipped") for h in steps] == [6, None, None, None]
    for s, h in enumerate(steps):
        records = rollouts(tmp_path / "run", s)
        missing = records[0]["gold"] is None
        assert h["data/missing_answers"] == h["reward/none_rows"] == (4 if missing else 0)
        assert all((r["rewards"] == [None]) == missing for r in records)
        assert all((r["phi"] is None or all(v is None for v in r["phi"])) == missing for r in records)
    assert sum(h["data/missing_answers"] for h in steps) == 8
    assert warnings_with(caplog, "have no gold answer") == 1
