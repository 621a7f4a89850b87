"""Posterior traces: the answer block stays the gold answer, the phi-score against separate forwards and the sampler's
own phi, AUC and filtering against hand-computed values, the SFT data path, the recipes and the script."""

import itertools
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch
from doubles import MASK, OracleModel, oracle_canvas, save_scratch_policy

from rl.models import ScratchModelConfig, build_scratch_model
from rl.posterior import (
    PosteriorConfig,
    canonical_trace,
    check_sampler,
    generate_traces,
    grouped_auc,
    numbers_match,
    phi_trajectory,
    reasoning_matches,
    roc_auc,
    sample_posterior,
    select_by_score,
    summarize,
    write_outputs,
)
from rl.recipe import load_recipe, parse
from rl.sft.data import SFTCollator, fit_to_canvas
from rl.tasks import TaskConfig, load_task
from rl.tokenizer import build_tokenizer
from rollout import MDLMAdapter, SamplerConfig, TemplateConfig, build_canvas, sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = TaskConfig(train_size=6, min_ops=1, max_ops=2, max_operand=5, max_multiplier=3, max_result=20)
TEMPLATE = TemplateConfig(reasoning_length=16, answer_length=3)


@pytest.fixture(scope="module")
def setup():
    """A random 1-layer bidirectional Gemma3 with a word-level tokenizer over a few arithmetic problems."""
    data = load_task(TASK, split="train").dataset
    tok = build_tokenizer([*data["prompt"], *data["reasoning"], *data["answer"], TEMPLATE.delimiter])
    model = build_scratch_model(ScratchModelConfig(scratch_layers=1, scratch_hidden=32, scratch_heads=2,
                                                   scratch_kv_heads=1, scratch_max_length=128), tok, seed=0).eval()
    return MDLMAdapter.from_pretrained(model, tok), tok, data


def _canvas(setup, rows=None):
    adapter, tok, data = setup
    rows = rows if rows is not None else list(range(len(data)))
    return build_canvas(tok, [data[i]["prompt"] for i in rows], TEMPLATE, adapter.mask_id,
                        answers=[data[i]["answer"] for i in rows], max_length=adapter.max_length)


@pytest.mark.parametrize("policy", ["left_to_right", "med", "entropy"])
def test_answer_block_is_the_gold_answer_and_never_changes(setup, policy):
    adapter, tok, data = setup
    canvas = _canvas(setup)
    out = sample_posterior(adapter, canvas, SamplerConfig(policy=policy, k=2, block_length=8, temperature=1.0),
                           seeds=list(range(len(data))))
    answer = out.generation[:, out.answer]  # [B, A]
    assert torch.equal(answer, canvas.gold)
    assert answer[:, 0].tolist() == [tok(a, add_special_tokens=False)["input_ids"][0] for a in data["answer"]]
    assert (out.decode_step[:, out.answer] == -1).all()  # the sampler never selected an answer position
    assert (out.decode_step[:, out.reasoning] >= 0).all() and (out.generation != MASK).all()
    assert not torch.equal(canvas.input_ids[:, canvas.gen_start :][:, canvas.answer], canvas.gold)  # input untouched


def test_posterior_traces_are_consistent_with_the_gold_answer():
    """Exact oracle: the answer is a function of reasoning slots 0 and 2; given a* every sampled trace must agree."""
    content = [4, 5, 6]
    joint = {}
    for seq in itertools.product(content, repeat=4):
        if seq[3] == content[(content.index(seq[0]) + content.index(seq[2])) % 3]:
            joint[seq] = 1.0 + content.index(seq[1])
    canvas, slots = oracle_canvas(300, 3, gold=[[5]] * 300)
    adapter = MDLMAdapter(OracleModel(joint, 10, canvas.gen_length, slots), mask_id=MASK, pad_id=0, eos_ids=(1,))
    out = sample_posterior(adapter, canvas, SamplerConfig(policy="entropy", temperature=1.0), seeds=list(range(300)))
    traces = out.generation[:, :3].tolist()
    assert all(content[(content.index(r[0]) + content.index(r[2])) % 3] == 5 for r in traces)
    assert len({tuple(r) for r in traces}) == 9  # every trace consistent with a* = 5 shows up: 3 (s0, s2) x 3 s1


SHORT = TemplateConfig(reasoning_length=6, answer_length=3)


