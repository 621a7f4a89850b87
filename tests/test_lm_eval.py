"""lm-evaluation-harness adapter (`rl.harness`): model_args checking, and lm-eval's simple_evaluate on the local
GSM8K task reproducing scripts/evaluate.py row for row (same rows, sampler and seeds) on a tiny random model."""

import importlib.util
import json
import os
import random

import pytest
from doubles import save_scratch_policy

lm_eval = pytest.importorskip("lm_eval")

from rl.harness import InfillRLM, answer_of, cut_at, parse_model_args  # noqa: E402
from rl.tasks import TaskConfig, load_task  # noqa: E402
from rollout import TemplateConfig  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "..", "shared", "data", "gsm8k_test.jsonl")
N = 8
ARITHMETIC = {"task": "arithmetic", "test_size": N, "min_ops": 1, "max_ops": 2, "max_operand": 5, "max_multiplier": 3,
              "max_result": 20}


def test_unknown_model_args_are_an_error_listing_the_valid_keys():
    from lm_eval.api.registry import get_model

    assert get_model("infill-rl") is InfillRLM
    with pytest.raises(ValueError, match=r"'polcy' \(did you mean policy\?\).*Valid keys: .*med_lambda"):
        InfillRLM.create_from_arg_string("pretrained=unused,polcy=med", {"batch_size": 4, "device": "cpu"})
    with pytest.raises(ValueError, match="both pretrained and model_name_or_path"):
        parse_model_args({"pretrained": "a", "model_name_or_path": "b"})
    with pytest.raises(ValueError, match="expected int"):
        parse_model_args({"pretrained": "a", "reasoning_length": "long"})
    model, template, sampler, config = parse_model_args(
        {"pretrained": "a", "layout": "plain", "med_lambda": 1, "exit_gamma": None, "batch_size": "auto",
         "max_batch_size": None, "delimiter": 5})
    assert (model.model_name_or_path, template.layout, template.delimiter) == ("a", "plain", "5")
    assert sampler.med_lambda == 1.0 and sampler.exit_gamma is None and config.batch_size == 64
    with pytest.raises(ValueError, match="prune_phi reads the gold answer"):
        parse_model_args({"pretrained": "a", "prune_phi": -1.0})


def test_an_evaluate_recipe_gives_the_defaults_and_model_args_win(tmp_path):
    recipe = tmp_path / "eval.yaml"
    recipe.write_text("model_name_or_path: some/dir\ntask: arithmetic\ntest_size: 7\nreasoning_length: 32\n"
                      "block_length: 8\npolicy: med\nbatch_size: 100\noutput_file: theirs.jsonl\n")
    model, template, sampler, config = parse_model_args({"recipe": str(recipe), "policy": "left_to_right"})
    assert (model.model_name_or_path, template.reasoning_length, sampler.block_length) == ("some/dir", 32, 8)
    assert (sampler.policy, config.batch_size, config.output_file) == ("left_to_right", 100, None)
    recipe.write_text("reasoning_lenght: 32\n")
    with pytest.raises(ValueError, match="reasoning_lenght"):
        parse_model_args({"recipe": str(recipe)})


def test_answer_reading_and_until():
    assert answer_of("Add 2 to get 18.\nThe answer is 18") == "18"
    assert answer_of("The answer is 3. So\nThe answer is 18 dollars") == "18 dollars"
    assert answer_of("no delimiter 7") == "no delimiter 7"
    assert answer_of("x\n#### 42}", TemplateConfig(delimiter="\n#### ", suffix="}")) == "42"
    assert cut_at("a b Question: c\n\nd", ["\n\n", "Question:"]) == "a b "
    assert cut_at("a b", []) == "a b"


def test_task_helpers_score_the_answer_after_the_delimiter_and_read_the_split_from_metadata():
    spec = importlib.util.spec_from_file_location("task_utils", os.path.join(ROOT, "recipes", "lm_eval", "utils.py"))
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    doc = {"prompt": "...", "answer": "18"}
    assert utils.process_results(doc, ["Add 9 to get 17.\nThe answer is 18 dollars"]) == {"accuracy": 1.0}
    assert utils.process_results(doc, ["Add 9 to get 18.\nThe answer is 17"]) == {"accuracy": 0.0}
    # lm-eval passes the task metadata, which holds the model_args too: only TaskConfig keys count.
    split = utils.arithmetic(pretrained="x", seed=3, version=1.0, test_size=5, min_ops=1, max_ops=2)["test"]
    expected = load_task(TaskConfig(**{**utils.ARITHMETIC, "test_size": 5, "min_ops": 1, "max_ops": 2}), split="test")
    assert split["prompt"] == expected.dataset["prompt"] and len(split) == 5


@pytest.fixture(scope="module")
def gsm8k_model_dir(tmp_path_factory):
    if not os.path.isfile(DATA):
        pytest.skip(f"{DATA} is not present")
    rows = load_task(TaskConfig(task="gsm8k", dataset_path=DATA, num_samples=N), split="test").dataset
    return _save_policy(tmp_path_factory, rows)


