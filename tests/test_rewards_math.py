"""Math and format rewards: extraction rules, every GSM8K / MATH-500 gold answer, perturbations, call conventions."""

import json
from pathlib import Path

import pytest

from rewards.format_reward import FormatReward, answer_format
from rewards.math_answer import (
    after_delimiter,
    all_boxed,
    candidates,
    gold_answer,
    gold_parts,
    last_boxed,
    last_number,
    read_answer,
    stated_answers,
)
from rewards.math_reward import MathReward, math_accuracy, reasoning_accuracy, supported_accuracy

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# MATH-500 neighbours whose answers differ as strings but are equal as mathematics (math-verify is right).
EQUIVALENT_NEIGHBOURS = {("5", "x=5")}


def load(name: str) -> list[dict]:
    path = DATA / name
    if not path.exists():
        pytest.skip(f"reference data {path} is absent (it lives outside the repository, in ../shared/data)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_last_boxed():
    assert last_boxed(r"a \boxed{1} b \boxed{\frac{1}{2}} c") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{3} then \boxed{4") == "3"  # the last one is unclosed: the last complete one
    assert last_boxed(r"\boxed {x^{2}}") == "x^{2}"
    assert last_boxed(r"\fbox{7}") == "7"
    assert last_boxed("no box") is None


def test_last_number():
    assert last_number("she pays $1,234.50 then 18 dollars.") == "18"
    assert last_number("total 1,000,000 ") == "1000000"
    assert last_number("ratio -3/4") == "-3/4"
    assert last_number("none") is None


def test_gold_and_candidate_rules():
    assert gold_answer("work <<2*9=18>>\n#### 1,018") == ("number", "1018")
    assert gold_answer(r"so \boxed{\frac{1}{2}}.") == ("latex", r"\frac{1}{2}")
    assert gold_answer(r"\frac{1}{2}") == ("latex", r"\frac{1}{2}")
    assert gold_answer(42) == ("number", "42") and gold_answer("1,000") == ("number", "1000")
    assert candidates("18 dollars", "block", "number") == ["18 dollars", "18"]
    assert candidates("18", "block", "number") == ["18"]
    assert candidates(r"$\frac{1}{2}$.", "block", "latex") == [r"\frac{1}{2}"]
    assert candidates(r"x \boxed{2} y 3", "text", "latex") == ["2"]
    assert candidates("it is 7, not 8", "text", "latex") == ["8"]
    assert candidates(r"\boxed{}", "text", "number") == candidates("no digits", "text", "number") == []
    assert after_delimiter(r"The answer is \boxed{1} or \boxed{\frac{2}{3}} ok", "\\boxed{") == r"\frac{2}{3}"
    assert after_delimiter("The answer is 12\nmore", "The answer is") == " 12"
    assert after_delimiter(r"\boxed{12", "\\boxed{") is None


def test_every_gsm8k_gold_verifies_and_perturbations_fail():
    rows = load("gsm8k_test.jsonl")
    gold = [r["answer"] for r in rows]
    finals = [g.rsplit("####", 1)[1].strip() for g in gold]
    assert len(rows) == 1319
    assert math_accuracy([f"So the answer is {n}." for n in finals], answer=gold) == [1.0] * len(rows)
    assert math_accuracy([f"\\boxed{{{n}}}" for n in finals], answer=gold) == [1.0] * len(rows)
    wrong = [str(int(n.replace(",", "")) + 1) for n in finals]
    assert math_accuracy(["x"] * len(rows), answer=gold, answer_texts=wrong) == [0.0] * len(rows)
    assert math_accuracy([f"So the answer is {n}." for n in wrong], answer=gold) == [0.0] * len(rows)


def test_every_math500_answer_verifies_against_boxed_and_perturbations_fail():
    rows = load("math500_test.jsonl")
    answers = [r["answer"] for r in rows]
    assert len(rows) == 500
    assert math_accuracy([f"Hence \\boxed{{{a}}}." for a in answers], answer=answers) == [1.0] * len(rows)
    assert math_accuracy(["..."] * len(rows), answer=answers, answer_texts=answers) == [1.0] * len(rows)
    # the gold may also be the full solution (its last \boxed{} is used)
    assert math_accuracy([f"\\boxed{{{a}}}" for a in answers], solution=[r["solution"] for r in rows]) == [1.0] * 500
    pairs = [(a, answers[(i + 1) % len(answers)]) for i, a in enumerate(answers)]
    pairs = [(a, b) for a, b in pairs if a != b and (a, b) not in EQUIVALENT_NEIGHBOURS]
    scores = math_accuracy([f"\\boxed{{{b}}}" for _, b in pairs], answer=[a for a, _ in pairs])
    assert [p for p, s in zip(pairs, scores) if s != 0.0] == []
    numeric = [a for a in answers if a.lstrip("-").isdigit()]
    scores = math_accuracy([f"\\boxed{{{int(a) + 1}}}" for a in numeric], answer=numeric)
    assert len(numeric) > 100 and scores == [0.0] * len(numeric)


def test_answer_texts_take_precedence_over_the_completion():
    assert math_accuracy([r"\boxed{17}"], answer=["#### 18"], answer_texts=["18"]) == [1.0]
    assert math_accuracy([r"\boxed{18}"], answer=["#### 18"], answer_texts=["17"]) == [0.0]
    assert math_accuracy(["..."], answer=[r"\frac{1}{2}"], answer_texts=[r"$\frac{2}{4}$."]) == [1.0]
    # a plain-number gold (GSM8K as our task loaders store it): the block, or its last number
    golds = ["18", "18", "18", "18"]
    blocks = ["18 dollars", r"\frac{36}{2}", "$18.00", "18 or 19"]
    assert math_accuracy(["..."] * 4, answer=golds, answer_texts=blocks) == [1.0, 1.0, 1.0, 0.0]


def test_reasoning_reward_scores_the_chains_conclusion_not_the_answer_block():
    reasoning = ["Start with 2. Add 2 to get 4.", "Start with 2. Add 2 to get 5.", r"So it is \boxed{4} in all.", ""]
    golds = ["4"] * 4
    blocks = ["5", "4", "5", "4"]  # the answer block disagrees with every chain: it must not matter
    assert reasoning_accuracy(["..."] * 4, answer=golds, answer_texts=blocks, reasoning_texts=reasoning) == [
        1.0, 0.0, 1.0, 0.0]
    assert math_accuracy(["..."] * 4, answer=golds, answer_texts=blocks, reasoning_texts=reasoning) == [
        0.0, 1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="needs `reasoning_texts`"):
        reasoning_accuracy(["4"], answer=["4"])
    with pytest.raises(ValueError, match="1 reasoning_texts for 2 completions"):
        reasoning_accuracy(["4", "4"], answer=["4", "4"], reasoning_texts=["4"])
    with pytest.raises(ValueError, match="read="):
        MathReward(read="prompt")


def test_supported_reward_needs_the_answer_block_and_the_chain_both_right():
    reasoning = ["Add 2 to get 4.", "Add 2 to get 5.", "Add 2 to get 4.", "Add 2 to get 5.", "", r"so \boxed{4}"]
    blocks = ["4", "4", "5", "5", "4", "4.0"]
    log = []
    rewards = supported_accuracy(["..."] * 6, answer=["#### 4"] * 6, answer_texts=blocks, reasoning_texts=reasoning,
                                 log_metric=lambda k, v: log.append((k, v)))
    assert rewards == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert log == [("reward/supported_accuracy_unscorable", 0.0), ("reward/supported_accuracy_hedged", 0.0)]
    assert supported_accuracy.totals["reasoning_wrong"] >= 1 and supported_accuracy.totals["answer_wrong"] >= 1
    assert supported_accuracy.totals["both_wrong"] >= 1 and supported_accuracy.totals["reasoning_no_answer"] >= 1
    with pytest.raises(ValueError, match="needs `answer_texts` and `reasoning_texts`"):
        supported_accuracy(["4"], answer=["4"], reasoning_texts=["4"])
    with pytest.raises(ValueError, match="needs `reasoning_texts`"):
        supported_accuracy(["4"], answer=["4"], answer_texts=["4"])


def test_chat_completions_and_no_answer():
    chat = [[{"role": "assistant", "content": r"It is \boxed{3}."}], [{"role": "assistant", "content": "no idea"}]]
    assert math_accuracy(chat, answer=["3", "3"]) == [1.0, 0.0]
    parts = [[{"role": "assistant", "content": [{"type": "text", "text": r"\boxed{x^2}"}]}]]
    assert math_accuracy(parts, answer=["x^2"]) == [1.0]


def test_missing_gold_column_says_which_columns_exist():
    with pytest.raises(ValueError, match="'answer' or 'solution'.*question"):
        math_accuracy(["1"], question=["q"])
    with pytest.raises(ValueError, match="2 values for 1 completions"):
        math_accuracy(["1"], answer=["1", "2"])


def test_format_reward():
    texts = [r"so \boxed{\frac{1}{2}}", r"so \boxed{}", r"so \boxed{1", "so 1/2", r"\boxed{1} then \boxed{2}"]
    assert answer_format(texts) == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert answer_format(["x", "x", "x"], answer_texts=["12", "  ", "}{"]) == [1.0, 0.0, 0.0]
    plain = FormatReward(delimiter="The answer is")
    assert plain(["... The answer is 12.", "... The answer is \n12", "12"]) == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="delimiter"):
        FormatReward(delimiter="")


def test_stated_answers_count_candidates_not_commas_in_numbers_or_brackets():
    assert stated_answers("3 or 4") == ["3", "4"] and stated_answers(r"3 \lor 4") == ["3", "4"]
    assert stated_answers(r"2 \text{ or } 3") == ["2", "3"] and stated_answers("either 3 or 4") == ["3", "4"]
    assert stated_answers("1,-2") == ["1", "-2"] and stated_answers("3, 5, 7") == ["3", "5", "7"]
    for one in ["1,018", r"10,\!080", r"11,\! 111,\! 111,\! 100", r"\left( 3, \frac{\pi}{2} \right)", "(3,4]",
                r"(0,9) \cup (9,36)", r"\{1\pm\sqrt{5},-2\}", "18 dollars", r"\frac{36}{2}", "x", "Thus, she has 4"]:
        assert len(stated_answers(one)) == 1, one
    assert stated_answers("17 19") == ["17 19"] and stated_answers("17 19", numbers=True) == ["17", "19"]
    assert stated_answers("it is 7, not 8", lists=False) == ["it is 7, not 8"]  # prose: commas are grammar
    assert gold_parts("number", "18") == 1 and gold_parts("latex", "4") == 1 and gold_parts("latex", "1,-2") == 2
    assert gold_parts("latex", r"1 \pm \sqrt{19}") == 2 and gold_parts("latex", r"10,\!080") == 1
    assert all_boxed(r"\boxed{3} and \boxed{ 3 } then \boxed{4} and \boxed{5") == ["3", "4"]


HEDGED = {  # (gold, text, where the text comes from): each states the right answer among others
    "gsm8k_or_block": ("#### 4", "3 or 4", "block"),
    "gsm8k_list_block": ("#### 4", "3, 4, 5", "block"),
    "gsm8k_side_by_side_block": ("#### 4", "3 4", "block"),
    "gsm8k_two_boxes": ("#### 4", r"\boxed{3} \boxed{4}", "text"),
    "gsm8k_or_after_cue": ("#### 4", "So the answer is 3 or 4.", "text"),
    "gsm8k_list_after_cue": ("#### 4", "The answer is: 2, 3, 4", "text"),
    "gsm8k_hashes_two_numbers": ("#### 4", "#### 3 4", "text"),
    "gsm8k_or_in_prose": ("#### 4", "She has either 3 or 4 apples.", "text"),
    "math_two_boxes": ("4", r"Hence \boxed{3} or maybe \boxed{4}.", "text"),
    "math_disjunction_boxed": ("4", r"\boxed{3 \text{ or } 4}", "text"),
    "math_lor_block": (r"\frac{1}{2}", r"\frac{1}{3} \lor \frac{1}{2}", "block"),
    "math_list_in_box": ("4", r"\boxed{3, 4}", "text"),
    "math_three_for_two_roots": ("1,-2", r"\boxed{1, -2, 3}", "text"),
}


@pytest.mark.parametrize("name", list(HEDGED))
def test_hedged_answers_score_zero_and_are_counted(name):
    gold, text, source = HEDGED[name]
    reward = MathReward(name=f"hedge_{name}")
    log = []
    kwargs = {"answer_texts": [text]} if source == "block" else {}
    assert reward(["..." if source == "block" else text], answer=[gold], log_metric=lambda k, v: log.append((k, v)),
                  **kwargs) == [0.0]
    assert reward.totals["hedged"] == 1 and (f"reward/hedge_{name}_hedged", 1.0) in log


def test_one_answer_stated_once_or_the_golds_own_parts_still_pay():
    cases = [  # (gold, text, source)
        ("#### 4", r"\boxed{4} so again \boxed{4}", "text"),  # the same answer twice is one answer
        ("#### 4", "Start with 2. Add 2 to get 4.", "text"),  # prose: the conclusion, not every number
        ("#### 18", "She sells 9 * 2 = $18 every day.", "text"),
        ("#### 18", "The answer is 18. I checked it 3 ways.", "text"),  # the cued sentence only
        ("#### 1,018", "1,018 dollars", "block"),
        ("1,-2", r"\boxed{1, -2}", "text"),  # the gold lists two roots: two may be stated
        ("1,-2", r"\boxed{-2} and \boxed{1}", "text"),
        ("3, 5, 7", "3, 5, 7", "block"),
        (r"1 \pm \sqrt{19}", r"\boxed{1 + \sqrt{19}, 1 - \sqrt{19}}", "text"),
        (r"\left( 3, \frac{\pi}{2} \right)", r"\boxed{\left( 3, \frac{\pi}{2} \right)}", "text"),
        (r"10,\!080", r"\boxed{10,\!080}", "text"),
    ]
    for gold, text, source in cases:
        kwargs = {"answer_texts": [text]} if source == "block" else {}
        assert math_accuracy(["..." if source == "block" else text], answer=[gold], **kwargs) == [1.0], (gold, text)
    assert read_answer("3 or 4", "block", "latex", parts=2) == (["3 or 4"], None)  # within the gold's parts


def test_an_unparseable_gold_is_an_error_naming_the_row(caplog):
    reward = MathReward(name="bad_gold")
    with caplog.at_level("WARNING", logger="rewards"):
        assert reward([r"\boxed{1}", r"\boxed{1}"], answer=["1", "}{"]) == [1.0, None]
    assert "row 1" in caplog.text and "cannot parse the gold answer" in caplog.text