def _hand_phi(adapter, tok, prompt, answer, trace, t):
    """phi after revealing trace[:t] in a canvas of one row (no padding), from a separate raw forward."""
    c = build_canvas(tok, [prompt], SHORT, adapter.mask_id, answers=[answer])
    ids = c.input_ids.clone()
    ids[0, c.gen_start : c.gen_start + t] = trace[:t]
    logits = adapter.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.double()  # [1, L, V]
    logits[..., adapter.mask_id] = -math.inf
    cols = [c.gen_start + c.answer.start + j for j in range(SHORT.answer_length)]
    logp = torch.log_softmax(logits[0, cols], -1)  # [A, V]
    n = len(tok(answer, add_special_tokens=False)["input_ids"])  # the answer's tokens + the one ending it
    return sum(logp[j, c.gold[0, j]].item() for j in range(min(n + 1, SHORT.answer_length)))


def test_score_is_the_mean_of_phi_over_reveal_steps_from_separate_forwards(setup):
    adapter, tok, data = setup
    lengths = [len(tok(p)["input_ids"]) for p in data["prompt"]]
    rows = [lengths.index(min(lengths)), lengths.index(max(lengths))]  # different prompt lengths: left padding
    canvas = build_canvas(tok, [data[i]["prompt"] for i in rows], SHORT, adapter.mask_id,
                          answers=[data[i]["answer"] for i in rows])
    assert (canvas.attention_mask == 0).any()
    g = torch.Generator().manual_seed(0)
    trace = torch.randint(5, len(tok), (len(rows), SHORT.reasoning_length), generator=g)
    phi = phi_trajectory(adapter, canvas, trace)  # [2, R]
    for i, row in enumerate(rows):
        hand = [_hand_phi(adapter, tok, data[row]["prompt"], data[row]["answer"], trace[i], t)
                for t in range(1, SHORT.reasoning_length + 1)]
        assert phi[i].tolist() == pytest.approx(hand, abs=1e-4)
        assert phi[i].mean().item() == pytest.approx(sum(hand) / len(hand), abs=1e-4)
    assert phi.std() > 0.01  # the reveals move phi: the check is not of a constant


def test_score_matches_the_samplers_own_phi_on_its_left_to_right_path(setup):
    """The sampler records phi(t) while decoding left to right with the answer masked; replaying its trace must
    give the same numbers at t = 1..R."""
    adapter, _, _ = setup
    canvas = _canvas(setup)
    out = sample(adapter, canvas, SamplerConfig(policy="left_to_right", temperature=1.0), seeds=list(range(6)))
    R = TEMPLATE.reasoning_length
    phi = phi_trajectory(adapter, canvas, out.generation[:, out.reasoning])
    assert torch.allclose(phi, out.phi[:, 1 : R + 1], atol=1e-5)


def test_roc_auc_against_hand_computed_values_with_ties():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # positives {1, 2}, negatives {1, 0}: pairs (1,1) tie = 1/2, (1,0), (2,1), (2,0) = 1 each -> 3.5 / 4
    assert roc_auc([1.0, 1.0, 2.0, 0.0], [True, False, True, False]) == pytest.approx(0.875)
    assert roc_auc([3.0, 3.0, 3.0], [1, 0, 1]) == pytest.approx(0.5)
    assert roc_auc([-1.0, -2.0], [0, 1]) == 0.0 and roc_auc([-1.0, -2.0], [1, 0]) == 1.0
    assert roc_auc([1.0, 2.0], [1, 1]) is None and roc_auc([], []) is None
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([float("nan"), 1.0], [0, 1])
    # pooled vs within-question: group a ranks right (1 pair), group b wrong (2 pairs), group c has no pairs.
    scores, labels, groups = [1, 2, 3, 0, 0, 5], [0, 1, 0, 1, 1, 1], ["a", "a", "b", "b", "b", "c"]
    assert grouped_auc(scores, labels, groups) == pytest.approx(1 / 3)
    # pooled: positives {2, 0, 0, 5}, negatives {1, 3} -> 2>1, 5>1, 5>3 = 3 of 8
    assert roc_auc(scores, labels) == pytest.approx(3 / 8)
    rng = random.Random(0)
    s = [rng.choice([0.0, 0.5, 1.0]) for _ in range(40)]
    y = [rng.random() < 0.4 for _ in range(40)]
    brute = [1.0 if a > b else 0.5 if a == b else 0.0 for a, ya in zip(s, y) if ya for b, yb in zip(s, y) if not yb]
    assert roc_auc(s, y) == pytest.approx(sum(brute) / len(brute))


