"""Rows and scoring of the local lm-eval tasks (`gsm8k_local`, `arithmetic_local`): the project's own loaders and
answer check, so lm-eval's accuracy is scripts/evaluate.py's, row for row."""

from __future__ import annotations

DELIMITER, SUFFIX = "\nThe answer is ", ""
"""The canvas delimiter and suffix (TemplateConfig defaults): the answer is read after the last delimiter. Change
both here (in a copy of this directory) for a model evaluated with other model_args delimiter/suffix."""

ARITHMETIC = {"task_seed": 0, "test_size": 500, "min_ops": 2, "max_ops": 3, "max_operand": 5, "max_multiplier": 3,
              "max_result": 20}
"""The held-out split of the tiny default (recipes/tiny/eval.yaml); `--metadata '{"test_size": 100}'` overrides."""


def process_docs(dataset):
    """Raw GSM8K rows -> the project's task rows (prompt, answer, reasoning); unusable rows are counted, logged
    and left out exactly as `rl.tasks.load_task` leaves them out, so doc ids equal evaluate.py's row indices."""
    import datasets

    from rl.tasks.loaders import BadRows, gsm8k_rows

    bad = BadRows()
    rows = gsm8k_rows(dataset, bad)
    bad.log("gsm8k_local", len(rows) + bad.total)
    return datasets.Dataset.from_list(rows)


def arithmetic(**metadata) -> dict:
    """The generated arithmetic test split ({'test': Dataset}); lm-eval passes the task metadata (which also holds
    the model_args), and the TaskConfig keys among it override `ARITHMETIC`."""
    import dataclasses

    from rl.tasks import TaskConfig, load_task

    keys = {f.name for f in dataclasses.fields(TaskConfig)} - {"task", "dataset_path", "split", "num_samples"}
    config = TaskConfig(task="arithmetic", **{**ARITHMETIC, **{k: v for k, v in metadata.items() if k in keys}})
    return {"test": load_task(config, split="test").dataset}


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """1.0 if the answer (the text after the last delimiter) matches the gold answer (`rl.evaluate.check_answers`)."""
    from rl.evaluate import check_answers
    from rl.harness import answer_of
    from rollout.template import TemplateConfig

    answer = answer_of(results[0], TemplateConfig(delimiter=DELIMITER, suffix=SUFFIX))
    return {"accuracy": float(check_answers([doc["answer"]], [answer])[0])}
