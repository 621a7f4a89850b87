"""Posterior reasoning traces p(r | c, a*) and their phi-score (paper, appendix E).

1. Sample: the canvas's answer block is pre-filled with the gold answer (`Canvas.fill_answer`) and the one sampler
   (`rollout.sample`) decodes the reasoning block around it; several traces per question come from distinct
   per-trace seeds (`row_seed(seed, trace_index)`), so a trace does not depend on its batch.
2. Score: with the answer block masked again, the trace is revealed left to right one token at a time (teacher
   forcing) and after each reveal t = 1..R the answer block gives

       phi_t = sum_j log p(a_j = a*_j | c, r_<=t)

   (the same phi as the sampler's, `rollout/sampler.py`). score = mean_t phi_t. One forward per reveal step over
   the whole batch: R forwards per batch. phi_0 (nothing revealed) is left out: it is the same for every trace
   of a question and says nothing about the trace.
3. Filter: keep traces whose score is >= a threshold (`min_score`, or the quantile given by `keep_top_fraction`),
   and write them as SFT rows.

The scored trace is the one that lands in the SFT data: the sampled block is decoded (cut at the first stop id)
and re-encoded padded to R, exactly as the SFT collator lays out reasoning text (`canonical_trace`). Quality labels
for the diagnostics (the arithmetic task knows its gold reasoning exactly): `correct_reasoning` = the decoded trace
equals the gold reasoning up to whitespace; `numbers_match` = both carry the same sequence of numbers. `roc_auc` is
the Mann-Whitney statistic with ties counted one half.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field

import torch

from rl.evaluate import row_seed
from rl.sft.data import block_pad_id
from rollout.adapter import MDLMAdapter
from rollout.sampler import SampleOutput, SamplerConfig, sample
from rollout.template import Canvas, TemplateConfig, build_canvas, decode_block, encode_block

logger = logging.getLogger(__name__)

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass
class PosteriorConfig:
    """Posterior-trace generation, scoring and filtering. Field names are recipe keys."""

    traces_per_question: int = field(default=4, metadata={"help": "Posterior traces sampled per question."})
    batch_size: int = field(default=128, metadata={"help": "Traces per sampler call and per scoring pass."})
    min_score: float | None = field(
        default=None,
        metadata={"help": "Keep traces with phi-score >= min_score (nats). Exclusive with keep_top_fraction."},
    )
    keep_top_fraction: float | None = field(
        default=None,
        metadata={"help": "Keep traces scoring at least the (1 - f) quantile, ties included. None with min_score "
                          "None keeps every trace."},
    )
    output_dir: str = field(
        default="outputs/posterior",
        metadata={"help": "Writes traces.jsonl, posterior_sft.jsonl, gold_matched.jsonl and summary.json here."},
    )
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:1, ... (None: cuda if available)."})

    def __post_init__(self) -> None:
        if self.traces_per_question < 1:
            raise ValueError(f"traces_per_question must be >= 1, got {self.traces_per_question}.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}.")
        if self.min_score is not None and self.keep_top_fraction is not None:
            raise ValueError("Set min_score or keep_top_fraction, not both (set the other to null).")
        if self.keep_top_fraction is not None and not 0 < self.keep_top_fraction <= 1:
            raise ValueError(f"keep_top_fraction must be in (0, 1], got {self.keep_top_fraction}.")


def check_sampler(sampler: SamplerConfig, traces_per_question: int) -> None:
    """Reject sampler settings that mean nothing (or the same trace K times) once the answer is pre-filled."""
    if sampler.exit_gamma is not None or sampler.prune_phi is not None:
        raise ValueError("exit_gamma / prune_phi read the masked answer block, which posterior sampling pre-fills; "
                         "set both to null.")
    if sampler.temperature == 0 and traces_per_question > 1:
        raise ValueError(f"temperature 0 is greedy: all {traces_per_question} traces per question would be equal. "
                         "Set temperature > 0 (for example 1.0) or traces_per_question: 1.")


def sample_posterior(adapter: MDLMAdapter, canvas: Canvas, sampler: SamplerConfig, seeds: list[int]) -> SampleOutput:
    """Sample reasoning from p(r | c, a*): the answer block holds the gold answer, the sampler decodes the rest.

    `canvas` is an infill canvas with gold answers (its answer block may still be masked); the answer block of the
    result is the gold answer, never touched by the sampler (`decode_step` -1 there).
    """
    if canvas.answer is None or canvas.gold is None:
        raise ValueError("Posterior sampling needs the 'infill' layout and gold answers (build_canvas(answers=...)).")
    return sample(adapter, canvas.fill_answer(), sampler, seeds=seeds)


def canonical_trace(tokenizer, tokens: torch.Tensor, stop_ids: tuple[int, ...], mask_id: int,
                    pad_id: int) -> tuple[list[str], torch.Tensor, dict]:
    """The sampled reasoning as SFT will see it: decoded text (cut at the first stop id, special tokens dropped)
    re-encoded and padded with `pad_id` exactly as the SFT collator lays out gold reasoning.

    Args:
        tokens: [B, R] sampled reasoning block.
    Returns:
        (B texts, [B, R] token ids of those texts, [B] bool: the text needs more than R tokens (cut here, so its
        score is not the score of the text; never kept), counts: rows whose ids differ from the sampled ones
        (`traces_reencoded`, e.g. tokens after the stop id or special tokens inside) and `traces_too_long`).
    """
    R = tokens.shape[1]
    texts = [decode_block(tokenizer, row, stop_ids, mask_id) for row in tokens]
    ids, too_long, lengths = encode_block(tokenizer, texts, R, pad_id, "posterior reasoning", overflow="truncate")
    overflow = [n > R for n in lengths]
    counts = {"traces_reencoded": int((ids != tokens.cpu()).any(-1).sum()), "traces_too_long": too_long}
    return texts, ids, overflow, counts


@torch.no_grad()
def phi_trajectory(adapter: MDLMAdapter, canvas: Canvas, trace: torch.Tensor) -> torch.Tensor:
    """phi_t = sum_j log p(a*_j | c, r_<=t) for t = 1..R, revealing `trace` left to right into a masked canvas.

    Args:
        adapter: the model.
        canvas: infill canvas with gold answers; its reasoning and answer blocks are masked here whatever they hold.
        trace: [B, R] reasoning tokens to teacher-force.
    Returns:
        [B, R] float64; column t-1 is phi after revealing the first t trace tokens. R forwards.
    """
    if canvas.answer is None or canvas.gold is None:
        raise ValueError("phi_trajectory needs the 'infill' layout and gold answers (build_canvas(..., answers=...)).")
    R = canvas.reasoning.stop - canvas.reasoning.start
    B = canvas.input_ids.shape[0]
    if tuple(trace.shape) != (B, R):
        raise ValueError(f"trace has shape {tuple(trace.shape)}; expected [B={B}, R={R}].")
    canvas = canvas.to(adapter.device)
    c0 = int((canvas.attention_mask == 0).sum(-1).min())  # columns that are padding in every row
    ids = canvas.input_ids[:, c0:].clone()  # [B, L - c0]
    attn = canvas.attention_mask[:, c0:]
    g0 = canvas.gen_start - c0
    r0, a0, a1 = g0 + canvas.reasoning.start, g0 + canvas.answer.start, g0 + canvas.answer.stop
    ids[:, r0 : r0 + R] = canvas.mask_id
    ids[:, a0:a1] = canvas.mask_id
    trace = trace.to(ids.device)
    gold = canvas.gold[:, :, None]  # [B, A, 1]
    weights = canvas.phi_weights().double()  # [B, A] the gold positions phi sums
    keep = ids.shape[1] - a0  # logits from the answer block to the end
    phi = torch.empty((B, R), dtype=torch.float64, device=ids.device)
    for t in range(R):
        ids[:, r0 + t] = trace[:, t]
        logits = adapter.logits(ids, attn, keep_last=keep)[:, : a1 - a0]  # [B, A, V]
        phi[:, t] = (torch.log_softmax(logits.double(), -1).gather(-1, gold).squeeze(-1) * weights).sum(-1)
    return phi


def roc_auc(scores: list[float], labels: list[bool]) -> float | None:
    """P(score of a positive > score of a negative) + 1/2 P(tie) (Mann-Whitney U / (n_pos n_neg)).

    None when either class is empty. Scores must be finite or +-inf, never NaN.
    """
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores but {len(labels)} labels.")
    if any(s != s for s in scores):
        raise ValueError("roc_auc got a NaN score.")
    n_pos = sum(bool(x) for x in labels)
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    rank_sum, i = 0.0, 0
    while i < len(order):  # average 1-based ranks over runs of tied scores
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        rank_sum += (i + j + 2) / 2 * sum(bool(labels[order[k]]) for k in range(i, j + 1))
        i = j + 1
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def grouped_auc(scores: list[float], labels: list[bool], groups: list) -> float | None:
    """AUC over (positive, negative) pairs from the same group only (here: traces of the same question)."""
    by_group: dict = {}
    for s, y, g in zip(scores, labels, groups):
        by_group.setdefault(g, ([], []))[0].append(s)
        by_group[g][1].append(y)
    u, pairs = 0.0, 0
    for s, y in by_group.values():
        auc = roc_auc(s, y)
        if auc is not None:
            n = sum(bool(x) for x in y) * (len(y) - sum(bool(x) for x in y))
            u, pairs = u + auc * n, pairs + n
    return u / pairs if pairs else None


def normalize_text(text: str) -> str:
    return " ".join(text.split())


def reasoning_matches(trace: str, gold: str) -> bool:
    """The trace is the gold reasoning, up to whitespace."""
    return normalize_text(trace) == normalize_text(gold)


def numbers_match(trace: str, gold: str) -> bool:
    """The trace states the same numbers as the gold reasoning, in the same order (wording may differ)."""
    return _NUMBER.findall(trace) == _NUMBER.findall(gold)


def select_by_score(scores: list[float], min_score: float | None = None, keep_top_fraction: float | None = None,
                    eligible: list[bool] | None = None) -> tuple[list[bool], float | None]:
    """Which traces to keep: eligible and score >= threshold. Returns (keep flags, threshold; None = keep all).

    With `keep_top_fraction` f the threshold is the ceil(f * n)-th highest score among the n eligible traces, so
    ties at the threshold are all kept (possibly a little more than f * n traces). `eligible` (default: all) rules
    traces out whatever their score (e.g. `too_long`: their text is not what was scored).
    """
    eligible = [True] * len(scores) if eligible is None else list(eligible)
    if len(eligible) != len(scores):
        raise ValueError(f"{len(scores)} scores but {len(eligible)} eligibility flags.")
    if min_score is not None and keep_top_fraction is not None:
        raise ValueError("Pass min_score or keep_top_fraction, not both.")
    threshold = min_score
    if keep_top_fraction is not None:
        if not 0 < keep_top_fraction <= 1:
            raise ValueError(f"keep_top_fraction must be in (0, 1], got {keep_top_fraction}.")
        pool = [s for s, ok in zip(scores, eligible) if ok]
        n_keep = max(1, math.ceil(keep_top_fraction * len(pool)))
        threshold = sorted(pool, reverse=True)[n_keep - 1] if pool else None
    if threshold is None:
        return eligible, None
    return [ok and s >= threshold for s, ok in zip(scores, eligible)], threshold


def _fits(tokenizer, answers: list[str], length: int) -> list[bool]:
    return [len(tokenizer(a, add_special_tokens=False)["input_ids"]) <= length for a in answers]


def generate_traces(adapter: MDLMAdapter, tokenizer, dataset, template: TemplateConfig, sampler: SamplerConfig,
                    config: PosteriorConfig, progress: bool = True) -> tuple[list[dict], dict]:
    """Sample `traces_per_question` posterior traces for every row of `dataset` (prompt, answer[, reasoning]) and
    score each one. Returns (one record per trace, report of skipped rows and timings).

    Rows whose gold answer does not fit the answer block are skipped and counted (a truncated answer would
    condition the traces on a wrong answer).
    """
    from tqdm.auto import tqdm

    if template.layout != "infill":
        raise ValueError("Posterior traces need the 'infill' layout: the answer block is what gets pre-filled.")
    check_sampler(sampler, config.traces_per_question)
    answers = [str(a) for a in dataset["answer"]]
    fits = _fits(tokenizer, answers, template.answer_length)
    skipped = [i for i, ok in enumerate(fits) if not ok]
    if skipped:
        logger.warning("Skipping %d of %d question(s) whose answer is longer than answer_length=%d (first: row %d, "
                       "%r).", len(skipped), len(fits), template.answer_length, skipped[0], answers[skipped[0]][:40])
    golds = dataset["reasoning"] if "reasoning" in dataset.column_names else [None] * len(answers)
    prompts = dataset["prompt"]
    K = config.traces_per_question
    items = [(q, k) for q in range(len(answers)) if fits[q] for k in range(K)]
    pad = block_pad_id(tokenizer, template)
    report = {"questions": len(answers), "questions_skipped_answer_too_long": len(skipped),
              "traces_reencoded": 0, "traces_too_long": 0, "sample_seconds": 0.0, "score_seconds": 0.0,
              "forwards": 0}
    records = []
    with tqdm(total=len(items), desc="Posterior traces", unit="trace", disable=not progress) as bar:
        for lo in range(0, len(items), config.batch_size):
            chunk = items[lo : lo + config.batch_size]
            qs = [q for q, _ in chunk]
            canvas = build_canvas(tokenizer, [prompts[q] for q in qs], template, adapter.mask_id,
                                  answers=[answers[q] for q in qs], max_length=adapter.max_length)
            seeds = [row_seed(sampler.seed, q * K + k) for q, k in chunk]
            start = time.perf_counter()
            out = sample_posterior(adapter, canvas, sampler, seeds)
            report["sample_seconds"] += time.perf_counter() - start
            texts, trace, overflow, counts = canonical_trace(
                tokenizer, out.generation[:, out.reasoning].cpu(), adapter.eos_ids, adapter.mask_id, pad)
            for key, n in counts.items():
                report[key] += n
            start = time.perf_counter()
            phi = phi_trajectory(adapter, canvas, trace).cpu()  # [b, R]
            report["score_seconds"] += time.perf_counter() - start
            report["forwards"] += out.stats["forwards"] + trace.shape[1]
            for j, (q, k) in enumerate(chunk):
                text, gold = texts[j], golds[q]
                labelled = bool(gold)
                records.append({
                    "trace": lo + j, "question": q, "sample": k, "seed": seeds[j], "prompt": prompts[q],
                    "answer": answers[q], "gold_reasoning": gold, "reasoning": text,
                    "correct_reasoning": reasoning_matches(text, gold) if labelled else None,
                    "numbers_match": numbers_match(text, gold) if labelled else None,
                    "score": float(phi[j].mean()), "phi_final": float(phi[j, -1]), "nfe": int(out.nfe[j]),
                    "phi": [round(x, 5) for x in phi[j].tolist()], "too_long": overflow[j],
                })
            bar.update(len(chunk))
    report["sample_seconds"] = round(report["sample_seconds"], 2)
    report["score_seconds"] = round(report["score_seconds"], 2)
    return records, report


def _mean(values: list) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(records: list[dict], keep: list[bool], threshold: float | None) -> dict:
    """Trace quality, how well the score separates good from bad traces, and what the filter kept."""
    labelled = [r for r in records if r["correct_reasoning"] is not None]
    scores = [r["score"] for r in labelled]
    exact = [r["correct_reasoning"] for r in labelled]
    loose = [r["numbers_match"] for r in labelled]
    kept = [r for r, k in zip(records, keep) if k]
    kept_labelled = [r for r in kept if r["correct_reasoning"] is not None]

    def auc(values):
        return None if (a := roc_auc(values, exact)) is None else round(a, 4)

    def rnd(x):
        return None if x is None else round(x, 4)

    return {
        "n_traces": len(records),
        "n_questions": len({r["question"] for r in records}),
        "frac_correct_reasoning": rnd(_mean(exact)),
        "frac_numbers_match": rnd(_mean(loose)),
        "auc": auc(scores),
        "auc_numbers_match": rnd(roc_auc(scores, loose)),
        "auc_within_question": rnd(grouped_auc(scores, exact, [r["question"] for r in labelled])),
        "auc_phi_final": auc([r["phi_final"] for r in labelled]),
        "mean_score": rnd(_mean([r["score"] for r in records])),
        "threshold": threshold,
        "kept": len(kept),
        "kept_questions": len({r["question"] for r in kept}),
        "frac_correct_among_kept": rnd(_mean([r["correct_reasoning"] for r in kept_labelled])),
        "frac_numbers_match_among_kept": rnd(_mean([r["numbers_match"] for r in kept_labelled])),
    }


def sft_row(prompt: str, reasoning: str, answer: str) -> dict:
    """One SFT row: the task columns (prompt, reasoning, answer), plus `problem` / `solution` aliases so that the
    `math` task loader reads the file as it is (`task: math`, `dataset_path: <file>.jsonl`)."""
    return {"prompt": prompt, "reasoning": reasoning, "answer": answer, "problem": prompt, "solution": reasoning}


def _write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_outputs(records: list[dict], keep: list[bool], summary: dict, output_dir: str) -> dict[str, str]:
    """traces.jsonl (every trace, scored and labelled), posterior_sft.jsonl (the kept traces as SFT rows),
    gold_matched.jsonl (the gold reasoning of the same kept rows: the matched baseline) and summary.json."""
    os.makedirs(output_dir, exist_ok=True)
    files = {name: os.path.join(output_dir, name)
             for name in ("traces.jsonl", "posterior_sft.jsonl", "gold_matched.jsonl", "summary.json")}
    _write_jsonl(files["traces.jsonl"], [{**r, "kept": k} for r, k in zip(records, keep)])
    kept = [r for r, k in zip(records, keep) if k]
    _write_jsonl(files["posterior_sft.jsonl"], [sft_row(r["prompt"], r["reasoning"], r["answer"]) for r in kept])
    _write_jsonl(files["gold_matched.jsonl"],
                 [sft_row(r["prompt"], r["gold_reasoning"] or "", r["answer"]) for r in kept])
    with open(files["summary.json"], "w") as f:
        json.dump({**summary, "files": files}, f, indent=2)
    return files
