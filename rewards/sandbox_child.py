"""Sandbox bootstrap, run by `rewards.sandbox` as `python -I -S sandbox_child.py LIMITS_JSON REPORT_FD`.

Standard library only (it runs without site-packages). Before the untrusted program runs, the child confines
itself, each layer independent of the others, kernel layers first:

1. rlimits: address space, CPU seconds, file size, open files, no core dumps, and RLIMIT_NPROC = 0 (which the
   kernel ignores for uid 0, hence the next layers).
2. As root: private network and mount namespaces (no interfaces but a down loopback; the working directory
   becomes a fresh tmpfs of `disk_bytes`, so many files cannot fill the host's disk), then every capability
   dropped (bounding, ambient, effective, permitted). Raising the rlimits back needs CAP_SYS_RESOURCE: gone.
3. Landlock (Linux >= 5.13, unprivileged): writes only beneath the working directory; TCP bind/connect denied
   (ABI >= 4); signals only within the sandbox (ABI >= 6).
4. seccomp (x86-64): fork/vfork/clone/clone3, execve, socket/socketpair, kill/tkill/tgkill, ptrace, setsid/
   setpgid, namespaces, io_uring, bpf and friends fail with EPERM, so a fork bomb dies on its first fork even as
   root, and nothing can leave the process group the parent kills.
5. A Python guard with readable error messages (and the only guard where the kernel ones are missing).

Protocol: stdin carries one line, a random nonce; the program is read from `program.py` in the working directory;
the child writes `<nonce> start` to the report pipe (file descriptor argv[2]) once confined, and `<nonce> <json
status>` once the program has run to its end or raised. A program that exits early, or writes a fake status
without knowing the nonce, cannot pass; no `start` line means the sandbox itself failed.
"""

import ctypes
import json
import os
import platform
import resource
import struct
import sys

# seccomp / prctl constants (linux/seccomp.h, linux/prctl.h, linux/filter.h, linux/audit.h)
PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 38, 24, 47, 4
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO, SECCOMP_RET_KILL_PROCESS = 0x7FFF0000, 0x00050000, 0x80000000
BPF_LD_W_ABS, BPF_JEQ_K, BPF_JGE_K, BPF_RET_K = 0x20, 0x15, 0x35, 0x06
AUDIT_ARCH_X86_64, X32_SYSCALL_BIT, EPERM = 0xC000003E, 0x40000000, 1
CLONE_NEWNET, CLONE_NEWNS = 0x40000000, 0x00020000
MS_NOSUID, MS_NODEV, MS_REC, MS_PRIVATE = 2, 4, 1 << 14, 1 << 18
# x86-64 syscall numbers denied inside the sandbox.
DENIED_X86_64 = {
    "clone": 56, "fork": 57, "vfork": 58, "execve": 59, "kill": 62, "clone3": 435, "execveat": 322,
    "socket": 41, "socketpair": 53, "tkill": 200, "tgkill": 234, "pidfd_send_signal": 424, "pidfd_open": 434,
    "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "setpgid": 109, "setsid": 112,
    "unshare": 272, "setns": 308, "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161,
    "open_by_handle_at": 304, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    "bpf": 321, "perf_event_open": 298, "userfaultfd": 323, "keyctl": 250, "add_key": 248, "request_key": 249,
    "reboot": 169, "kexec_load": 246, "init_module": 175, "finit_module": 313, "personality": 135,
}
# Landlock (linux/landlock.h); the syscall numbers are shared by all architectures.
LL_CREATE, LL_ADD_RULE, LL_RESTRICT, LL_VERSION_FLAG, LL_RULE_PATH_BENEATH = 444, 445, 446, 1, 1
LL_WRITE_ABI1 = sum(1 << b for b in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12))  # write file, remove, make *
LL_REFER, LL_TRUNCATE, LL_NET_TCP, LL_SCOPE = 1 << 13, 1 << 14, 0b11, 0b11


def _c(*args):
    """Variadic C arguments (prctl, syscall) are machine words: widen ints explicitly."""
    return [ctypes.c_ulong(a) if isinstance(a, int) else a for a in args]


