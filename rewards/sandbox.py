"""Run an untrusted Python program in a sandboxed subprocess and report how it ended.

Parent side of the sandbox (the child side, `sandbox_child.py`, describes the confinement layers). Per run:
a fresh temporary working directory (removed afterwards), a stripped environment, `python -I -S` (no site-packages,
no environment variables), its own session and process group, a wall-clock deadline after which the whole process
group is killed, and rlimits on memory, CPU seconds and output size. Runs are independent, so callers may run many
at once from a thread pool: nothing here uses `preexec_fn` or touches global state.

    >>> run_program("assert 1 + 1 == 2").status
    'passed'
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
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

CHILD = Path(__file__).with_name("sandbox_child.py")
STATUSES = ("passed", "failed", "timeout", "memory", "output_limit", "crashed", "error")


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed run."""

    wall_seconds: float = 10.0
    """Wall-clock deadline; the whole process group is killed when it passes."""
    cpu_seconds: int | None = None
    """RLIMIT_CPU (SIGXCPU, then SIGKILL a second later). None: ceil(wall_seconds)."""
    memory_bytes: int = 1 << 30
    """RLIMIT_AS: address space of the child (the interpreter itself needs ~20 MB)."""
    file_bytes: int = 16 << 20
    """RLIMIT_FSIZE: largest file the child may write, stdout and stderr included."""
    open_files: int = 64
    """RLIMIT_NOFILE."""
    disk_bytes: int = 64 << 20
    """Size of the private tmpfs working directory (root only; elsewhere only `file_bytes` per file applies)."""

    def __post_init__(self) -> None:
        if not self.wall_seconds > 0:
            raise ValueError(f"wall_seconds must be > 0, got {self.wall_seconds}.")
        if self.memory_bytes < 64 << 20:
            raise ValueError(f"memory_bytes={self.memory_bytes} is below the 64 MiB the interpreter needs to start.")

    def to_child(self) -> dict:
        d = asdict(self)
        d["cpu_seconds"] = max(1, self.cpu_seconds or math.ceil(self.wall_seconds))
        return d


@dataclass
class SandboxResult:
    """How a sandboxed program ended.

    Attributes:
        status: one of STATUSES. `error` means the sandbox itself failed (the sample is not scorable).
        reason: a human-readable reason, e.g. "passed", "failed: AssertionError: ...", "timeout (wall 3.0 s)".
        seconds: wall time of the run.
        guards: the confinement layers the child installed (empty if it never got that far).
        stdout, stderr: the last few KB of each stream.
    """

    status: str
    reason: str
    seconds: float
    guards: list[str] = field(default_factory=list)
    stdout: str = ""
    stderr: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _remove_tree(path: str) -> None:
    """Remove the working directory even where the program made parts of it unwritable."""

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


def _read_report(fd: int, nonce: str) -> tuple[list[str] | None, dict | None]:
    """(the guards the child installed, None if it never got as far as running the program; its final status)."""
    os.set_blocking(fd, False)
    chunks = []
    try:
        while len(chunks) < 64 and (chunk := os.read(fd, 65536)):
            chunks.append(chunk)
    except BlockingIOError:
        pass
    guards, report = None, None
    for line in b"".join(chunks).decode("utf-8", "replace").splitlines():
        if not line.startswith(nonce + " "):
            continue  # the program may write junk to the pipe, but not with the nonce
        payload = line[len(nonce) + 1 :]
        try:
            if payload.startswith("start "):
                guards = json.loads(payload[len("start ") :])
            else:
                report = json.loads(payload)
        except ValueError:
            pass
    return guards, report


def _wait_exit(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait until the child exits WITHOUT reaping it, so its pid (= process group id) cannot be reused yet."""
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


def _classify(returncode: int, report: dict | None, limits: SandboxLimits, seconds: float) -> tuple[str, str]:
    if report is not None:
        status, detail = report["status"], report.get("detail", "")
        if status == "failed":
            return status, f"failed: {detail}"
        return status, "memory (MemoryError)" if status == "memory" else status
    if returncode == -signal.SIGXCPU:
        return "timeout", f"timeout (cpu {limits.to_child()['cpu_seconds']} s)"
    if returncode == -signal.SIGKILL:  # nobody but the kernel kills a child that exited before its deadline
        if seconds >= limits.to_child()["cpu_seconds"]:
            return "timeout", f"timeout (cpu {limits.to_child()['cpu_seconds']} s, SIGXCPU ignored)"
        return "crashed", "crashed: SIGKILL (out-of-memory killer?)"
    if returncode == -signal.SIGXFSZ:
        return "output_limit", f"output limit ({limits.file_bytes} bytes)"
    if returncode < 0:
        return "crashed", f"crashed: {signal.Signals(-returncode).name}"
    return "failed", f"failed: exited with code {returncode} before finishing"


def run_program(source: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `source` as `__main__` in a sandbox. A program passes when it runs to its end without raising."""
    limits = limits or SandboxLimits()
    start = time.perf_counter()
    workdir = tempfile.mkdtemp(prefix="infill-rl-sandbox-")
    nonce = secrets.token_hex(16)
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
    read_end, write_end = os.pipe()
    cmd = [sys.executable, "-I", "-S", str(CHILD), json.dumps(limits.to_child()), str(write_end)]
    try:
        Path(workdir, "program.py").write_text(source, encoding="utf-8")
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.Popen(
                    cmd, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=workdir, env=env,
                    start_new_session=True, close_fds=True, pass_fds=(write_end,),
                )
            except OSError as e:
                return SandboxResult("error", f"error: could not start the sandbox: {e}", time.perf_counter() - start)
            try:
                proc.stdin.write(f"{nonce}\n".encode())  # a few bytes: never blocks on the pipe buffer
                proc.stdin.close()
            except BrokenPipeError:
                pass
            os.close(write_end)
            write_end = -1
            exited = _wait_exit(proc, limits.wall_seconds)
            _kill_group(proc)  # on timeout: everything; after an exit: any straggler (none can exist with seccomp)
            proc.wait()
            seconds = time.perf_counter() - start
            stdout, stderr = _tail(out), _tail(err)
            output_bytes = out.seek(0, os.SEEK_END) + err.seek(0, os.SEEK_END)
            guards, report = _read_report(read_end, nonce)
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)
        _remove_tree(workdir)
    if guards is None:  # the bootstrap failed or was starved past the deadline: not the program's fault
        detail = stderr[-500:].strip() or ("timeout" if not exited else f"exit code {proc.returncode}")
        status, reason = "error", f"error: the sandbox failed before running the program: {detail}"
    elif not exited:
        status, reason = "timeout", f"timeout (wall {limits.wall_seconds:g} s)"
    elif output_bytes >= limits.file_bytes and (report is None or report["status"] != "passed"):
        status, reason = "output_limit", f"output limit ({limits.file_bytes} bytes)"
    else:
        status, reason = _classify(proc.returncode, report, limits, seconds)
    if guards is not None:
        _log_guards_once(guards)
    return SandboxResult(status, reason, seconds, guards or [], stdout, stderr)


_guards_logged = False


def _log_guards_once(guards: list[str]) -> None:
    global _guards_logged
    if _guards_logged:
        return
    _guards_logged = True
    logger.info("Sandbox confinement layers: %s.", ", ".join(guards))
    if os.geteuid() == 0 and "seccomp" not in guards:
        logger.warning(
            "Running as root without seccomp (%s): only the Python-level guard stops process creation, and a "
            "program that bypasses it (ctypes) could fork. Run rewards as an unprivileged user where possible.",
            ", ".join(guards),
        )
