"""A small process pool with real per-task timeouts: a task that overruns is killed with its worker.

`concurrent.futures.ProcessPoolExecutor` cannot kill one hung task, and math-verify's own timeouts rely on
`signal.alarm`, which only works in the main thread and cannot interrupt a long call into C (Python only runs
signal handlers between bytecodes; `10 ** 10 ** 10` is one bytecode). Here every task runs in a worker process
that is the main thread of its own interpreter; the worker arms its own interval timer (a soft timeout it reports
back), and the parent kills the worker when a task outlives `timeout + grace` (a hard timeout; the worker is
replaced). Workers are fresh interpreters started with `subprocess` (safe from a threaded parent, and unlike
multiprocessing's `spawn` they never re-import the caller's `__main__`, so scripts need no
`if __name__ == "__main__"` guard), capped by RLIMIT_AS, and ignore SIGINT; a worker exits when its parent's end
of the socket closes.

`WorkerPool.map` is thread-safe (calls are serialised) and works from any thread, e.g. TRL's async reward thread.

    >>> pool = WorkerPool("operator:add", timeout=1.0)
    >>> pool.map([(1, 2), (3, 4)])
    [TaskResult(status='ok', value=3), TaskResult(status='ok', value=7)]
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, NamedTuple

logger = logging.getLogger(__name__)


class TaskResult(NamedTuple):
    """status: 'ok' (value is the result), 'timeout', 'error' (value is the error text) or 'crashed'."""

    status: str
    value: Any = None


class SoftTimeout(BaseException):
    """Raised inside a worker by its interval timer. A BaseException so `except Exception` in libraries misses it."""


def resolve(target: str):
    """`"package.module:function"` -> the function."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _on_alarm(signum, frame):
    raise SoftTimeout


def _worker(conn: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    try:
        sys.path[:], target, warmup, timeout, memory_bytes = conn.recv()
        if memory_bytes:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        fn = resolve(target)
        if warmup:
            resolve(warmup)()  # imports and first-call set-up must not count against the first task's timeout
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises
        conn.send(("init_error", f"{type(e).__name__}: {e}"))
        return
    signal.signal(signal.SIGALRM, _on_alarm)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        idx, args = msg
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout)
            try:
                out = TaskResult("ok", fn(*args))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except SoftTimeout:
            out = TaskResult("timeout")
        except BaseException as e:  # noqa: BLE001 - any failure of one task is that task's result
            out = TaskResult("error", f"{type(e).__name__}: {str(e)[:200]}")
        conn.send((idx, out))


def worker_main() -> None:
    """Entry point of a worker process: `python -c "...; worker_main()" FD`."""
    _worker(Connection(int(sys.argv[1])))


_BOOT = "import sys; sys.path.insert(0, sys.argv[2]); from rewards.pool import worker_main; worker_main()"


class _Worker:
    def __init__(self, target: str, warmup: str | None, timeout: float, memory_bytes: int | None):
        parent, child = socket.socketpair()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT, str(child.fileno()), str(Path(__file__).resolve().parents[1])],
            pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, close_fds=True,
        )
        child.close()
        self.conn = Connection(parent.detach())
        self.conn.send((list(sys.path), target, warmup, timeout, memory_bytes))
        self.started = time.monotonic()
        self.ready = False
        self.task: tuple[int, float] | None = None  # (index, deadline)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.conn.close()


def _shutdown(workers: list[_Worker]) -> None:
    for w in workers:
        try:
            w.conn.send(None)
        except (OSError, ValueError):
            pass
    for w in workers:
        try:
            w.proc.wait(1)
        except subprocess.TimeoutExpired:
            pass
        w.kill()