def set_limits(limits: dict) -> None:
    for name, value in (
        ("RLIMIT_AS", limits["memory_bytes"]),
        ("RLIMIT_CPU", limits["cpu_seconds"]),
        ("RLIMIT_FSIZE", limits["file_bytes"]),
        ("RLIMIT_NOFILE", limits["open_files"]),
        ("RLIMIT_CORE", 0),
        ("RLIMIT_NPROC", 0),
    ):
        which = getattr(resource, name)
        hard = value + 1 if name == "RLIMIT_CPU" else value  # SIGXCPU at the soft limit, SIGKILL one second later
        current = resource.getrlimit(which)[1]
        if current != resource.RLIM_INFINITY:  # an unprivileged process cannot raise its hard limit
            value, hard = min(value, current), min(hard, current)
        resource.setrlimit(which, (value, hard))


def unshare_network(libc) -> bool:
    return os.geteuid() == 0 and libc.unshare(ctypes.c_int(CLONE_NEWNET)) == 0


def private_tmpfs(libc, workdir: str, size: int) -> bool:
    """As root: mount a `size`-byte tmpfs over `workdir` in a private mount namespace, and enter it."""
    if os.geteuid() != 0 or libc.unshare(ctypes.c_int(CLONE_NEWNS)) != 0:
        return False
    # Private propagation first, or the tmpfs would appear in (and outlive the run in) the host's namespace.
    if libc.mount(None, b"/", None, ctypes.c_ulong(MS_REC | MS_PRIVATE), None) != 0:
        return False
    options = f"size={size},mode=0700".encode()
    if libc.mount(b"tmpfs", workdir.encode(), b"tmpfs", ctypes.c_ulong(MS_NOSUID | MS_NODEV), options) != 0:
        return False
    os.chdir(workdir)  # the old cwd is the directory underneath the mount
    return True


def drop_capabilities(libc) -> bool:
    if os.geteuid() != 0:
        return False
    for cap in range(64):
        libc.prctl(*_c(PR_CAPBSET_DROP, cap, 0, 0, 0))  # EINVAL past the last capability: harmless
    libc.prctl(*_c(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0))
    header = struct.pack("Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = ctypes.create_string_buffer(24)  # two zeroed {effective, permitted, inheritable} words
    return libc.capset(header, data) == 0


def landlock(libc, workdir: str) -> int:
    """Restrict writes to `workdir` (and TCP, signals where supported). Returns the Landlock ABI, 0 if none."""
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(*_c(LL_CREATE, None, 0, LL_VERSION_FLAG))
    if abi < 1:
        return 0
    fs = LL_WRITE_ABI1 | (LL_REFER if abi >= 2 else 0) | (LL_TRUNCATE if abi >= 3 else 0)
    attr = struct.pack("QQQ", fs, LL_NET_TCP if abi >= 4 else 0, LL_SCOPE if abi >= 6 else 0)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = libc.syscall(*_c(LL_CREATE, attr, size, 0))
    if ruleset < 0:
        return 0
    dirfd = os.open(workdir, os.O_PATH | os.O_DIRECTORY)
    rule = struct.pack("=Qi", fs, dirfd)  # landlock_path_beneath_attr is packed
    ok = libc.syscall(*_c(LL_ADD_RULE, ruleset, LL_RULE_PATH_BENEATH, rule, 0)) == 0
    ok = ok and libc.syscall(*_c(LL_RESTRICT, ruleset, 0)) == 0
    os.close(dirfd)
    os.close(ruleset)
    return abi if ok else 0


def seccomp(libc) -> bool:
    if platform.machine() != "x86_64":
        return False
    denied = sorted(DENIED_X86_64.values())
    deny_at = 6 + len(denied)  # index of the EPERM return, after the ALLOW return
    prog = [(BPF_LD_W_ABS, 0, 0, 4), (BPF_JEQ_K, 1, 0, AUDIT_ARCH_X86_64), (BPF_RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS)]
    prog.append((BPF_LD_W_ABS, 0, 0, 0))
    prog.append((BPF_JGE_K, deny_at - 5, 0, X32_SYSCALL_BIT))
    prog += [(BPF_JEQ_K, deny_at - i - 1, 0, nr) for i, nr in enumerate(denied, start=5)]
    prog += [(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW), (BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | EPERM)]
    assert len(prog) == deny_at + 1
    filters = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *ins) for ins in prog))
    fprog = struct.pack("HxxxxxxP", len(prog), ctypes.addressof(filters))
    return libc.prctl(*_c(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, fprog, 0, 0)) == 0


