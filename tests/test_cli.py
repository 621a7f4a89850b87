"""Entry scripts: `--help` without torch/TRL (from rl/cli_help.json, which must match the real configs), and every
path that a script's docstring, a recipe comment or the README names exists."""

import json
import os
import re
import subprocess
import sys

import pytest

from rl import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("torch", "transformers", "trl", "peft", "accelerate", "datasets")


def test_help_file_matches_the_real_configs():
    with open(cli.SPEC_FILE) as f:
        committed = json.load(f)
    assert committed == json.loads(json.dumps(cli.generate())), "stale rl/cli_help.json: run `python -m rl.cli`"


@pytest.mark.parametrize("script", cli.scripts_with_configs() + ["bench_trainer"])
def test_help_imports_no_heavy_module(script):
    probe = (
        "import runpy, sys\n"
        f"sys.argv = [{script!r}, '--help']\n"
        "try:\n"
        f"    runpy.run_path({os.path.join(ROOT, 'scripts', script + '.py')!r}, run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout and "--output_dir" in out.stdout or "--model_name_or_path" in out.stdout
    assert out.stdout.strip().endswith("HEAVY []"), out.stdout[-300:]


def test_help_lists_every_key_with_its_help():
    spec = cli.generate()
    options = {flags[0]: help_text for name in spec["scripts"]["grpo"] for flags, _, help_text, _ in
               spec["classes"][name]}
    for key in ("--dense_coef", "--policy", "--bf16", "--reasoning_length", "--use_peft", "--task"):
        assert options[key], key


# Files named in prose (with an extension, so metric names such as rollout/nfe are not paths): recipes/x.yaml,
# scripts/x.py, docs/x.md, rl/x.py, ../shared/data/x.jsonl, recipes/accelerate/{ddp,zero2}.yaml, ...
PATH = re.compile(r"(?<![\w./-])((?:\.\./shared|recipes|scripts|docs|rl|rewards|rollout|tests)/[\w./{},-]*\.\w+)")


def _named_paths(text: str) -> set[str]:
    found = set()
    for path in PATH.findall(text):
        if "{" in path:  # recipes/accelerate/{ddp,zero2}.yaml
            head, rest = path.split("{", 1)
            alts, tail = rest.split("}", 1)
            found |= {head + alt + tail for alt in alts.split(",")}
        else:
            found.add(path)
    return found


def _sources() -> list[str]:
    files = [os.path.join(ROOT, "README.md")]
    for folder in ("scripts", "recipes", "docs"):
        for base, _, names in os.walk(os.path.join(ROOT, folder)):
            files += [os.path.join(base, n) for n in names if n.endswith((".py", ".yaml", ".md"))]
    return files


def test_every_named_path_exists():
    missing = []
    for source in _sources():
        with open(source) as f:
            text = f.read()
        if source.endswith(".py"):
            text = text.split('"""', 2)[1] if text.count('"""') >= 2 else ""  # the module docstring
        for path in _named_paths(text):
            if path.startswith("outputs/") or "<" in path:
                continue
            if not os.path.exists(os.path.join(ROOT, path)):
                missing.append(f"{os.path.relpath(source, ROOT)}: {path}")
    assert not missing, "paths named but absent:\n" + "\n".join(missing)
