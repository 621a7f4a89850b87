"""Procedurally generated multi-step arithmetic word problems: the embedded default task.

Every problem is a chain: a starting quantity, then `steps` events, each applying one operation (+, -, *, /) with
one operand to the running value. Four story templates (an inventory, a chain of people compared with each
other, a bakery, a purse) phrase the same chain differently; the gold reasoning is one short sentence per event,
in order, each giving the running value::

    prompt:    Mia has 7 shells. Mia finds 5 more shells. Mia gives 3 shells to Leo. How many shells does Mia have now?
    reasoning: Start with 7. Add 5 to get 12. Subtract 3 to get 9.
    answer:    9

Why this form: every intermediate value appears once. In the equation form (`7 + 5 = 12. 12 - 3 = 9.`) each
result is repeated as the next operand, so a masked-diffusion model sees a masked result next to a visible copy
most of the time and learns to copy instead of to compute; with one mention per value, a masked result can only
be computed (except the last one, which the answer block also holds: measured on the tiny default, masked-diffusion
SFT then learns the last step as a copy of the answer, and the model's own last step is wrong 43% of the time
against 13% for the earlier ones; `recipes/tiny/sft_answer.yaml` teaches the answer to read the reasoning instead).
The terse wording keeps the canvas short.

Difficulty knobs: the number of steps, the operand range, the largest multiplier/divisor and the largest value
any intermediate result may take. Splits are disjoint by construction: a problem's *signature* (its numbers and
operations, not the story, names or nouns) is hashed into a test share of the problem space and a train
share; each split only keeps problems from its own share, so no arithmetic chain of the test split is ever seen
in training whatever the sizes or seeds. Generation is a deterministic function of (seed, split); a smaller
split is a prefix of a larger one.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

TEST_SHARE = 0.1
"""Fraction of the signature space reserved for the test split."""

STEP_WORDS = {"+": "Add", "-": "Subtract", "*": "Multiply by", "/": "Divide by"}
"""How the reasoning names each operation: 'Add 5 to get 12.'"""

NAMES = ("Mia", "Leo", "Ava", "Sam", "Zoe", "Max", "Lily", "Ben", "Emma", "Noah", "Ella", "Jack", "Nora", "Owen")


@dataclass(frozen=True)
class Template:
    """How one story phrases a chain. Placeholders: {name}, {other}, {x}, {item}, {v}, and {n0}/{n1} (the previous
    and the next person) in stories that name a new person at every step."""

    name: str
    items: tuple[str, ...]
    start: str
    events: dict[str, tuple[str, ...]]  # op -> sentence variants
    question: str
    new_person_per_step: bool = False


TEMPLATES = (
    Template(
        name="inventory",
        items=("apples", "marbles", "stickers", "shells", "cards", "stamps"),
        start="{name} has {v} {item}.",
        events={
            "+": ("{name} buys {x} more {item}.", "{name} finds {x} more {item}.", "{other} gives {name} {x} {item}."),
            "-": ("{name} gives {x} {item} to {other}.", "{name} loses {x} {item}.", "{name} sells {x} {item}."),
            "*": ("Then {name} has {x} times as many {item}.",),
            "/": ("{name} splits the {item} into {x} equal piles and keeps one pile.",),
        },
        question="How many {item} does {name} have now?",
    ),
    Template(
        name="relations",
        items=("coins", "books", "pencils", "stickers", "marbles"),
        start="{n0} has {v} {item}.",
        events={
            "+": ("{n1} has {x} more {item} than {n0}.",),
            "-": ("{n1} has {x} fewer {item} than {n0}.",),
            "*": ("{n1} has {x} times as many {item} as {n0}.",),
        },
        question="How many {item} does {name} have?",
        new_person_per_step=True,
    ),
    Template(
        name="bakery",
        items=("cakes", "cookies", "pies", "muffins", "buns"),
        start="A baker makes {v} {item} in the morning.",
        events={
            "+": ("She bakes {x} more {item}.", "A helper brings {x} more {item}."),
            "-": ("She sells {x} {item}.", "She drops {x} {item}."),
            "*": ("By noon she has {x} times as many {item}.",),
            "/": ("She shares the {item} equally among {x} shops and keeps one share.",),
        },
        question="How many {item} does the baker have now?",
    ),
    Template(
        name="purse",
        items=("dollars",),
        start="{name} has {v} dollars.",
        events={
            "+": ("{name} earns {x} dollars.", "{other} gives {name} {x} dollars."),
            "-": ("{name} spends {x} dollars on a book.", "{name} pays {x} dollars for lunch."),
            "*": ("Then {name} has {x} times as much money.",),
            "/": ("{name} shares the money equally among {x} people and keeps one share.",),
        },
        question="How many dollars does {name} have now?",
    ),
)


@dataclass(frozen=True)
class Difficulty:
    """Difficulty knobs of the arithmetic task (see `TaskConfig` for their recipe keys)."""

    min_ops: int = 2
    max_ops: int = 3
    max_operand: int = 20
    max_multiplier: int = 5
    max_result: int = 200

    def __post_init__(self) -> None:
        if not 1 <= self.min_ops <= self.max_ops:
            raise ValueError(f"Need 1 <= min_ops <= max_ops, got {self.min_ops} and {self.max_ops}.")
        if self.max_ops > len(NAMES) - 2:
            raise ValueError(f"max_ops must be <= {len(NAMES) - 2} (the 'relations' story names a person per step).")
        if self.max_operand < 2 or self.max_multiplier < 2:
            raise ValueError("max_operand and max_multiplier must be >= 2.")
        if self.max_result < self.max_operand:
            raise ValueError(f"max_result ({self.max_result}) must be >= max_operand ({self.max_operand}).")


def _feasible_ops(v: int, ops: tuple[str, ...], d: Difficulty) -> list[str]:
    out = []
    for op in ops:
        if (op == "+" and v < d.max_result) or (op == "-" and v >= 2):
            out.append(op)
        elif op == "*" and 2 * v <= d.max_result:
            out.append(op)
        elif op == "/" and any(v % x == 0 for x in range(2, min(d.max_multiplier, v) + 1)):
            out.append(op)
    return out


def _operand(rng: random.Random, op: str, v: int, d: Difficulty) -> int:
    if op == "+":
        return rng.randint(1, min(d.max_operand, d.max_result - v))
    if op == "-":
        return rng.randint(1, min(d.max_operand, v - 1))
    if op == "*":
        return rng.randint(2, min(d.max_multiplier, d.max_result // v))
    return rng.choice([x for x in range(2, min(d.max_multiplier, v) + 1) if v % x == 0])


def _apply(op: str, v: int, x: int) -> int:
    return {"+": v + x, "-": v - x, "*": v * x, "/": v // x}[op]


def make_problem(rng: random.Random, d: Difficulty) -> tuple[dict[str, str], tuple]:
    """One problem as a row {prompt, answer, reasoning}, and its signature: the arithmetic chain alone."""
    tpl = TEMPLATES[rng.randrange(len(TEMPLATES))]
    steps = rng.randint(d.min_ops, d.max_ops)
    item = rng.choice(tpl.items)
    people = rng.sample(NAMES, steps + 2)
    name, other = people[0], people[1]
    v = rng.randint(2, d.max_operand)
    fmt = {"name": name, "other": other, "item": item, "v": v, "n0": name}
    prompt, reasoning = [tpl.start.format(**fmt)], [f"Start with {v}."]
    signature: list = [v]
    for i in range(steps):
        op = rng.choice(_feasible_ops(v, tuple(tpl.events), d))
        x = _operand(rng, op, v, d)
        if tpl.new_person_per_step:
            fmt.update(n0=people[i], n1=people[i + 1])
        fmt["x"] = x
        prompt.append(rng.choice(tpl.events[op]).format(**fmt))
        new_v = _apply(op, v, x)
        reasoning.append(f"{STEP_WORDS[op]} {x} to get {new_v}.")
        signature += [op, x]
        v = new_v
    if tpl.new_person_per_step:
        fmt["name"] = people[steps]
    prompt.append(tpl.question.format(**fmt))
    row = {"prompt": " ".join(prompt), "answer": str(v), "reasoning": " ".join(reasoning)}
    return row, tuple(signature)


def in_test_share(signature: tuple) -> bool:
    """Stable hash of the signature (not Python's salted hash) -> True for the test share of the space."""
    digest = hashlib.sha256(repr(signature).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < TEST_SHARE


def generate(split: str, n: int, seed: int, difficulty: Difficulty) -> list[dict[str, str]]:
    """`n` problems of `split` ('train' or 'test'). Test prompts are unique; train problems may repeat.

    Raises when the problem space is too small to fill a unique test split (raise max_operand or max_ops).
    """
    if split not in ("train", "test"):
        raise ValueError(f"The arithmetic task has splits 'train' and 'test', got {split!r}.")
    rng = random.Random(f"arithmetic/{seed}/{split}")
    want_test = split == "test"
    rows, seen, attempts = [], set(), 0
    while len(rows) < n:
        attempts += 1
        if attempts > 200 * n + 10_000:
            raise ValueError(
                f"Could only make {len(rows)} unique {split} problems of {n} requested at this difficulty; "
                "raise max_operand / max_ops or lower the split size."
            )
        row, signature = make_problem(rng, difficulty)
        if in_test_share(signature) != want_test or (want_test and row["prompt"] in seen):
            continue
        seen.add(row["prompt"])
        rows.append(row)
    return rows
