"""Code reward: HumanEval canonical solutions pass; programs that break limits fail inside them, host untouched.

The hostile programs that try to forge a verdict or read the host are in test_rewards_adversarial.py."""

import json
import os
import platform
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import rewards.sandbox as sandbox
from rewards.code_reward import CodeReward, build_program, code_tests, extract_code, prelude
from rewards.sandbox import SandboxLimits, run_test

psutil = pytest.importorskip("psutil")

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LIMITS = SandboxLimits(wall_seconds=2.0, memory_bytes=512 << 20)
UNDER_PYTHON = "import sys\nfor m in ('ctypes', '_ctypes', '_socket'):\n    sys.modules.pop(m, None)\nimport ctypes\n"
LIBC = UNDER_PYTHON + "libc = ctypes.CDLL(None, use_errno=True)\n"
PASS = "def check(candidate):\n    candidate()\n"  # passes iff the program loads and f() returns


def run_program(source: str, limits: SandboxLimits = LIMITS):
    """Run `source` as the body of f() (indented), so that its failure is the test's failure."""
    body = "".join(f"    {line}\n" for line in source.splitlines()) or "    pass\n"
    return run_test(f"def f():\n{body}", PASS, "f", limits=limits)


def kernel_guards() -> list[str]:
    return run_program("pass").guards


def sandbox_processes() -> set[int]:
    """Every process on the host running the sandbox bootstrap or judge (an escaped fork would still be one)."""
    found = set()
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "sandbox_child.py" in cmd or "sandbox_judge.py" in cmd:
            found.add(p.pid)
    return found


def sandbox_dirs() -> set[str]:
    """Sandbox working directories on disk, and any of their tmpfs mounts visible to the host."""
    mounts = Path("/proc/self/mountinfo")
    lines = mounts.read_text().splitlines() if mounts.exists() else []
    mounted = [line for line in lines if "infill-rl-sandbox" in line]
    return {p.name for p in Path(tempfile.gettempdir()).glob("infill-rl-sandbox-*")} | set(mounted)


@pytest.fixture
def host():
    """Snapshot of our process tree, the sandbox processes and temp dirs; checked unchanged after the test."""
    before = ({c.pid for c in psutil.Process().children(recursive=True)}, sandbox_processes(), sandbox_dirs())
    yield
    time.sleep(0.2)
    after = ({c.pid for c in psutil.Process().children(recursive=True)}, sandbox_processes(), sandbox_dirs())
    assert after[0] <= before[0], "child processes left behind"
    assert after[1] <= before[1], "sandbox processes escaped"
    assert after[2] <= before[2], "sandbox working directories left behind"


def test_every_humaneval_canonical_solution_passes(host):
    path = DATA / "humaneval.jsonl"
    if not path.exists():
        pytest.skip(f"reference data {path} is absent (it lives outside the repository, in ../shared/data)")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    columns = {k: [r[k] for r in rows] for k in ("test", "entry_point")}
    out = code_tests([r["canonical_solution"] for r in rows], prompts=[r["prompt"] for r in rows], **columns)
    failed = [(r["task_id"], res.reason) for r, res in zip(rows, code_tests.last_results) if not res.passed]
    assert len(rows) == 164 and failed == [] and out == [1.0] * 164
    out = code_tests(["    return None\n"] * len(rows), prompts=[r["prompt"] for r in rows], **columns)
    assert out == [0.0] * 164
    assert sum(r.reason.startswith("failed: AssertionError") for r in code_tests.last_results) > 150


def test_program_assembly():
    prompt, test = "def add(a, b):\n    '''Add.'''\n", "def check(f):\n    assert f(1, 2) == 3\n"
    assert build_program("    return a + b\n", "add", prompt) == prompt + "    return a + b\n"
    assert prelude(prompt) == prompt and prelude("def add(a, b):\n") is None and prelude([]) is None
    fenced = "Sure:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    assert extract_code(fenced, "add") == "def add(a, b):\n    return a + b\n"
    chat_prompt = [{"role": "user", "content": "write add"}]
    assert build_program(fenced, "add", chat_prompt).startswith("def add(a, b):")
    reward = CodeReward(LIMITS)
    completions = ["    return a + b\n", fenced, [{"role": "assistant", "content": fenced}], "    return a - b\n"]
    prompts = [prompt, prompt, chat_prompt, prompt]
    assert reward(completions, prompts=prompts, test=[test] * 4, entry_point=["add"] * 4) == [1.0, 1.0, 1.0, 0.0]
    assert reward.last_results[3].reason.startswith("failed: AssertionError")
    # a bare signature as prompt (does not compile alone), and a chat-rendered prompt (not Python at all)
    prompts = ["def add(a, b):\n", "<|user|> write add(a, b) <|assistant|>"]
    completions = ["    return a + b\n", "def add(a, b):\n    return a + b\n"]
    assert reward(completions, prompts=prompts, test=[test] * 2, entry_point=["add"] * 2) == [1.0, 1.0]


