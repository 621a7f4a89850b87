"""Kernel confinement layers of the sandbox bootstrap (`sandbox_child.py`); standard library only.

Each layer is independent of the others and is skipped where the platform lacks it (the bootstrap reports the names
of those installed). What needs what:

| layer | needs | gives |
|---|---|---|
| `rlimits` | nothing | address space, CPU seconds, file size, open files, no core dumps, tasks (threads) |
| `netns` | root | a network namespace with nothing but a down loopback |
| `mountns` | root | a new root: a read-only tmpfs holding only the interpreter's installation and the shared libraries
  it loads (bind-mounted read-only at their own paths), /dev/{null,zero,random,urandom}, and the program's
  private writable tmpfs `/sandbox` of `disk_bytes`. No /proc, no /etc, no home, no host temp dir. |
| `uid` | root | every capability dropped (bounding, ambient, effective, permitted), then a random unprivileged uid
  and gid with no groups: the host's permission checks treat the program as a stranger (no signals to, or
  /proc/<pid>/mem of, the host's processes), and RLIMIT_NPROC, which the kernel ignores for root, caps the
  threads at `max_threads` |
| `nonewprivs` | Linux | no privilege gained through exec (Landlock's precondition for an unprivileged process) |
| `landlock{abi}` | Linux >= 5.13, any user | reads only beneath the same allowed paths, writes only beneath the
  working directory; TCP bind/connect denied (ABI >= 4), signals and abstract sockets scoped (ABI >= 6). For a
  non-root user this is the read isolation. |
| `seccomp` | x86-64 | no fork/vfork/execve, `clone` only for threads (CLONE_THREAD, no namespace flags), `clone3`
  answered ENOSYS (glibc then falls back to `clone`), no kill/tkill/tgkill, sockets, ptrace, process_vm_*,
  setsid/setpgid, namespaces, mounts, io_uring, bpf, keyrings, module loading |
"""

import ctypes
import os
import resource
import struct

PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 38, 24, 47, 4
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO, SECCOMP_RET_KILL_PROCESS = 0x7FFF0000, 0x00050000, 0x80000000
BPF_LD_W_ABS, BPF_JEQ_K, BPF_JGE_K, BPF_JSET_K, BPF_RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
AUDIT_ARCH_X86_64, X32_SYSCALL_BIT, EPERM, ENOSYS = 0xC000003E, 0x40000000, 1, 38
CLONE_NEWNET, CLONE_NEWNS, CLONE_THREAD = 0x40000000, 0x00020000, 0x00010000
CLONE_NAMESPACES = 0x7E020080  # NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET, NEWTIME
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 1 << 14, 1 << 18
MNT_DETACH, SYS_PIVOT_ROOT = 2, 155
DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")
SANDBOX_DIR = "/sandbox"  # the working directory inside the private root
# x86-64 syscall numbers denied inside the sandbox (clone and clone3 are handled apart).
DENIED_X86_64 = {
    "fork": 57, "vfork": 58, "execve": 59, "execveat": 322, "kill": 62, "tkill": 200, "tgkill": 234,
    "pidfd_send_signal": 424, "pidfd_open": 434, "pidfd_getfd": 438, "socket": 41, "socketpair": 53,
    "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312, "setpgid": 109, "setsid": 112,
    "unshare": 272, "setns": 308, "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
    "mount_setattr": 442, "open_by_handle_at": 304, "io_uring_setup": 425, "io_uring_enter": 426,
    "io_uring_register": 427, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323, "keyctl": 250,
    "add_key": 248, "request_key": 249, "reboot": 169, "kexec_load": 246, "init_module": 175, "finit_module": 313,
    "personality": 135,
}
CLONE, CLONE3 = 56, 435
# Landlock (linux/landlock.h); the syscall numbers are shared by all architectures.
LL_CREATE, LL_ADD_RULE, LL_RESTRICT, LL_VERSION_FLAG, LL_RULE_PATH_BENEATH = 444, 445, 446, 1, 1
LL_EXECUTE, LL_WRITE_FILE, LL_READ_FILE, LL_READ_DIR = 1, 2, 4, 8
LL_ABI1 = (1 << 13) - 1  # execute, read/write file, read dir, remove, make *
LL_REFER, LL_TRUNCATE, LL_NET_TCP, LL_SCOPE = 1 << 13, 1 << 14, 0b11, 0b11


