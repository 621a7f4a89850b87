"""Intrinsic rewards read from the sampler's trace (`rollout.sampler.SampleOutput`): pure, vectorised functions.

Trace conventions (per row b, step t = index of the forward pass, 0-based):

- `phi[b, t]` = sum_j log p_t(a_j = a*_j), the gold answer's log-likelihood read at the INPUT of forward t, i.e.
  given the tokens decoded at steps < t. NaN once the answer block is no longer fully masked (after the last
  reasoning step) and for steps the row never ran. Its last defined value is phi_T, the answer's likelihood given
  the finished (or early-exited) reasoning.
- `h_ub[b, t]` = sum_j H(p_t(a_j)) over the answer block, same NaN convention.
- `decode_step[b, i]` = step at which generation position i was decoded, -1 if never (prefilled/not generated).

Potential-based shaping. Hold phi at phi_T after its last defined step; the step reward is
r_t = phi(t + 1) - phi(t) and goes to the tokens decoded at step t (so the answer tokens, decoded after the last
defined step, get 0). A token decoded at step s gets either

- `return_to_go`: sum_{t >= s} r_t = phi_T - phi(s) (the sum telescopes), or
- `immediate`: r_s.

Rows without any defined phi (e.g. a prefilled answer block) get 0 credit and NaN from `phi_final`.

Stepwise verifier (the MDPO / EGSPO-SA family, for comparison with phi): `verifier_step_scores` turns the answer
block's greedy guess at the input of every step (`SampleOutput.answer_guess`, read from the sampler's own
forwards: no extra NFE) into v(t) in {0, 1} with the task's verifier, and `phi_token_credit(decode_step, v,
'immediate')` gives the tokens decoded at step t the change v(t + 1) - v(t): +1 for the step that made the
model's answer right, -1 for the one that made it wrong, 0 otherwise. It needs no gold likelihood, only a
verifier, and is as sparse as the verifier's verdicts.
"""

from __future__ import annotations

import torch

CREDIT_MODES = ("return_to_go", "immediate")


def held(values: torch.Tensor) -> torch.Tensor:
    """[B, S] -> [B, S + 1]: each row forward-filled past its defined steps (last value held) and extended by one
    column, so that every step t < S has a successor t + 1. Steps before a row's first defined value stay NaN."""
    if values.dim() != 2:
        raise ValueError(f"Expected a [B, S] per-step tensor, got shape {tuple(values.shape)}.")
    if torch.isinf(values).any():
        raise ValueError("Per-step values contain +-inf; phi and H_UB must be finite (check the model's logits).")
    B, S = values.shape
    steps = torch.arange(S, device=values.device).expand(B, S)  # [B, S]
    last = torch.where(~torch.isnan(values), steps, torch.full_like(steps, -1)).cummax(-1).values  # [B, S]
    filled = values.gather(-1, last.clamp(min=0))  # [B, S]
    filled = torch.where(last >= 0, filled, torch.full_like(filled, float("nan")))
    return torch.cat([filled, filled[:, -1:]], dim=-1)  # [B, S + 1]


def phi_step_rewards(phi: torch.Tensor) -> torch.Tensor:
    """[B, S] phi -> [B, S] step rewards r_t = phi(t + 1) - phi(t) (phi held at phi_T; 0 where undefined)."""
    h = held(phi)  # [B, S + 1]
    return torch.nan_to_num(h[:, 1:] - h[:, :-1], nan=0.0)


