"""Format reward: is there a well-formed answer where the template says it should be?

- With `answer_texts` (the decoded answer block of the infilling canvas): 1.0 if the block is non-empty and
  math-verify parses it, else 0.0.
- From free text: 1.0 if the completion contains the delimiter (default `\\boxed{`), what follows its last
  occurrence is complete (a closing brace for a delimiter ending in `{`, else the rest of the line), non-empty
  and parsed by math-verify; else 0.0.

Parsing runs in the math worker pool; a sample that times out there gets None.

    >>> answer_format(["so the answer is \\\\boxed{\\\\frac{1}{2}}"])
    [1.0]
"""

from __future__ import annotations

from collections import Counter

from rewards.common import completion_text, report, shared_pool
from rewards.math_answer import MAX_CHARS, after_delimiter
from rewards.math_reward import TARGET, WARMUP


class FormatReward:
    """Callable format reward; see the module docstring. `delimiter` applies to free text only."""

    def __init__(
        self,
        delimiter: str = "\\boxed{",
        timeout: float = 5.0,
        num_workers: int | None = None,
        max_chars: int | None = MAX_CHARS,
        memory_bytes: int | None = 4 << 30,
        name: str = "answer_format",
    ):
        if not delimiter:
            raise ValueError("delimiter must be a non-empty string, e.g. '\\\\boxed{' or 'The answer is'.")
        self.delimiter, self.timeout, self.num_workers = delimiter, timeout, num_workers
        self.max_chars, self.memory_bytes = max_chars, memory_bytes
        self.__name__ = name

    def __repr__(self) -> str:
        return f"FormatReward(delimiter={self.delimiter!r}, timeout={self.timeout}, name={self.__name__!r})"

    def __call__(self, completions: list, answer_texts: list[str] | None = None, log_metric=None, **kwargs):
        if answer_texts is not None:
            if len(answer_texts) != len(completions):
                n, m = len(answer_texts), len(completions)
                raise ValueError(f"{self.__name__}: {n} answer_texts for {m} completions.")
            answers = [t.strip() for t in answer_texts]
        else:
            answers = [after_delimiter(completion_text(c), self.delimiter) for c in completions]
            answers = [None if a is None else a.strip() for a in answers]
        todo = [i for i, a in enumerate(answers) if a]
        pool = shared_pool(TARGET, self.timeout, self.num_workers, self.memory_bytes, WARMUP)
        results = pool.map([("parseable", answers[i], "block", self.max_chars) for i in todo])
        rewards: list[float | None] = [0.0] * len(completions)
        notes = Counter(missing=len(completions) - len(todo))
        for i, res in zip(todo, results):
            rewards[i] = float(res.value) if res.status == "ok" else None
            notes[res.status if res.status != "ok" else ("parsed" if res.value else "unparsed")] += 1
        report(self.__name__, rewards, notes, log_metric)
        return rewards


answer_format = FormatReward()