def python_guard(workdir: str) -> None:
    """Disable process creation, signals, sockets and writes outside `workdir` at the Python level."""
    import builtins
    import io
    import socket
    import subprocess

    def disabled(name):
        def refuse(*args, **kwargs):
            raise PermissionError(f"sandbox: {name} is disabled")

        return refuse

    for name in ("fork", "forkpty", "system", "popen", "kill", "killpg", "setsid", "setpgid", "posix_spawn",
                 "posix_spawnp", "execv", "execve", "execvp", "execvpe", "execl", "execle", "execlp", "execlpe",
                 "spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "pidfd_open"):
        if hasattr(os, name):
            setattr(os, name, disabled(f"os.{name}"))
    subprocess.Popen = disabled("subprocess")
    for name in ("socket", "socketpair", "create_connection", "create_server", "fromfd"):
        setattr(socket, name, disabled(f"socket.{name}"))
    for name in ("ctypes", "_ctypes", "multiprocessing", "_posixsubprocess", "_socket"):
        sys.modules[name] = None  # `import` now raises ImportError

    root = os.path.realpath(workdir) + os.sep
    real_open, real_os_open = builtins.open, os.open
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def check(path, writing: bool) -> None:
        if writing and not isinstance(path, int) and not os.path.realpath(path).startswith(root):
            raise PermissionError(f"sandbox: writing outside the working directory is disabled: {path!r}")

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


def run(source: bytes) -> dict:
    import builtins

    try:
        code = compile(source, "program.py", "exec")
        exec(code, {"__name__": "__main__", "__builtins__": builtins})
    except MemoryError:
        return {"status": "memory", "detail": "MemoryError"}
    except BaseException as e:  # noqa: BLE001 - the program's own failure is the result
        try:
            msg = str(e)[:300]
        except BaseException:  # noqa: BLE001 - a hostile __str__
            msg = "<unprintable>"
        return {"status": "failed", "detail": f"{type(e).__name__}: {msg}" if msg else type(e).__name__}
    return {"status": "passed", "detail": ""}


def attempt(fn, *args):
    """Run one kernel guard; a platform without it (no prctl, no Landlock, ...) just goes without."""
    try:
        return fn(*args)
    except (AttributeError, OSError, ValueError):
        return False


def main() -> None:
    limits, report = json.loads(sys.argv[1]), int(sys.argv[2])
    nonce = sys.stdin.readline().strip()
    workdir = os.getcwd()
    with open("program.py", "rb") as f:
        source = f.read()
    set_limits(limits)
    libc = ctypes.CDLL(None, use_errno=True)
    guards = ["rlimits"]
    if attempt(unshare_network, libc):
        guards.append("netns")
    if attempt(private_tmpfs, libc, workdir, limits["disk_bytes"]):
        guards.append("tmpfs")
    attempt(lambda: libc.prctl(*_c(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)))
    abi = attempt(landlock, libc, workdir)
    if abi:
        guards.append(f"landlock{abi}")
    if attempt(drop_capabilities, libc):
        guards.append("nocaps")
    if attempt(seccomp, libc):
        guards.append("seccomp")
    python_guard(workdir)
    guards.append("python")
    sys.stdin = None
    os.write(report, f"{nonce} start {json.dumps(guards)}\n".encode())  # from here on, exits are the program's
    result = run(source)
    try:
        sys.stdout.flush()
    except BaseException:  # noqa: BLE001 - the program may have replaced or closed stdout
        pass
    os.write(report, f"\n{nonce} {json.dumps(result)}\n".encode())
    os._exit(0)


if __name__ == "__main__":
    main()
