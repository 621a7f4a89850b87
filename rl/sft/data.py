"""SFT data on the reasoning-as-infilling canvas: length checks before training, and the batch collator.

The clean target of a row is the sampler's canvas (`rollout.build_canvas`) with its masked blocks filled in:

    [pad ...][prompt][gold reasoning, padded to R][delimiter][gold answer, padded to A][suffix]

Only the two blocks are ever masked; prompt, delimiter and suffix are fixed context, exactly as at sampling time.
In the 'plain' layout the gold text `reasoning + delimiter + answer + suffix` fills the single block of R.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from rollout.template import TemplateConfig, build_canvas, encode_block, encode_prompt

logger = logging.getLogger(__name__)


def block_pad_id(tokenizer, template: TemplateConfig) -> int:
    """The token that pads gold text inside its block (the same choice `build_canvas` makes for answers)."""
    tid = tokenizer.eos_token_id if template.pad_with == "eos" else tokenizer.pad_token_id
    if tid is None:
        raise ValueError(f"The tokenizer has no {template.pad_with} token; set pad_with to the other choice.")
    return int(tid)


def plain_response(row: dict, template: TemplateConfig) -> str:
    """Gold text of the single block of the 'plain' layout."""
    return f"{row['reasoning']}{template.delimiter}{row['answer']}{template.suffix}"


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0


def generation_length(tokenizer, template: TemplateConfig) -> int:
    """G: columns of the generation region (blocks plus template tokens)."""
    if template.layout == "plain":
        return template.reasoning_length
    fixed = _n_tokens(tokenizer, template.delimiter) + _n_tokens(tokenizer, template.suffix)
    return template.reasoning_length + template.answer_length + fixed


def fit_to_canvas(dataset, tokenizer, template: TemplateConfig, overflow: str = "skip",
                  max_length: int | None = None):
    """Drop (and count) rows whose gold reasoning or answer does not fit its block; or raise with `overflow='error'`.

    Also checks, before any training step, that the longest prompt plus the generation region fits the model
    context `max_length` (unless `template.max_prompt_length` left-truncates prompts).

    Returns:
        (dataset of the rows that fit, report dict with the counts and the longest lengths seen).
    """
    if overflow not in ("skip", "error"):
        raise ValueError(f"overflow={overflow!r}; use 'skip' (count and drop) or 'error'.")
    R, A = template.reasoning_length, template.answer_length

    def lengths(batch: dict[str, list]) -> dict[str, list[int]]:
        rows = [dict(zip(batch, vals)) for vals in zip(*batch.values())]
        if template.layout == "plain":
            reasoning = tokenizer([plain_response(r, template) for r in rows], add_special_tokens=False)["input_ids"]
            answer = [[]] * len(rows)
        else:
            reasoning = tokenizer(batch["reasoning"], add_special_tokens=False)["input_ids"]
            answer = tokenizer(batch["answer"], add_special_tokens=False)["input_ids"]
        prompt = [len(encode_prompt(tokenizer, p, template)) for p in batch["prompt"]]
        return {"_r": [len(x) for x in reasoning], "_a": [len(x) for x in answer], "_p": prompt}

    sized = dataset.map(lengths, batched=True, desc="Measuring rows")
    r_len, a_len, p_len = sized["_r"], sized["_a"], sized["_p"]
    long_r = [i for i, n in enumerate(r_len) if n > R]
    long_a = [i for i, n in enumerate(a_len) if n > A] if template.layout == "infill" else []
    report = {
        "rows_in": len(dataset), "reasoning_too_long": len(long_r), "answer_too_long": len(long_a),
        "longest_reasoning": max(r_len), "longest_answer": max(a_len), "longest_prompt": max(p_len),
    }
    what = "reasoning" if template.layout == "infill" else "reasoning + delimiter + answer"
    problems = []
    if long_r:
        problems.append(f"{len(long_r)} row(s) with {what} longer than R={R} tokens (longest {max(r_len)}; "
                        f"row {long_r[0]}: {dataset[long_r[0]]['prompt'][:60]!r})")
    if long_a:
        problems.append(f"{len(long_a)} row(s) with an answer longer than A={A} tokens (longest {max(a_len)}; "
                        f"row {long_a[0]}: answer {dataset[long_a[0]]['answer'][:40]!r})")
    if problems and overflow == "error":
        raise ValueError("; ".join(problems) + ". Raise reasoning_length/answer_length or set overflow: skip.")
    for p in problems:
        logger.warning("Skipping %s.", p)
    drop = set(long_r) | set(long_a)
    kept = dataset.select([i for i in range(len(dataset)) if i not in drop]) if drop else dataset
    report["rows_kept"] = len(kept)
    if not len(kept):
        raise ValueError(f"No training row fits the canvas: {'; '.join(problems)}.")
    gen = generation_length(tokenizer, template)
    longest = min(report["longest_prompt"], template.max_prompt_length or report["longest_prompt"])
    if max_length is not None and longest + gen > max_length:
        raise ValueError(
            f"The longest prompt ({longest} tokens) plus the generation region ({gen}) exceeds the model context of "
            f"{max_length}. Set max_prompt_length <= {max_length - gen} to left-truncate prompts, or shorten "
            "reasoning_length/answer_length."
        )
    return kept, report


_NUMBER = re.compile(r"-?\d+")


def corrupt_conclusion(row: dict, rng: random.Random, fits) -> dict | None:
    """The row with the last number of its reasoning moved by 1-3 and the answer set to that number, or None.

    Teaches the answer block to state what the reasoning concluded, right or wrong (`reasoning_corrupt_rate`).
    None when the gold answer is not the reasoning's last number (nothing to corrupt) or when no nearby value
    passes `fits(row)` (the caller's check that the new texts fit their blocks and the vocabulary).
    """
    numbers = list(_NUMBER.finditer(row["reasoning"]))
    if not numbers or numbers[-1].group() != str(row["answer"]).strip():
        return None
    last, value = numbers[-1], int(numbers[-1].group())
    shifts = [d for d in (-3, -2, -1, 1, 2, 3) if value + d >= 0]
    rng.shuffle(shifts)
    for d in shifts:
        text = str(value + d)
        reasoning = row["reasoning"][: last.start()] + text + row["reasoning"][last.end() :]
        new = dict(row, reasoning=reasoning, answer=text)
        if fits(new):
            return new
    return None


@dataclass
class SFTCollator:
    """Rows {prompt, answer, reasoning} -> clean canvases plus the positions the noise may mask.

    Returns a dict of `input_ids` [B, L] (left padded, blocks filled with gold text), `attention_mask` [B, L],
    `maskable` [B, G] (True on the reasoning and answer blocks; the generation region is the last G columns),
    `answer_block` [B, G] (True on the answer block) and `answer_only` [B] bool.

    `answer_only_rate` of the rows (drawn per row) are *answer-only* rows: the noise masks their whole answer block
    and nothing else, so the answer is predicted from the complete reasoning, which is the state the sampler fills
    the answer block in. `reasoning_corrupt_rate` of those rows carry a wrong conclusion (`corrupt_conclusion`) with
    the answer matching it: the answer learns to follow the reasoning rather than recompute it from the prompt.
    Their reasoning is never masked, so no wrong reasoning is ever a training target.
    """

    tokenizer: Any
    template: TemplateConfig
    mask_id: int
    max_length: int | None = None
    answer_only_rate: float = 0.0
    reasoning_corrupt_rate: float = 0.0
    seed: int = 0
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("answer_only_rate", "reasoning_corrupt_rate"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}.")
        if self.answer_only_rate > 0 and self.template.layout != "infill":
            raise ValueError("answer_only_rate needs the 'infill' layout (the 'plain' layout has no answer block).")
        self._rng = random.Random(f"sft-collator/{self.seed}")

    def _fits(self, row: dict) -> bool:
        tok, tpl = self.tokenizer, self.template
        answer = tok(row["answer"], add_special_tokens=False)["input_ids"]
        reasoning = tok(row["reasoning"], add_special_tokens=False)["input_ids"]
        unk = tok.unk_token_id
        return (len(answer) <= tpl.answer_length and len(reasoning) <= tpl.reasoning_length
                and (unk is None or unk not in answer + reasoning))

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        tok, tpl = self.tokenizer, self.template
        answer_only = [self._rng.random() < self.answer_only_rate for _ in rows]
        rows = list(rows)
        for i, only in enumerate(answer_only):
            if only and self._rng.random() < self.reasoning_corrupt_rate:
                rows[i] = corrupt_conclusion(rows[i], self._rng, self._fits) or rows[i]
        prompts = [r["prompt"] for r in rows]
        pad = block_pad_id(tok, tpl)
        if tpl.layout == "infill":
            canvas = build_canvas(tok, prompts, tpl, self.mask_id, answers=[r["answer"] for r in rows],
                                  max_length=self.max_length)
            gold_r, _, _ = encode_block(tok, [r["reasoning"] for r in rows], tpl.reasoning_length, pad,
                                        "gold reasoning")
        else:
            canvas = build_canvas(tok, prompts, tpl, self.mask_id, max_length=self.max_length)
            gold_r, _, _ = encode_block(tok, [plain_response(r, tpl) for r in rows], tpl.reasoning_length, pad,
                                        "gold response")
        ids = canvas.input_ids.clone()  # [B, L]
        gen = ids[:, canvas.gen_start :]  # [B, G] view into ids
        maskable = torch.zeros(gen.shape, dtype=torch.bool)  # [B, G]
        gen[:, canvas.reasoning] = gold_r
        maskable[:, canvas.reasoning] = True
        if canvas.answer is not None:
            gen[:, canvas.answer] = canvas.gold
            maskable[:, canvas.answer] = True
        answer_block = torch.zeros_like(maskable)  # [B, G]
        if canvas.answer is not None:
            answer_block[:, canvas.answer] = True
        return {"input_ids": ids, "attention_mask": canvas.attention_mask, "maskable": maskable,
                "answer_block": answer_block, "answer_only": torch.tensor(answer_only, dtype=torch.bool)}
