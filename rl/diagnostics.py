"""Diagnostics of the diffusion trainers: per-step metrics, counts of degenerate rollouts, warnings, rollout JSONL.

Degenerate inputs never reach the loss as NaN, and each kind is counted per step (summed over processes) and
warned about once: rows whose model logits are non-finite (`rollout/nonfinite_logits_rows`: replaced by uniform
logits, not scored, out of the loss), rows without a reward from any function (`reward/none_rows`,
`reward/all_none_groups`; TRL gives them advantage 0), empty answer or reasoning blocks (`rollout/empty_answers`,
`rollout/empty_reasoning`), exits before any reasoning token (`rollout/exit_at_step0`), gold answers longer than
the answer block (`data/answers_truncated`), rows without a gold answer (`data/missing_answers`: not scored) and
rows the loader left out (`data/rows_skipped`). Groups with identical rewards are TRL's `frac_reward_zero_std`.
Warnings go to the `rl.trainer` logger (the name users filter on).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from rollout import MDLMAdapter
from rollout.adapter import Readout
from rollout.guard import round_stats

logger = logging.getLogger("rl.trainer")
NAN = float("nan")


@dataclass
class FiniteLogitsAdapter(MDLMAdapter):
    """`MDLMAdapter` whose logits are always finite.

    A row whose logits hold NaN or +inf, or a position without any finite logit (or, read through `readout`, whose
    final hidden states hold NaN or inf), gets uniform logits (mask id still -inf) for that forward: the sampler
    cannot stall on it and the loss cannot turn NaN (the replacement passes no gradient). With `nonfinite_inputs`
    set to a list, the non-padding tokens of each such row are appended to it, so the trainer can tell which
    rollouts met them (`nonfinite_rows`). `replaced` counts rows, shared by every copy made with
    `dataclasses.replace`.
    """

    nonfinite_inputs: list | None = None
    replaced: list = dataclasses.field(default_factory=lambda: [0])

    @classmethod
    def wrap(cls, adapter: MDLMAdapter) -> FiniteLogitsAdapter:
        return cls(**{f.name: getattr(adapter, f.name) for f in dataclasses.fields(MDLMAdapter) if f.init})

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep_last: int) -> torch.Tensor:
        logits = super().logits(input_ids, attention_mask, keep_last)  # [B, K, V]
        bad = (~torch.isfinite(logits.amax(-1))).any(-1)  # [B]: amax is NaN/+inf/-inf exactly then
        if not bad.any():
            return logits
        uniform = torch.zeros_like(logits[:1])
        uniform[..., self.mask_id] = float("-inf")
        self._record(bad, input_ids, attention_mask)
        return torch.where(bad[:, None, None], uniform, logits)

    def checked(self, read: Readout, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Readout:
        bad = read.nonfinite_rows() if read.full is None else None  # logits read whole are guarded by `logits`
        if bad is None or not bad.any():
            return read
        self._record(bad, input_ids, attention_mask)
        return read.with_uniform_rows(bad)

    def _record(self, bad: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self.replaced[0] += int(bad.sum())
        if self.nonfinite_inputs is not None:
            for i in torch.nonzero(bad).flatten().tolist():
                self.nonfinite_inputs.append(tuple(input_ids[i][attention_mask[i].bool()].tolist()))


def nonfinite_rows(canvas, out, inputs: list) -> torch.Tensor:
    """[B] bool: rows of a sampler call whose state at some step is among `inputs` (the adapter's record)."""
    bad = torch.zeros(len(out.nfe), dtype=torch.bool)
    if not inputs:
        return bad
    seen = set(inputs)
    g0 = out.gen_start
    ids, am = canvas.input_ids[:, :g0].cpu(), canvas.attention_mask[:, :g0].cpu()
    prompts = [row[keep.bool()].tolist() for row, keep in zip(ids, am)]
    nfe = out.nfe.tolist()
    for t in range(max(nfe)):
        state = out.state_at(t).cpu()  # [B, G] the input of forward t
        for i in range(len(nfe)):
            if t < nfe[i] and not bad[i] and tuple(prompts[i] + state[i].tolist()) in seen:
                bad[i] = True
    return bad


class _Repeats(logging.Filter):
    """Drops the records whose message contains `text` after the first `keep` of them."""

    def __init__(self, text: str, keep: int):
        super().__init__()
        self.text, self.keep, self.count = text, keep, 0

    def filter(self, record: logging.LogRecord) -> bool:
        if self.text not in str(record.msg):  # not startswith: accelerate's logger prefixes "[RANK i] "
            return True
        self.count += 1
        return self.count <= self.keep


def log_once(logger_name: str, text: str) -> None:
    """Let `logger_name` emit its message containing `text` once per process (the trainer counts repeats)."""
    log = logging.getLogger(logger_name)
    if not any(isinstance(f, _Repeats) and f.text == text for f in log.filters):
        log.addFilter(_Repeats(text, keep=1))


@contextmanager
def silenced(logger_name: str, text: str):
    log, drop = logging.getLogger(logger_name), _Repeats(text, keep=0)
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


class DiagnosticsMixin:
    """Metric, count and warning helpers of `rl.trainer.DiffusionMixin` (reads its `Generation` record)."""

    def _warn_once(self, key: str, message: str, *args) -> None:
        if key not in self._warned and self.accelerator.is_main_process:
            self._warned.add(key)
            logger.warning(message + " Reported once; the metric counts every step.", *args)

    def _gather_mean(self, x: torch.Tensor) -> float:
        x = torch.as_tensor(x, dtype=torch.float32, device=self.accelerator.device).reshape(-1)
        x = self.accelerator.gather(x)
        x = x[~torch.isnan(x)]
        return float(x.mean()) if x.numel() else float("nan")

    def _gather_sums(self, counts: dict[str, float]) -> dict[str, int]:
        """Per-process counts summed over processes (one collective)."""
        local = torch.tensor(list(counts.values()), dtype=torch.float64, device=self.accelerator.device)
        total = self.accelerator.reduce(local, reduction="sum") if self.accelerator.num_processes > 1 else local
        return dict(zip(counts, (int(v) for v in total.tolist())))

    def _log_rollout(self, gen, mode: str) -> None:
        """Per-step rollout metrics, degenerate counts and (training) the rollout JSONL of one `Generation`."""
        out, m = gen.rollout, self._metrics[mode]
        m["rollout/nfe"].append(self._gather_mean(out.nfe.float()))
        m["rollout/exit_rate"].append(self._gather_mean(out.exited.float()))
        if self._sampler.prune_phi is not None:
            m["rollout/prune_rate"].append(self._gather_mean(out.pruned.float()))
        stats = {k: self._gather_mean(torch.tensor([v])) for k, v in round_stats(out).items()}  # the guard's inputs
        m["rollout/tokens_per_nfe"].append(stats["tokens_per_nfe"])
        m["rollout/decode_nll"].append(stats["decode_nll"])
        m["rollout/answer_entropy"].append(stats["answer_entropy"])
        if getattr(self, "_guard", None) is not None and mode == "train":
            for key, value in self._guard.observe(stats).items():
                m[key].append(value)
        if out.phi is not None:
            m["reward/phi_T"].append(self._gather_mean(out.phi_final))
        rewards = gen.rewards  # [B_global, F] per reward function, gathered by TRL
        if rewards is not None:
            weights = self.reward_weights.to(rewards.device, rewards.dtype)
            total = (rewards * weights).nansum(-1).masked_fill(torch.isnan(rewards).all(-1), NAN)
            m["reward/outcome"].append(float(total.nanmean()))
        self._count_degenerate(gen, mode)
        if self.args.rollout_log_dir == "" or mode != "train":
            return
        folder = self.args.rollout_log_dir or os.path.join(self.args.output_dir, "rollouts")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"step{self.state.global_step:06d}_rank{self.accelerator.process_index}.jsonl")
        B, rank = len(out.nfe), self.accelerator.process_index
        local = rewards[rank * B : (rank + 1) * B].tolist() if rewards is not None else [None] * B
        local = [[None if v != v else v for v in row] if isinstance(row, list) else row for row in local]  # NaN: None
        with open(path, "w") as f:
            for i in range(B):
                row = {"prompt": gen.prompts[i], "reasoning": gen.reasoning_texts[i],
                       "answer_text": gen.answer_texts[i],
                       "gold": gen.golds[i] if gen.golds and not gen.missing_gold[i] else None,
                       "rewards": local[i], "seed": int(gen.seeds["rollout"][i]), **out.row(i)}
                f.write(json.dumps(row) + "\n")

    def _count_degenerate(self, gen, mode: str) -> None:
        """Per-step counts (summed over processes) of degenerate rollouts and inputs; each warned about once."""
        out, answers, reasoning = gen.rollout, gen.answer_texts, gen.reasoning_texts
        counts = self._gather_sums({
            "rollout/nonfinite_logits_rows": float(gen.nonfinite.sum()),
            "rollout/empty_answers": float(sum(not t.strip() for t in answers)) if out.answer is not None else 0.0,
            "rollout/empty_reasoning": float(sum(not t.strip() for t in reasoning)),
            "rollout/exit_at_step0": float((out.exit_step == 0).sum()),
            "data/answers_truncated": float(gen.canvas_report.get("answers_truncated", 0)),
            "data/missing_answers": float(gen.missing_gold.sum()),
        })
        m = self._metrics[mode]
        for key, value in counts.items():
            m[key].append(float(value))
        rows = len(out.nfe) * self.accelerator.num_processes
        if counts["rollout/nonfinite_logits_rows"]:
            self._warn_once("nonfinite", "%d of %d rollouts met non-finite (NaN/inf) logits: replaced by uniform "
                            "logits, left out of the loss and not scored (rollout/nonfinite_logits_rows). Check the "
                            "model's numerics (dtype, attention mask).", counts["rollout/nonfinite_logits_rows"], rows)
        if counts["rollout/empty_answers"]:
            self._warn_once("empty_answers", "%d of %d rollouts decoded an empty answer block (e.g. EOS first); the "
                            "rewards score them as they are (rollout/empty_answers).", counts["rollout/empty_answers"],
                            rows)
        if counts["rollout/empty_reasoning"]:
            self._warn_once("empty_reasoning", "%d of %d rollouts have an empty reasoning block (EOS first, or an "
                            "exit before any reasoning token; rollout/empty_reasoning).",
                            counts["rollout/empty_reasoning"], rows)
        if counts["rollout/exit_at_step0"]:
            self._warn_once("exit0", "%d of %d rollouts exited at step 0 (H_UB < exit_gamma=%s before any "
                            "reasoning token): only their answer tokens are trained (rollout/exit_at_step0); lower "
                            "exit_gamma if this persists.", counts["rollout/exit_at_step0"], rows,
                            self._sampler.exit_gamma)
        if counts["data/answers_truncated"] and "truncated" not in self._warned:
            A = self._template.answer_length
            long = [a for a in gen.golds or [] if len(self.processing_class(a, add_special_tokens=False)
                                                          ["input_ids"]) > A]
            self._warn_once("truncated", "%d gold answer(s) are longer than the answer block (answer_length=%d), "
                            "e.g. %r; phi reads them truncated (data/answers_truncated). Increase answer_length.",
                            counts["data/answers_truncated"], A, long[0] if long else "(on another process)")
        if counts["data/missing_answers"]:
            self._warn_once("missing", "%d of %d rows have no gold answer: they are not scored and get no phi "
                            "(data/missing_answers).", counts["data/missing_answers"], rows)
        if self._rows_skipped is not None and mode == "train":
            m["data/rows_skipped"].append(float(self._rows_skipped))  # once: the loader's count
            self._rows_skipped = None

    def _screen_rewards(self, rewards: torch.Tensor) -> torch.Tensor:
        """NaN (TRL: not scorable, advantage 0) for rows met by non-finite logits or without a gold answer and
        for +-inf values; count rows without any reward and groups without any scorable row."""
        mode = "train" if self.model.training else "eval"
        unusable = self.accelerator.gather(self.generation.unusable.long().to(rewards.device)).bool()
        inf = torch.isinf(rewards)
        if inf.any():
            self._warn_once("inf_reward", "A reward function returned +-inf for %d value(s); they count as None "
                            "(reward/none_rows when no function scored the row).", int(inf.sum()))
        rewards = torch.where(inf | unusable[:, None], torch.full_like(rewards, NAN), rewards)
        none = torch.isnan(rewards).all(-1)  # [B_global]
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        all_none = none.view(-1, group_size).all(-1)  # [groups]
        m = self._metrics[mode]
        m["reward/none_rows"].append(float(none.sum()))
        m["reward/all_none_groups"].append(float(all_none.sum()))
        if none.any():
            self._warn_once("none_rows", "%d of %d rollouts got no reward (every reward function returned None, or "
                            "the row was unusable); they get advantage 0 and stay out of the group baselines "
                            "(reward/none_rows; %d whole groups: reward/all_none_groups).",
                            int(none.sum()), len(none), int(all_none.sum()))
        total = (rewards * self.reward_weights.to(rewards.device, rewards.dtype)).nansum(-1).masked_fill(none, NAN)
        grouped = total.view(-1, group_size)  # [groups, group_size]
        spread = grouped.nan_to_num(-torch.inf).amax(-1) - grouped.nan_to_num(torch.inf).amin(-1)
        if mode == "train" and not (spread > 0).any():
            self._warn_once("no_signal", "Step %d: every group had identical rewards (or none): the outcome "
                            "advantage is 0 for the whole batch (frac_reward_zero_std).", self.state.global_step)
        return rewards