def test_bad_completions_fail_quickly_with_a_reason():
    reward = CodeReward(LIMITS)
    prompt, test = "def add(a, b):\n", "def check(f):\n    assert f(1, 2) == 3\n"
    completions = ["", "   \n", "    return a +\n", "x" * (10 << 20), "    return (" * 50_000]
    start = time.perf_counter()
    out = reward(completions, prompts=[prompt] * 5, test=[test] * 5, entry_point=["add"] * 5)
    assert out == [0.0] * 5 and time.perf_counter() - start < 5.0
    reasons = [r.reason for r in reward.last_results]
    assert reasons[0] == reasons[1] == "failed: empty completion"
    assert reasons[2].startswith("failed: SyntaxError") and "over the limit of 100000" in reasons[3], reasons
    assert reasons[4].startswith("failed:"), reasons


def test_a_task_that_cannot_run_is_not_scorable(host):
    reward = CodeReward(LIMITS)
    tests = ["def check(f):\n    assert f(1) == 1\n", "x = undefined_name\n", "def check(f):\n    f(lambda: 1)\n"]
    out = reward(["def f(x):\n    return x\n"] * 3, test=tests, entry_point=["f"] * 3)
    assert out == [1.0, None, None], [r.reason for r in reward.last_results]
    assert "no check" in reward.last_results[1].reason or "NameError" in reward.last_results[1].reason
    assert "cannot cross the sandbox boundary" in reward.last_results[2].reason


def test_threads_are_allowed_up_to_a_limit(host):
    started = (
        "import threading\nresults = []\n"
        "def work(i):\n    results.append(i * i)\n"
        "def f(n):\n    ts = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(n)]\n"
        "    [t.start() for t in ts]\n    [t.join() for t in ts]\n    return sorted(results)\n"
    )
    res = run_test(started, "def check(f):\n    assert f(8) == [i * i for i in range(8)]\n", "f", limits=LIMITS)
    assert res.passed, res.reason
    daemon = "import threading, time\ndef f():\n" \
        "    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n    return 1\n"
    assert run_test(daemon, "def check(f):\n    assert f() == 1\n", "f", limits=LIMITS).passed
    # below the Python guard: how many threads can the program really start?
    bomb = "import _thread, time\ndef f():\n    n = 0\n    try:\n        while n < 5000:\n" \
        "            _thread.start_new_thread(time.sleep, (30,))\n            n += 1\n    except RuntimeError:\n" \
        "        pass\n    return n\n"
    res = run_test(bomb, "def check(f):\n    n = f()\n    assert n < 32, n\n", "f", limits=LIMITS)
    if "uid" not in res.guards:
        pytest.skip(f"no kernel thread limit without the uid layer (root only): {res.guards}")
    assert res.passed, res.reason


@pytest.mark.parametrize(
    "source, status, reason",
    [
        ("while True:\n    pass\n", "timeout", "timeout"),
        ("import time\ntime.sleep(600)\n", "timeout", "timeout"),
        ("x = bytearray(10 * 1024**3)\n", "memory", "memory"),
        ("chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 1024**2))\n", "memory", "memory"),
        ("def f():\n    return f()\nf()\n", "failed", "failed: RecursionError"),
        ("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", "output_limit", "output limit"),
        ("import os\nos._exit(0)\n", "failed", "failed: exited with code 0 before the test finished"),
        ("import sys\nsys.exit(0)\n", "failed", "failed: SystemExit"),
    ],
)
def test_limits_and_early_exits_fail_with_a_reason(host, source, status, reason):
    res = run_program(source)
    assert (res.status, res.reason[: len(reason)]) == (status, reason), res.reason
    assert res.run_seconds < LIMITS.wall_seconds + 1.0


def test_fork_bomb_is_stopped(host):
    res = run_program("import os\nwhile True:\n    os.fork()\n")
    assert res.status == "failed" and res.run_seconds < LIMITS.wall_seconds, res.reason


def test_fork_bomb_below_python_is_stopped_by_the_kernel(host):
    guards = kernel_guards()
    if os.geteuid() == 0 and "seccomp" not in guards:
        pytest.skip(f"root without seccomp ({guards}): nothing below Python would stop a fork bomb here")
    bomb = LIBC + "while True:\n    if libc.fork() < 0:\n        raise OSError(ctypes.get_errno(), 'fork failed')\n"
    res = run_program(bomb)
    assert res.status == "failed" and "fork failed" in res.reason, res.reason


