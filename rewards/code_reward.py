"""Code correctness reward for HumanEval-style tasks: the task's tests judge the completion's function, sandboxed.

The completion (after the prompt when prompt + completion compiles, see `build_program`; unwrapped from a Markdown
code fence) runs in a sandbox and the task's `check(candidate)` runs in a separate trusted judge that calls the
candidate over a data-only pipe (`rewards.sandbox.run_test`, whose docstring argues the design): the verdict is
computed where the completion cannot reach it. Tests run in parallel from a thread pool, two processes each.

Reward: 1.0 passed, 0.0 failed (wrong answer, exception, timeout, memory or output limit, early exit; also, without
starting anything, a completion that is empty, longer than `max_chars` or not valid Python), None when the sandbox
or the task itself failed (not scorable).

    >>> code_tests(["    return a + b\\n"], prompts=["def add(a, b):\\n"],
    ...            test=["def check(f):\\n    assert f(1, 2) == 3\\n"], entry_point=["add"])
    [1.0]
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from rewards.common import column, completion_text, report
from rewards.sandbox import SandboxLimits, SandboxResult, run_test

MAX_CHARS = 100_000  # the longest HumanEval canonical solution is ~1,200 characters
FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(text: str, entry_point: str | None = None) -> str:
    """The code in a completion: the fenced block defining `entry_point` (else the first fenced block), or the
    completion as is when it has no code fence."""
    blocks = FENCE.findall(text)
    if not blocks:
        return text
    if entry_point:
        for block in blocks:
            if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", block, re.MULTILINE):
                return block
    return blocks[0]


def _compiles(source: str) -> bool:
    try:
        compile(source, "<program>", "exec")
    except (SyntaxError, ValueError):
        return False
    return True


def build_program(completion: str, entry_point: str, prompt=None) -> str:
    """The code the sandbox runs: the prompt followed by the completion (a continuation of the prompt's function,
    or a full definition that replaces the prompt's stub) when that compiles, else the completion alone (a chat
    prompt, or prose). If nothing compiles, the most likely candidate is kept so that its SyntaxError is the reason.
    The tests are not part of it: they run in the judge."""
    code = extract_code(completion, entry_point)
    candidates = [prompt + code, prompt + "\n" + code] if isinstance(prompt, str) and prompt else []
    candidates.append(code)
    return next((c for c in candidates if _compiles(c)), candidates[0])


def prelude(prompt) -> str | None:
    """The trusted code the judge runs before the test: the task's prompt when it is Python (it defines helpers
    some tests call, e.g. HumanEval/32's `poly`), so the completion cannot redefine them for the test."""
    return prompt if isinstance(prompt, str) and prompt and _compiles(prompt) else None


def precheck(completion: str, program: str, max_chars: int) -> SandboxResult | None:
    """A failed result for a completion that cannot pass, decided without starting anything; else None."""
    start = time.perf_counter()
    reason = None
    if len(completion) > max_chars:
        reason = f"failed: the completion is {len(completion)} characters long, over the limit of {max_chars}"
    elif not completion.strip():
        reason = "failed: empty completion"
    else:
        try:
            compile(program, "program.py", "exec")
        except SyntaxError as e:
            reason = f"failed: {type(e).__name__}: {e.msg} (line {e.lineno})"
        except (ValueError, RecursionError, MemoryError, OverflowError) as e:
            reason = f"failed: {type(e).__name__}: {str(e)[:200]}"
    return None if reason is None else SandboxResult("failed", reason, time.perf_counter() - start)


def run_tests(
    jobs: list[tuple[str, str, str, str | None]], limits: SandboxLimits | None = None, max_workers: int | None = None
) -> list[SandboxResult]:
    """`run_test(program, test, entry_point, prelude)` for each job, `max_workers` at a time (default: CPU count)."""
    if not jobs:
        return []
    workers = max(1, min(len(jobs), max_workers or os.cpu_count() or 1))
    with ThreadPoolExecutor(workers, thread_name_prefix="sandbox") as ex:
        return list(ex.map(lambda job: run_test(*job, limits=limits), jobs))


class CodeReward:
    """Callable HumanEval-style reward; see the module docstring.

    Columns: `test` (defines `check(candidate)`), `entry_point`, and the prompt (TRL passes it as `prompts`).
    """

    def __init__(self, limits: SandboxLimits | None = None, max_workers: int | None = None, name: str = "code_tests",
                 max_chars: int = MAX_CHARS):
        self.limits, self.max_workers, self.max_chars = limits or SandboxLimits(), max_workers, max_chars
        self.__name__ = name
        self.last_results: list[SandboxResult] = []  # of the latest call, for inspection and logging

    def __repr__(self) -> str:
        return f"CodeReward(limits={self.limits}, max_workers={self.max_workers}, name={self.__name__!r})"

    def __call__(self, completions: list, log_metric=None, **kwargs) -> list[float | None]:
        n = len(completions)
        tests = column(kwargs, ("test",), n, self.__name__)
        entry_points = column(kwargs, ("entry_point",), n, self.__name__)
        has_prompt = any(kwargs.get(k) is not None for k in ("prompts", "prompt"))
        prompts = column(kwargs, ("prompts", "prompt"), n, self.__name__) if has_prompt else [None] * n
        results: list[SandboxResult | None] = []
        jobs = []
        for c, t, e, p in zip(completions, tests, entry_points, prompts):
            text = completion_text(c)
            program = build_program(text, e, p) if len(text) <= self.max_chars else ""
            results.append(precheck(text, program, self.max_chars))
            if results[-1] is None:
                jobs.append((program, t, e, prelude(p)))
        ran = iter(run_tests(jobs, self.limits, self.max_workers))
        self.last_results = [r if r is not None else next(ran) for r in results]
        rewards = [None if r.status == "error" else float(r.passed) for r in self.last_results]
        notes = Counter(r.status for r in self.last_results)
        report(self.__name__, rewards, notes, log_metric)
        return rewards


code_tests = CodeReward()
