"""Row loading and scoring of the `gsm8k_local` lm-eval task: the project's own, so results match evaluate.py."""

from __future__ import annotations

DELIMITER, SUFFIX = "\nThe answer is ", ""
"""The canvas delimiter and suffix (TemplateConfig defaults): the answer is read after the last delimiter. Change
both here (in a copy of this task) for a model evaluated with other model_args delimiter/suffix."""


def process_docs(dataset):
    """Raw GSM8K rows -> the project's task rows (prompt, answer, reasoning); unusable rows are counted, logged
    and left out exactly as `rl.tasks.load_task` leaves them out, so doc ids equal evaluate.py's row indices."""
    import datasets

    from rl.tasks.loaders import BadRows, gsm8k_rows

    bad = BadRows()
    rows = gsm8k_rows(dataset, bad)
    bad.log("gsm8k_local", len(rows) + bad.total)
    return datasets.Dataset.from_list(rows)


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """1.0 if the answer (the text after the last delimiter) matches the gold answer (`rl.evaluate.check_answers`)."""
    from rl.evaluate import check_answers
    from rl.harness import answer_of
    from rollout.template import TemplateConfig

    answer = answer_of(results[0], TemplateConfig(delimiter=DELIMITER, suffix=SUFFIX))
    return {"accuracy": float(check_answers([doc["answer"]], [answer])[0])}
