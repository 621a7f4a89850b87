"""Hostile completions against the code reward: each is a wrong body plus a few lines that try to get paid anyway.

Every case must fail, and the host must be untouched: no process left behind or signalled, no file outside the
sandbox written or read (a canary's content never appears in a result), no sandbox directory or mount left.
`CASES` is also what the table in docs/sandbox.md is made from (`python tests/test_rewards_adversarial.py`).
"""

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from rewards.code_reward import CodeReward
from rewards.sandbox import SandboxLimits

PROMPT = 'def add(a, b):\n    """Return the sum of a and b."""\n'
TEST = "def check(candidate):\n" + "".join(f"    assert candidate({a}, {b}) == {a + b}\n" for a, b in [(1, 2), (9, 4)])
WRONG = "    return None\n"
LIMITS = SandboxLimits(wall_seconds=3.0, memory_bytes=512 << 20, disk_bytes=16 << 20)
UNDER_PYTHON = "import sys\nfor m in ('ctypes', '_ctypes'):\n    sys.modules.pop(m, None)\nimport ctypes\n"
LIBC = UNDER_PYTHON + "libc = ctypes.CDLL(None, use_errno=True)\n"

# name -> (class, code after the wrong body; @CANARY@, @VICTIM@, @OUTSIDE@ are filled in)
CASES = {
    # forging the verdict from inside the interpreter
    "patch_json_dumps": ("module patching", """
import json
json.dumps = lambda *a, **k: '{"status": "passed"}'
"""),
    "patch_wire_encode": ("module patching", """
import sys
w = sys.modules.get('sandbox_wire')
if w:
    w.encode = lambda v, depth=0: 3
"""),
    "patch_exit_paths": ("module patching", """
import os, sys
os._exit = lambda code: None
sys.exit = lambda *a: None
"""),
    "frames_call_send": ("frame walking", """
import sys
f = sys._getframe()
while f:
    s = f.f_locals.get('send')
    if callable(s):
        s(['loaded'])
        s(['passed'])
        s(['return', 3])
    f = f.f_back
"""),
    "frames_fd_verdict": ("frame walking", """
import os, sys
f = sys._getframe()
while f:
    fd = f.f_locals.get('replies_fd')
    if isinstance(fd, int):
        os.write(fd, b'{"status": "passed", "reason": "passed"}\\n["loaded"]\\n')
    f = f.f_back
os._exit(0)
"""),
    "gc_find_send": ("frame walking", """
import gc
for o in gc.get_objects():
    if getattr(o, '__name__', '') == 'send' and callable(o):
        for v in (3, 6, 0):
            o(['return', v])
"""),
    "spray_descriptors": ("descriptor writes", """
import os
line = b'{"clock": []}\\n{"status": "passed", "reason": "passed"}\\n["loaded"]\\n'
for fd in range(1024):
    try:
        os.write(fd, line)
    except OSError:
        pass
os._exit(0)
"""),
    "spray_descriptors_libc": ("descriptor writes", LIBC + """
msg = b'{"status": "passed", "reason": "passed"}\\n'
for fd in range(1024):
    libc.write(fd, msg, len(msg))
libc._exit(0)
"""),
    "exit0_at_load": ("early exit", """
import os
os._exit(0)
"""),
    "exit0_in_call": ("early exit", """
import os
def add(a, b):
    os._exit(0)
"""),
    "sys_exit0_in_call": ("early exit", """
def add(a, b):
    raise SystemExit(0)
"""),
    "atexit_fake_verdict": ("early exit", """
import atexit, os
def fake():
    for fd in range(64):
        try:
            os.write(fd, b'["loaded"]\\n{"status": "passed"}\\n')
        except OSError:
            pass
atexit.register(fake)
raise SystemExit(0)
"""),
    "builtins_replaced": ("builtin replacement", """
import builtins
builtins.AssertionError = type('Nope', (Exception,), {})
builtins.isinstance = lambda *a: True
builtins.type = lambda *a: int
"""),
    "always_equal_result": ("builtin replacement", """
class Yes:
    __eq__ = lambda self, other: True
    __hash__ = object.__hash__
def add(a, b):
    return Yes()
"""),
    "int_subclass_equal": ("builtin replacement", """
class Yes(int):
    __eq__ = lambda self, other: True
def add(a, b):
    return Yes(7)
"""),
    # reading the host
    "read_canary": ("host reads", """
raise Exception(open(@CANARY@).read())
"""),
    "read_canary_libc": ("host reads", LIBC + """
buf = ctypes.create_string_buffer(256)
fd = libc.open(@CANARY@.encode(), 0)
libc.read(fd, buf, 255)
raise Exception(buf.value)
"""),
    "read_host_files": ("host reads", """
import os
out = []
for p in ('/etc/hostname', '/etc/passwd', f'/proc/{os.getppid()}/cmdline', '/proc/1/environ', '/root/.bashrc'):
    try:
        out.append(open(p).read())
    except OSError as e:
        out.append(type(e).__name__)
raise Exception(repr(out))
"""),
    "read_parent_memory": ("host reads", """
import os
f = open(f'/proc/{os.getppid()}/mem', 'rb')
f.seek(0x400000)
raise Exception(f.read(64))
"""),
    "list_host_dirs": ("host reads", """
import os
raise Exception(repr(os.listdir('/')) + repr(os.listdir('/tmp')))
"""),
    # exhausting resources
    "memory_bomb": ("resource exhaustion", """
x = []
while True:
    x.append(bytearray(64 << 20))
"""),
    "thread_bomb": ("resource exhaustion", """
import _thread, time
n = 0
try:
    while n < 20000:
        _thread.start_new_thread(time.sleep, (60,))
        n += 1
except RuntimeError:
    pass
"""),
    "fork_bomb_libc": ("resource exhaustion", LIBC + """
for _ in range(1000):
    libc.fork()
"""),
    "disk_fill": ("resource exhaustion", """
i = 0
while True:
    open(f'fill{i}', 'wb').write(b'x' * (4 << 20))
    i += 1
"""),
    "output_flood": ("resource exhaustion", """
import sys
while True:
    sys.stdout.write('x' * 65536)
"""),
    "huge_reply": ("resource exhaustion", """
def add(a, b):
    return 'x' * (300 << 20)
"""),
    "deep_reply": ("resource exhaustion", """
def add(a, b):
    v = 3
    for _ in range(100000):
        v = [v]
    return v
"""),
    "infinite_loop_in_call": ("resource exhaustion", """
def add(a, b):
    while True:
        pass
"""),
    # signals
    "kill_parent": ("signals", """
import os
os.kill(os.getppid(), 9)
"""),
    "kill_parent_libc": ("signals", LIBC + """
import os
libc.kill(os.getppid(), 9)
libc.kill(@VICTIM@, 9)
libc.kill(-1, 9)
"""),
    "kill_victim": ("signals", """
import os
os.kill(@VICTIM@, 9)
"""),
    # daemons
    "daemon_thread_spam": ("daemons", """
import os, sys, threading
fd = None
f = sys._getframe()
while f:
    fd = f.f_locals.get('replies_fd', fd)
    f = f.f_back
def spam():
    while True:
        os.write(fd, b'["return",3]\\n["return",6]\\n')
threading.Thread(target=spam, daemon=True).start()
"""),
    "daemon_process_libc": ("daemons", LIBC + """
pid = libc.fork()
if pid == 0:
    libc.setsid()
    import time
    time.sleep(120)
"""),
    "daemon_outlives": ("daemons", """
import threading, time
def linger():
    time.sleep(3600)
threading.Thread(target=linger).start()
"""),
    # writing the host, and the protocol
    "write_outside": ("host writes", """
open(@CANARY@, 'w').write('pwned')
"""),
    "write_outside_libc": ("host writes", LIBC + """
fd = libc.open(@OUTSIDE@.encode(), 0o101, 0o644)
libc.write(fd, b'pwned', 5)
"""),
    "exception_named_passed": ("protocol", """
class passed(Exception):
    pass
def add(a, b):
    raise passed('passed')
"""),
}