def test_filter_keeps_exactly_the_rows_at_or_above_the_threshold():
    scores = [-3.0, -1.0, -2.0, -1.0, -5.0]
    assert select_by_score(scores, min_score=-2.0) == ([False, True, True, True, False], -2.0)
    assert select_by_score(scores, keep_top_fraction=0.4) == ([False, True, False, True, False], -1.0)
    assert select_by_score(scores, keep_top_fraction=0.5) == ([False, True, True, True, False], -2.0)  # ceil(2.5)
    assert select_by_score(scores) == ([True] * 5, None)
    assert select_by_score([-1.0, -1.0, -1.0, -2.0], keep_top_fraction=0.25) == ([True, True, True, False], -1.0)
    # ineligible traces are never kept and do not count towards the fraction
    assert select_by_score(scores, keep_top_fraction=0.5, eligible=[True, False, True, True, True]) == (
        [False, False, True, True, False], -2.0)
    with pytest.raises(ValueError, match="not both"):
        select_by_score(scores, min_score=0.0, keep_top_fraction=0.5)
    rng = random.Random(1)
    for _ in range(20):
        s = [round(rng.gauss(0, 1), 1) for _ in range(rng.randint(1, 30))]
        f = rng.uniform(0.01, 1.0)
        keep, thr = select_by_score(s, keep_top_fraction=f)
        assert keep == [x >= thr for x in s] and sum(keep) >= math.ceil(f * len(s))


def test_labels_and_canonical_trace(setup):
    gold = "Start with 4. Add 5 to get 9."
    assert reasoning_matches("Start  with 4.\nAdd 5 to get 9. ", gold)
    assert not reasoning_matches("Start with 4. Subtract 5 to get 9.", gold)
    assert numbers_match("Start with 4. Subtract 5 to get 9.", gold) and not numbers_match("Start with 4.", gold)
    _, tok, _ = setup
    eos, bos, w = tok.eos_token_id, tok.bos_token_id, tok.convert_tokens_to_ids
    start, one, two, dot = w("Start"), w("1"), w("##2"), w(".")
    tokens = torch.tensor([
        [start, one, two, dot, eos, eos],  # clean: "Start 12." stays as it is
        [start, one, eos, dot, dot, eos],  # tokens after the first EOS are dropped
        [start, bos, one, dot, eos, eos],  # a special token inside is dropped (decode skips it)
    ])
    texts, ids, too_long, counts = canonical_trace(tok, tokens, (eos,), tok.mask_token_id, eos)
    assert texts == ["Start 12.", "Start 1", "Start 1."]
    assert ids.tolist() == [tokens[0].tolist(), [start, one, eos, eos, eos, eos], [start, one, dot, eos, eos, eos]]
    assert counts == {"traces_reencoded": 2, "traces_too_long": 0} and too_long == [False] * 3


def test_settings_that_mean_nothing_are_errors():
    with pytest.raises(ValueError, match="exit_gamma"):
        check_sampler(SamplerConfig(exit_gamma=0.1, temperature=1.0), 2)
    with pytest.raises(ValueError, match="greedy"):
        check_sampler(SamplerConfig(temperature=0.0), 2)
    check_sampler(SamplerConfig(temperature=0.0), 1)
    with pytest.raises(ValueError, match="not both"):
        PosteriorConfig(min_score=-1.0, keep_top_fraction=0.5)


def test_kept_traces_load_through_the_sft_data_path(setup, tmp_path):
    adapter, tok, data = setup
    config = PosteriorConfig(traces_per_question=2, batch_size=5, keep_top_fraction=0.5, output_dir=str(tmp_path))
    sampler = SamplerConfig(policy="med", block_length=8, temperature=1.0)
    records, report = generate_traces(adapter, tok, data, TEMPLATE, sampler, config, progress=False)
    assert len(records) == 12 and [r["question"] for r in records] == [q for q in range(6) for _ in range(2)]
    assert len({r["seed"] for r in records}) == 12 and report["questions_skipped_answer_too_long"] == 0
    too_long = [r["too_long"] for r in records]
    assert sum(too_long) == report["traces_too_long"]
    keep, threshold = select_by_score([r["score"] for r in records], keep_top_fraction=0.5,
                                      eligible=[not x for x in too_long])
    assert not any(k and x for k, x in zip(keep, too_long))  # a cut trace's text is not what was scored
    summary = summarize(records, keep, threshold)
    assert summary["kept"] == sum(keep) >= math.ceil(0.5 * (12 - sum(too_long))) and summary["n_traces"] == 12
    files = write_outputs(records, keep, summary, str(tmp_path))

    kept = [r for r, k in zip(records, keep) if k]
    loaded = load_task(TaskConfig(task="math", dataset_path=files["posterior_sft.jsonl"])).dataset
    assert [(r["prompt"], r["reasoning"], r["answer"]) for r in loaded] == [
        (r["prompt"], r["reasoning"], r["answer"]) for r in kept]
    rows, report = fit_to_canvas(loaded, tok, TEMPLATE, "error", adapter.max_length)
    assert report["rows_kept"] == len(kept)
    batch = SFTCollator(tok, TEMPLATE, adapter.mask_id, adapter.max_length)(list(rows))
    G = batch["maskable"].shape[1]
    # The SFT target's reasoning block is the trace that was scored: rescoring it reproduces the recorded score.
    canvas = build_canvas(tok, [r["prompt"] for r in kept], TEMPLATE, adapter.mask_id,
                          answers=[r["answer"] for r in kept])
    phi = phi_trajectory(adapter, canvas, batch["input_ids"][:, -G:][:, canvas.reasoning])
    assert phi.mean(-1).tolist() == pytest.approx([r["score"] for r in kept], abs=1e-4)

    gold = load_task(TaskConfig(task="math", dataset_path=files["gold_matched.jsonl"])).dataset
    assert gold["prompt"] == loaded["prompt"] and gold["answer"] == loaded["answer"]
    assert gold["reasoning"] == [r["gold_reasoning"] for r in kept]
    with open(files["traces.jsonl"]) as f:
        assert [json.loads(line)["kept"] for line in f] == keep


