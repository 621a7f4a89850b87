"""A stability guard for parallel decoding in RL: a cap on tokens per step that tightens as the policy grows
confident, and alarms when decoding parallelism jumps.

Why: MED, EB, threshold decoding and early exit decode more positions per step the more confident the model is. RL
sharpens the policy, so the same sampler settings decode ever more tokens per step as training goes on; the d1
author reports that fast parallel decoding inside online RL made the policy overconfident and collapse (d1#25):
confident marginals say nothing about whether the positions decoded together are consistent, and a policy trained
on its own parallel samples learns to be confident about exactly those.

The guard keeps the uncertainty decoded per step near its level at the start of training. Let H_0 be the policy's
mean per-token negative log-likelihood of the tokens it decoded in its first guarded rollout round, and H_t an
exponential moving average of the same quantity since. The cap on positions per row and step is

    cap_t = clamp(round(cap_0 * H_t / H_0), 1, cap_0),

where cap_0 = `max_per_step` (or the policy's own limit: `med_k_max`, `k`): a policy twice as confident as at the
start may decode half as many tokens per step, so cap x H - the entropy budget of a step - stays put. It only ever
tightens below cap_0. Alarms (logged, counted in `rollout/guard_alarms`) fire when a round's tokens per NFE exceeds
`guard_alarm_ratio` x its moving average, or its mean answer entropy (H_UB at the row's last step) falls below the
moving average / `guard_alarm_ratio`.

The state is the trainer's (one guard per run, saved in checkpoints): rollout rounds feed it global means (the same
on every process), and the next round samples with `guard.config(sampler)`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


def round_stats(out) -> dict[str, float]:
    """Per-round quantities the guard reads from a `SampleOutput`: tokens per NFE, mean NLL of the decoded
    reasoning tokens (the policy's confidence; NaN if none), mean answer entropy at each row's last step."""
    generated = out.generated
    reasoning = torch.zeros_like(generated)
    reasoning[:, out.reasoning] = True
    decoded = generated & reasoning
    nll = -out.token_logprob[decoded].double()
    hub = out.final_index(out.h_ub)
    return {
        "tokens_per_nfe": float(generated.sum(-1).double().div(out.nfe.clamp(min=1)).mean()),
        "decode_nll": float(nll.mean()) if nll.numel() else math.nan,
        "answer_entropy": float(hub[~torch.isnan(hub)].mean()) if (~torch.isnan(hub)).any() else math.nan,
    }


@dataclass
class ParallelismGuard:
    """Cross-round state of the guard (see the module docstring).

    Attributes:
        cap0: the cap when the policy is as uncertain as at the start.
        alarm_ratio: a jump by this factor against the moving average raises an alarm.
        momentum: weight of the past in the moving averages.
        warmup: rounds observed before alarms can fire (the averages need a few rounds).
    """

    cap0: int
    alarm_ratio: float = 1.5
    momentum: float = 0.8
    warmup: int = 3
    ref_nll: float | None = None
    nll: float | None = None
    tokens_per_nfe: float | None = None
    answer_entropy: float | None = None
    rounds: int = 0
    alarms: int = 0

    @classmethod
    def from_config(cls, config) -> ParallelismGuard | None:
        """The guard a `SamplerConfig` asks for (`parallel_guard`), or None."""
        if not config.parallel_guard:
            return None
        cap0 = config.max_per_step or {"med": config.med_k_max}.get(config.policy, config.k)
        if config.max_per_step is None and config.policy in ("eb", "threshold"):
            raise ValueError(f"parallel_guard with policy {config.policy!r} needs max_per_step (its own parallelism "
                             "has no limit to tighten from).")
        return cls(cap0=cap0, alarm_ratio=config.guard_alarm_ratio)

    def cap(self) -> int:
        if not self.ref_nll or self.nll is None:
            return self.cap0
        return max(1, min(self.cap0, round(self.cap0 * self.nll / self.ref_nll)))

    def config(self, sampler):
        """`sampler` with the current cap as its `max_per_step`."""
        return dataclasses.replace(sampler, max_per_step=self.cap())

    def observe(self, stats: dict[str, float]) -> dict[str, float]:
        """Feed one round's global `round_stats`; returns the metrics to log (cap used, alarm flags)."""
        cap, alarm = self.cap(), []
        tpn, nll, hub = stats["tokens_per_nfe"], stats["decode_nll"], stats["answer_entropy"]
        if self.rounds >= self.warmup:
            if self.tokens_per_nfe and tpn > self.alarm_ratio * self.tokens_per_nfe:
                alarm.append(f"tokens per NFE jumped to {tpn:.2f} (moving average {self.tokens_per_nfe:.2f})")
            if self.answer_entropy and hub == hub and hub < self.answer_entropy / self.alarm_ratio:
                alarm.append(f"answer entropy fell to {hub:.3f} nats (moving average {self.answer_entropy:.3f})")
        if alarm:
            self.alarms += 1
            logger.warning("Parallel-decoding alarm at rollout round %d: %s; the guard's cap is %d tokens per step.",
                           self.rounds, "; ".join(alarm), cap)
        if self.ref_nll is None and nll == nll and nll > 0:
            self.ref_nll = nll
        self.nll = self._average(self.nll, nll)
        self.tokens_per_nfe = self._average(self.tokens_per_nfe, tpn)
        self.answer_entropy = self._average(self.answer_entropy, hub)
        self.rounds += 1
        return {"rollout/guard_cap": float(cap), "rollout/guard_alarm": float(bool(alarm)),
                "rollout/guard_alarms": float(self.alarms)}

    def _average(self, old: float | None, new: float) -> float | None:
        if new != new:  # NaN: nothing observed
            return old
        return new if old is None else self.momentum * old + (1 - self.momentum) * new

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
