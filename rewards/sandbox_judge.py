"""The trusted side of a code test: runs the task's `check` and calls the candidate in the sandbox over a data pipe.

Run by `rewards.sandbox` as `python -I -S sandbox_judge.py CALLS_FD REPLIES_FD` with the task on stdin (JSON:
`prelude`, `test`, `entry_point`, `wall_seconds`, `startup_seconds`, `max_reply_bytes`, `memory_bytes`). It writes
JSON lines to stdout, which only the parent holds: `{"clock": guards}` when the program starts (its wall clock
starts then), and one verdict `{"status", "reason", "exception"}`.

The test code (and the prompt's own helpers, `prelude`: the dataset's prompt when it is Python) runs here, in an
interpreter the program never touches. `candidate` is a stub that sends `["call", name, args, kwargs]` to the
sandbox and returns the value decoded from its answer (`sandbox_wire`: builtin types only) or raises the builtin
exception it names. So `check(candidate)` passes only if the values the program answers with satisfy the test:
the program can patch its own interpreter, walk its frames, write to every descriptor it holds and exit when it
likes, but it holds no channel that can say "passed". Deviations from the reference harness (one process running
prompt + completion + test): argument mutations made by the candidate do not reach the test; a return value that
is not plain data fails the call (TypeError); a global the test reads but neither the prelude nor the test defines
(a helper the completion defines, with a chat prompt) is called in the sandbox like the candidate.
"""

import builtins
import os
import resource
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sandbox_wire as wire  # noqa: E402

del sys.path[0]


class Deadline(BaseException):
    """The program's wall-clock time is up. BaseException: a test's `except Exception` must not swallow it."""


class Gone(BaseException):
    """The sandboxed process closed its pipe (it exited, crashed or was killed)."""


class Broken(BaseException):
    """The program answered with something that is not a well-formed reply."""


class Aborted(BaseException):
    """The candidate raised SystemExit, KeyboardInterrupt or GeneratorExit: the reference harness stops there."""


class Unsupported(BaseException):
    """The test passes the candidate something that is not plain data: a limit of this judge, not the program."""


class CandidateError(Exception):
    """An exception of a type that is not a builtin (the program's own class), as name and message."""


def global_names(code) -> set[str]:
    """Names `code` and the functions it defines read: globals, and attribute names too (binding those as
    globals changes nothing, and sorting them out would need the bytecode)."""
    names = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_code"):
            names |= global_names(const)
    return names


def rebuild(name: str, message: str) -> BaseException:
    """The exception the candidate raised, as a builtin exception of the same name where there is one."""
    kind = getattr(builtins, name, None)
    if isinstance(kind, type) and issubclass(kind, BaseException):
        if not issubclass(kind, Exception):
            return Aborted(f"{name}: {message}" if message else name)
        try:
            return kind(message)
        except Exception:  # noqa: BLE001 - a builtin with a fixed signature (UnicodeDecodeError)
            pass
    return CandidateError(f"{name}: {message}" if message else name)


class Sandbox:
    """The judge's end of the two pipes."""

    def __init__(self, calls_fd: int, replies_fd: int, max_reply_bytes: int):
        self.calls_fd, self.replies = calls_fd, os.fdopen(replies_fd, "rb")
        self.max_reply_bytes = max_reply_bytes
        self.failure: BaseException | None = None  # a transport failure, even if the test swallowed it

    def receive(self, *expected: str) -> list:
        line = self.replies.readline(self.max_reply_bytes + 1)
        if not line:
            raise Gone("the program's process ended")
        if not line.endswith(b"\n"):
            raise Broken(f"a reply longer than {self.max_reply_bytes} bytes")
        try:
            message = wire.loads(line)
        except wire.WireError as e:
            raise Broken(str(e)) from None
        if message[0] not in expected:
            raise Broken(f"{message[0][:20]!r} where {' or '.join(expected)} was expected")
        return message

    def send(self, message: list) -> None:
        data = memoryview(wire.dumps(message))
        try:
            while data:
                data = data[os.write(self.calls_fd, data) :]
        except BrokenPipeError:
            raise Gone("the program's process ended") from None

    def function(self, name: str):
        def candidate(*args, **kwargs):
            try:
                payload = [wire.encode(list(args)), wire.encode(kwargs)]
            except (TypeError, ValueError) as e:
                raise Unsupported(f"the test passes {name} {e}") from None
            try:
                self.send(["call", name, *payload])
                reply = self.receive("return", "raise")
                if reply[0] == "return" and len(reply) == 2:
                    return wire.decode(reply[1])
                if reply[0] == "raise" and len(reply) == 3 and all(type(x) is str for x in reply[1:]):
                    exc = rebuild(reply[1][:100], reply[2][:300])
                else:
                    raise Broken("a malformed reply")
            except wire.WireError as e:
                self.failure = Broken(str(e))
                raise self.failure from None
            except (Gone, Broken) as e:
                self.failure = e
                raise
            if isinstance(exc, Aborted):
                self.failure = exc
            raise exc

        candidate.__name__ = candidate.__qualname__ = name
        return candidate


