"""Loaders for real math datasets (GSM8K, MATH-500) from a hub name or a local jsonl, into the task columns.

Every loader returns rows {prompt, answer, reasoning}: `answer` is the final answer as a string, `reasoning` the
gold solution text without the final answer line. Rows that cannot be used (a line that is not JSON, a missing or
non-text question, a missing or non-numeric answer) are counted by reason, logged with an example, and left out;
the counts travel in `BadRows`. A local .jsonl is read line by line, so one bad line (or a field whose type differs
from the other rows') costs that row only, not the whole file.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

_CALCULATOR = re.compile(r"<<[^>]*>>")
_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)$")
INVALID_LINE = "__invalid_json_line__"  # key of the placeholder row `read_rows` yields for an unreadable line


@dataclass
class BadRows:
    """Rows left out while loading, counted by reason, with the first example of each reason."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def add(self, reason: str, index: int, row: dict) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, f"row {index}: {str(row)[:160]}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def log(self, source: str, n_read: int) -> None:
        for reason, n in self.counts.items():
            logger.warning("%s: left out %d of %d rows (%s); first: %s", source, n, n_read, reason,
                           self.examples[reason])


def normalize_number(text: str) -> str | None:
    """'1,234' -> '1234', '$18.00' -> '18', ' 7. ' -> '7'; None if `text` is not a plain number."""
    s = text.strip().replace(",", "").replace("$", "").rstrip(".").strip()
    if not _NUMBER.match(s):
        return None
    if "." in s:
        s = s.rstrip("0").rstrip(".") or "0"
    return s.lstrip("+")


def read_rows(path: str, hub_config: str | None, split: str) -> Iterable[dict]:
    """Rows of a local .jsonl/.json file (the whole file is the split) or of a hub dataset's `split`.

    A .jsonl line that is not a JSON object yields `{INVALID_LINE: <the line>}`, which the converters count.
    """
    import datasets

    if path.endswith(".jsonl"):
        return list(_jsonl_rows(path))
    if path.endswith(".json"):
        return datasets.load_dataset("json", data_files=path, split="train")
    return datasets.load_dataset(path, hub_config, split=split)


def _jsonl_rows(path: str) -> Iterable[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            yield row if isinstance(row, dict) else {INVALID_LINE: line.strip()[:160]}


def _text(value) -> str | None:
    return (value.strip() or None) if isinstance(value, str) else None


def gsm8k_rows(rows: Iterable[dict], bad: BadRows) -> list[dict[str, str]]:
    """GSM8K: the answer is the number after '####'; the reasoning is the text before it, calculator
    annotations (`<<48/2=24>>`) removed."""
    out = []
    for i, row in enumerate(rows):
        if INVALID_LINE in row:
            bad.add("not a JSON object", i, row)
            continue
        question, solution = _text(row.get("question")), _text(row.get("answer"))
        if not question:
            bad.add("missing question", i, row)
            continue
        if not solution or "####" not in solution:
            bad.add("missing '####' answer line", i, row)
            continue
        reasoning, _, final = solution.rpartition("####")
        answer = normalize_number(final)
        if answer is None:
            bad.add("non-numeric answer", i, row)
            continue
        out.append({"prompt": question, "answer": answer,
                    "reasoning": _CALCULATOR.sub("", reasoning).strip()})
    return out


def math500_rows(rows: Iterable[dict], bad: BadRows) -> list[dict[str, str]]:
    """MATH (MATH-500 or the full MATH train/test): `answer` is the reference answer (LaTeX allowed), or, for
    copies without an `answer` column, the last `\\boxed{}` of the solution; the reasoning is the full solution."""
    from rewards.math_answer import last_boxed

    out = []
    for i, row in enumerate(rows):
        if INVALID_LINE in row:
            bad.add("not a JSON object", i, row)
            continue
        problem, answer, solution = _text(row.get("problem")), row.get("answer"), _text(row.get("solution"))
        if not problem:
            bad.add("missing problem", i, row)
            continue
        if answer is None and solution:
            answer = last_boxed(solution)
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        if not _text(answer):
            bad.add("missing answer", i, row)
            continue
        out.append({"prompt": problem, "answer": answer.strip(), "reasoning": solution or ""})
    return out
