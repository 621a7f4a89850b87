"""The worker pool's real timeouts, and math rewards on pathological inputs from the main and a worker thread."""

import logging
import signal
import threading
import time

import pytest

from rewards.common import close_pools
from rewards.math_reward import MathReward, math_accuracy
from rewards.pool import WorkerPool

psutil = pytest.importorskip("psutil")

TIMEOUT, GRACE = 0.5, 1.0
SLACK = 4.0  # a killed worker's replacement must start (import math-verify) before the next sample runs

PATHOLOGICAL = {
    "million_chars": ("#### 5", "\\boxed{" + "1" * 10**6 + "}"),
    "million_chars_latex": ("5", "\\boxed{" + "x+" * 500_000 + "}"),
    "tower": ("#### 5", "\\boxed{10^{10^{10}}}"),
    "tower_latex": ("5", "The answer is \\boxed{10^{10^{10}}}"),
    "nested_braces": ("5", "\\boxed{" + "{" * 2000 + "5" + "}" * 2000 + "}"),
    "nested_fracs": ("5", "\\boxed{" + "\\frac{1}{" * 200 + "2" + "}" * 200 + "}"),
    "unclosed_braces": ("5", "\\boxed{" * 100_000),
}


def ignore_alarm_and_sleep(seconds: float) -> str:
    """A task the worker's soft timeout cannot interrupt (SIGALRM blocked), like a long C call."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(seconds)
    return "finished"


def descendants() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def score_each(reward: MathReward) -> dict[str, tuple[float | None, float]]:
    """Score every pathological input in its own call: {name: (reward, seconds)}."""
    out = {}
    for name, (gold, text) in PATHOLOGICAL.items():
        start = time.perf_counter()
        (value,) = reward([text], answer=[gold])
        out[name] = (value, time.perf_counter() - start)
    return out


def check(results: dict) -> None:
    for name, (value, seconds) in results.items():
        assert value in (0.0, 1.0, None), name
        assert seconds < TIMEOUT + GRACE + SLACK, f"{name} took {seconds:.1f} s"


def test_pathological_inputs_main_thread_and_worker_thread():
    before = descendants()
    reward = MathReward(timeout=TIMEOUT, num_workers=2, max_chars=None, name="pathological")
    reward.pool.map([("score", "1", "1", "text", None)])  # start the workers outside the timed calls
    check(score_each(reward))
    box: dict = {}
    worker = threading.Thread(target=lambda: box.update(score_each(reward)))
    worker.start()
    worker.join(len(PATHOLOGICAL) * (TIMEOUT + GRACE + SLACK))
    assert not worker.is_alive(), "scoring hung in a worker thread"
    check(box)
    assert reward([r"\boxed{5}"], answer=["#### 5"]) == [1.0]  # the pool still works afterwards
    assert len(reward.pool.worker_pids()) == 2  # killed workers were replaced, not accumulated
    # With the default length cap, a huge answer is not even parsed.
    (value,) = math_accuracy(["\\boxed{" + "1" * 10**6 + "}"], answer=["#### 5"])
    assert value == 0.0
    close_pools()
    deadline = time.monotonic() + 10
    while descendants() - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert descendants() - before == set(), "worker processes leaked"


def test_timeouts_give_none_with_a_logged_count(caplog):
    metrics = {}
    reward = MathReward(timeout=0.5, num_workers=1, max_chars=None, name="tiny_timeout")
    gold, text = PATHOLOGICAL["nested_braces"]
    with caplog.at_level(logging.WARNING, logger="rewards"):
        out = reward([text, r"\boxed{5}"], answer=[gold, gold], log_metric=metrics.__setitem__)
    assert out == [None, 1.0]
    assert reward.totals["timeout"] == 1 and reward.totals["correct"] == 1
    assert "1 of 2 samples not scorable" in caplog.text
    assert metrics == {"reward/tiny_timeout_unscorable": 0.5, "reward/tiny_timeout_hedged": 0.0}
    reward.pool.close()


def test_a_hung_worker_is_killed_and_replaced():
    pool = WorkerPool(f"{__name__}:ignore_alarm_and_sleep", num_workers=1, timeout=0.3, grace=0.3)
    try:
        pool.map([(0.0,)])
        (old,) = pool.worker_pids()
        start = time.perf_counter()
        results = pool.map([(60.0,), (0.0,)])
        assert time.perf_counter() - start < 0.6 + SLACK
        assert [r.status for r in results] == ["timeout", "ok"] and results[1].value == "finished"
        assert pool.restarts == 1 and pool.worker_pids() != [old]
        assert not psutil.pid_exists(old)
    finally:
        pool.close()


def test_soft_timeouts_errors_and_crashes_are_results():
    for recycle in (False, True):
        pool = WorkerPool("time:sleep", num_workers=2, timeout=0.3, grace=2.0, recycle_on_timeout=recycle)
        try:
            assert [r.status for r in pool.map([(5,), (0,)])] == ["timeout", "ok"]
            assert pool.restarts == int(recycle)  # the soft timeout interrupted the task; was the worker kept?
        finally:
            pool.close()
    pool = WorkerPool("operator:truediv", num_workers=1, timeout=1.0)
    try:
        out = pool.map([(1, 0), (1, 2)])
        assert out[0].status == "error" and "ZeroDivisionError" in out[0].value and out[1].value == 0.5
    finally:
        pool.close()
    pool = WorkerPool("os:_exit", num_workers=1, timeout=1.0)
    try:
        assert [r.status for r in pool.map([(3,)])] == ["crashed"] and pool.restarts == 1
    finally:
        pool.close()


def test_a_target_that_cannot_load_raises():
    pool = WorkerPool("no_such_module_xyz:f", num_workers=1)
    with pytest.raises(RuntimeError, match="cannot load no_such_module_xyz:f"):
        pool.map([(1,)])
    assert pool.worker_pids() == []
