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
            `answer_texts`, else the completion text) or "reasoning" (the last boxed value or number of the reasoning
            block, `reasoning_texts`: scores the chain's own conclusion, whatever the answer block says).

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
        if read not in ("answer", "reasoning"):
            raise ValueError(f"read={read!r}; use 'answer' or 'reasoning'.")
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
        block = reasoning_texts if self.read == "reasoning" else answer_texts
        if self.read == "reasoning" and block is None:
            raise ValueError(f"{self.__name__} reads the reasoning block: it needs `reasoning_texts`, which the "
                             "diffusion trainers pass. Use 'math' for completions from other trainers.")
        if block is not None:
            texts, source = list(block), "text" if self.read == "reasoning" else "block"
            if len(texts) != len(completions):
                n, m = len(texts), len(completions)
                raise ValueError(f"{self.__name__}: {n} {self.read}_texts for {m} completions.")
        else:
            texts, source = [completion_text(c) for c in completions], "text"
        tasks = [("score", gold, text, source, self.max_chars) for gold, text in zip(golds, texts)]
        rewards, notes = [], Counter()
        for res in self.pool.map(tasks):
            if res.status == "ok":
                value, note = res.value
                rewards.append(value)
                notes[note] += 1
            else:
                rewards.append(None)
                notes[res.status] += 1
                logger.debug("%s: %s %s", self.__name__, res.status, res.value or "")
        self.totals.update(notes)
        report(self.__name__, rewards, notes, log_metric)
        return rewards


math_accuracy = MathReward()
reasoning_accuracy = MathReward(name="reasoning_accuracy", read="reasoning")
