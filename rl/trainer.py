"""Diffusion GRPO/RLOO: thin subclasses of TRL's trainers sharing one mixin.

What changes against TRL (everything else - batching, buffering, clipping, KL to the adapter-disabled
reference, logging, checkpoints - is TRL's own):

- Generation (`_generate_single_turn`) runs the project's batched sampler on the reasoning-as-infilling canvas.
  The completion is the whole generation region; positions the sampler did not decode (template tokens,
  reasoning skipped by an early exit) are excluded from the loss through TRL's `tool_mask`.
- Likelihoods (`_get_per_token_logps_and_entropies`) come from a diffusion estimator (`rl.logprobs`) that reads
  the rollout trace travelling with the batch (decode steps, NFE, per-row mask seeds).
- Advantages: TRL's outcome advantage plus `dense_coef` x the per-token phi shaping credit, a [B, G] tensor.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import torch
from trl import GRPOTrainer, RLOOTrainer

from rl.advantages import dense_advantages
from rl.logprobs import coupled_logps, mean_field_logps, trajectory_logps, trajectory_steps
from rollout import MDLMAdapter, decode_block, layout_canvas, sample

logger = logging.getLogger(__name__)
TRACE_KEYS = ("decode_step", "nfe", "mask_seed", "score_steps")


class DiffusionMixin:
    """Shared diffusion behaviour; mixed in before the TRL trainer class."""

    _turn_returns_logprobs = True  # TRL's GRPO `_generate_single_turn` returns (ids, logprobs), RLOO's only ids

    def _init_diffusion(self, heldout_dataset=None) -> None:
        model = self.accelerator.unwrap_model(self.model)
        self._adapter = MDLMAdapter.from_pretrained(model, self.processing_class)
        self._sampler = self.args.sampler_config()
        self._template = self.args.template_config()
        self._round = 0
        self._trace: dict | None = None
        self._answers: list[str] | None = None
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

    # Generation ---------------------------------------------------------------------------------------------
    def _generate_single_turn(self, prompt_ids, *args, **kwargs):
        from trl.models import unwrap_model_for_generation

        self._round += 1
        rank = self.accelerator.process_index
        base = (self.args.seed * 1_000_003 + self._round * 10_007 + rank * 1_009) % (2**62)
        seeds = torch.arange(len(prompt_ids)) + base  # one random stream per row, distinct across ranks/rounds
        with unwrap_model_for_generation(self.model_wrapped, self.accelerator) as model:
            adapter = self._adapter_for(model)
            answers = self._answers if self._template.layout == "infill" else None
            canvas = layout_canvas(self.processing_class, prompt_ids, self._template, adapter.mask_id,
                                   answers=answers, max_length=adapter.max_length, answer_overflow="truncate")
            was_training = model.training
            model.eval()
            out = sample(adapter, canvas, self._sampler, seeds=seeds)
            model.train(was_training)
        self._rollout, self._canvas_report = out, canvas.report
        self._trace = {"decode_step": out.decode_step, "nfe": out.nfe, "mask_seed": seeds.to(out.nfe.device)}
        if self.args.logprob_estimator == "trajectory" and self.args.trajectory_sample_steps:
            self._trace["score_steps"] = trajectory_steps(seeds, out.nfe, self.args.trajectory_buckets)
        completion_ids = out.generation.tolist()
        return (completion_ids, out.token_logprob.tolist()) if self._turn_returns_logprobs else completion_ids

    def _block_texts(self, block) -> list[str]:
        out = self._rollout
        if block is None:
            return [""] * len(out.nfe)
        stops = self._adapter.eos_ids
        return [decode_block(self.processing_class, row, stops, out.mask_id) for row in out.generation[:, block]]

    def _answer_texts(self) -> list[str]:
        return self._block_texts(self._rollout.answer)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        for x, text in zip(inputs, self._answer_texts(), strict=True):
            x["answer_texts"] = text  # rewards read the answer block, not the free text
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._last_rewards = rewards
        return rewards

    def _generate_and_score_completions(self, inputs):
        self._answers = [str(x["answer"]) for x in inputs] if "answer" in inputs[0] else None
        self._prompts = [x["prompt"] for x in inputs]
        output = super()._generate_and_score_completions(inputs)
        out, mode = self._rollout, "train" if self.model.training else "eval"
        device = output["completion_ids"].device
        scored = out.generated  # loss only on tokens the sampler decoded (and, with sampled steps, at those steps)
        if "score_steps" in self._trace:
            steps = self._trace["score_steps"]
            scored = scored & (out.decode_step[:, :, None] == steps[:, None, :]).any(-1)
        output["tool_mask"] = scored.long().to(device)
        if "num_items_in_batch" in output:  # TRL's dapo normaliser: count only the tokens in the loss
            in_loss = (output["completion_mask"] * output["tool_mask"]).sum()
            output["num_items_in_batch"] = self.accelerator.gather(in_loss).sum()
        for key, value in self._trace.items():
            output[key] = value.to(device)
        if self.args.dense_coef > 0 and out.phi is not None:
            from rewards.intrinsic import phi_token_credit

            credit = phi_token_credit(out.decode_step, out.phi, mode=self.args.dense_credit).to(device)  # [B, G]
            output["advantages"], share = dense_advantages(output["advantages"], credit, out.generated.to(device),
                                                           self.args.dense_coef)
            self._metrics[mode]["advantage/dense_share"].append(self._gather_mean(torch.tensor([share])))
        self._log_rollout(out, mode)
        return output

    def _gather_mean(self, x: torch.Tensor) -> float:
        x = torch.as_tensor(x, dtype=torch.float32, device=self.accelerator.device).reshape(-1)
        x = self.accelerator.gather(x)
        x = x[~torch.isnan(x)]
        return float(x.mean()) if x.numel() else float("nan")

    def _log_rollout(self, out, mode: str) -> None:
        m = self._metrics[mode]
        m["rollout/nfe"].append(self._gather_mean(out.nfe.float()))
        m["rollout/exit_rate"].append(self._gather_mean(out.exited.float()))
        if self._sampler.prune_phi is not None:
            m["rollout/prune_rate"].append(self._gather_mean(out.pruned.float()))
        m["rollout/tokens_per_nfe"].append(self._gather_mean(out.generated.sum(-1).float() / out.nfe.clamp(min=1)))
        if out.phi is not None:
            m["reward/phi_T"].append(self._gather_mean(out.phi_final))
        rewards = getattr(self, "_last_rewards", None)  # [B_global, F] per reward function, gathered by TRL
        if rewards is not None:
            weights = self.reward_weights.to(rewards.device, rewards.dtype)
            m["reward/outcome"].append(float((rewards * weights).nansum(-1).mean()))
        truncated = float(self._canvas_report.get("answers_truncated", 0))
        m["data/answers_truncated"].append(self._gather_mean(torch.tensor([truncated])))
        if self.args.rollout_log_dir == "" or mode != "train":
            return
        folder = self.args.rollout_log_dir or os.path.join(self.args.output_dir, "rollouts")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"step{self.state.global_step:06d}_rank{self.accelerator.process_index}.jsonl")
        B, rank = len(out.nfe), self.accelerator.process_index
        local = rewards[rank * B : (rank + 1) * B].tolist() if rewards is not None else [None] * B
        texts, reasoning = self._answer_texts(), self._block_texts(out.reasoning)
        with open(path, "w") as f:
            for i in range(B):
                row = {"prompt": self._prompts[i], "reasoning": reasoning[i], "answer_text": texts[i],
                       "gold": self._answers[i] if self._answers else None, "rewards": local[i], **out.row(i)}
                f.write(json.dumps(row) + "\n")

    # Likelihood ---------------------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        self._trace = {k: inputs[k] for k in TRACE_KEYS if k in inputs}
        return super()._compute_loss(model, inputs)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **unused):
        adapter = self._adapter_for(model)
        gen_start = input_ids.shape[1] - logits_to_keep
        batch_size = batch_size or input_ids.shape[0]
        temperature = self.args.temperature
        logps, ents = [], []
        for s in range(0, input_ids.shape[0], batch_size):
            rows = slice(s, s + batch_size)
            trace = {k: v[rows] for k, v in self._trace.items()}
            ids, am = input_ids[rows], attention_mask[rows]
            generated = trace["decode_step"] >= 0
            with self.accelerator.autocast():
                if self.args.logprob_estimator == "trajectory":
                    lp, ent = trajectory_logps(adapter.logits, ids, am, gen_start, trace["decode_step"], trace["nfe"],
                                               adapter.mask_id, self.args.trajectory_buckets, temperature,
                                               steps=trace.get("score_steps"))
                elif self.args.logprob_estimator == "coupled":
                    lp, ent = coupled_logps(adapter.logits, ids, am, gen_start, generated, trace["mask_seed"],
                                            adapter.mask_id, temperature)
                else:
                    lp, ent = mean_field_logps(adapter.logits, ids, am, gen_start, generated, trace["mask_seed"],
                                               adapter.mask_id, temperature, self.args.prompt_mask_prob)
            logps.append(lp)
            ents.append(ent)
        return torch.cat(logps), torch.cat(ents) if compute_entropy else None, None


class DiffusionGRPOTrainer(DiffusionMixin, GRPOTrainer):
    """`trl.GRPOTrainer` generating with the diffusion sampler; config: `rl.config.DiffusionGRPOConfig`."""

    def __init__(self, *args, heldout_dataset=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_diffusion(heldout_dataset)


class DiffusionRLOOTrainer(DiffusionMixin, RLOOTrainer):
    """`trl.RLOOTrainer` generating with the diffusion sampler; config: `rl.config.DiffusionRLOOConfig`.

    TRL's RLOO loss is per sequence. With dense advantages ([B, G]) this trainer uses a per-token clipped
    loss instead (token ratio against the rollout's per-token log-probs, averaged per sequence, then over the
    batch); with `dense_coef: 0` the loss is TRL's own, unchanged.
    """

    _turn_returns_logprobs = False

    def __init__(self, *args, heldout_dataset=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_diffusion(heldout_dataset)

    def _generate_and_score_completions(self, inputs):
        self._old_per_token = None
        self._capture_old = True  # RLOO computes the policy's old log-probs first: keep them per token
        output = super()._generate_and_score_completions(inputs)
        self._capture_old = False
        if output["advantages"].dim() == 2:
            output["old_per_token_logps"] = self._old_per_token
        return output

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        result = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if getattr(self, "_capture_old", False):
            self._old_per_token, self._capture_old = result[0].detach(), False
        return result

    def _compute_loss(self, model, inputs):
        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            return super()._compute_loss(model, inputs)
        self._trace = {k: inputs[k] for k in TRACE_KEYS if k in inputs}
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        logps, entropies, _ = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, inputs["completion_ids"].shape[1], compute_entropy=True
        )
        mask = inputs["tool_mask"].float()  # [B, G] tokens the sampler decoded
        ratio = torch.exp(logps - inputs["old_per_token_logps"])
        clipped = torch.clamp(ratio, 1 - self.epsilon_low, 1 + self.epsilon_high)
        per_token = -torch.min(ratio * advantages, clipped * advantages)  # [B, G]
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
        mode = "train" if self.model.training else "eval"
        ent = self.accelerator.reduce(torch.stack([(entropies * mask).sum(), mask.sum()]), reduction="sum")
        self._metrics[mode]["entropy"].append((ent[0] / ent[1].clamp(min=1.0)).item())
        clip = ((ratio != clipped).float() * mask).sum() / mask.sum().clamp(min=1.0)
        self._metrics[mode]["clip_ratio/region_mean"].append(self._gather_mean(clip))
        return loss
