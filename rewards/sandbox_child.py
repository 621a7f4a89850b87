"""Sandbox bootstrap, run by `rewards.sandbox` as `python -I -S sandbox_child.py CONFIG_JSON CALLS_FD REPLIES_FD`.

Standard library only (no site-packages). It reads `program.py` from its working directory, confines itself
(`sandbox_confine`: rlimits, namespaces, a private root, an unprivileged uid, Landlock, seccomp; then a Python
guard with readable error messages), runs the program's module code, and then serves calls: the trusted judge
(`sandbox_judge.py`) sends `["call", name, args, kwargs]` lines on CALLS_FD and reads `["return", value]` or
`["raise", type_name, message]` lines from REPLIES_FD, in the data-only format of `sandbox_wire`.

Nothing here decides a verdict, and nothing here is trusted once the program runs: the program may rewrite this
loop, the wire format or the interpreter, and all it gains is control over the data it answers with, which is
exactly the control a candidate function has over its return values. Before the program runs, the bootstrap
sends `["ready", guards]` (the layers installed) and, once the module code has run, `["loaded"]` (or the
exception that stopped it).
"""

import _thread
import builtins
import ctypes
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sandbox_confine as confine  # noqa: E402 - found beside this file, before confinement hides it
import sandbox_wire as wire  # noqa: E402

del sys.path[0]


def python_guard(workdir: str, readable: list[str], max_threads: int) -> None:
    """Readable errors for process creation, signals, sockets, file access outside the allowed paths and too many
    threads. Python-level only: the kernel layers are the guard; this one explains, or stands alone where the
    kernel has none (a program that pops `ctypes` back into `sys.modules` gets past it)."""
    import io

    def disabled(name):
        def refuse(*args, **kwargs):
            raise PermissionError(f"sandbox: {name} is disabled")

        return refuse

    for name in ("fork", "forkpty", "system", "popen", "kill", "killpg", "setsid", "setpgid", "posix_spawn",
                 "posix_spawnp", "execv", "execve", "execvp", "execvpe", "execl", "execle", "execlp", "execlpe",
                 "spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "pidfd_open"):
        if hasattr(os, name):
            setattr(os, name, disabled(f"os.{name}"))
    for name in ("ctypes", "_ctypes", "multiprocessing", "_multiprocessing", "_posixsubprocess", "_socket", "socket",
                 "subprocess"):
        sys.modules[name] = None  # `import` now raises ImportError

    root = os.path.realpath(workdir) + os.sep
    readable = tuple(os.path.realpath(p) for p in readable)
    real_open, real_os_open = builtins.open, os.open
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def check(path, writing: bool) -> None:
        if isinstance(path, int):
            return
        real = os.path.realpath(path)
        if real.startswith(root) or (not writing and any(real == p or real.startswith(p + os.sep) for p in readable)):
            return
        raise PermissionError(f"sandbox: {'writing' if writing else 'reading'} outside the working directory is "
                              f"disabled: {path!r}")

    def guarded_open(file, mode="r", *args, **kwargs):
        check(file, any(c in mode for c in "wax+"))
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        check(path, bool(flags & write_flags))
        return real_os_open(path, flags, *args, **kwargs)

    builtins.open = io.open = guarded_open
    os.open = guarded_os_open
    for name in ("remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "mkdir", "makedirs",
                 "symlink", "link", "chmod", "chown", "truncate", "utime"):
        real = getattr(os, name)

        def guarded(path, *args, _real=real, **kwargs):
            check(path, True)
            return _real(path, *args, **kwargs)

        setattr(os, name, guarded)

    start = _thread.start_new_thread  # `threading` binds it when the program first imports it

    def limited_start(*args, **kwargs):
        if _thread._count() + 1 >= max_threads:  # _count: the threads started from Python, alive
            raise RuntimeError(f"sandbox: at most {max_threads} threads")
        return start(*args, **kwargs)

    _thread.start_new_thread = _thread.start_new = limited_start


def _describe(e: BaseException) -> list:
    try:
        message = str(e)[:300]
    except BaseException:  # noqa: BLE001 - a hostile __str__
        message = "<unprintable>"
    return ["raise", type(e).__name__, message]


def serve(namespace: dict, calls, send) -> None:
    """Answer the judge's calls until it closes the pipe."""
    for line in calls:
        try:
            _, name, args, kwargs = wire.loads(line)
            if name not in namespace:
                reply = ["raise", "NameError", f"name {name!r} is not defined"]
            else:
                reply = ["return", wire.encode(namespace[name](*wire.decode(args), **wire.decode(kwargs)))]
        except BaseException as e:  # noqa: BLE001 - the candidate's own failure is its answer
            reply = _describe(e)
        send(reply)


def main() -> None:
    config, calls_fd, replies_fd = wire.from_json(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    limits, allowed = config["limits"], config["allowed"]
    workdir = os.getcwd()
    with open("program.py", "rb") as f:
        source = f.read()
    uid = 2_000_000_000 + int.from_bytes(os.urandom(4), "little") % 100_000_000  # unlikely to be anyone's

    def send(message: list) -> None:
        data = memoryview(wire.dumps(message))
        while data:
            data = data[os.write(replies_fd, data) :]

    confine.set_limits(limits)
    libc = ctypes.CDLL(None, use_errno=True)
    guards = ["rlimits"]
    if attempt(confine.unshare_network, libc):
        guards.append("netns")
    if confine.private_root(libc, workdir, allowed, uid, limits["disk_bytes"]):  # half a private root: fail loudly
        guards.append("mountns")
    elif os.geteuid() == 0:  # no private root (a container without CAP_SYS_ADMIN): the host directory, made its own
        os.chown(workdir, uid, uid)
    if confine.drop_root(libc, uid):
        guards.append("uid")
    if attempt(confine.no_new_privs, libc):
        guards.append("nonewprivs")
    if "mountns" in guards:
        workdir = confine.SANDBOX_DIR
        os.environ.update(HOME=workdir, TMPDIR=workdir)
    abi = attempt(confine.landlock, libc, workdir, allowed)
    if abi:
        guards.append(f"landlock{abi}")
    if attempt(confine.seccomp, libc):
        guards.append("seccomp")
    readable = list(allowed["dirs"]) + list(allowed["files"]) + list(confine.DEVICES)
    python_guard(workdir, readable, limits["max_threads"])
    guards.append("python")
    sys.stdin = None
    calls = os.fdopen(calls_fd, "rb")
    send(["ready", guards])  # from here on, everything is the program's
    namespace = {"__builtins__": builtins}  # no __name__: like the reference harness, `__main__` blocks do not run
    try:
        exec(compile(source, "program.py", "exec"), namespace)
    except BaseException as e:  # noqa: BLE001 - the program's own failure is the answer
        send(_describe(e))
        return
    send(["loaded"])
    serve(namespace, calls, send)


def attempt(fn, *args):
    """Run one kernel layer; a platform without it (no prctl, no Landlock, not root, ...) just goes without."""
    try:
        return fn(*args)
    except (AttributeError, OSError, ValueError):
        return False


if __name__ == "__main__":
    main()
    os._exit(0)
