"""Diffusion GRPO/RLOO: thin subclasses of TRL's trainers sharing one mixin.

What changes against TRL (everything else - batching, buffering, clipping, KL to the adapter-disabled
reference, logging, checkpoints - is TRL's own):

- Generation (`_generate_single_turn`) runs the project's batched sampler on the reasoning-as-infilling canvas,
  one random stream per (seed, round, rank, row) (`rl.seeding`). The completion is the whole generation region;
  the loss mask (`loss_mask` in the batch; TRL's GRPO reads it as `tool_mask`) keeps the tokens the sampler
  decoded, minus the answer block unless `loss_on_answer`, minus rows with non-finite logits, and with sampled
  trajectory steps only the drawn steps' tokens.
- Likelihoods (`_get_per_token_logps_and_entropies`) come from a diffusion estimator (`rl.logprobs`) that reads
  the rollout trace travelling with the batch (decode steps, NFE, per-row mask seeds), and are 0 outside the loss
  mask, so every log-prob TRL sees (old, reference, current; RLOO's sequence sums and KL) covers exactly the loss
  tokens.
- Advantages: TRL's outcome advantage plus `dense_coef` x the phi credit standardised within each group over its
  loss tokens (`rl.advantages`), a [B, G] tensor.
- Checkpoints are TRL's/HF's own (`save_strategy: steps`, `resume_from_checkpoint`), written atomically and
  completed with the rollout round counter that seeds every row's sampler stream (`rl.checkpoint.ResumableMixin`),
  so a resumed run draws the same prompts and the same rollouts as an uninterrupted one. SIGTERM / Ctrl-C save a
  checkpoint at the end of the current step.
- Diagnostics (per-step metrics, counts of degenerate rollouts, warnings, rollout JSONL) live in `rl.diagnostics`.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from trl import GRPOTrainer, RLOOTrainer

from rl.advantages import dense_advantages
from rl.checkpoint import ResumableMixin
from rl.diagnostics import DiagnosticsMixin, FiniteLogitsAdapter, log_once, nonfinite_rows, silenced
from rl.generation import BATCH_FIELDS, Generation
from rl.logprobs import ESTIMATORS, EstimatorOptions, step_weights
from rl.rloo_loss import per_token_clipped_loss
from rollout import MDLMAdapter, layout_canvas, sample
from rollout.cache import CachePlan
from rollout.guard import ParallelismGuard

logger = logging.getLogger(__name__)


class DiffusionMixin(DiagnosticsMixin, ResumableMixin):
    """Shared diffusion behaviour; mixed in before the TRL trainer class.

    One step reads as one walk through TRL's hooks, carrying one record (`rl.generation.Generation`):
    `_generate_and_score_completions` opens it from the dataset rows -> `_generate_single_turn` samples and fills it
    -> `_calculate_rewards` decodes and scores it -> back in `_generate_and_score_completions`, its batch fields
    and the dense credit join TRL's batch -> `_compute_loss` / `_get_per_token_logps_and_entropies` score the
    micro-batch's rows with the chosen estimator.
    """

    _turn_returns_logprobs = True  # TRL's GRPO `_generate_single_turn` returns (ids, logprobs), RLOO's only ids

    def __init__(self, *args, heldout_dataset=None, rows_skipped: int = 0, **kwargs):
        super().__init__(*args, **kwargs)  # the TRL trainer's
        self._init_diffusion(heldout_dataset, rows_skipped)

    def _init_diffusion(self, heldout_dataset=None, rows_skipped: int = 0) -> None:
        model = self.accelerator.unwrap_model(self.model)
        self._adapter = FiniteLogitsAdapter.wrap(MDLMAdapter.from_pretrained(model, self.processing_class))
        self._sampler = self.args.sampler_config()
        self._guard = ParallelismGuard.from_config(self._sampler)  # parallel_guard: its cap tightens across rounds
        self._template = self.args.template_config()
        self._round = 0  # rollout rounds so far: seeds the sampler's per-row streams; saved in checkpoints
        self.generation: Generation | None = None  # the current rollout round's record
        self._trace: dict | None = None  # the batch fields of the micro-batch being scored
        self._warned: set[str] = set()
        self._rows_skipped = rows_skipped or None
        self._init_resume()
        for name in ("trl.trainer.grpo_trainer", "trl.trainer.rloo_trainer"):  # TRL warns at every such step
            log_once(name, "All reward functions returned None")
        self.heldout = None
        if heldout_dataset is not None and self.args.heldout_eval_steps > 0:
            from rl.callbacks import HeldOutEvalCallback

            rows = heldout_dataset.select(range(min(self.args.heldout_size, len(heldout_dataset))))
            template = dataclasses.replace(self._template, chat_template=self.args.chat_prompts)
            self.heldout = HeldOutEvalCallback(self, rows, self.args.heldout_sampler_config(),
                                               self.args.heldout_eval_steps, template=template)
            self.add_callback(self.heldout)

    def _adapter_for(self, model) -> MDLMAdapter:
        return dataclasses.replace(self._adapter, model=model)

    def _resume_state(self) -> dict:
        return {"round": self._round, **({"guard": self._guard.state_dict()} if self._guard else {})}

    def _load_resume_state(self, state: dict) -> None:
        self._round = state["round"]
        if self._guard and "guard" in state:
            self._guard.load_state_dict(state["guard"])

    # Generation ---------------------------------------------------------------------------------------------
    def _generate_single_turn(self, prompt_ids, *args, **kwargs):
        from trl.models import unwrap_model_for_generation

        gen, args = self.generation, self.args
        self._round += 1
        seeds = gen.draw_seeds(args.seed, self._round, self.accelerator.process_index,
                               sample_steps=args.logprob_estimator == "trajectory" and args.trajectory_sample_steps)
        with unwrap_model_for_generation(self.model_wrapped, self.accelerator) as model:
            adapter = dataclasses.replace(self._adapter_for(model), nonfinite_inputs=[])
            answers = gen.golds if self._template.layout == "infill" else None
            with silenced("rollout.template", "Truncated"):  # counted and reported once by `_log_rollout`
                canvas = layout_canvas(self.processing_class, prompt_ids, self._template, adapter.mask_id,
                                       answers=answers, max_length=adapter.max_length, answer_overflow="truncate")
            was_training = model.training
            model.eval()
            out = sample(adapter, canvas, self._guard.config(self._sampler) if self._guard else self._sampler,
                         seeds=seeds)
            model.train(was_training)
        gen.record_rollout(out, canvas.report, nonfinite_rows(canvas, out, adapter.nonfinite_inputs),
                           args.loss_on_answer, args.trajectory_buckets)
        completion_ids = out.generation.tolist()
        return (completion_ids, out.token_logprob.tolist()) if self._turn_returns_logprobs else completion_ids

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        gen = self.generation
        gen.decode(self.processing_class, self._adapter.eos_ids)
        out = gen.rollout
        phi_final = out.phi_final.tolist() if out.phi is not None else [None] * len(inputs)
        for x, text, reasoning, phi in zip(inputs, gen.answer_texts, gen.reasoning_texts, phi_final, strict=True):
            x["answer_texts"] = text  # rewards read the answer block, not the free text
            x["reasoning_texts"] = reasoning  # `reasoning_math` scores the chain's own conclusion
            x["phi_final"] = phi  # phi_T, for the soft outcome reward `answer_likelihood`
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)  # [B_global, F]
        gen.rewards = self._screen_rewards(rewards)
        return gen.rewards

    def _generate_and_score_completions(self, inputs):
        self.generation = gen = Generation.open(inputs)
        output = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        device = output["completion_ids"].device
        output["tool_mask"] = gen.loss_mask.long().to(device)  # GRPO's loss reads it; RLOO's reads loss_mask
        if "num_items_in_batch" in output:  # TRL's dapo normaliser: the tokens a full replay would put in the loss
            # (with sampled steps each scored token carries the weight NFE_i / S_i, so the weighted sum estimates
            # the full replay's sum and the normaliser is the full replay's count)
            in_loss = (output["completion_mask"] * gen.eligible.to(device)).sum()
            output["num_items_in_batch"] = self.accelerator.gather(in_loss).sum()
        output.update(gen.batch_fields(device))
        if self.args.dense_coef > 0:
            self._add_dense_credit(output, gen, mode)
        self._log_rollout(gen, mode)
        return output

    def _add_dense_credit(self, output: dict, gen: Generation, mode: str) -> None:
        """Outcome advantage + dense_coef x the dense credit (phi or stepwise verifier, `dense_credit`)
        standardised per group over its loss tokens."""
        out, credit_mode = gen.rollout, self.args.dense_credit
        if out.phi is None or gen.missing_gold.all():
            self._warn_once("no_phi", "dense_coef=%s but no rollout of this batch has a gold answer, so its phi "
                            "credit is 0: it trains outcome-only (a dataset without gold answers: the whole run).",
                            self.args.dense_coef)
            if out.phi is None:  # the same on every process (no answer column): no collective is skipped unevenly
                return
        from rewards.intrinsic import phi_token_credit

        device = output["completion_ids"].device
        potential = out.phi
        if credit_mode == "verifier_step":  # v(t): the verdict on step t's greedy answer guess
            from rewards.registry import get_reward

            verifier = get_reward(self.args.step_verifier)
            potential = gen.verifier_scores(self.processing_class, self._adapter.eos_ids, verifier)
            credit_mode = "immediate"  # the tokens of step s get v(s+1) - v(s)
        credit = phi_token_credit(out.decode_step, potential, mode=credit_mode).to(device)  # [B, G]
        in_loss = (gen.loss_mask & ~gen.missing_gold.to(out.nfe.device)[:, None]).to(device)
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        output["advantages"], share = dense_advantages(
            output["advantages"], credit, in_loss, self.args.dense_coef, group_size, self.args.dense_clip,
            gather=self.accelerator.gather, offset=self.accelerator.process_index * len(out.nfe))
        self._metrics[mode]["advantage/dense_share"].append(self._gather_mean(torch.tensor([share])))

    # Likelihood ---------------------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        inputs = self._rows_with_signal(inputs)
        self._trace = {k: inputs[k] for k in BATCH_FIELDS if k in inputs}
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._trace = None

    def _skip_is_exact(self) -> bool:
        """Whether rows with zero advantage add exactly nothing to the loss (so leaving them out is exact)."""
        return False

    def _rows_with_signal(self, inputs: dict) -> dict:
        """`inputs` without the rows whose loss tokens all have advantage 0 (`skip_zero_advantage_rows`)."""
        if not self.args.skip_zero_advantage_rows or not self._skip_is_exact():
            return inputs
        adv, mask = inputs["advantages"], inputs["completion_mask"] * inputs.get("tool_mask", 1)
        adv = adv[:, None].expand_as(mask) if adv.dim() == 1 else adv
        keep = ((adv != 0) & mask.bool()).any(-1)  # [B]
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["loss/rows_skipped"].append(self._gather_mean(1.0 - keep.float()))
        if keep.all():
            return inputs
        if not keep.any():
            keep[0] = True  # its terms are 0, but every process must run a forward and backward (DDP, ZeRO)
        B = len(keep)
        return {k: v[keep] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == B else v
                for k, v in inputs.items()}

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **unused):
        adapter = self._adapter_for(model)
        replaced = adapter.replaced[0]
        gen_start = input_ids.shape[1] - logits_to_keep
        batch_size = batch_size or input_ids.shape[0]
        estimator = ESTIMATORS[self.args.logprob_estimator]
        # the rows being scored: a loss micro-batch's, or at generation time (old/reference log-probs) the round's
        fields = self._trace if self._trace is not None else self.generation.batch_fields(input_ids.device)
        cache = None  # replay a KV-cached sampler exactly: its plan travels with the rows
        if "cache_block" in fields:
            cache = CachePlan(self._sampler.kv_cache, fields["cache_block"][0].cpu(), fields["cache_answer"][0].cpu())
        options = EstimatorOptions(self.args.temperature, self.args.trajectory_buckets, self.args.prompt_mask_prob,
                                   cache=cache)
        logps, ents = [], []
        for s in range(0, input_ids.shape[0], batch_size):
            rows = slice(s, s + batch_size)
            trace = {k: v[rows] for k, v in fields.items()}
            in_loss = trace.get("loss_mask", trace["decode_step"] >= 0).bool()
            with self.accelerator.autocast():
                lp, ent = estimator(adapter.logits, input_ids[rows], attention_mask[rows], gen_start, trace,
                                    adapter.mask_id, options)
            if "score_steps" in trace:  # each row's drawn steps stand for all its NFE_i steps
                lp = lp * step_weights(trace["score_steps"], trace["nfe"]).to(lp.dtype)[:, None]
            # Out of the loss: log-prob 0 (no gradient), so TRL's sequence sums (RLOO's ratio and KL) skip them too.
            logps.append(torch.where(in_loss, lp, torch.zeros_like(lp)))
            ents.append(torch.where(in_loss, ent, torch.zeros_like(ent)))
        if adapter.replaced[0] > replaced:
            self._warn_once("likelihood_nonfinite", "Non-finite logits in a likelihood pass (%d row-forwards): "
                            "replaced by uniform logits, which pass no gradient.", adapter.replaced[0] - replaced)
        return torch.cat(logps), torch.cat(ents) if compute_entropy else None, None


class DiffusionGRPOTrainer(DiffusionMixin, GRPOTrainer):
    """`trl.GRPOTrainer` generating with the diffusion sampler; config: `rl.config.DiffusionGRPOConfig`."""

    def _skip_is_exact(self) -> bool:
        # Token-sum losses normalised by the generation batch's token count: a zero-advantage row adds 0 and does
        # not change the normaliser. KL, entropy bonus/mask and router losses would still see the row.
        return (self.loss_type in ("dapo", "cispo") and self.beta == 0.0 and self.top_entropy_quantile >= 1.0
                and not self._entropy_bonus_enabled and not self.aux_loss_enabled)


class DiffusionRLOOTrainer(DiffusionMixin, RLOOTrainer):
    """`trl.RLOOTrainer` generating with the diffusion sampler; config: `rl.config.DiffusionRLOOConfig`.

    TRL's RLOO loss is per sequence. With dense advantages ([B, G]) this trainer uses the per-token clipped loss
    of `rl.rloo_loss` instead (token ratio against the rollout's per-token log-probs, averaged per sequence over the
    loss tokens, then over the batch); with `dense_coef: 0` the loss is TRL's own, unchanged.
    """

    _turn_returns_logprobs = False

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if output["advantages"].dim() == 2:
            output["old_per_token_logps"] = self.generation.old_per_token
        return output

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        result = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        gen = self.generation
        if self._trace is None and gen.old_per_token is None:  # generation time: RLOO's first pass is the old
            gen.old_per_token = result[0].detach()  # policy's (the reference pass, if any, comes second)
        return result

    def _compute_loss(self, model, inputs):
        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            return super()._compute_loss(model, inputs)
        self._trace = {k: inputs[k] for k in BATCH_FIELDS if k in inputs}
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        try:
            logps, entropies, _ = self._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, inputs["completion_ids"].shape[1], compute_entropy=True)
        finally:
            self._trace = None
        mask = inputs["loss_mask"].float()  # [B, G]
        loss, stats = per_token_clipped_loss(logps, inputs["old_per_token_logps"], advantages, mask,
                                             self.epsilon_low, self.epsilon_high)
        mode = "train" if self.model.training else "eval"
        ent = self.accelerator.reduce(torch.stack([(entropies * mask).sum(), mask.sum()]), reduction="sum")
        self._metrics[mode]["entropy"].append((ent[0] / ent[1].clamp(min=1.0)).item())
        self._metrics[mode]["clip_ratio/region_mean"].append(self._gather_mean(stats["clip_fraction"]))
        return loss
