"""Answer extraction and math-verify checks. String helpers run anywhere; `score` and `parseable` run in workers.

What is compared (same rule for GSM8K and MATH):

- Gold: a GSM8K solution is reduced to the number after its last `####` (commas dropped); a MATH solution with a
  `\\boxed{}` to its last boxed content; anything else (MATH-500's `answer` column, plain numbers) is taken as is.
  A gold that is a plain number is "numeric".
- Prediction, and one answer per answer: a reward pays only for a text that states as many answers as the gold
  has parts (`gold_parts`: 1, or the items of a list such as MATH's "1,-2"; each `\\pm` adds one). Stating more
  ("3 or 4", `\\boxed{3} \\boxed{4}`, "17, 19") is "hedged": 0, counted apart. Where the answer is read from:
  - the complete `\\boxed{...}`s if there are any: their distinct contents (the same box twice is one answer;
    several, within the gold's parts, are read as one list);
  - else, from the answer block of the infilling canvas, the whole block (surrounding `$` and a final period
    removed) and, for a numeric gold, also its last number ("18 dollars");
  - else, from free text, the final statement: the sentence after the last answer cue (`####`, "answer is",
    "answer:"), or without one the last sentence with a digit; its part after a last `=`; its last number.
  Answers are counted (`stated_answers`) between top-level commas, semicolons and disjunctions ("or", `\\lor`,
  `\\vee`; not inside brackets or braces, not thousands separators such as "1,000" or "10,\\!080"). In a prose
  sentence (free text without a cue) only disjunctions count, commas being grammar there; in a block or after a
  cue, for a numeric gold, bare numbers side by side ("17 19") count one each too.
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


def all_boxed(text: str) -> list[str]:
    """Distinct stripped contents of every complete `\\boxed{...}` (or `\\fbox{...}`), in order. Linear time."""
    pairs = _matching_braces(text)
    out: list[str] = []
    for m in BOXED.finditer(text):
        start = m.end() - 1
        if start in pairs:
            content = text[start + 1 : pairs[start]].strip()
            if content and content not in out:
                out.append(content)
    return out


THOUSANDS = re.compile(r"(?<=\d),(?:\\!)?\s?(?=\d{3}(?!\d))")
DISJUNCTION = r"\bor\b|\beither\b|\\(?:lor|vee)(?![a-zA-Z])"
LIST_SEPARATOR = re.compile(rf"[,;]|{DISJUNCTION}", re.IGNORECASE)
OR_SEPARATOR = re.compile(DISJUNCTION, re.IGNORECASE)
TEXT_WORD = re.compile(r"\\(?:text|mbox|textrm|mathrm)\s*\{\s*([a-zA-Z]+)\s*\}")
ANSWER_CUE = re.compile(r"####|\banswer\s*(?:is\b|:)\s*:?", re.IGNORECASE)
SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n")
PLAIN = re.compile(r"[\w\s$.%]*")


def stated_answers(text: str, lists: bool = True, numbers: bool = False) -> list[str]:
    """The separate answers `text` states: its top-level items between disjunctions and (if `lists`) commas and
    semicolons, ignoring text within brackets or braces and thousands separators; items that are prose (no digit,
    no LaTeX command, more than three letters) do not count. With `numbers`, a plain item ("17 19") counts each of
    its numbers. Linear time."""
    text = TEXT_WORD.sub(r" \1 ", THOUSANDS.sub("", text))  # "\\text{ or }" -> " or "
    depth, depths = 0, []
    for ch in text:
        depth += (ch in "([{") - (ch in ")]}")
        depths.append(depth)
    items, start = [], 0
    for m in (LIST_SEPARATOR if lists else OR_SEPARATOR).finditer(text):
        if depths[m.start()] <= 0:  # depth before the separator: it is a one-character or word token
            items.append(text[start : m.start()])
            start = m.end()
    items.append(text[start:])
    out = []
    for item in (i.strip(" \t\n$.{}") for i in items):
        if not item or not (re.search(r"\d|\\[a-zA-Z]", item) or len(re.sub(r"[^A-Za-z]", "", item)) <= 3):
            continue
        found = NUMBER.findall(item) if numbers and PLAIN.fullmatch(item) else []
        out.extend(dict.fromkeys(found) if len(found) > 1 else [item])
    return out


def gold_parts(kind: str, gold_text: str) -> int:
    """How many answers the gold itself states: 1 for a number, else its list items plus one per `\\pm`."""
    if kind == "number":
        return 1
    return max(1, len(stated_answers(gold_text))) + gold_text.count("\\pm")


def final_statement(text: str) -> tuple[str, bool]:
    """(where free text states its final answer, whether an answer cue marks it). See the module docstring."""
    cues = list(ANSWER_CUE.finditer(text))
    if cues:
        rest = text[cues[-1].end() :].strip()
        statement, cued = (SENTENCE_END.split(rest, 1)[0] if rest else ""), True
    else:
        sentences = [s for s in SENTENCE_END.split(text) if re.search(r"\d", s)]
        statement, cued = (sentences[-1] if sentences else ""), False
    return statement.rsplit("=", 1)[-1], cued


def read_answer(text: str, source: str, kind: str, parts: int = 1) -> tuple[list[str], str | None]:
    """(the predictions to compare, best first; "hedged" when `text` states more answers than `parts`, else None).
    source: 'block' (the canvas answer block) or 'text'. See the module docstring."""
    boxes = all_boxed(text)
    if boxes:
        answer = ", ".join(boxes)
        return ([], "hedged") if len(stated_answers(answer)) > parts else ([answer], None)
    number = kind == "number"
    if source == "block":
        block = text.strip().rstrip(". ").strip("$ ").rstrip(". ")  # "$x$." -> "x"
        if len(stated_answers(block, numbers=number)) > parts:
            return [], "hedged"
        last = last_number(block)
        return ([block] if block else []) + ([last] if number and last is not None and last != block else []), None
    statement, cued = final_statement(text)
    if len(stated_answers(statement, lists=cued, numbers=number and cued)) > parts:
        return [], "hedged"
    last = last_number(statement)
    return ([last] if last is not None else []), None


def candidates(text: str, source: str, kind: str) -> list[str]:
    """The predictions `read_answer` compares for a single-part gold ([] when hedged or absent)."""
    return read_answer(text, source, kind)[0]


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
    """(1.0 or 0.0, note) for one prediction; note is "correct", "wrong", "no_answer", "hedged" or "too_long".

    Raises whatever math-verify raises (the pool reports it as an error, i.e. not scorable).
    """
    kind, gold_text = gold_answer(gold)
    gold_parsed = _parse_gold(gold_text)  # first: an unusable gold answer is an error, never a silent 0
    if not gold_parsed:
        raise ValueError(f"math-verify cannot parse the gold answer {gold_text[:100]!r}")
    preds, hedged = read_answer(text, source, kind, gold_parts(kind, gold_text))
    if hedged:
        return 0.0, "hedged"
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
