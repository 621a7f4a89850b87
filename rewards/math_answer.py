"""Answer extraction and math-verify checks. String helpers run anywhere; `score` and `parseable` run in workers.

What is compared (same rule for GSM8K and MATH):

- Gold: a GSM8K solution is reduced to the number after its last `####` (commas dropped); a MATH solution with a
  `\\boxed{}` to its last boxed content; anything else (MATH-500's `answer` column, plain numbers) is taken as is.
  A gold that is a plain number is "numeric".
- Prediction: the content of the last complete `\\boxed{...}` if there is one. Otherwise, from the answer block of
  the infilling canvas, the whole block (surrounding `$` and a final period removed) and, for a numeric gold, also
  its last number ("18 dollars"); from free text, the last number.
- Both are parsed as `\\boxed{...}` by math-verify (LaTeX first, plain expression second) and compared with
  `math_verify.verify`; the sample is correct if one of its (at most two) candidates is. Candidates longer than
  `max_chars` are not parsed and score 0 ("too_long").

`score` and `parseable` call math-verify with its signal-based timeouts disabled: they are meant to run inside a
`rewards.pool.WorkerPool`, whose timer and kill are the real guard.
"""

from __future__ import annotations

import functools
import logging
import re

BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
MAX_CHARS = 1000


def _matching_braces(text: str) -> dict[int, int]:
    """Position of each '{' -> position of its matching '}', in one linear pass (unmatched ones are absent)."""
    stack, pairs = [], {}
    for i, ch in enumerate(text):
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            pairs[stack.pop()] = i
    return pairs


def last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` (or `\\fbox{...}`), None if there is none. Linear time."""
    opens = [m.end() - 1 for m in BOXED.finditer(text)]
    if not opens:
        return None
    pairs = _matching_braces(text)
    for start in reversed(opens):
        if start in pairs:
            return text[start + 1 : pairs[start]]
    return None


def last_number(text: str) -> str | None:
    """The last number in `text` (integer, decimal, or a/b; thousands separators dropped), None if none."""
    last = None
    for last in NUMBER.finditer(text):  # noqa: B007 - we want the final match
        pass
    return None if last is None else last.group(0).replace(",", "")


def after_delimiter(text: str, delimiter: str) -> str | None:
    """What follows the last `delimiter`: up to its closing brace if it ends with '{' (None if unclosed), else the
    rest of that line. None if the delimiter does not occur. Linear time."""
    pos = text.rfind(delimiter)
    if pos < 0:
        return None
    rest = text[pos + len(delimiter) :]
    if not delimiter.endswith("{"):
        return rest.split("\n", 1)[0]
    depth = 1
    for i, ch in enumerate(rest):
        depth += (ch == "{") - (ch == "}")
        if depth == 0:
            return rest[:i]
    return None


def gold_answer(gold) -> tuple[str, str]:
    """Normalise a gold answer column to (kind, text): kind 'number' (GSM8K `#### N`, or a plain number) or 'latex'."""
    gold = str(gold)
    if "####" in gold:
        gold = gold.rsplit("####", 1)[1]
    else:
        boxed = last_boxed(gold)
        gold = boxed if boxed is not None else gold
    gold = gold.strip()
    if NUMBER.fullmatch(gold):
        return "number", gold.replace(",", "")
    return "latex", gold


def candidates(text: str, source: str, kind: str) -> list[str]:
    """The predictions to compare, best first (see the module docstring). source: 'block' (answer block) or 'text'."""
    boxed = last_boxed(text)
    if boxed is not None:
        return [boxed.strip()] if boxed.strip() else []
    number = last_number(text)
    if source == "text":
        return [number] if number is not None else []
    block = text.strip().rstrip(". ").strip("$ ").rstrip(". ")  # "$x$." -> "x"
    out = [block] if block else []
    if kind == "number" and number is not None and number != block:
        out.append(number)
    return out


# ----- inside workers -----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _math_verify():
    import math_verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout disabled" warning: we know
    return math_verify


def _parse(expr: str):
    mv = _math_verify()
    configs = [mv.LatexExtractionConfig(), mv.ExprExtractionConfig()]
    return mv.parse("\\boxed{" + expr + "}", configs, parsing_timeout=None)


@functools.lru_cache(maxsize=4096)
def _parse_gold(text: str):
    return _parse(text)


def score(gold, text: str, source: str = "text", max_chars: int | None = MAX_CHARS) -> tuple[float, str]:
    """(1.0 or 0.0, note) for one prediction; note is "correct", "wrong", "no_answer" or "too_long".

    Raises whatever math-verify raises (the pool reports it as an error, i.e. not scorable).
    """
    kind, gold_text = gold_answer(gold)
    gold_parsed = _parse_gold(gold_text)  # first: an unusable gold answer is an error, never a silent 0
    if not gold_parsed:
        raise ValueError(f"math-verify cannot parse the gold answer {gold_text[:100]!r}")
    preds = candidates(text, source, kind)
    if not preds:
        return 0.0, "no_answer"
    if max_chars is not None and all(len(p) > max_chars for p in preds):
        return 0.0, "too_long"
    note = "no_answer"
    for pred in preds:
        if max_chars is not None and len(pred) > max_chars:
            continue
        pred_parsed = _parse(pred)
        if pred_parsed:
            if _math_verify().verify(gold_parsed, pred_parsed, timeout_seconds=None):
                return 1.0, "correct"
            note = "wrong"
    return 0.0, note


def warmup() -> None:
    """Import math-verify and run one LaTeX and one numeric comparison (parser set-up, caches)."""
    score("\\frac{1}{2}", "\\boxed{0.5}")
    score("#### 3", "3")


def dispatch(op: str, *args):
    """The pool's single entry point: `score` or `parseable`."""
    return {"score": score, "parseable": parseable}[op](*args)


def parseable(text: str, source: str = "text", max_chars: int | None = MAX_CHARS) -> bool:
    """Whether the answer `score` would compare is present, short enough, and parsed by math-verify."""
    preds = candidates(text, source, "latex")
    if not preds or (max_chars is not None and len(preds[0]) > max_chars):
        return False
    return bool(_parse(preds[0]))