class WorkerPool:
    """`num_workers` processes running `target(*args)`, each task bounded by `timeout` seconds.

    Args:
        target: "module:function", importable in a fresh interpreter.
        num_workers: worker processes (default: min(4, CPU count)).
        timeout: per-task soft timeout in seconds (the worker raises SoftTimeout and survives).
        grace: extra seconds before the parent kills a worker whose task ignores the soft timeout.
        memory_bytes: RLIMIT_AS of each worker (None: unlimited), so a runaway task fails with MemoryError.
        startup_timeout: seconds a worker may take to import `target` (and run `warmup`) before the pool gives up.
        warmup: optional "module:function" each worker calls once before taking tasks (lazy imports, caches).
        recycle_on_timeout: replace a worker after a soft timeout too (the interrupted task may have left caches
            half-updated); costs one interpreter start per timed-out task.
    """

    def __init__(
        self,
        target: str,
        num_workers: int | None = None,
        timeout: float = 5.0,
        grace: float = 1.0,
        memory_bytes: int | None = 4 << 30,
        startup_timeout: float = 120.0,
        recycle_on_timeout: bool = True,
        warmup: str | None = None,
    ):
        if not timeout > 0 or grace < 0:
            raise ValueError(f"timeout must be > 0 and grace >= 0, got timeout={timeout}, grace={grace}.")
        self.target, self.timeout, self.grace, self.memory_bytes = target, timeout, grace, memory_bytes
        self.num_workers = num_workers or min(4, os.cpu_count() or 1)
        self.startup_timeout, self.recycle_on_timeout, self.warmup = startup_timeout, recycle_on_timeout, warmup
        self.restarts = 0
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)

    def _spawn(self) -> _Worker:
        w = _Worker(self.target, self.warmup, self.timeout, self.memory_bytes)
        self._workers.append(w)
        return w

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self._workers.remove(w)
        self.restarts += 1
        self._spawn()

    def map(self, tasks: list[tuple]) -> list[TaskResult]:
        """Run `target(*args)` for each args tuple; results in order. Never raises for a task's own failure."""
        if not tasks:
            return []
        results: list[TaskResult | None] = [None] * len(tasks)
        with self._lock:
            while len(self._workers) < self.num_workers:
                self._spawn()
            try:
                self._run(tasks, results)
            except BaseException:
                # A worker that failed to start, or an interrupt: no worker may keep a task of this call.
                _shutdown(self._workers)
                self._workers.clear()
                raise
        return results  # type: ignore[return-value]

    def _run(self, tasks: list[tuple], results: list) -> None:
        pending = deque(range(len(tasks)))
        while pending or any(w.task for w in self._workers):
            now = time.monotonic()
            for w in self._workers:
                if w.ready and w.task is None and pending:
                    idx = pending.popleft()
                    w.conn.send((idx, tasks[idx]))
                    w.task = (idx, now + self.timeout + self.grace)
            deadlines = [w.task[1] for w in self._workers if w.task]
            deadlines += [w.started + self.startup_timeout for w in self._workers if not w.ready]
            wait_for = max(0.0, min(deadlines) - now) if deadlines else None
            ready = wait([w.conn for w in self._workers], wait_for)  # EOF on a connection = its worker died
            for w in list(self._workers):
                if w.conn in ready:
                    self._receive(w, results)
            now = time.monotonic()
            for w in list(self._workers):
                if w.task and now > w.task[1]:
                    results[w.task[0]] = TaskResult("timeout")
                    logger.debug("Killing worker %d: task %d overran its deadline.", w.proc.pid, w.task[0])
                    self._replace(w)
                elif not w.ready and now > w.started + self.startup_timeout:
                    raise RuntimeError(f"A worker for {self.target} did not start in {self.startup_timeout} s.")

    def _receive(self, w: _Worker, results: list) -> None:
        try:
            msg = w.conn.recv()
        except (EOFError, OSError):
            code = w.proc.wait()
            if not w.ready:
                raise RuntimeError(f"A worker for {self.target} died while starting (exit code {code}).") from None
            if w.task:  # died mid-task: a crash (segfault, out of memory killer) counts against that task only
                results[w.task[0]] = TaskResult("crashed", f"exit code {code}")
            self._replace(w)
            return
        if msg[0] == "ready":
            w.ready = True
        elif msg[0] == "init_error":
            self._workers.remove(w)
            w.kill()
            raise RuntimeError(f"Workers cannot load {self.target}: {msg[1]}")
        else:
            idx, out = msg
            results[idx] = out
            w.task = None
            if out.status == "timeout" and self.recycle_on_timeout:
                self._replace(w)

    def close(self) -> None:
        """Stop all workers (also done automatically at garbage collection and interpreter exit)."""
        with self._lock:
            self._finalizer()
            self._workers.clear()
            self._finalizer = weakref.finalize(self, _shutdown, self._workers)

    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]
