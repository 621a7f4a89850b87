"""Test an untrusted program's function against a task's tests, with a verdict the program cannot reach.

Why this design: a program that runs in the same interpreter as its tests controls that interpreter, so it can
forge any verdict the interpreter reports (patch the modules the harness reports with, reach the harness's
variables through frames, write "passed" to the report descriptor, exit with status 0). Here the program and the
tests never share a process. Per test, `run_test` starts two fresh interpreters:

- the **sandbox** (`sandbox_child.py`): confined (`sandbox_confine.py`: rlimits, private network, mount and
  root, an unprivileged uid, Landlock, seccomp), it runs the program's module code and then answers calls of its
  functions. It holds two pipes to the judge and its own stdout/stderr files, nothing else;
- the **judge** (`sandbox_judge.py`): trusted, it runs the task's test with `candidate` bound to a stub that
  forwards each call over the pipe as plain data (`sandbox_wire.py`: JSON of builtin types, no pickle) and
  returns the decoded answer. The judge alone computes the verdict and writes it to a pipe only this process holds.

So the only influence the program has on the verdict is the data its functions answer with, i.e. being correct.
A failed assertion, an exception, a timeout (the judge's wall clock, which starts when the program starts), a
process that ends or breaks the protocol before the test finishes: all fail. Deviations from the reference
harness are listed in `sandbox_judge.py`; `docs/sandbox.md` has the layer table (what needs root or x86-64).

    >>> run_test("def add(a, b):\\n    return a + b\\n", "def check(f):\\n    assert f(1, 2) == 3\\n", "add").status
    'passed'
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
CHILD, JUDGE = HERE / "sandbox_child.py", HERE / "sandbox_judge.py"
STATUSES = ("passed", "failed", "timeout", "memory", "output_limit", "crashed", "error")
GRACE = 2.0  # seconds past the judge's own deadlines before this process kills the judge too


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed test."""

    wall_seconds: float = 10.0
    """Wall-clock limit of the program (its module code and every call), counted from when it starts running."""
    cpu_seconds: int | None = None
    """RLIMIT_CPU of the sandbox (SIGXCPU, then SIGKILL a second later). None: ceil(wall_seconds)."""
    memory_bytes: int = 1 << 30
    """RLIMIT_AS: address space of the sandbox (the interpreter itself needs ~20 MB); the judge gets twice this."""
    file_bytes: int = 16 << 20
    """RLIMIT_FSIZE: largest file the sandbox may write, stdout and stderr included; also the largest reply."""
    open_files: int = 64
    """RLIMIT_NOFILE."""
    disk_bytes: int = 64 << 20
    """Size of the private tmpfs working directory (root only; elsewhere only `file_bytes` per file applies)."""
    max_threads: int = 32
    """Threads of the sandbox, its main thread included (RLIMIT_NPROC as root; a Python-level count elsewhere)."""
    startup_seconds: float = 30.0
    """How long the sandbox may take to start and confine itself before the test is unscorable (not counted
    against the program: a loaded machine starts interpreters slowly)."""

    def __post_init__(self) -> None:
        if not self.wall_seconds > 0:
            raise ValueError(f"wall_seconds must be > 0, got {self.wall_seconds}.")
        if self.memory_bytes < 64 << 20:
            raise ValueError(f"memory_bytes={self.memory_bytes} is below the 64 MiB the interpreter needs to start.")
        if self.max_threads < 1:
            raise ValueError(f"max_threads must be >= 1 (the main thread), got {self.max_threads}.")

    def to_child(self) -> dict:
        d = asdict(self)
        d["cpu_seconds"] = max(1, self.cpu_seconds or math.ceil(self.wall_seconds))
        return d


@dataclass
class SandboxResult:
    """How a sandboxed test ended.

    Attributes:
        status: one of STATUSES. `error` means the sandbox or the task itself failed (the sample is not scorable).
        reason: a human-readable reason, e.g. "passed", "failed: AssertionError: ...", "timeout (wall 3 s)".
        seconds: wall time of the whole test, start-up included.
        run_seconds: wall time of the program, from when it started running (its clock) to the verdict.
        guards: the confinement layers the sandbox installed (empty if it never got that far).
        stdout, stderr: the last few KB of the sandbox's streams.
    """

    status: str
    reason: str
    seconds: float
    run_seconds: float = 0.0
    guards: list[str] = field(default_factory=list)
    stdout: str = ""
    stderr: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