def test_writes_outside_the_working_directory_fail(host, tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("original")
    escape = tmp_path / "escape.txt"
    attempts = [
        f"open({str(escape)!r}, 'w').write('x')",
        f"import os\nos.remove({str(victim)!r})",
        f"import io\nio.FileIO({str(escape)!r}, 'w')",
        f"open({str(victim)!r}, 'a').write('x')",
        "open('inside.txt', 'w').write('fine')\nopen('../escape.txt', 'w').write('x')",
    ]
    if any(g.startswith("landlock") for g in kernel_guards()):
        attempts.append(LIBC + f"assert libc.open({str(escape).encode()!r}, 0o101, 0o644) >= 0, ctypes.get_errno()")
    for source in attempts:
        res = run_program(source)
        assert res.status == "failed", (source, res.reason)
    assert victim.read_text() == "original" and not escape.exists()
    assert list(tmp_path.iterdir()) == [victim]


def test_disk_filling_stops_at_the_private_tmpfs(host):
    if "tmpfs" not in kernel_guards():
        pytest.skip("no private tmpfs (needs root): only RLIMIT_FSIZE per file bounds the disk use here")
    res = run_program("for i in range(64):\n    open(f'f{i}', 'wb').write(b'x' * (8 << 20))\n")
    assert res.status == "failed" and "No space left on device" in res.reason, res.reason


def test_no_network(host):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.5)
    port = server.getsockname()[1]
    attempts = [
        "import socket\nsocket.socket()",
        f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
        f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}', timeout=1)",
    ]
    if "seccomp" in kernel_guards() or "netns" in kernel_guards():
        attempts.append(UNDER_PYTHON + f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))")
    try:
        for source in attempts:
            res = run_program(source)
            assert res.status in ("failed", "timeout"), (source, res.reason)  # a loaded machine imports slowly
        with pytest.raises(TimeoutError):
            server.accept()  # nobody connected
    finally:
        server.close()


def test_cannot_signal_host_processes(host):
    victim = subprocess.Popen(["sleep", "30"])
    try:
        attempts = [f"import os\nos.kill({victim.pid}, 9)", f"import os\nos.killpg({victim.pid}, 9)"]
        if platform.machine() == "x86_64" and "seccomp" in kernel_guards():
            attempts.append(LIBC + f"assert libc.kill({victim.pid}, 9) == 0, ctypes.get_errno()")
            attempts.append(LIBC + "assert libc.kill(-1, 0) == 0, ctypes.get_errno()")  # probe only: signal 0
        for source in attempts:
            assert run_program(source).status == "failed", source
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def test_sandbox_failure_is_not_scorable(host, monkeypatch):
    monkeypatch.setattr(sandbox, "CHILD", Path("/nonexistent/sandbox_child.py"))
    res = run_program("pass")
    assert res.status == "error"
    reward = CodeReward(LIMITS)
    assert reward(["    return 1\n"], prompts=["def f():\n"], test=["def check(f): pass"], entry_point=["f"]) == [None]


def test_guards_reported():
    guards = kernel_guards()
    assert {"rlimits", "python"} <= set(guards)
    if platform.machine() == "x86_64" and platform.system() == "Linux":
        assert "seccomp" in guards
    if os.geteuid() == 0 and "mountns" in guards:
        assert {"netns", "uid"} <= set(guards)


def test_the_wire_carries_plain_data_only():
    import rewards.sandbox_wire as wire

    values = [None, True, 3, -(2**20000), 1.5, float("inf"), 2 - 1j, b"\x00b", "é\n", [1, (2, 3)], {(1, 2): {3}},
              frozenset({1}), {"t": "tuple", "v": []}]
    for v in values:
        out = wire.decode(wire.loads(wire.dumps(["return", wire.encode(v)]))[1])
        assert out == v and type(out) is type(v)

    class Yes(int):
        def __eq__(self, other):
            return True

    assert type(wire.decode(wire.encode(Yes(5)))) is int  # a subclass travels as its builtin base
    with pytest.raises(TypeError, match="cannot cross the sandbox boundary"):
        wire.encode(object())
    nested = []
    for _ in range(200):
        nested = [nested]
    with pytest.raises(ValueError, match="nested deeper"):
        wire.encode(nested)
    bad = [b'["r", {"t": "set", "v": [[1]]}]', b'["r", {"t": "eval", "v": "1"}]', b"[" * 100_000, b'["r"] trailing',
           b"\xff", b"{}", b'["r", {"t": "tuple", "v": [], "x": 1}]']
    for line in bad:
        with pytest.raises(wire.WireError):
            message = wire.loads(line)
            wire.decode(message[1])
