"""Evaluation: sample a task's rows with any policy and template, check the answers, write the traces.

Rows go through `rollout.sample` in batches; row i of the dataset always uses the seed `row_seed(seed, i)`, so a
row's sample does not depend on the batch size or on which rows share its batch. Each JSONL record holds the
row's trace (`SampleOutput.row`), the decoded reasoning and answer text, and whether the answer is correct.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field

import torch

from rollout.adapter import MDLMAdapter
from rollout.sampler import SampleOutput, SamplerConfig, sample
from rollout.template import TemplateConfig, build_canvas, decode_block

logger = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """How to run an evaluation. Field names are recipe keys."""

    batch_size: int = field(default=64, metadata={"help": "Rows per sampler call."})
    output_file: str | None = field(
        default=None, metadata={"help": "JSONL of samples (None: outputs/eval/<task>-<split>-<policy>.jsonl)."}
    )
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:1, ... (None: cuda if available)."})
    record_phi: bool = field(
        default=True, metadata={"help": "Give the sampler the gold answers so traces carry phi(t) (no extra NFE)."}
    )

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}.")


def row_seed(seed: int, index: int) -> int:
    """Seed of dataset row `index` under base seed `seed`: `rl.seeding.stream_seed(seed, "eval", row=index)`, distinct
    for distinct indices under one seed, and from every RL rollout, mask and SFT stream."""
    from rl.seeding import stream_seed

    return stream_seed(seed, "eval", row=index)


def check_answers(golds: list[str], answers: list[str]) -> list[bool]:
    """Whether each decoded answer matches its gold answer, by the same math-verify check as the `math` reward
    (`rewards.math_reward.math_accuracy`, answers read as answer-block text). Unscorable answers count as wrong."""
    from rewards.math_reward import math_accuracy

    scores = math_accuracy(completions=answers, answer=golds, answer_texts=answers)
    return [score == 1.0 for score in scores]


def check_reasoning(golds: list[str], reasonings: list[str], answers: list[str]) -> tuple[list[bool], list[bool]]:
    """Per row: is the reasoning's own conclusion (its last boxed expression or number) right, and does the answer
    block state that conclusion? The second is how much the answer follows the reasoning: RL on the reasoning can
    only move accuracy as far as the answer reads it."""
    from rewards.math_reward import math_accuracy, reasoning_accuracy

    right = reasoning_accuracy(completions=reasonings, answer=golds, reasoning_texts=reasonings)
    follows = math_accuracy(completions=reasonings, answer=answers)
    return [score == 1.0 for score in right], [score == 1.0 for score in follows]


def decode_row(out: SampleOutput, i: int, tokenizer, adapter: MDLMAdapter, template: TemplateConfig):
    """(reasoning text, answer text) of row i; in the 'plain' layout the answer follows the delimiter."""
    gen = out.generation[i]  # [G]
    reasoning = decode_block(tokenizer, gen[out.reasoning], adapter.eos_ids, out.mask_id)
    if out.answer is not None:
        return reasoning, decode_block(tokenizer, gen[out.answer], adapter.eos_ids, out.mask_id)
    marker = template.delimiter.strip()
    if marker and marker in reasoning:
        head, _, tail = reasoning.rpartition(marker)
        return head.strip(), tail.strip().removesuffix(template.suffix.strip()).strip()
    return reasoning, reasoning


def evaluate(adapter: MDLMAdapter, tokenizer, dataset, template: TemplateConfig, sampler: SamplerConfig,
             config: EvalConfig, output_file: str, progress: bool = True) -> dict:
    """Sample every row of `dataset` (columns prompt, answer), write JSONL records, return the summary."""
    from tqdm.auto import tqdm

    if sampler.prune_phi is not None:
        raise ValueError("prune_phi reads the gold answer: it is for training rollouts, not for evaluation.")
    n = len(dataset)
    infill = template.layout == "infill"
    totals = {"correct": 0, "reasoning_correct": 0, "follows": 0, "nfe": 0, "exited": 0, "tokens": 0,
              "row_forwards": 0, "answers_truncated": 0}
    os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
    start = time.perf_counter()
    with open(output_file, "w") as f, tqdm(total=n, desc="Evaluating", unit="row", disable=not progress) as bar:
        for lo in range(0, n, config.batch_size):
            batch = dataset[lo : lo + config.batch_size]  # dict of column lists
            golds = [str(a) for a in batch["answer"]]
            answers = golds if infill and config.record_phi else None
            canvas = build_canvas(tokenizer, batch["prompt"], template, adapter.mask_id, answers=answers,
                                  max_length=adapter.max_length, answer_overflow="truncate")
            totals["answers_truncated"] += canvas.report.get("answers_truncated", 0)
            seeds = [row_seed(sampler.seed, lo + j) for j in range(len(golds))]
            out = sample(adapter, canvas, sampler, seeds=seeds)
            decoded = [decode_row(out, j, tokenizer, adapter, template) for j in range(len(golds))]
            verdicts = check_answers(golds, [answer for _, answer in decoded])
            if infill:
                chain_ok, follows = check_reasoning(golds, *map(list, zip(*decoded)))
            for j, (gold, (reasoning, answer), correct) in enumerate(zip(golds, decoded, verdicts)):
                totals["correct"] += correct
                record = {"index": lo + j, "prompt": batch["prompt"][j], "gold": gold, "reasoning": reasoning,
                          "answer": answer, "correct": correct, **out.row(j)}
                if infill:
                    record.update(reasoning_correct=chain_ok[j], answer_follows_reasoning=follows[j])
                    totals["reasoning_correct"] += chain_ok[j]
                    totals["follows"] += follows[j]
                f.write(json.dumps(record) + "\n")
            totals["nfe"] += int(out.nfe.sum())
            totals["exited"] += int(out.exited.sum())
            totals["tokens"] += out.stats["tokens_decoded"]
            totals["row_forwards"] += out.stats["row_forwards"]
            bar.update(len(golds))
            bar.set_postfix(acc=f"{totals['correct'] / (lo + len(golds)):.3f}")
    wall = time.perf_counter() - start
    return {
        "n": n,
        "accuracy": totals["correct"] / n,
        **({"reasoning_accuracy": totals["reasoning_correct"] / n, "answer_follows_reasoning": totals["follows"] / n}
           if infill else {}),
        "mean_nfe": totals["nfe"] / n,
        "exit_rate": totals["exited"] / n,
        "tokens_per_nfe": totals["tokens"] / max(1, totals["row_forwards"]),
        "wall_seconds": round(wall, 2),
        "answers_truncated": totals["answers_truncated"],
        "output_file": output_file,
    }


def default_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