def _canvas_keys():
    import dataclasses

    return {f.name for f in dataclasses.fields(TemplateConfig)}


def _script(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"script_{name}", os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipes_parse_and_share_the_sft_canvas():
    tiny = os.path.join(ROOT, "recipes", "tiny")
    post = load_recipe(os.path.join(tiny, "posterior.yaml"))
    sft, ev = load_recipe(os.path.join(tiny, "sft.yaml")), load_recipe(os.path.join(tiny, "eval.yaml"))
    parse(_script("posterior").configs(), [os.path.join(tiny, "posterior.yaml")])
    task_keys = {"task", "task_seed", "train_size", "min_ops", "max_ops", "max_operand", "max_multiplier"}
    for key in task_keys | {"max_result"} | _canvas_keys():
        assert post.get(key) == sft.get(key), key
    assert post["model_name_or_path"] == sft["output_dir"] + "/final" and post["split"] == "train"
    for name, file in (("sft_posterior.yaml", "posterior_sft.jsonl"), ("sft_gold_matched.yaml", "gold_matched.jsonl")):
        recipe = load_recipe(os.path.join(tiny, name))
        task, *_, args = parse(_script("sft").configs(), [os.path.join(tiny, name), "--use_cpu", "true", "--bf16",
                                                          "false"])
        assert task.task == "math" and task.dataset_path == f"{post['output_dir']}/{file}"
        assert args.max_steps == load_recipe(os.path.join(tiny, "sft_ci.yaml"))["max_steps"]
        for key in _canvas_keys():
            assert recipe.get(key) == ev.get(key), (name, key)


def test_script_writes_sft_data_and_prints_summary_last(tmp_path):
    data = load_task(TASK, split="train").dataset
    model_dir = save_scratch_policy(tmp_path / "model", [*data["prompt"], *data["reasoning"], *data["answer"],
                                                          TEMPLATE.delimiter])
    args = ["--model_name_or_path", model_dir, "--split", "train", "--train_size", "6", "--num_samples", "4",
            "--min_ops", "1", "--max_ops", "2", "--max_operand", "5", "--max_multiplier", "3", "--max_result", "20",
            "--reasoning_length", "16", "--answer_length", "3", "--policy", "med", "--block_length", "8",
            "--temperature", "1.0", "--traces_per_question", "3", "--min_score", "-30", "--device", "cpu",
            "--output_dir", str(tmp_path / "out")]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "posterior.py"), *args],
                          capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    with open(tmp_path / "out" / "traces.jsonl") as f:
        traces = [json.loads(line) for line in f]
    with open(tmp_path / "out" / "posterior_sft.jsonl") as f:
        sft_rows = [json.loads(line) for line in f]
    assert summary["n_traces"] == len(traces) == 12 and summary["n_questions"] == 4
    assert summary["threshold"] == -30.0 and summary["kept"] == len(sft_rows) == sum(
        t["score"] >= -30 and not t["too_long"] for t in traces)
    assert summary["frac_correct_reasoning"] == pytest.approx(sum(t["correct_reasoning"] for t in traces) / 12,
                                                              abs=1e-4)
    assert {"auc", "auc_within_question", "frac_correct_among_kept", "sample_seconds", "score_seconds"} <= set(summary)
    assert all(len(t["phi"]) == 16 and t["score"] == pytest.approx(sum(t["phi"]) / 16, abs=1e-3) for t in traces)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["kept"] == summary["kept"]