def _c(*args):
    """Variadic C arguments (prctl, syscall, mount) are machine words: widen ints explicitly."""
    return [ctypes.c_ulong(a) if isinstance(a, int) else a for a in args]


def _check(result: int, what: str) -> None:
    if result != 0:
        raise OSError(ctypes.get_errno(), f"{what} failed")


def set_limits(limits: dict) -> None:
    for name, value in (
        ("RLIMIT_AS", limits["memory_bytes"]),
        ("RLIMIT_CPU", limits["cpu_seconds"]),
        ("RLIMIT_FSIZE", limits["file_bytes"]),
        ("RLIMIT_NOFILE", limits["open_files"]),
        ("RLIMIT_CORE", 0),
    ) + ((("RLIMIT_NPROC", limits["max_threads"]),) if os.geteuid() == 0 else ()):
        # RLIMIT_NPROC counts all the tasks of a uid: only a root sandbox, which moves to a uid of its own, can
        # make it count its own threads (a user's limit would count the user's other processes too)
        which = getattr(resource, name)
        hard = value + 1 if name == "RLIMIT_CPU" else value  # SIGXCPU at the soft limit, SIGKILL one second later
        current = resource.getrlimit(which)[1]
        if current != resource.RLIM_INFINITY:  # an unprivileged process cannot raise its hard limit
            value, hard = min(value, current), min(hard, current)
        resource.setrlimit(which, (value, hard))


def unshare_network(libc) -> bool:
    return os.geteuid() == 0 and libc.unshare(ctypes.c_int(CLONE_NEWNET)) == 0


def _mount(libc, source, target: str, fstype, flags: int, data=None) -> None:
    enc = [s.encode() if isinstance(s, str) else s for s in (source, target, fstype, data)]
    _check(libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]), f"mount {target}")


def _bind_read_only(libc, source: str, target: str, device: bool = False) -> None:
    _mount(libc, source, target, None, MS_BIND | MS_REC)
    _mount(libc, None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | (0 if device else MS_NODEV))


