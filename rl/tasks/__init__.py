"""Tasks by name: every task yields a `datasets.Dataset` with columns `prompt`, `answer`, `reasoning`.

    >>> from rl.tasks import TaskConfig, load_task
    >>> data = load_task(TaskConfig(task="arithmetic", test_size=8), split="test")
    >>> data.dataset.column_names
    ['prompt', 'answer', 'reasoning']

`gsm8k`, `math` (full MATH train/test) and `math500` read a hub dataset or a local jsonl
(`dataset_path: ../shared/data/gsm8k_test.jsonl`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rl.tasks.arithmetic import Difficulty, generate
from rl.tasks.loaders import BadRows, gsm8k_rows, math500_rows, normalize_number, read_rows

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

__all__ = ["TASKS", "BadRows", "TaskConfig", "TaskData", "load_task", "normalize_number"]


@dataclass
class TaskConfig:
    """Which task and which rows. Field names are recipe keys."""

    task: str = field(default="arithmetic", metadata={"help": "Task name: arithmetic, gsm8k, math or math500."})
    dataset_path: str | None = field(
        default=None,
        metadata={"help": "Hub dataset name or local .jsonl for gsm8k/math500 (None: the task's hub default)."},
    )
    split: str | None = field(default=None, metadata={"help": "Split to read (None: the entry script's default)."})
    num_samples: int | None = field(default=None, metadata={"help": "Keep only the first N usable rows."})
    task_seed: int = field(default=0, metadata={"help": "arithmetic: seed of the generated splits."})
    train_size: int = field(default=20000, metadata={"help": "arithmetic: problems in the train split."})
    test_size: int = field(default=500, metadata={"help": "arithmetic: problems in the held-out test split."})
    min_ops: int = field(default=2, metadata={"help": "arithmetic: fewest operations per problem."})
    max_ops: int = field(default=3, metadata={"help": "arithmetic: most operations per problem."})
    max_operand: int = field(default=20, metadata={"help": "arithmetic: largest start value / added amount."})
    max_multiplier: int = field(default=5, metadata={"help": "arithmetic: largest multiplier or divisor."})
    max_result: int = field(default=200, metadata={"help": "arithmetic: largest value any step may produce."})

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"Unknown task {self.task!r}; valid tasks: {', '.join(sorted(TASKS))}.")
        if self.num_samples is not None and self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1 or None, got {self.num_samples}.")
        if self.train_size < 1 or self.test_size < 1:
            raise ValueError("train_size and test_size must be >= 1.")
        self.difficulty()  # range-checks the arithmetic knobs

    def difficulty(self) -> Difficulty:
        return Difficulty(self.min_ops, self.max_ops, self.max_operand, self.max_multiplier, self.max_result)


@dataclass
class TaskData:
    """Rows of one split plus what was left out while loading them."""

    dataset: datasets.Dataset  # columns prompt, answer, reasoning
    bad_rows: BadRows
    source: str


Loader = Callable[[TaskConfig, str], tuple[list[dict], BadRows, str]]
"""(config, split) -> (rows, rows left out, source name)."""


def _arithmetic(config: TaskConfig, split: str) -> tuple[list[dict], BadRows, str]:
    n = config.train_size if split == "train" else config.test_size
    return generate(split, n, config.task_seed, config.difficulty()), BadRows(), f"arithmetic/{split}"


def _from_rows(convert: Callable, default_hub: str, hub_config: str | None) -> Loader:
    def load(config: TaskConfig, split: str) -> tuple[list[dict], BadRows, str]:
        source = config.dataset_path or default_hub
        bad = BadRows()
        rows = convert(read_rows(source, hub_config, split), bad)
        bad.log(source, len(rows) + bad.total)
        return rows, bad, source

    return load


TASKS: dict[str, Loader] = {
    "arithmetic": _arithmetic,
    "gsm8k": _from_rows(gsm8k_rows, "openai/gsm8k", "main"),
    "math500": _from_rows(math500_rows, "HuggingFaceH4/MATH-500", None),
    "math": _from_rows(math500_rows, "DigitalLearningGmbH/MATH-lighteval", None),  # full MATH, train + test
}


def load_task(config: TaskConfig, split: str | None = None) -> TaskData:
    """Load `split` (default: `config.split`, else 'train') of the configured task as a Dataset."""
    import datasets

    if config.task not in TASKS:
        raise ValueError(f"Unknown task {config.task!r}; valid tasks: {', '.join(sorted(TASKS))}.")
    split = split or config.split or "train"
    rows, bad, source = TASKS[config.task](config, split)
    rows = rows[: config.num_samples] if config.num_samples else rows
    if not rows:
        raise ValueError(f"{source}: no usable rows ({bad.total} left out: {dict(bad.counts)}).")
    logger.info("Loaded %d rows from %s (%d left out).", len(rows), source, bad.total)
    return TaskData(datasets.Dataset.from_list(rows), bad, source)
