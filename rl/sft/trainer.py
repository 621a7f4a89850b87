"""Masked-diffusion SFT as a thin `transformers.Trainer` subclass: only the loss and the batch layout change.

Everything else (optimizer, schedule, gradient accumulation, mixed precision, DDP / DeepSpeed through
`accelerate launch`, checkpoints, resuming) is the stock Trainer. The forward pass goes through the rollout
engine's `MDLMAdapter`, the same call the sampler makes (position ids that skip left padding, key padding mask,
Dream's logit shift, only the generation region's logits), so training and sampling see identical inputs.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict

import torch
from transformers import Trainer

from rl.seeding import stream_seed
from rl.sft.config import DiffusionSFTConfig
from rl.sft.data import SFTCollator
from rl.sft.loss import mask_answer_only, mdlm_loss, sample_noise
from rollout.adapter import MDLMAdapter
from rollout.template import TemplateConfig

logger = logging.getLogger(__name__)


class DiffusionSFTTrainer(Trainer):
    """Trainer whose loss is the MDLM objective (`rl.sft.loss`) on reasoning-as-infilling canvases.

    Args:
        model: the network (optionally a PEFT model); its tokenizer must have a mask token.
        args: a `DiffusionSFTConfig`.
        template: the canvas layout (R, A, delimiter, suffix) shared with the sampler.
        processing_class: the tokenizer.
        train_dataset / eval_dataset: datasets with `prompt`, `answer`, `reasoning` columns.
    """

    loss_is_scaled_for_ga = False  # the loss is a per-batch mean: the Trainer divides by accumulation steps

    def __init__(self, model, args: DiffusionSFTConfig, template: TemplateConfig, processing_class, **kwargs):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        # Call conventions are read from the base model: PEFT / DDP wrappers hide its forward signature.
        self.mdlm = MDLMAdapter.from_pretrained(base, processing_class)
        collator = SFTCollator(processing_class, template, self.mdlm.mask_id, self.mdlm.max_length,
                               answer_only_rate=args.answer_only_rate,
                               reasoning_corrupt_rate=args.reasoning_corrupt_rate,
                               seed=stream_seed(args.seed, "sft_data", rank=args.process_index))
        super().__init__(model=model, args=args, data_collator=collator, processing_class=processing_class, **kwargs)
        self._noise = torch.Generator().manual_seed(stream_seed(args.seed, "sft_noise", rank=args.process_index))
        self._eval_noise = torch.Generator()
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, generator=None):
        ids, attention, maskable = inputs["input_ids"], inputs["attention_mask"], inputs["maskable"]  # [B, L], [B, G]
        G = maskable.shape[1]
        scored = maskable  # [B, G] positions the noise may mask and the loss scores
        if self.args.reasoning_first:  # MDLM rows keep the answer masked and unscored: it is learned from r alone
            scored = maskable & ~(inputs["answer_block"] & ~inputs["answer_only"][:, None])
        masked, t = sample_noise(scored, self.args.mask_eps, generator or self._noise)  # [B, G], [B]
        if "answer_only" in inputs:
            masked, t = mask_answer_only(masked, t, inputs["answer_only"], inputs["answer_block"], scored)
        noisy = ids.clone()
        hide = masked | (maskable & ~scored)  # [B, G]
        noisy[:, -G:] = torch.where(hide, torch.full_like(hide, self.mdlm.mask_id, dtype=ids.dtype), ids[:, -G:])
        self.mdlm.model = model  # the (possibly wrapped) module the Trainer hands us
        logits = self.mdlm.logits(noisy, attention, keep_last=G)  # [B, G, V]
        loss, stats = mdlm_loss(logits, ids[:, -G:], masked, t, scored.sum(-1))
        mode = "train" if model.training else "eval"
        for name, value in stats.items():
            self._metrics[mode][f"sft/{name}"].append(value)
        return (loss, logits) if return_outputs else loss

    def evaluate(self, *args, **kwargs):
        # The same masks at every evaluation, so eval losses are comparable across checkpoints.
        self._eval_noise.manual_seed(stream_seed(self.args.seed, "sft_eval", rank=self.args.process_index))
        return super().evaluate(*args, **kwargs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs, generator=self._eval_noise)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        for name, values in self._metrics[mode].items():
            finite = [v for v in values if not math.isnan(v)]
            if finite:
                logs[f"{prefix}{name}"] = sum(finite) / len(finite)
        self._metrics[mode].clear()
        super().log(logs, start_time)