def private_root(libc, new_root: str, allowed: dict, uid: int, disk_bytes: int) -> bool:
    """As root: enter a mount namespace whose root holds only what `allowed` lists, read-only, plus a writable
    tmpfs at SANDBOX_DIR owned by `uid`; chdir there. `new_root` (an empty host directory) becomes the root."""
    if os.geteuid() != 0 or libc.unshare(ctypes.c_int(CLONE_NEWNS)) != 0:
        return False
    # Private propagation first, or the mounts below would appear in (and outlive the run in) the host's namespace.
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)
    _mount(libc, "tmpfs", new_root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for source in allowed["dirs"]:
        os.makedirs(new_root + source, exist_ok=True)
        _bind_read_only(libc, source, new_root + source)
    for source in list(allowed["files"]) + [d for d in DEVICES if os.path.exists(d)]:
        os.makedirs(os.path.dirname(new_root + source), exist_ok=True)
        open(new_root + source, "w").close()
        _bind_read_only(libc, source, new_root + source, device=source in DEVICES)
    for link, target in allowed["links"]:  # the names the dynamic loader looks libraries up by
        if not os.path.lexists(new_root + link):
            os.makedirs(os.path.dirname(new_root + link), exist_ok=True)
            os.symlink(target, new_root + link)
    os.mkdir(new_root + SANDBOX_DIR)
    options = f"size={disk_bytes},mode=0700,uid={uid},gid={uid}"
    _mount(libc, "tmpfs", new_root + SANDBOX_DIR, "tmpfs", MS_NOSUID | MS_NODEV, options)
    os.chdir(new_root)
    libc.syscall.restype = ctypes.c_long
    if libc.syscall(*_c(SYS_PIVOT_ROOT, b".", b".")) == 0:
        _check(libc.umount2(b".", ctypes.c_int(MNT_DETACH)), "detaching the host's root")  # stacked on the new /
    else:  # an initramfs root cannot be pivoted away; chroot holds too once the capabilities are gone
        os.chroot(".")
    os.chdir("/")
    _mount(libc, None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir(SANDBOX_DIR)
    return True


def drop_root(libc, uid: int) -> bool:
    """As root: drop every capability and become `uid` (no supplementary groups). False if not root."""
    if os.geteuid() != 0:
        return False
    for cap in range(64):
        libc.prctl(*_c(PR_CAPBSET_DROP, cap, 0, 0, 0))  # EINVAL past the last capability: harmless
    libc.prctl(*_c(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0))
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)  # clears the permitted and effective capabilities
    header = struct.pack("Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = ctypes.create_string_buffer(24)  # two zeroed {effective, permitted, inheritable} words
    return libc.capset(header, data) == 0 and os.getuid() == uid


def no_new_privs(libc) -> bool:
    return libc.prctl(*_c(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) == 0


def landlock(libc, workdir: str, allowed: dict) -> int:
    """Reads only beneath `allowed` and `workdir`, writes only beneath `workdir` (and TCP, signals where
    supported). Returns the Landlock ABI, 0 if none."""
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(*_c(LL_CREATE, None, 0, LL_VERSION_FLAG))
    if abi < 1:
        return 0
    fs = LL_ABI1 | (LL_REFER if abi >= 2 else 0) | (LL_TRUNCATE if abi >= 3 else 0)
    attr = struct.pack("QQQ", fs, LL_NET_TCP if abi >= 4 else 0, LL_SCOPE if abi >= 6 else 0)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = libc.syscall(*_c(LL_CREATE, attr, size, 0))
    if ruleset < 0:
        return 0
    read = LL_EXECUTE | LL_READ_FILE
    device = LL_READ_FILE | LL_WRITE_FILE | (LL_TRUNCATE if abi >= 3 else 0)
    rules = [(workdir, fs)] + [(d, read | LL_READ_DIR) for d in allowed["dirs"]]
    rules += [(f, read) for f in allowed["files"]] + [(d, device) for d in DEVICES]
    ok = True
    try:
        for path, access in rules:
            try:
                fd = os.open(path, os.O_PATH)
            except FileNotFoundError:
                continue
            rule = struct.pack("=Qi", access, fd)  # landlock_path_beneath_attr is packed
            ok = ok and libc.syscall(*_c(LL_ADD_RULE, ruleset, LL_RULE_PATH_BENEATH, rule, 0)) == 0
            os.close(fd)
        ok = ok and libc.syscall(*_c(LL_RESTRICT, ruleset, 0)) == 0
    finally:
        os.close(ruleset)
    return abi if ok else 0


def _filter() -> list[tuple[int, int, int, int]]:
    """The seccomp program (BPF instructions): see the module docstring for what it denies."""
    denied = sorted(DENIED_X86_64.values())
    head = [(BPF_LD_W_ABS, 0, 0, 4), (BPF_JEQ_K, 1, 0, AUDIT_ARCH_X86_64), (BPF_RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS),
            (BPF_LD_W_ABS, 0, 0, 0)]
    # labels, as indices: after the head come the jumps, then ALLOW, DENY, ENOSYS and the clone check
    checks = [(BPF_JGE_K, X32_SYSCALL_BIT, "deny"), (BPF_JEQ_K, CLONE, "clone"), (BPF_JEQ_K, CLONE3, "enosys")]
    checks += [(BPF_JEQ_K, nr, "deny") for nr in denied]
    allow = len(head) + len(checks)
    at = {"allow": allow, "deny": allow + 1, "enosys": allow + 2, "clone": allow + 3}
    prog = head + [(op, at[label] - (len(head) + i) - 1, 0, k) for i, (op, k, label) in enumerate(checks)]
    prog += [(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW), (BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | EPERM),
             (BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | ENOSYS)]
    # clone: only a thread of this process (jumps go forward only, so this block has its own returns)
    prog += [(BPF_LD_W_ABS, 0, 0, 16), (BPF_JSET_K, 2, 0, CLONE_NAMESPACES), (BPF_JSET_K, 0, 1, CLONE_THREAD),
             (BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW), (BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | EPERM)]
    return prog


def seccomp(libc) -> bool:
    if os.uname().machine != "x86_64":
        return False
    prog = _filter()
    filters = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *ins) for ins in prog))
    fprog = struct.pack("HxxxxxxP", len(prog), ctypes.addressof(filters))
    return libc.prctl(*_c(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, fprog, 0, 0)) == 0