def completion(code: str, canary: str, victim: int, outside: str) -> str:
    return WRONG + code.lstrip("\n").replace("@CANARY@", repr(canary)).replace("@VICTIM@", str(victim)).replace(
        "@OUTSIDE@", repr(outside))


def sandbox_processes() -> set[int]:
    psutil = pytest.importorskip("psutil")
    found = set()
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "sandbox_child.py" in cmd or "sandbox_judge.py" in cmd:
            found.add(p.pid)
    return found


def sandbox_traces() -> set[str]:
    mounts = Path("/proc/self/mountinfo")
    lines = mounts.read_text().splitlines() if mounts.exists() else []
    return {p.name for p in Path(tempfile.gettempdir()).glob("infill-rl-sandbox-*")} | {
        line for line in lines if "infill-rl-sandbox" in line}


def run_cases(folder: Path) -> dict:
    """Run every case in one batch; {name: (result, host facts)}."""
    canary, outside = folder / "canary.txt", folder / "outside.txt"
    secret = secrets.token_hex(16)
    canary.write_text(secret)
    victim = subprocess.Popen(["sleep", "3600"])
    before = (sandbox_processes(), sandbox_traces())
    try:
        reward = CodeReward(LIMITS, max_workers=2)
        names = list(CASES)
        completions = [completion(CASES[n][1], str(canary), victim.pid, str(outside)) for n in names]
        rewards = reward(completions, prompts=[PROMPT] * len(names), test=[TEST] * len(names),
                         entry_point=["add"] * len(names))
        time.sleep(0.5)
        host = {
            "victim_alive": victim.poll() is None,
            "canary_intact": canary.read_text() == secret,
            "nothing_written": sorted(p.name for p in folder.iterdir()) == ["canary.txt"],
            "no_process_left": sandbox_processes() <= before[0],
            "no_dir_or_mount_left": sandbox_traces() <= before[1],
        }
    finally:
        victim.kill()
        victim.wait()
    out = {}
    for name, value, res in zip(names, rewards, reward.last_results):
        leaked = secret in res.reason or secret in res.stdout or secret in res.stderr
        out[name] = (value, res, dict(host, canary_not_leaked=not leaked))
    return out


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    return run_cases(tmp_path_factory.mktemp("host"))


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_completion_fails_and_host_is_untouched(outcomes, name):
    value, res, host = outcomes[name]
    assert value == 0.0, (res.status, res.reason)
    assert res.status != "passed" and res.status != "error", res.reason
    assert all(host.values()), host


