"""Math correctness reward (GSM8K numbers, MATH LaTeX) with math-verify, isolated in a worker pool.

TRL calls reward functions as `f(prompts=..., completions=..., **dataset_columns)`, possibly from its async
reward thread. math-verify's own timeouts use `signal.alarm` (main thread only, and a float timeout silently
empties every result), so parsing and verification run in `rewards.pool.WorkerPool` processes with a real
per-sample timeout instead. A sample that times out, crashes its worker or raises gets `None` (TRL: not scorable)
and is counted in a warning; it is never silently scored 0.

    >>> math_accuracy(["... so she makes \\\\boxed{18} dollars."], answer=["... #### 18"])
    [1.0]
    >>> math_accuracy(["<reasoning>"], answer=["#### 18"], answer_texts=["18 dollars"])  # canvas answer block
    [1.0]
    >>> reasoning_accuracy(["..."], answer=["#### 18"], reasoning_texts=["6 times 3 is 18."])  # reasoning block
    [1.0]
    >>> supported_accuracy(["..."], answer=["#### 18"], answer_texts=["18"], reasoning_texts=["6 times 3 is 19."])
    [0.0]
"""

from __future__ import annotations

import logging
from collections import Counter

from rewards.common import column, completion_text, report, shared_pool
from rewards.math_answer import MAX_CHARS

logger = logging.getLogger(__name__)

GOLD_COLUMNS = ("answer", "solution")
TARGET, WARMUP = "rewards.math_answer:dispatch", "rewards.math_answer:warmup"


class MathReward:
    """Callable reward: 1.0 if the completion's answer matches the gold answer, 0.0 if not, None if not scorable.

    Args:
        timeout: seconds per sample (soft timeout in the worker; the worker is killed one second later).
        num_workers: worker processes (default min(4, CPU count)); pools are shared by rewards with equal settings.
        max_chars: predictions longer than this are not parsed and score 0 (None: no limit).
        memory_bytes: address-space limit of each worker.
        name: the name TRL logs the reward under.
        read: where the prediction comes from: "answer" (the canvas answer block when the trainer passes
            `answer_texts`, else the completion text), "reasoning" (the last boxed value or number of the reasoning
            block, `reasoning_texts`: scores the chain's own conclusion, whatever the answer block says) or "both"
            (1.0 only when the answer block and the reasoning's conclusion are both right: no credit for an answer
            block that is right while its reasoning is wrong, or the reverse).

    A prediction that states more answers than the gold has parts ("3 or 4", two different boxes) scores 0 with
    the note "hedged", logged as `reward/<name>_hedged` (see `rewards.math_answer`).

    Call columns: `answer` (or `solution`) holds the gold answer: a GSM8K solution ending in `#### N`, a MATH
    solution with `\\boxed{}`, or a bare answer. If `answer_texts` (the decoded answer blocks of the infilling canvas)
    is given, the prediction is read from it; otherwise from the completion text (see `rewards.math_answer`).
    """

    def __init__(
        self,
        timeout: float = 5.0,
        num_workers: int | None = None,
        max_chars: int | None = MAX_CHARS,
        memory_bytes: int | None = 4 << 30,
        name: str = "math_accuracy",
        read: str = "answer",
    ):
        if read not in ("answer", "reasoning", "both"):
            raise ValueError(f"read={read!r}; use 'answer', 'reasoning' or 'both'.")
        self.timeout, self.num_workers, self.read = timeout, num_workers, read
        self.max_chars, self.memory_bytes = max_chars, memory_bytes
        self.__name__ = name
        self.totals: Counter = Counter()  # cumulative notes and failure statuses over all calls

    @property
    def pool(self):
        return shared_pool(TARGET, self.timeout, self.num_workers, self.memory_bytes, WARMUP)

    def __repr__(self) -> str:
        settings = f"timeout={self.timeout}, num_workers={self.num_workers}, max_chars={self.max_chars}"
        return f"MathReward({settings}, name={self.__name__!r}, read={self.read!r})"

    def __call__(self, completions: list, answer_texts: list[str] | None = None,
                 reasoning_texts: list[str] | None = None, log_metric=None, **kwargs):
        golds = column(kwargs, GOLD_COLUMNS, len(completions), self.__name__)
        if self.read != "answer" and reasoning_texts is None:
            raise ValueError(f"{self.__name__} reads the reasoning block: it needs `reasoning_texts`, which the "
                             "diffusion trainers pass. Use 'math' for completions from other trainers.")
        if self.read == "both" and answer_texts is None:
            raise ValueError(f"{self.__name__} reads the answer block and the reasoning: it needs `answer_texts` and "
                             "`reasoning_texts`, which the diffusion trainers pass.")
        reads = {"answer": ["answer"], "reasoning": ["reasoning"], "both": ["answer", "reasoning"]}[self.read]
        tasks = []
        for part in reads:
            block = reasoning_texts if part == "reasoning" else answer_texts
            if block is not None:
                texts, source = list(block), "text" if part == "reasoning" else "block"
                if len(texts) != len(completions):
                    n, m = len(texts), len(completions)
                    raise ValueError(f"{self.__name__}: {n} {part}_texts for {m} completions.")
            else:
                texts, source = [completion_text(c) for c in completions], "text"
            tasks += [("score", gold, text, source, self.max_chars) for gold, text in zip(golds, texts)]
        results = list(self.pool.map(tasks))
        n = len(completions)
        rewards, notes = [], Counter()
        for i in range(n):
            parts = results[i::n]  # one result per block read, for completion i
            failed = [res for res in parts if res.status != "ok"]
            if failed:
                rewards.append(None)
                notes[failed[0].status] += 1
                first_error = failed[0].status == "error" and notes["error"] == 1  # e.g. a gold it cannot parse
                (logger.warning if first_error else logger.debug)(
                    "%s: row %d not scorable (%s) %s", self.__name__, i, failed[0].status, failed[0].value or "")
                continue
            values = [res.value for res in parts]
            rewards.append(min(v for v, _ in values))
            notes[values[0][1] if len(values) == 1 else _joint_note(values)] += 1
        self.totals.update(notes)
        report(self.__name__, rewards, notes, log_metric)
        if log_metric is not None and n:  # several candidate answers where one was due: scored 0, counted here
            log_metric(f"reward/{self.__name__}_hedged", sum(v for k, v in notes.items() if k.endswith("hedged")) / n)
        return rewards


def _joint_note(values: list[tuple[float, str]]) -> str:
    """Note for an answer-and-reasoning score: "correct", or which part failed ("answer_wrong", "reasoning_wrong")."""
    (answer, answer_note), (reasoning, reasoning_note) = values
    if answer and reasoning:
        return "correct"
    if not answer and not reasoning:
        return "both_wrong"
    return "reasoning_" + reasoning_note if answer else "answer_" + answer_note


math_accuracy = MathReward()
reasoning_accuracy = MathReward(name="reasoning_accuracy", read="reasoning")
supported_accuracy = MathReward(name="supported_accuracy", read="both")