def describe(e: BaseException) -> str:
    try:
        message = str(e)[:300]
    except Exception:  # noqa: BLE001
        message = ""
    if isinstance(e, (CandidateError, Aborted)):
        return message
    return f"{type(e).__name__}: {message}" if message else type(e).__name__


def judge(task: dict, sandbox: Sandbox, report) -> dict:
    """Run the task's check against the sandboxed candidate; the verdict as a dict."""
    namespace = {"__builtins__": builtins}
    try:
        if task.get("prelude"):
            exec(compile(task["prelude"], "prompt", "exec"), namespace)
        test = compile(task["test"], "test", "exec")
        exec(test, namespace)
    except Exception as e:  # noqa: BLE001 - a task row that does not run without any candidate
        return {"status": "error", "reason": f"error: the task's own prompt or test fails: {describe(e)}"}
    if not callable(namespace.get("check")):
        return {"status": "error", "reason": "error: the task's test defines no check(candidate) function"}
    entry = task["entry_point"]
    for name in global_names(test) - set(namespace) - set(dir(builtins)) | {entry}:
        namespace[name] = sandbox.function(name)

    def expire(signum, frame):
        sandbox.failure = Deadline()  # remembered: a test with a bare `except:` must not swallow the timeout
        raise sandbox.failure

    signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, task["startup_seconds"])
    try:
        guards = sandbox.receive("ready")[1]
    except (Deadline, Gone, Broken) as e:
        return {"status": "error", "reason": f"error: the sandbox failed before running the program: {describe(e)}"}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    sandbox.failure = None
    report({"clock": guards})
    started = time.perf_counter()
    verdict = run_check(namespace, entry, sandbox, task)
    verdict["run_seconds"] = time.perf_counter() - started
    return verdict


def run_check(namespace: dict, entry: str, sandbox: Sandbox, task: dict) -> dict:
    """Wait for the program to load, then run `check(candidate)` within the wall clock: the verdict."""
    try:
        signal.setitimer(signal.ITIMER_REAL, task["wall_seconds"])
        loaded = sandbox.receive("loaded", "raise")
        if loaded[0] == "raise":
            exc = rebuild(*(str(x)[:300] for x in loaded[1:3]))
            return {"status": "failed", "reason": f"failed: {describe(exc)}", "exception": type(exc).__name__}
        namespace["check"](namespace[entry])
        if sandbox.failure is not None:
            raise sandbox.failure
    except Deadline:
        return {"status": "timeout", "reason": f"timeout (wall {task['wall_seconds']:g} s)"}
    except Gone:
        return {"status": "gone", "reason": "failed: the program's process ended before the test did"}
    except Broken as e:
        return {"status": "failed", "reason": f"failed: the program broke the call protocol: {str(e)[:300]}"}
    except Unsupported as e:
        return {"status": "error", "reason": f"error: {describe(e)}"}
    except BaseException as e:  # noqa: BLE001 - the test's failure is the verdict
        name = type(e).__name__
        exc_name = str(e).split(":", 1)[0] if isinstance(e, (CandidateError, Aborted)) else name
        return {"status": "failed", "reason": f"failed: {describe(e)}", "exception": exc_name}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return {"status": "passed", "reason": "passed"}


def main() -> None:
    task = wire.from_json(sys.stdin.buffer.read().decode())
    limit = task["memory_bytes"]
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # replies are data, but data can be large
    sandbox = Sandbox(int(sys.argv[1]), int(sys.argv[2]), task["max_reply_bytes"])
    reports = os.dup(1)  # the verdict channel; what the test itself prints goes nowhere, as in the reference harness
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)

    def report(message: dict) -> None:
        os.write(reports, (wire.to_json(message) + "\n").encode())

    report(judge(task, sandbox, report))


if __name__ == "__main__":
    main()
