"""Helpers shared by the outcome rewards: completion text, gold columns, unscorable-sample reporting, shared pools."""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Sequence

from rewards.pool import WorkerPool

logger = logging.getLogger(__name__)

_pools: dict[tuple, WorkerPool] = {}
_pools_lock = threading.Lock()


def completion_text(completion) -> str:
    """A completion as text: a string as is; a chat completion (list of messages) as its assistant turns joined.

    Message content may be a string or a list of parts ({"type": "text", "text": ...}); other parts are skipped.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    messages = [m for m in completion if m.get("role", "assistant") == "assistant"] or list(completion)
    out = []
    for m in messages:
        content = m.get("content") or ""
        if isinstance(content, str):
            out.append(content)
        else:
            out.extend(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type", "text") == "text")
    return "".join(out)


def column(kwargs: dict, names: Sequence[str], n: int, reward: str) -> list:
    """The first of `names` present in the dataset columns, checked to hold one value per completion."""
    for name in names:
        if kwargs.get(name) is not None:
            values = list(kwargs[name])
            if len(values) != n:
                raise ValueError(f"{reward}: column {name!r} has {len(values)} values for {n} completions.")
            return values
    raise ValueError(
        f"{reward} needs a dataset column named {' or '.join(map(repr, names))}; got columns {sorted(kwargs)}. "
        "Rename the gold column in the dataset, or wrap the reward to map it."
    )


_WARNED: set = set()
_SCORED = ("correct", "wrong", "no_answer", "hedged", "too_long", "passed", "failed")
# notes of scorable samples; a reward that reads two blocks prefixes the note of the block that failed
SCORED_NOTES = _SCORED + ("both_wrong",) + tuple(f"{b}_{note}" for b in ("answer", "reasoning") for note in _SCORED)


def report(name: str, rewards: list[float | None], notes: Counter, log_metric: Callable | None = None) -> None:
    """Log the unscorable count of one call (warning) and the notes (debug); forward the rate to TRL's metrics."""
    missing = sum(r is None for r in rewards)
    if missing:
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(notes.items()))
        reasons = (name, frozenset(k for k in notes if k not in SCORED_NOTES))
        log = logger.debug if reasons in _WARNED else logger.warning  # once per reward and set of reasons
        _WARNED.add(reasons)
        log("%s: %d of %d samples not scorable, reward None (%s).", name, missing, len(rewards), counts)
    logger.debug("%s: %s", name, dict(notes))
    if log_metric is not None and rewards:
        log_metric(f"reward/{name}_unscorable", missing / len(rewards))


def shared_pool(
    target: str, timeout: float, num_workers: int | None, memory_bytes: int | None, warmup: str | None = None
) -> WorkerPool:
    """One pool per process and configuration (a forked child never reuses its parent's workers)."""
    key = (os.getpid(), target, timeout, num_workers, memory_bytes, warmup)
    with _pools_lock:
        if key not in _pools:
            _pools[key] = WorkerPool(
                target, num_workers=num_workers, timeout=timeout, memory_bytes=memory_bytes, warmup=warmup
            )
        return _pools[key]


def close_pools() -> None:
    """Stop every shared worker pool of this process (they also stop at interpreter exit)."""
    with _pools_lock:
        for key in [k for k in _pools if k[0] == os.getpid()]:
            _pools.pop(key).close()
