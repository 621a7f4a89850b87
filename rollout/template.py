"""Reasoning-as-infilling canvas.

Layout of one row (left padded so that the generation region shares columns across the batch)::

    [pad ...][prompt][R reasoning masks][delimiter][A answer masks][suffix]
                     ^ gen_start                                          ^ L

The "plain" layout (no-template baselines) is `[pad ...][prompt][R masks]`. Any generation-region position
may be pre-filled (prompting-as-infilling); `Canvas.fill_answer` writes the gold answer into the answer block
for posterior sampling p(r | c, a*).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)


@dataclass
class TemplateConfig:
    """Shape of the canvas. Field names match the recipe keys."""

    layout: str = "infill"
    """'infill' (prompt, reasoning block, delimiter, answer block, suffix) or 'plain' (prompt, R masks)."""
    reasoning_length: int = 128
    """R: masked reasoning positions (the whole generation length in the 'plain' layout)."""
    answer_length: int = 16
    """A: masked answer positions; gold answers are right-padded to A."""
    delimiter: str = "\nThe answer is "
    """Fixed text between the reasoning and the answer block."""
    suffix: str = ""
    """Fixed text after the answer block (for example '}' when the delimiter opens a \\boxed{)."""
    chat_template: bool = False
    """Render prompts with the tokenizer's chat template (user turn + generation prompt)."""
    system_prompt: str | None = None
    """Optional system turn when `chat_template` is on."""
    max_prompt_length: int | None = None
    """Left-truncate longer prompts to this many tokens (counted and logged). None: a too long prompt is an error."""
    pad_with: str = "eos"
    """Token that pads gold reasoning/answers inside their blocks: 'eos' (LLaDA convention) or 'pad'."""

    def __post_init__(self) -> None:
        if self.layout not in ("infill", "plain"):
            raise ValueError(f"layout={self.layout!r}; use 'infill' or 'plain'.")
        if self.reasoning_length < 1:
            raise ValueError(f"reasoning_length must be >= 1, got {self.reasoning_length}.")
        if self.layout == "infill" and self.answer_length < 1:
            raise ValueError(f"answer_length must be >= 1 for the infill layout, got {self.answer_length}.")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be >= 1 or None, got {self.max_prompt_length}.")
        if self.pad_with not in ("eos", "pad"):
            raise ValueError(f"pad_with={self.pad_with!r}; use 'eos' or 'pad'.")


@dataclass
class Canvas:
    """A batch of canvases ready for the sampler. Column indices of blocks are relative to `gen_start`.

    Attributes:
        input_ids: [B, L] token ids; masked positions hold the mask id.
        attention_mask: [B, L] 1 for real tokens, 0 for left padding.
        gen_start: first column of the generation region; G = L - gen_start.
        reasoning: slice of the reasoning block inside the generation region.
        answer: slice of the answer block inside the generation region (None for 'plain').
        gold: [B, A] gold answer ids right-padded to A, or None.
        mask_id: the mask token id.
        report: counts of adjustments made while building (truncated prompts, ...).
        gold_scored: [B, A] bool, the gold positions phi sums: the answer's own tokens and the first padding token
            (it says where the answer ends); the rest of the padding is left out, so phi's scale follows the
            answer, not A. None: every position (hand-built canvases).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    gen_start: int
    reasoning: slice
    answer: slice | None
    gold: torch.Tensor | None
    mask_id: int
    report: dict = field(default_factory=dict)
    gold_scored: torch.Tensor | None = None

    @property
    def gen_length(self) -> int:
        return self.input_ids.shape[1] - self.gen_start

    @property
    def generation(self) -> torch.Tensor:
        """[B, G] view of the generation region."""
        return self.input_ids[:, self.gen_start :]

    def masked(self) -> torch.Tensor:
        """[B, G] True where the generation region still holds a mask."""
        return self.generation == self.mask_id

    def to(self, device: torch.device | str) -> Canvas:
        gold, scored = (None if x is None else x.to(device) for x in (self.gold, self.gold_scored))
        return Canvas(
            self.input_ids.to(device), self.attention_mask.to(device), self.gen_start, self.reasoning,
            self.answer, gold, self.mask_id, dict(self.report), scored,
        )

    def phi_weights(self) -> torch.Tensor:
        """[B, A] float: 1 at the gold positions phi sums (`gold_scored`), 0 elsewhere."""
        if self.gold is None:
            raise ValueError("phi needs gold answers on the canvas (build_canvas(..., answers=...)).")
        scored = self.gold_scored if self.gold_scored is not None else torch.ones_like(self.gold, dtype=torch.bool)
        return scored.to(self.gold.device, torch.float32)

    def fill_answer(self) -> Canvas:
        """Pre-fill the answer block with the gold answer (posterior sampling p(r | c, a*))."""
        if self.answer is None or self.gold is None:
            raise ValueError("fill_answer needs the 'infill' layout and gold answers.")
        ids = self.input_ids.clone()
        start = self.gen_start + self.answer.start
        ids[:, start : start + self.gold.shape[1]] = self.gold.to(ids.device)
        return Canvas(ids, self.attention_mask, self.gen_start, self.reasoning, self.answer, self.gold,
                      self.mask_id, dict(self.report), self.gold_scored)


def _pad_token(tokenizer, pad_with: str) -> int:
    tid = tokenizer.eos_token_id if pad_with == "eos" else tokenizer.pad_token_id
    if tid is None:
        raise ValueError(f"The tokenizer has no {pad_with} token; set TemplateConfig.pad_with to the other choice.")
    return int(tid)


def encode_prompt(tokenizer, prompt: str | list[dict], config: TemplateConfig) -> list[int]:
    """Token ids of one prompt: a string (plain or chat-rendered) or a list of chat messages."""
    if isinstance(prompt, list) or config.chat_template:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if config.system_prompt and messages[0].get("role") != "system":
            messages = [{"role": "system", "content": config.system_prompt}, *messages]
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("chat_template=True (or chat-message prompts) but the tokenizer has no chat template.")
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def encode_block(tokenizer, texts: list[str], length: int, pad_id: int, what: str, overflow: str = "error"):
    """Encode texts into a right-padded [B, length] block.

    Returns (ids, n_overflow, lengths): lengths are each text's token count before any cut. `overflow='error'`
    raises on a text longer than `length` (naming the first offending row); 'truncate' cuts it and counts it.
    """
    rows, lengths, n_over, first = [], [], 0, None
    for i, text in enumerate(texts):
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        lengths.append(len(ids))
        if len(ids) > length:
            n_over += 1
            if first is None:
                first = (i, text, len(ids))
            ids = ids[:length]
        rows.append(ids + [pad_id] * (length - len(ids)))
    if n_over and overflow == "error":
        i, text, n = first
        raise ValueError(
            f"{n_over} {what} text(s) do not fit their block of {length} tokens (row {i}: {n} tokens, "
            f"{text[:80]!r}). Increase the block length or pass overflow='truncate' to cut and count them."
        )
    return torch.tensor(rows, dtype=torch.long).reshape(len(texts), length), n_over, lengths


def build_canvas(
    tokenizer,
    prompts: list[str] | list[list[dict]],
    config: TemplateConfig,
    mask_id: int,
    answers: list[str] | None = None,
    max_length: int | None = None,
    answer_overflow: str = "error",
) -> Canvas:
    """Lay out a batch of prompts on the canvas.

    Args:
        tokenizer: a transformers tokenizer.
        prompts: B prompts (strings, or chat message lists).
        config: the template.
        mask_id: the model's mask token id (from the adapter).
        answers: optional B gold answer strings; aligned to the answer block and right-padded to A.
        max_length: the model context; a canvas longer than it is an error (or prompts are left-truncated when
            `config.max_prompt_length` is set).
        answer_overflow: 'error' or 'truncate' for gold answers longer than A (counted in `report`).
    """
    if len(prompts) == 0:
        raise ValueError("build_canvas got no prompts.")
    encoded = [encode_prompt(tokenizer, p, config) for p in prompts]
    return layout_canvas(tokenizer, encoded, config, mask_id, answers, max_length, answer_overflow)


def layout_canvas(
    tokenizer,
    encoded: list[list[int]],
    config: TemplateConfig,
    mask_id: int,
    answers: list[str] | None = None,
    max_length: int | None = None,
    answer_overflow: str = "error",
) -> Canvas:
    """`build_canvas` for prompts that are already token ids (for example tokenized by a trainer)."""
    if len(encoded) == 0:
        raise ValueError("build_canvas got no prompts.")
    if answers is not None and len(answers) != len(encoded):
        raise ValueError(f"{len(encoded)} prompts but {len(answers)} answers.")
    if answers is not None and config.layout == "plain":
        raise ValueError("Gold answers need the 'infill' layout (the 'plain' layout has no answer block).")
    report = {"prompts_truncated": 0, "answers_truncated": 0}
    encoded = [list(ids) for ids in encoded]
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"Prompt {i} is empty after tokenization; every row needs at least one prompt token.")
    if config.max_prompt_length is not None:
        for i, ids in enumerate(encoded):
            if len(ids) > config.max_prompt_length:
                encoded[i] = ids[-config.max_prompt_length :]
                report["prompts_truncated"] += 1
        if report["prompts_truncated"]:
            logger.warning("Left-truncated %d prompt(s) to %d tokens.", report["prompts_truncated"],
                           config.max_prompt_length)

    pad_block = _pad_token(tokenizer, config.pad_with)
    R = config.reasoning_length
    if config.layout == "infill":
        delim = list(tokenizer(config.delimiter, add_special_tokens=False)["input_ids"]) if config.delimiter else []
        suffix = list(tokenizer(config.suffix, add_special_tokens=False)["input_ids"]) if config.suffix else []
        A = config.answer_length
        gen = [mask_id] * R + delim + [mask_id] * A + suffix
        answer = slice(R + len(delim), R + len(delim) + A)
    else:
        gen, answer, A = [mask_id] * R, None, 0
    prompt_len = max(len(ids) for ids in encoded)
    length = prompt_len + len(gen)
    if max_length is not None and length > max_length:
        longest = max(range(len(encoded)), key=lambda i: len(encoded[i]))
        raise ValueError(
            f"Canvas of {length} tokens (prompt {prompt_len} in row {longest} + generation {len(gen)}) exceeds the "
            f"model context of {max_length}. Set max_prompt_length <= {max_length - len(gen)} to left-truncate "
            "prompts, or shorten reasoning_length/answer_length."
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else pad_block
    input_ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)
    for i, ids in enumerate(encoded):
        input_ids[i, prompt_len - len(ids) : prompt_len] = torch.tensor(ids)
        attention_mask[i, prompt_len - len(ids) :] = 1
    input_ids[:, prompt_len:] = torch.tensor(gen)

    gold = scored = None
    if answers is not None:
        gold, report["answers_truncated"], kept = encode_block(tokenizer, answers, A, pad_block, "gold answer",
                                                               answer_overflow)
        scored = torch.arange(A)[None] <= torch.tensor(kept)[:, None]  # the answer + its first padding token
        if report["answers_truncated"]:
            logger.warning("Truncated %d gold answer(s) to the answer block of %d tokens.",
                           report["answers_truncated"], A)
    return Canvas(input_ids, attention_mask, prompt_len, slice(0, R), answer, gold, mask_id, report, scored)


def decode_block(tokenizer, tokens: torch.Tensor, stop_ids: tuple[int, ...], mask_id: int) -> str:
    """Text of one decoded block: cut at the first stop id; never-decoded (mask) positions are dropped."""
    ids = tokens.tolist()
    for j, t in enumerate(ids):
        if t in stop_ids:
            ids = ids[:j]
            break
    return tokenizer.decode([t for t in ids if t != mask_id], skip_special_tokens=True)
