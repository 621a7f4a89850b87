"""The masked-diffusion (MDLM) training objective as two pure functions: draw the noise, score the masked tokens.

For one sequence with response tokens x_1..x_N (everything the model must generate: the gold reasoning and the
gold answer, padded inside their blocks), draw a noise level t ~ U(eps, 1), mask every response token
independently with probability t (prompt and template tokens are never masked), and score

    loss_row = (1 / N) * sum_{i masked} -log p(x_i | x_t) / t

The batch loss is the mean of loss_row over rows. Up to the eps truncation, E_t,mask[loss_row] is the MDLM
negative ELBO per response token, -log p(x_1..x_N | prompt) / N <= E[loss_row]: the 1/t weight compensates for
the t*N tokens a row masks on average. N counts every maskable position, padding included (LLaDA's SFT
convention: the pads teach the model where the reasoning ends), so every row of a canvas has the same N = R + A.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_noise(maskable: torch.Tensor, eps: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw t ~ U(eps, 1) per row and mask each maskable position with probability t.

    The B noise levels of a batch are stratified (low-discrepancy, as in Sahoo et al. 2024): one uniform offset u,
    t_b = eps + (1 - eps) * (b + u) / B, then shuffled over rows. Each t_b is still marginally U(eps, 1), so the
    loss keeps its expectation, but a batch always covers the whole noise range, which lowers the variance of
    the 1/t-weighted loss.

    Args:
        maskable: [B, G] bool, positions that may be masked (the response blocks).
        eps: smallest noise level, in (0, 1).
        generator: CPU generator owning this randomness.
    Returns:
        masked [B, G] bool (a subset of `maskable`) and t [B] float32, both on `maskable.device`.
    """
    if not 0 < eps < 1:
        raise ValueError(f"eps must be in (0, 1), got {eps}.")
    B, G = maskable.shape
    strata = (torch.arange(B) + torch.rand(1, generator=generator)) / B  # [B], one point per stratum
    t = eps + (1 - eps) * strata[torch.randperm(B, generator=generator)]  # [B]
    u = torch.rand(B, G, generator=generator)  # [B, G]
    masked = (u < t[:, None]).to(maskable.device) & maskable
    return masked, t.to(maskable.device)


def mask_answer_only(
    masked: torch.Tensor, t: torch.Tensor, answer_only: torch.Tensor, answer_block: torch.Tensor,
    maskable: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace the noise of answer-only rows: their whole answer block is masked and nothing else.

    Their t becomes the fraction of the row that is masked, A_b / N_b, so `mdlm_loss` scores them as the mean
    cross-entropy over their A_b answer tokens (the weight a row masking A_b of N_b tokens at random would get).

    Args:
        masked: [B, G] the drawn mask; t: [B] its noise levels.
        answer_only: [B] bool rows to replace; answer_block: [B, G] bool answer positions; maskable: [B, G] bool.
    Returns:
        (masked [B, G], t [B]) with the answer-only rows replaced.
    """
    block = answer_block & maskable  # [B, G]
    frac = block.sum(-1).float() / maskable.sum(-1).clamp(min=1).float()  # [B]
    if bool((answer_only & (frac == 0)).any()):
        raise ValueError("An answer-only row has no answer block to mask.")
    masked = torch.where(answer_only[:, None], block, masked)
    return masked, torch.where(answer_only, frac.to(t.dtype), t)


def mdlm_loss(
    logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor, t: torch.Tensor, n_response: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """MDLM loss: mean over rows of (1/N_b) * sum over masked positions of CE / t_b.

    Args:
        logits: [B, G, V] predictions for the generation region (already shifted for shifted models).
        targets: [B, G] clean token ids.
        masked: [B, G] bool, positions that were masked in the input.
        t: [B] noise level of each row.
        n_response: [B] number of response (maskable) tokens N_b of each row.
    Returns:
        The scalar loss and diagnostics: `masked_ce` (mean unweighted CE over masked tokens, nats),
        `mask_rate` (masked / response tokens) and `t` (mean noise level).
    """
    rows, cols = masked.nonzero(as_tuple=True)  # N masked positions
    ce = F.cross_entropy(logits[rows, cols].float(), targets[rows, cols], reduction="none")  # [N]
    per_row = torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device)
    per_row = per_row.index_add(0, rows, ce / t[rows].float())  # [B] sum of CE / t
    loss = (per_row / n_response.clamp(min=1).float()).mean()
    n_masked = int(rows.numel())
    if n_masked == 0:  # keep the graph connected: DDP / ZeRO expect a gradient for every parameter
        loss = loss + 0.0 * logits.sum()
    stats = {
        "masked_ce": float(ce.detach().mean()) if n_masked else float("nan"),
        "mask_rate": n_masked / max(1, int(n_response.sum())),
        "t": float(t.float().mean()),
    }
    return loss, stats