def phi_token_credit(decode_step: torch.Tensor, phi: torch.Tensor, mode: str = "return_to_go") -> torch.Tensor:
    """Per-token process reward from phi.

    Args:
        decode_step: [B, G] long, step at which each generation position was decoded (-1: never).
        phi: [B, S] float, gold-answer log-likelihood per step (NaN convention in the module docstring).
        mode: 'return_to_go' (phi_T - phi(s_i)) or 'immediate' (r at s_i).
    Returns:
        [B, G] credit in phi's dtype; 0 at never-decoded positions and in rows without any defined phi.
    """
    if mode not in CREDIT_MODES:
        raise ValueError(f"mode={mode!r}; use one of {CREDIT_MODES}.")
    if decode_step.dim() != 2 or decode_step.shape[0] != phi.shape[0]:
        shapes = f"decode_step {tuple(decode_step.shape)}, phi {tuple(phi.shape)}"
        raise ValueError(f"Expected decode_step [B, G] and phi [B, S] with the same B; got {shapes}.")
    S = phi.shape[1]
    if decode_step.numel() and int(decode_step.max()) >= S:
        raise ValueError(f"A decode step ({int(decode_step.max())}) lies beyond the {S} recorded steps of phi.")
    h = held(phi)  # [B, S + 1]
    s = decode_step.clamp(min=0)  # [B, G]
    at_s = h.gather(-1, s)  # [B, G] phi(s_i)
    if mode == "return_to_go":
        credit = h[:, -1:] - at_s  # phi_T - phi(s_i)
    else:
        credit = h.gather(-1, s + 1) - at_s  # r_{s_i}
    credit = torch.nan_to_num(credit, nan=0.0)
    return torch.where(decode_step >= 0, credit, torch.zeros_like(credit))


def verifier_step_scores(answer_guess: torch.Tensor, decode, verify) -> torch.Tensor:
    """[B, S, A] per-step greedy answer guesses -> [B, S] float64 verifier scores v(t) (NaN where undefined).

    Args:
        answer_guess: [B, S, A] token ids, -1 at steps whose answer block was no longer fully masked.
        decode: one answer block's token ids (a list) -> its text.
        verify: (rows, texts) -> one score (or None: not scorable) per pair, the task's verifier judging `texts[k]`
            against the gold answer of row `rows[k]`; called once for the whole batch.
    Each distinct guess of a row is decoded and verified once (consecutive steps often guess the same answer).
    """
    if answer_guess.dim() != 3:
        raise ValueError(f"Expected answer_guess [B, S, A], got shape {tuple(answer_guess.shape)}.")
    B, S, _ = answer_guess.shape
    guesses = answer_guess.cpu().tolist()
    pairs = sorted({(b, tuple(guesses[b][t])) for b in range(B) for t in range(S) if guesses[b][t][0] >= 0})
    values = verify([b for b, _ in pairs], [decode(list(ids)) for _, ids in pairs]) if pairs else []
    score = {pair: float("nan") if v is None else float(v) for pair, v in zip(pairs, values, strict=True)}
    scores = torch.full((B, S), float("nan"), dtype=torch.float64)
    for b in range(B):
        for t in range(S):
            if guesses[b][t][0] >= 0:
                scores[b, t] = score[(b, tuple(guesses[b][t]))]
    return scores


def phi_final(phi: torch.Tensor) -> torch.Tensor:
    """[B, S] -> [B] phi_T, the soft outcome reward log p(a* | reasoning); NaN for rows without a defined phi."""
    return held(phi)[:, -1]


def neg_h_ub(h_ub: torch.Tensor, reduction: str = "final") -> torch.Tensor:
    """[B, S] -> [B] label-free confidence reward -H_UB.

    reduction='final': -H_UB at the last defined step (the entropy bound of the answer actually committed to,
    given the finished or early-exited reasoning). reduction='mean': minus the mean over the defined steps
    (rewards reasoning that becomes confident early). NaN for rows without a defined step.
    """
    if reduction == "final":
        return -held(h_ub)[:, -1]
    if reduction == "mean":
        held(h_ub)  # validates shape and finiteness
        return -torch.nanmean(h_ub, dim=-1)
    raise ValueError(f"reduction={reduction!r}; use 'final' or 'mean'.")


def answer_likelihood(completions: list, phi_final: list[float | None] | None = None, **kwargs) -> list[float | None]:
    """Soft outcome reward for TRL: exp(phi_T) = p(a* | prompt, reasoning) in [0, 1], per completion.

    The diffusion trainers pass each rollout's phi_T as the `phi_final` column (NaN/None when the trace has no
    phi, e.g. no gold answer): those rows get None, which TRL treats as missing rather than 0.
    """
    if phi_final is None:
        raise ValueError("answer_likelihood needs the rollout's phi_T (column 'phi_final'); use it with the "
                         "diffusion trainers on a task with gold answers.")
    return [None if p is None or p != p else float(torch.tensor(float(p)).exp()) for p in phi_final]