PROBE = """
import importlib, json, os, sys
dirs = [p for p in sys.path if os.path.isdir(p)]
dirs = sorted(d for d in dirs if not any(d.startswith(o + os.sep) for o in dirs))
for d in dirs:
    for sub, _, names in os.walk(d):
        if os.path.basename(sub) == "lib-dynload":
            for name in names:
                try:
                    importlib.import_module(name.split(".")[0])
                except BaseException:
                    pass
mapped = {line.split(maxsplit=5)[5].strip() for line in open("/proc/self/maps") if len(line.split()) == 6}
files = sorted(f for f in mapped if f.startswith("/") and os.path.isfile(f)
               and not any(f.startswith(d + os.sep) for d in dirs))
links = []  # the sonames the dynamic loader looks for ("libffi.so.8" -> "libffi.so.8.1.2"), not ".so" dev links
for folder in sorted({os.path.dirname(f) for f in files}):
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if ".so." in name and os.path.islink(path) and os.path.realpath(path) in files:
            links.append([path, os.readlink(path)])
print(json.dumps({"dirs": dirs, "files": files, "links": links}))
"""


@functools.lru_cache(maxsize=1)
def python_paths() -> dict:
    """What the sandbox's interpreter may read: its standard library (`dirs`), the shared libraries it and its
    extension modules load (`files`, with the `links` the dynamic loader finds them by). Probed once."""
    out = subprocess.run([sys.executable, "-I", "-S", "-c", PROBE], capture_output=True, text=True, timeout=120,
                         stdin=subprocess.DEVNULL, check=True)
    return json.loads(out.stdout)


def _remove_tree(path: str) -> None:
    """Remove the working directory even where parts of it were made unwritable."""

    def make_writable_and_retry(func, p, _exc):
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            logger.warning("Could not remove %s from the sandbox directory %s.", p, path)

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=make_writable_and_retry)
    else:
        shutil.rmtree(path, onerror=make_writable_and_retry)


def _tail(f, limit: int = 4096) -> str:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - limit))
    return f.read().decode("utf-8", "replace")


def _wait_exit(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait until `proc` exits WITHOUT reaping it, so its pid (= process group id) cannot be reused yet."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # no pidfd (Linux < 5.3): reap directly; the group is killed before reaping
        try:
            proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(max(0.0, timeout) * 1000))
    finally:
        os.close(fd)


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.returncode is not None:  # reaped: the group id may belong to someone else by now
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_verdict(judge: subprocess.Popen, limits: SandboxLimits) -> tuple[list | None, dict | None, float]:
    """(the guards, once the program started; the verdict; the program's seconds), from the judge's stdout. The
    judge keeps its own deadlines; these are the backstops in case it cannot (a test stuck in one long C call)."""
    fd, buffer, clock, verdict = judge.stdout.fileno(), b"", None, None
    started = time.monotonic()
    deadline = time.monotonic() + limits.startup_seconds + GRACE
    while verdict is None:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(fd, 65536) if ready else b""
        if not chunk:  # EOF, or a backstop passed
            break
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            message = json.loads(line)  # only the judge writes here (the test's own prints go to /dev/null)
            if "clock" in message:
                clock, started = message["clock"], time.monotonic()
                deadline = started + limits.wall_seconds + GRACE
            else:
                verdict = message
    run_seconds = time.monotonic() - started if clock is not None else 0.0
    return clock, verdict, (verdict or {}).get("run_seconds", run_seconds)


def _classify(verdict: dict | None, clock, child: subprocess.Popen, limits: SandboxLimits,
              output_bytes: int, stderr: str) -> tuple[str, str]:
    cpu = limits.to_child()["cpu_seconds"]
    if verdict is None:
        if clock is None:
            return "error", f"error: the sandbox failed before running the program: {stderr[-500:].strip()}"
        return "timeout", f"timeout (wall {limits.wall_seconds:g} s; the test did not finish)"
    status, reason = verdict["status"], verdict["reason"]
    if status == "passed":
        return status, reason
    if status == "error" and clock is None and stderr.strip():
        return status, f"{reason} ({stderr[-500:].strip()})"
    if output_bytes >= limits.file_bytes or child.returncode == -signal.SIGXFSZ:
        return "output_limit", f"output limit ({limits.file_bytes} bytes)"
    if status == "failed" and verdict.get("exception") == "MemoryError":
        return "memory", "memory (MemoryError)"
    if status != "gone":
        return status, reason
    code = child.returncode
    if code == -signal.SIGXCPU or (code == -signal.SIGKILL and verdict.get("run_seconds", 0) >= cpu):
        return "timeout", f"timeout (cpu {cpu} s)"
    if code is not None and code < 0:
        return "crashed", f"crashed: {signal.Signals(-code).name}"
    return "failed", f"failed: exited with code {code} before the test finished"


