"""Code reward: HumanEval canonical solutions pass; hostile programs fail inside their limits, host untouched."""

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
from rewards.code_reward import CodeReward, build_program, code_tests, extract_code
from rewards.sandbox import SandboxLimits, run_program

psutil = pytest.importorskip("psutil")

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LIMITS = SandboxLimits(wall_seconds=2.0, memory_bytes=512 << 20)
UNDER_PYTHON = "import sys\nfor m in ('ctypes', '_ctypes', '_socket'):\n    sys.modules.pop(m, None)\nimport ctypes\n"
LIBC = UNDER_PYTHON + "libc = ctypes.CDLL(None, use_errno=True)\n"


def kernel_guards() -> list[str]:
    return run_program("pass", LIMITS).guards


def sandbox_processes() -> set[int]:
    """Every process on the host running the sandbox bootstrap (an escaped fork would still be one)."""
    found = set()
    for p in psutil.process_iter(["cmdline"]):
        if any("sandbox_child.py" in part for part in (p.info["cmdline"] or [])):
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
    assert build_program("    return a + b\n", test, "add", prompt).startswith(prompt + "    return a + b")
    fenced = "Sure:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    assert extract_code(fenced, "add") == "def add(a, b):\n    return a + b\n"
    chat_prompt = [{"role": "user", "content": "write add"}]
    assert build_program(fenced, test, "add", chat_prompt).startswith("def add(a, b):")
    reward = CodeReward(LIMITS)
    completions = ["    return a + b\n", fenced, [{"role": "assistant", "content": fenced}], "    return a - b\n"]
    prompts = [prompt, prompt, chat_prompt, prompt]
    assert reward(completions, prompts=prompts, test=[test] * 4, entry_point=["add"] * 4) == [1.0, 1.0, 1.0, 0.0]
    assert reward.last_results[3].reason.startswith("failed: AssertionError")
    # a bare signature as prompt (does not compile alone), and a chat-rendered prompt (not Python at all)
    prompts = ["def add(a, b):\n", "<|user|> write add(a, b) <|assistant|>"]
    completions = ["    return a + b\n", "def add(a, b):\n    return a + b\n"]
    assert reward(completions, prompts=prompts, test=[test] * 2, entry_point=["add"] * 2) == [1.0, 1.0]


@pytest.mark.parametrize(
    "source, status, reason",
    [
        ("while True:\n    pass\n", "timeout", "timeout"),
        ("import time\ntime.sleep(600)\n", "timeout", "timeout"),
        ("x = bytearray(10 * 1024**3)\n", "memory", "memory"),
        ("chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 1024**2))\n", "memory", "memory"),
        ("def f():\n    return f()\nf()\n", "failed", "failed: RecursionError"),
        ("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", "output_limit", "output limit"),
        ("import os\nos._exit(0)\n", "failed", "failed: exited with code 0 before finishing"),
        ("import sys\nsys.exit(0)\n", "failed", "failed: SystemExit"),
        ("import threading\nthreading.Thread(target=print).start()\n", "failed", "failed: RuntimeError"),
    ],
)
def test_limits_and_early_exits_fail_with_a_reason(host, source, status, reason):
    res = run_program(source, LIMITS)
    assert (res.status, res.reason[: len(reason)]) == (status, reason), res.reason
    assert res.seconds < LIMITS.wall_seconds + 2.0


def test_fork_bomb_is_stopped(host):
    res = run_program("import os\nwhile True:\n    os.fork()\n", LIMITS)
    assert res.status == "failed" and res.seconds < LIMITS.wall_seconds, res.reason


def test_fork_bomb_below_python_is_stopped_by_the_kernel(host):
    guards = kernel_guards()
    if os.geteuid() == 0 and "seccomp" not in guards:
        pytest.skip(f"root without seccomp ({guards}): nothing below Python would stop a fork bomb here")
    bomb = LIBC + "while True:\n    if libc.fork() < 0:\n        raise OSError(ctypes.get_errno(), 'fork failed')\n"
    res = run_program(bomb, LIMITS)
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
        res = run_program(source, LIMITS)
        assert res.status == "failed", (source, res.reason)
    assert victim.read_text() == "original" and not escape.exists()
    assert list(tmp_path.iterdir()) == [victim]


def test_disk_filling_stops_at_the_private_tmpfs(host):
    if "tmpfs" not in kernel_guards():
        pytest.skip("no private tmpfs (needs root): only RLIMIT_FSIZE per file bounds the disk use here")
    res = run_program("for i in range(64):\n    open(f'f{i}', 'wb').write(b'x' * (8 << 20))\n", LIMITS)
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
            res = run_program(source, LIMITS)
            assert res.status == "failed", (source, res.reason)
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
            assert run_program(source, LIMITS).status == "failed", source
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def test_a_fake_status_line_does_not_pass(host):
    fake = 'import os, json\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b"x start []\\nx {}\\n")\n' \
        "    except OSError:\n        pass\nos._exit(0)\n"
    res = run_program(fake, LIMITS)
    assert not res.passed and res.status == "failed"


def test_sandbox_failure_is_not_scorable(host, monkeypatch):
    monkeypatch.setattr(sandbox, "CHILD", Path("/nonexistent/sandbox_child.py"))
    res = run_program("pass", LIMITS)
    assert res.status == "error"
    reward = CodeReward(LIMITS)
    assert reward(["    return 1\n"], prompts=["def f():\n"], test=["def check(f): pass"], entry_point=["f"]) == [None]


def test_guards_reported():
    guards = kernel_guards()
    assert {"rlimits", "python"} <= set(guards)
    if platform.machine() == "x86_64" and platform.system() == "Linux":
        assert "seccomp" in guards