@pytest.fixture(scope="module")
def arithmetic_model_dir(tmp_path_factory):
    return _save_policy(tmp_path_factory, load_task(TaskConfig(**ARITHMETIC), split="test").dataset)


def _save_policy(tmp_path_factory, rows) -> str:
    """An untrained tiny model whose word-level tokenizer covers the rows."""
    texts = [*rows["prompt"], *rows["reasoning"], *rows["answer"], TemplateConfig().delimiter]
    return save_scratch_policy(tmp_path_factory.mktemp("tiny"), texts, seed=1)


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _compare(tmp_path, model_dir, task, script_args, settings, metadata=None, batch_sizes=(3, 4)):
    """scripts/evaluate.py on `script_args` and lm-eval's simple_evaluate on `task` (first N docs) with the same
    settings: same rows, per-row outputs, NFE and correctness, same accuracy. Returns the adapter instance."""
    from lm_eval.tasks import TaskManager

    spec = importlib.util.spec_from_file_location("evaluate_script", os.path.join(ROOT, "scripts", "evaluate.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    flags = [x for k, v in settings.items() for x in (f"--{k}", str(v))]
    summary = script.main(["--model_name_or_path", model_dir, *script_args, "--batch_size", str(batch_sizes[0]),
                           *flags, "--output_file", str(tmp_path / "script.jsonl")])
    expected = _records(tmp_path / "script.jsonl")
    assert len(expected) == N

    lm = InfillRLM(pretrained=model_dir, device="cpu", batch_size=batch_sizes[1],
                   output_file=str(tmp_path / "harness.jsonl"), **settings)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=[task], limit=N, bootstrap_iters=0, log_samples=True,
        task_manager=TaskManager(include_path=os.path.join(ROOT, "recipes", "lm_eval"), include_defaults=False,
                                 metadata=metadata))
    got = sorted(_records(tmp_path / "harness.jsonl"), key=lambda r: r["doc_id"])
    assert [r["doc_id"] for r in got] == list(range(N))
    for mine, theirs in zip(got, expected):
        assert mine["context"] == theirs["prompt"]
        assert (mine["reasoning"], mine["answer"]) == (theirs["reasoning"], theirs["answer"])
        assert (mine["nfe"], mine["decode_step"]) == (theirs["nfe"], theirs["decode_step"])
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    assert [s["accuracy"] for s in samples] == [float(r["correct"]) for r in expected]
    assert results["results"][task]["accuracy,none"] == summary["accuracy"]
    nfe = results["config"]["infill_rl"]["nfe"][task]
    assert nfe["requests"] == N and nfe["mean_nfe"] == summary["mean_nfe"]
    return lm, samples


def test_gsm8k_local_matches_evaluate_script_row_for_row(tmp_path, gsm8k_model_dir, monkeypatch):
    monkeypatch.chdir(ROOT)  # the task's data_files is relative to the repository root
    # Left-to-right at T=1: every token is a draw from the row's own stream, and the order does not hang on the
    # near-ties of an untrained model's entropies, so different batch sizes give the same rows.
    settings = {"reasoning_length": 16, "answer_length": 3, "max_prompt_length": 96, "policy": "left_to_right",
                "k": 2, "temperature": 1.0, "seed": 3, "cpu_threads": 1}
    _compare(tmp_path, gsm8k_model_dir, "gsm8k_local",
             ["--task", "gsm8k", "--dataset_path", DATA, "--num_samples", str(N)], settings)


def test_arithmetic_local_matches_evaluate_script_and_ignores_request_order(tmp_path, arithmetic_model_dir):
    from lm_eval.api.instance import Instance

    # Greedy MED in semi-AR blocks (the tiny default's sampler), batched alike on both sides.
    settings = {"reasoning_length": 16, "answer_length": 3, "policy": "med", "med_lambda": 0.2, "block_length": 8,
                "seed": 5, "cpu_threads": 1}
    task_args = [x for k, v in ARITHMETIC.items() if k != "task" for x in (f"--{k}", str(v))]
    lm, samples = _compare(tmp_path, arithmetic_model_dir, "arithmetic_local", task_args, settings,
                           metadata={k: v for k, v in ARITHMETIC.items() if k != "task"}, batch_sizes=(3, 3))
    with pytest.raises(NotImplementedError, match="no exact token log-likelihood"):
        lm.loglikelihood([])

    # Requests in any order, with repeats: row i keeps its seed (repeat r is the run with seed + r) and the rows are
    # batched in doc order again, so the first repeat reproduces the in-order run.
    docs = [s["doc"] for s in samples]
    requests = [Instance("generate_until", doc, (doc["prompt"], {"until": [], "max_gen_toks": 5}), 0,
                         ("arithmetic_local", i, 2)) for i, doc in enumerate(docs)] * 2
    shuffled = list(range(len(requests)))
    random.Random(0).shuffle(shuffled)
    texts = lm.generate_until([requests[j] for j in shuffled], disable_tqdm=True)
    first_seen = {}
    for j, text in zip(shuffled, texts):
        first_seen.setdefault(j % N, text)
    assert [first_seen[i] for i in range(N)] == [s["resps"][0][0] for s in samples]