def run_test(program: str, test: str, entry_point: str, prelude: str | None = None,
             limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `program` in the sandbox and `test`'s `check(entry_point)` in the judge (after `prelude`, trusted code
    such as the task's prompt that defines helpers the test uses). Thread-safe; no global state."""
    limits = limits or SandboxLimits()
    start = time.perf_counter()
    workdir = tempfile.mkdtemp(prefix="infill-rl-sandbox-")
    calls_read, calls_write = os.pipe()
    replies_read, replies_write = os.pipe()
    pipes = [calls_read, calls_write, replies_read, replies_write]
    config = json.dumps({"limits": limits.to_child(), "allowed": python_paths()})
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
    task = {"prelude": prelude, "test": test, "entry_point": entry_point, "wall_seconds": limits.wall_seconds,
            "startup_seconds": limits.startup_seconds, "max_reply_bytes": limits.file_bytes,
            "memory_bytes": 2 * limits.memory_bytes}
    child = judge = None
    try:
        Path(workdir, "program.py").write_text(program, encoding="utf-8")
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as judge_err:
            try:
                child = subprocess.Popen(
                    [sys.executable, "-I", "-S", str(CHILD), config, str(calls_read), str(replies_write)],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=workdir, env=env,
                    start_new_session=True, close_fds=True, pass_fds=(calls_read, replies_write),
                )
                judge = subprocess.Popen(
                    [sys.executable, "-I", "-S", str(JUDGE), str(calls_write), str(replies_read)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=judge_err, env={"LANG": "C.UTF-8"},
                    close_fds=True, pass_fds=(calls_write, replies_read),
                )
            except OSError as e:
                return SandboxResult("error", f"error: could not start the sandbox: {e}", time.perf_counter() - start)
            for fd in pipes:  # the two processes hold their ends now; EOF must mean one of them is gone
                os.close(fd)
            pipes = []
            try:
                judge.stdin.write(json.dumps(task).encode())
                judge.stdin.close()
            except BrokenPipeError:
                pass
            clock, verdict, run_seconds = _read_verdict(judge, limits)
            if verdict is not None and verdict["status"] == "gone":
                _wait_exit(child, 1.0)  # let an exiting program finish exiting: its exit status is the reason
            _kill_group(child)
            child.wait()
            seconds = time.perf_counter() - start
            stdout, stderr = _tail(out), _tail(err)
            output_bytes = out.seek(0, os.SEEK_END) + err.seek(0, os.SEEK_END)
            if verdict is None and _tail(judge_err).strip():
                logger.warning("The sandbox judge failed: %s", _tail(judge_err, 2000))
    finally:
        for fd in pipes:
            os.close(fd)
        if judge is not None:
            judge.kill()
            judge.wait()
        if child is not None and child.returncode is None:
            _kill_group(child)
            child.wait()
        _remove_tree(workdir)
    status, reason = _classify(verdict, clock, child, limits, output_bytes, stderr)
    if clock is not None:
        _log_guards_once(clock)
    return SandboxResult(status, reason, seconds, run_seconds, clock or [], stdout, stderr)


_guards_logged = False


def _log_guards_once(guards: list[str]) -> None:
    global _guards_logged
    if _guards_logged:
        return
    _guards_logged = True
    logger.info("Sandbox confinement layers: %s.", ", ".join(guards))
    missing = [g for g in ("mountns", "uid", "seccomp") if g not in guards]
    if not any(g.startswith("landlock") for g in guards):
        missing.append("landlock")
    if missing:
        logger.warning(
            "Sandbox without %s (%s): %s See docs/sandbox.md for what each layer needs.", ", ".join(missing),
            "not root" if os.geteuid() != 0 else "root", _consequence(missing),
        )


def _consequence(missing: list[str]) -> str:
    out = []
    if "mountns" in missing and "landlock" in missing:
        out.append("reads of host files are stopped only by the Python-level guard, which ctypes bypasses.")
    if "seccomp" in missing:
        out.append("process creation and signals are stopped by rlimits and the Python-level guard only.")
    if "uid" in missing:
        out.append("the thread limit is Python-level only.")
    return " ".join(out) or "the remaining layers cover reads, writes, processes and signals."
