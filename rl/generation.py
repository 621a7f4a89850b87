"""One rollout round as one record, built when TRL asks for completions and carried through its hooks.

TRL's step reaches the diffusion trainer through hooks that each see only part of the round:
`_generate_and_score_completions(inputs)` gets the dataset rows, `_generate_single_turn(prompt_ids)` only token
ids, `_calculate_rewards(...)` the completions, and the loss only TRL's batch. So the trainer opens a `Generation`
with the rows (prompts, gold answers), the sampler call fills it (seeds, canvas report, sampler output, unusable
rows, loss mask), the reward call adds the decoded blocks and the rewards, and the finished record's per-row
tensors (`batch_fields`) travel in TRL's batch - split and shuffled with it - to the estimators. The trainer keeps
the current record as `trainer.generation` and no other state of the round.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rl.logprobs import trajectory_steps
from rl.seeding import row_seeds
from rollout import SampleOutput, decode_block

BATCH_FIELDS = ("decode_step", "nfe", "mask_seed", "score_steps", "loss_mask", "cache_block", "cache_answer")
"""The per-row tensors of a record that travel in TRL's batch (the estimators read them at loss time)."""


@dataclass
class Generation:
    """Everything one rollout round of one process produced; B rows, G generation columns.

    Attributes:
        prompts: the B prompts as the dataset gave them.
        golds: the B gold answers ('' where missing), or None for a dataset without an answer column.
        missing_gold: [B] bool, rows whose gold answer is missing or blank (not scored, no phi credit).
        stream: the coordinates of this round's random streams (seed, round, rank, rows; `rl.seeding`).
        seeds: [B] int64 seeds by purpose: 'rollout' (sampler rows), 'mask' (estimator masks), 'steps' (drawn
            trajectory steps, only when steps are sampled).
        rollout: the sampler's output.
        canvas_report: the canvas builder's counts (e.g. `answers_truncated`).
        nonfinite: [B] bool, rows that met non-finite logits while sampling.
        score_steps: [B, S] drawn trajectory steps (-1: none), or None when every step is scored.
        eligible: [B, G] bool, the tokens a full replay would put in the loss: decoded, in a usable row, outside
            the answer block unless `loss_on_answer`.
        loss_mask: [B, G] bool, `eligible` restricted to the drawn steps' tokens (equal without sampled steps).
        answer_texts / reasoning_texts: the decoded answer and reasoning blocks (what the rewards read).
        rewards: [B_global, F] rewards per function after screening (NaN: not scored), gathered by TRL.
        old_per_token: [B, G] RLOO with dense advantages: the policy's log-probs before the update.
    """

    prompts: list
    golds: list[str] | None
    missing_gold: torch.Tensor
    stream: dict = field(default_factory=dict)
    seeds: dict[str, torch.Tensor] = field(default_factory=dict)
    rollout: SampleOutput | None = None
    canvas_report: dict = field(default_factory=dict)
    nonfinite: torch.Tensor | None = None
    score_steps: torch.Tensor | None = None
    eligible: torch.Tensor | None = None
    loss_mask: torch.Tensor | None = None
    answer_texts: list[str] | None = None
    reasoning_texts: list[str] | None = None
    rewards: torch.Tensor | None = None
    old_per_token: torch.Tensor | None = None

    @classmethod
    def open(cls, inputs: list[dict]) -> Generation:
        """A record for the dataset rows TRL hands to `_generate_and_score_completions`."""
        if "answer" not in inputs[0]:
            return cls([x["prompt"] for x in inputs], None, torch.zeros(len(inputs), dtype=torch.bool))
        missing = [x["answer"] is None or not str(x["answer"]).strip() for x in inputs]
        golds = ["" if m else str(x["answer"]) for x, m in zip(inputs, missing)]
        return cls([x["prompt"] for x in inputs], golds, torch.tensor(missing))

    def draw_seeds(self, seed: int, round: int, rank: int, sample_steps: bool) -> torch.Tensor:
        """Seed this round's streams (one per row and purpose); returns the sampler's [B] row seeds."""
        self.stream = {"seed": seed, "rows": len(self.prompts), "round": round, "rank": rank}
        purposes = ("rollout", "mask", "steps") if sample_steps else ("rollout", "mask")
        self.seeds = {p: row_seeds(purpose=p, **self.stream) for p in purposes}
        return self.seeds["rollout"]

    def record_rollout(self, out: SampleOutput, canvas_report: dict, nonfinite: torch.Tensor,
                       loss_on_answer: bool, buckets: int) -> None:
        """Keep the sampler's output and derive what the loss needs from it.

        Rows without a gold answer get phi = NaN (no gold, no potential: no dense credit). With 'steps' seeds,
        `buckets` steps are drawn per row and only their tokens enter the loss.
        """
        self.rollout, self.canvas_report, self.nonfinite = out, canvas_report, nonfinite
        if out.phi is not None and self.missing_gold.any():
            out.phi[self.missing_gold.to(out.phi.device)] = float("nan")
        eligible = out.generated & ~nonfinite.to(out.generated.device)[:, None]
        if not loss_on_answer and out.answer is not None:
            eligible[:, out.answer] = False  # train the reasoning only; the answer block still sets the reward
        self.eligible, self.loss_mask = eligible, eligible
        if "steps" in self.seeds:
            self.score_steps = trajectory_steps(self.seeds["steps"], out.nfe, buckets)
            drawn = (out.decode_step[:, :, None] == self.score_steps.to(out.decode_step.device)[:, None, :]).any(-1)
            self.loss_mask = eligible & drawn

    @property
    def unusable(self) -> torch.Tensor:
        """[B] bool: rows that are not scored (non-finite logits or no gold answer)."""
        return self.nonfinite | self.missing_gold

    def decode(self, tokenizer, stop_ids: tuple[int, ...]) -> None:
        """Decode the answer and reasoning blocks once (the rewards read them; the rollout log writes them)."""
        out = self.rollout

        def texts(block) -> list[str]:
            if block is None:
                return [""] * len(out.nfe)
            return [decode_block(tokenizer, row, stop_ids, out.mask_id) for row in out.generation[:, block]]

        self.answer_texts, self.reasoning_texts = texts(out.answer), texts(out.reasoning)

    def verifier_scores(self, tokenizer, stop_ids: tuple[int, ...], verifier) -> torch.Tensor:
        """[B, S] v(t): `verifier` (an outcome reward, `f(completions, answer=, answer_texts=)`) on the answer
        block's greedy guess at the input of every step (`SampleOutput.answer_guess`); NaN where undefined and in
        rows without a gold answer."""
        from rewards.intrinsic import verifier_step_scores

        out = self.rollout
        if out.answer_guess is None:
            raise ValueError("The stepwise-verifier credit needs the sampler's answer guesses (record_answer_guess).")
        usable = [b for b in range(len(self.prompts)) if not self.missing_gold[b]]

        def verify(rows: list[int], texts: list[str]) -> list:
            keep = [k for k, b in enumerate(rows) if b in usable]
            got = verifier([texts[k] for k in keep], answer=[self.golds[rows[k]] for k in keep],
                           answer_texts=[texts[k] for k in keep]) if keep else []
            values = [None] * len(rows)
            for k, v in zip(keep, got, strict=True):
                values[k] = v
            return values

        def decode(ids: list[int]) -> str:
            return decode_block(tokenizer, torch.tensor(ids), stop_ids, out.mask_id)

        return verifier_step_scores(out.answer_guess, decode, verify).to(out.nfe.device)

    def batch_fields(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The per-row tensors that travel in TRL's batch (`BATCH_FIELDS`), on `device`."""
        out = self.rollout
        fields = {"decode_step": out.decode_step, "nfe": out.nfe, "mask_seed": self.seeds["mask"],
                  "score_steps": self.score_steps, "loss_mask": self.loss_mask}
        plan = out.cache_plan
        if plan is not None:  # the KV-cache plan per row, so a batch restored on resume replays it too
            B = len(out.nfe)
            fields["cache_block"] = plan.block[None].expand(B, -1)
            fields["cache_answer"] = plan.answer[None].expand(B, -1)
        return {k: v.to(device) for k, v in fields.items() if v is not None}
