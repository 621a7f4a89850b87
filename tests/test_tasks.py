"""Tasks: the generated arithmetic problems, the GSM8K / MATH-500 loaders, the registry."""

import json
import os
import random
import re

import pytest

from rl.tasks import TASKS, TaskConfig, load_task, normalize_number
from rl.tasks.arithmetic import Difficulty, generate, in_test_share, make_problem

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
START = re.compile(r"^Start with (\d+)\.")
STEP = re.compile(r"(Add|Subtract|Multiply by|Divide by) (\d+) to get (\d+)\.")
OPS = {"Add": "+", "Subtract": "-", "Multiply by": "*", "Divide by": "/"}


def _check_chain(row: dict) -> list[tuple]:
    """Every step of the reasoning is right and starts from the previous value; the last value is the answer.

    Returns the chain as equations (a, op, b, c)."""
    a = int(START.match(row["reasoning"]).group(1))
    eqs = []
    for word, b, c in STEP.findall(row["reasoning"]):
        op, b, c = OPS[word], int(b), int(c)
        assert c == {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op], row
        if op == "/":
            assert a % b == 0
        eqs.append((a, op, b, c))
        a = c
    assert eqs, row
    assert len(row["reasoning"].split(".")) == len(eqs) + 2  # nothing else in the reasoning
    assert str(eqs[-1][3]) == row["answer"]
    return eqs


def test_arithmetic_rows_are_consistent_and_within_difficulty():
    d = Difficulty(min_ops=2, max_ops=4, max_operand=15, max_multiplier=4, max_result=150)
    rows = generate("train", 300, seed=1, difficulty=d)
    assert set(rows[0]) == {"prompt", "answer", "reasoning"}
    for row in rows:
        eqs = _check_chain(row)
        assert 2 <= len(eqs) <= 4
        assert all(0 < c <= 150 for *_, c in eqs)
        assert all(b <= 4 for _, op, b, _ in eqs if op in "*/")
        assert row["prompt"].endswith("?")
    assert len({r["prompt"].split()[0] for r in rows}) > 3  # several templates and names


def test_difficulty_knobs_change_the_problems():
    one = generate("train", 50, 0, Difficulty(min_ops=1, max_ops=1, max_operand=5, max_result=50))
    assert all(len(_check_chain(r)) == 1 for r in one)
    many = generate("train", 50, 0, Difficulty(min_ops=5, max_ops=5, max_operand=50, max_result=999))
    assert all(len(_check_chain(r)) == 5 for r in many)
    with pytest.raises(ValueError, match="min_ops"):
        Difficulty(min_ops=3, max_ops=2)


def test_splits_are_deterministic_disjoint_and_prefix_stable():
    d = Difficulty()
    train, test = generate("train", 2000, 0, d), generate("test", 300, 0, d)
    assert generate("test", 300, 0, d) == test
    assert generate("test", 100, 0, d) == test[:100]
    assert generate("test", 300, 1, d) != test
    assert len({r["prompt"] for r in test}) == 300
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    # Disjoint at the level of arithmetic chains, not only of wording.
    chains = lambda rows: {tuple(_check_chain(r)) for r in rows}  # noqa: E731
    assert not chains(train) & chains(test)
    rng = random.Random(0)
    shares = [in_test_share(make_problem(rng, d)[1]) for _ in range(3000)]
    assert 0.05 < sum(shares) / len(shares) < 0.15


def test_too_small_problem_space_errors():
    tiny = Difficulty(min_ops=1, max_ops=1, max_operand=2, max_multiplier=2, max_result=2)
    with pytest.raises(ValueError, match="unique test problems"):
        generate("test", 5000, 0, tiny)


def test_load_task_arithmetic_dataset_columns():
    data = load_task(TaskConfig(test_size=20, max_ops=2), split="test")
    assert data.dataset.column_names == ["prompt", "answer", "reasoning"]
    assert len(data.dataset) == 20 and data.bad_rows.total == 0
    assert len(load_task(TaskConfig(test_size=20, num_samples=5), split="test").dataset) == 5


def test_unknown_task_lists_valid_names():
    with pytest.raises(ValueError, match="valid tasks: arithmetic, gsm8k, math, math500"):
        TaskConfig(task="gsm9k")
    assert {"arithmetic", "gsm8k", "math500"} <= set(TASKS)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_gsm8k_local_jsonl_and_bad_rows(tmp_path):
    rows = [
        {"question": "Q1?", "answer": "She has 2 * 3 = <<2*3=6>>6 eggs.\n#### 6"},
        {"question": "Q2?", "answer": "It costs $1,200.\n#### 1,200"},
        {"question": "Q3?", "answer": "No final line here."},
        {"question": "Q4?", "answer": "Reasoning.\n#### twelve"},
        {"question": "", "answer": "#### 3"},
        {"question": "Q6?", "answer": "Half.\n#### 2.50"},
    ]
    data = load_task(TaskConfig(task="gsm8k", dataset_path=_jsonl(tmp_path / "g.jsonl", rows)), split="test")
    ds = data.dataset
    assert ds["answer"] == ["6", "1200", "2.5"]
    assert ds[0]["reasoning"] == "She has 2 * 3 = 6 eggs."
    assert ds[0]["prompt"] == "Q1?"
    assert data.bad_rows.total == 3
    assert data.bad_rows.counts == {"missing '####' answer line": 1, "non-numeric answer": 1, "missing question": 1}
    assert "row 3" in data.bad_rows.examples["non-numeric answer"]


def test_math500_local_jsonl_and_bad_rows(tmp_path):
    rows = [
        {"problem": "P1", "solution": "So \\boxed{\\frac{1}{2}}.", "answer": "\\frac{1}{2}"},
        {"problem": "P2", "solution": "...", "answer": ""},
        {"problem": "P3", "solution": "..."},
        {"problem": "P4", "solution": "Hence \\boxed{7}."},  # full-MATH copies: the answer is the last box
    ]
    data = load_task(TaskConfig(task="math500", dataset_path=_jsonl(tmp_path / "m.jsonl", rows)))
    assert data.dataset[0] == {"prompt": "P1", "answer": "\\frac{1}{2}", "reasoning": "So \\boxed{\\frac{1}{2}}."}
    assert data.bad_rows.counts == {"missing answer": 2}
    assert data.dataset[1]["answer"] == "7"


def test_all_rows_bad_is_an_error(tmp_path):
    path = _jsonl(tmp_path / "bad.jsonl", [{"question": "Q", "answer": "no answer"}])
    with pytest.raises(ValueError, match="no usable rows"):
        load_task(TaskConfig(task="gsm8k", dataset_path=path))


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/data not present")
def test_shared_copies_load():
    gsm = load_task(TaskConfig(task="gsm8k", dataset_path=os.path.join(SHARED, "gsm8k_test.jsonl")))
    assert len(gsm.dataset) + gsm.bad_rows.total == 1319
    assert all(normalize_number(a) == a for a in gsm.dataset["answer"][:50])
    math = load_task(TaskConfig(task="math500", dataset_path=os.path.join(SHARED, "math500_test.jsonl")))
    assert len(math.dataset) + math.bad_rows.total == 500


def test_normalize_number():
    assert normalize_number(" 1,234 ") == "1234"
    assert normalize_number("$18.00") == "18"
    assert normalize_number("7.") == "7"
    assert normalize_number("-3") == "-3"
    assert normalize_number("0.50") == "0.5"
    assert normalize_number("twelve") is None
    assert normalize_number("1 2") is None
