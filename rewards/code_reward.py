"""Code correctness reward for HumanEval-style tasks: run the completion against the task's tests in a sandbox.

Program = [prompt] + completion + test + `check(entry_point)`, executed by `rewards.sandbox.run_program`
(own session and process group, rlimits, no network, no process creation, writes only in a temporary directory,
group killed at the deadline). The prompt is prepended when prompt + completion compiles (see `build_program`);
a completion inside a Markdown code fence is unwrapped.
Programs run in parallel from a thread pool, one subprocess each.

Reward: 1.0 passed, 0.0 failed (wrong answer, exception, timeout, memory or output limit: the program's own
fault), None when the sandbox itself failed to run the program (not scorable).

    >>> code_tests(["    return a + b\\n"], prompts=["def add(a, b):\\n"],
    ...            test=["def check(f):\\n    assert f(1, 2) == 3\\n"], entry_point=["add"])
    [1.0]
"""

from __future__ import annotations

import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from rewards.common import column, completion_text, report
from rewards.sandbox import SandboxLimits, SandboxResult, run_program

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


def build_program(completion: str, test: str, entry_point: str, prompt=None) -> str:
    """The program that passes iff the completion's `entry_point` passes `test`'s `check`.

    The code is the prompt followed by the completion (a continuation of the prompt's function, or a full
    definition that replaces the prompt's stub) when that compiles, else the completion alone (a chat prompt, or
    prose). If nothing compiles, the most likely candidate is kept so that the SyntaxError becomes the reason.
    """
    code = extract_code(completion, entry_point)
    candidates = [prompt + code, prompt + "\n" + code] if isinstance(prompt, str) and prompt else []
    candidates.append(code)
    body = next((c for c in candidates if _compiles(c)), candidates[0])
    return f"{body}\n\n{test}\n\ncheck({entry_point})\n"


def run_tests(
    programs: list[str], limits: SandboxLimits | None = None, max_workers: int | None = None
) -> list[SandboxResult]:
    """Run each program in its own sandbox, `max_workers` at a time (default: CPU count)."""
    if not programs:
        return []
    workers = max(1, min(len(programs), max_workers or os.cpu_count() or 1))
    with ThreadPoolExecutor(workers, thread_name_prefix="sandbox") as ex:
        return list(ex.map(lambda p: run_program(p, limits), programs))


class CodeReward:
    """Callable HumanEval-style reward; see the module docstring.

    Columns: `test` (defines `check(candidate)`), `entry_point`, and the prompt (TRL passes it as `prompts`).
    """

    def __init__(self, limits: SandboxLimits | None = None, max_workers: int | None = None, name: str = "code_tests"):
        self.limits, self.max_workers = limits or SandboxLimits(), max_workers
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
        programs = [
            build_program(completion_text(c), t, e, p) for c, t, e, p in zip(completions, tests, entry_points, prompts)
        ]
        self.last_results = run_tests(programs, self.limits, self.max_workers)
        rewards = [None if r.status == "error" else float(r.passed) for r in self.last_results]
        notes = Counter(r.status for r in self.last_results)
        report(self.__name__, rewards, notes, log_metric)
        return rewards


code_tests = CodeReward()
