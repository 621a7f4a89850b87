"""Recipes: flat YAML whose keys are exactly the field names of the entry script's config dataclasses.

    python scripts/sft.py recipes/tiny/sft.yaml --max_steps 10 --output_dir /tmp/run

The optional first positional argument is the recipe; its values become the defaults, and `--key value` flags
override them. A key (in the file or on the command line) that no dataclass declares is an error naming the
closest valid keys. `--key null` sets an optional field to None
(`none` too, for non-string fields). Help texts come from each field's
`metadata["help"]` or, for dataclasses documented with attribute docstrings (the rollout configs), from those.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import sys
import textwrap
import typing
from collections.abc import Sequence
from typing import Any

import yaml


def _attribute_docs(cls: type) -> dict[str, str]:
    """Docstrings written under dataclass fields (`x: int = 1` followed by a string), through the MRO."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _optional(tp: Any) -> bool:
    return type(None) in typing.get_args(tp)


def _none_aware(convert):
    # 'none' is a legitimate string value (report_to: none), so only non-string fields read it as None.
    words = ("null",) if convert is str else ("null", "none")

    def parse(text: str):
        return None if text.lower() in words else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def load_recipe(path: str) -> dict[str, Any]:
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"Recipe {path} must be a flat mapping of key: value, got {type(data).__name__}.")
    nested = [k for k, v in data.items() if isinstance(v, dict)]
    if nested:
        raise ValueError(f"Recipe {path}: keys must be flat (no nested sections), but {nested} hold mappings.")
    return data


def field_names(types: Sequence[type]) -> set[str]:
    return {f.name for t in types for f in dataclasses.fields(t) if f.init}


def build_parser(types: Sequence[type], description: str | None = None):
    """An `HfArgumentParser` over `types`, with help from attribute docstrings and `none` for optional fields."""
    from transformers import HfArgumentParser

    seen: dict[str, str] = {}
    for t in types:
        for name in sorted(field_names([t])):
            if name in seen:
                raise ValueError(f"Field {name!r} is declared by both {seen[name]} and {t.__name__}; rename one.")
            seen[name] = t.__name__
    parser = HfArgumentParser(list(types), description=description,
                              usage="%(prog)s [RECIPE.yaml] [--key value ...]")
    docs, hints = {}, {}
    for t in types:
        docs.update(_attribute_docs(t))
        hints.update(typing.get_type_hints(t))
    for action in parser._actions:
        if action.dest in docs and not action.help:
            action.help = docs[action.dest].replace("%", "%%")  # argparse %-formats help
        if action.dest in hints and _optional(hints[action.dest]) and callable(action.type):
            action.type = _none_aware(action.type)
    return parser


def parse(types: Sequence[type], args: Sequence[str] | None = None, description: str | None = None,
          allow_unknown: bool = False) -> tuple:
    """Instances of `types` from `[recipe.yaml] [--key value ...]` (default: `sys.argv[1:]`).

    `allow_unknown` ignores recipe keys that `types` do not declare (for tools that read part of a recipe);
    entry scripts leave it off, so a misspelled key is an error.
    """
    args = list(sys.argv[1:] if args is None else args)
    parser = build_parser(types, description)
    recipe: dict[str, Any] = {}
    if args and not args[0].startswith("-"):
        recipe_path, args = args[0], args[1:]
        recipe = load_recipe(recipe_path)
        known = field_names(types)
        unknown = sorted(set(recipe) - known)
        if allow_unknown:
            recipe = {k: v for k, v in recipe.items() if k in known}
        elif unknown:
            hints = {k: difflib.get_close_matches(k, known, n=2) for k in unknown}
            raise ValueError(
                f"Recipe {recipe_path} has unknown key(s): "
                + "; ".join(f"{k!r} (did you mean {', '.join(h)}?)" if h else repr(k) for k, h in hints.items())
                + ". Keys must be field names of " + ", ".join(t.__name__ for t in types) + "."
            )
        parser.set_defaults(**recipe)
        for action in parser._actions:
            if action.dest in recipe:
                action.required = False
    flags = {a.split("=", 1)[0] for a in args if a.startswith("--")}
    unknown_flags = sorted(flags - set(parser._option_string_actions))
    if unknown_flags:
        options = [o for o in parser._option_string_actions if o.startswith("--")]
        hints = {f: difflib.get_close_matches(f, options, n=2) for f in unknown_flags}
        raise ValueError(
            "Unknown option(s): "
            + "; ".join(f"{f} (did you mean {', '.join(h)}?)" if h else f for f, h in hints.items())
            + ". Options are the field names of " + ", ".join(t.__name__ for t in types) + " (see --help)."
        )
    return parser.parse_args_into_dataclasses(args=args, look_for_args_file=False)


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return getattr(f.default, "value", f.default)


def to_dict(*configs, only_changed: bool = False) -> dict[str, Any]:
    """Flat {field: value} of config dataclasses: what a recipe with these values would say.

    `only_changed` keeps the fields whose value differs from the dataclass default.
    """
    out: dict[str, Any] = {}
    for cfg in configs:
        for f in dataclasses.fields(cfg):
            if not f.init:
                continue
            value = getattr(cfg, f.name)
            value = getattr(value, "value", value)  # enums (TrainingArguments strategies) as their strings
            if only_changed and value == _default(f):
                continue
            if isinstance(value, (str, int, float, bool, list, type(None))):
                out[f.name] = value
    return out


def recipe_yaml(*configs) -> str:
    """The non-default values of the resolved configs as recipe text, for provenance next to a saved model."""
    return yaml.safe_dump(to_dict(*configs, only_changed=True), sort_keys=False)
