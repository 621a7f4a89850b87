"""Instant `--help` for the entry scripts: their recipe keys, read from a generated field list, not from torch/TRL.

The entry scripts' recipe keys are the fields of config dataclasses that subclass transformers/TRL classes, and
importing those takes seconds. `--help` instead reads `rl/cli_help.json`, a list of every script's keys (name,
type, default, help, grouped by dataclass) generated from the real dataclasses:

    python -m rl.cli            # regenerate rl/cli_help.json after changing a config field

`tests/test_cli.py` fails when the file is stale. Parsing itself (and the unknown-key error with its suggestion)
still goes through `rl.recipe.parse` and the real dataclasses. This module imports only the standard library.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

SPEC_FILE = Path(__file__).with_name("cli_help.json")
SCRIPTS_DIR = Path(__file__).resolve().parent.parent / "scripts"
USAGE = "%(prog)s [RECIPE.yaml] [--key value ...]"


def wants_help(argv: list[str] | None) -> bool:
    args = sys.argv[1:] if argv is None else argv
    return any(a in ("-h", "--help") for a in args)


def exit_if_help(script: str, argv: list[str] | None, doc: str | None) -> None:
    """With `-h`/`--help` in `argv`, print `script`'s recipe keys and exit 0; otherwise return at once."""
    if not wants_help(argv):
        return
    with open(SPEC_FILE) as f:
        spec = json.load(f)
    if script not in spec["scripts"]:
        raise KeyError(f"{script!r} is not in {SPEC_FILE}; run `python -m rl.cli` to regenerate it.")
    parser = argparse.ArgumentParser(prog=f"{script}.py", usage=USAGE, description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for title in spec["scripts"][script]:
        options = spec["classes"][title]
        group = parser.add_argument_group(title)
        for flags, metavar, help_text, default in options:
            text = (help_text or "") + (f" (default: {default})" if default is not None else "")
            text = text.strip().replace("%", "%%")
            if metavar is None:
                group.add_argument(*flags, action="store_true", help=text)
            else:
                group.add_argument(*flags, metavar=metavar, help=text)
    parser.print_help()
    raise SystemExit(0)


def script_configs(script: str) -> list[type]:
    """The config dataclasses of `scripts/<script>.py` (imports the script module, not its heavy code)."""
    spec = importlib.util.spec_from_file_location(f"_script_{script}", SCRIPTS_DIR / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.configs()


def _metavar(action) -> str | None:
    if action.nargs == 0:
        return None
    kind = getattr(action.type, "__name__", None) or "value"
    if action.choices:
        return "{" + ",".join(str(c) for c in action.choices) + "}"
    return kind.upper() if kind in ("str", "int", "float") else "VALUE"


def build_spec(script: str) -> dict[str, list]:
    """{dataclass name: [(flags, metavar, help, default text), ...]} of a script's configs, in order."""
    import dataclasses

    from rl.recipe import build_parser

    types = script_configs(script)
    parser = build_parser(types)
    by_dest = {}
    for action in parser._actions:  # the field's own flag, not the `--no_<field>` HfArgumentParser adds after it
        by_dest.setdefault(action.dest, action)
    groups = {}
    for t in types:
        options = []
        for f in dataclasses.fields(t):
            action = by_dest.get(f.name)
            if not f.init or action is None:
                continue
            default = action.default
            default = getattr(default, "value", default)
            text = None if default is argparse.SUPPRESS or default is None else str(default)
            help_text = action.help.replace("%%", "%") if action.help else None
            options.append([list(action.option_strings), _metavar(action), help_text, text])
        groups[t.__name__] = options
    return groups


def scripts_with_configs() -> list[str]:
    return sorted(p.stem for p in SCRIPTS_DIR.glob("*.py") if "\ndef configs()" in p.read_text())


def generate() -> dict:
    """{"classes": {dataclass: options}, "scripts": {script: [dataclass, ...]}} for every script with configs()."""
    spec = {"classes": {}, "scripts": {}}
    for script in scripts_with_configs():
        groups = build_spec(script)
        spec["classes"].update(groups)
        spec["scripts"][script] = list(groups)
    return spec


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    with open(SPEC_FILE, "w") as out:
        json.dump(generate(), out, indent=0, sort_keys=True)
        out.write("\n")
    print(f"wrote {SPEC_FILE}")