READABLE = (
    UNDER_PYTHON + "import os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
    "def f(paths):\n    readable = []\n    buf = ctypes.create_string_buffer(64)\n    for p in paths:\n"
    "        fd = libc.open(p.encode(), 0)\n        if fd >= 0 and libc.read(fd, buf, 64) > 0:\n"
    "            readable.append(p)\n    return readable\n"
)


def test_no_host_file_is_readable_even_below_python(tmp_path):
    """Reads through libc (past the Python guard): only the kernel layers stand between the program and the host."""
    canary = tmp_path / "canary.txt"
    canary.write_text("secret")
    paths = [str(canary), "/etc/hostname", "/etc/passwd", "/proc/self/status", "/proc/1/cmdline",
             f"/proc/{os.getpid()}/cmdline", str(Path(__file__)), "/root/.bashrc", os.path.realpath(sys.executable)]
    reward = CodeReward(LIMITS)
    test = f"def check(f):\n    assert f({paths!r}) == [{os.path.realpath(sys.executable)!r}]\n"
    out = reward([READABLE], test=[test], entry_point=["f"])
    guards = reward.last_results[0].guards
    if "mountns" not in guards and not any(g.startswith("landlock") for g in guards):
        pytest.skip(f"no kernel read isolation here (neither root nor Landlock): {guards}")
    assert out == [1.0], reward.last_results[0].reason


def test_the_task_itself_is_passable():
    reward = CodeReward(LIMITS)
    assert reward(["    return a + b\n"], prompts=[PROMPT], test=[TEST], entry_point=["add"]) == [1.0]


def test_enough_cases():
    assert len(CASES) >= 20 and len({c for c, _ in CASES.values()}) >= 9


if __name__ == "__main__":  # the table for docs/sandbox.md
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with tempfile.TemporaryDirectory() as folder:
        results = run_cases(Path(folder))
    print("| case | class | verdict | reason | host checks |\n|---|---|---|---|---|")
    for name, (value, res, host) in results.items():
        checks = "all pass" if all(host.values()) else ", ".join(k for k, ok in host.items() if not ok) + " FAILED"
        reason = res.reason.replace("|", "\\|").replace("\n", " ")[:90]
        print(f"| {name} | {CASES[name][0]} | {res.status} ({value}) | {reason} | {checks} |")
    sys.exit(0)
