"""Trainer configs: TRL's GRPO/RLOO configs plus the diffusion fields, nothing else.

Sampler and canvas settings are flat fields with the same names as `rollout.SamplerConfig` and
`rollout.TemplateConfig` (so a recipe is one flat YAML), except `temperature` and `seed`, which are TRL's own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from trl import GRPOConfig, RLOOConfig

from rl.logprobs import ESTIMATORS
from rl.precision import resolve_bf16
from rollout import SamplerConfig, TemplateConfig


@dataclass
class DiffusionArgs:
    """Diffusion-specific training fields shared by the GRPO and RLOO configs."""

    # Unmasking policy and sampler (see rollout.SamplerConfig).
    policy: str = field(default="med", metadata={"help": "Unmasking policy: left_to_right, entropy, confidence, "
                                                         "margin, med, eb, threshold."})
    k: int = field(default=1, metadata={"help": "Tokens per step for left_to_right and fixed-k policies."})
    med_lambda: float = field(default=0.2, metadata={"help": "MED entropy threshold (nats)."})
    med_k_max: int = field(default=8, metadata={"help": "MED: most tokens per step."})
    eb_gamma: float = field(default=0.1, metadata={"help": "EB-Sampler error budget (nats)."})
    eb_proxy: str = field(default="entropy", metadata={"help": "EB ordering proxy: entropy or confidence."})
    tau: float = field(default=0.9, metadata={"help": "Confidence threshold policy: decode every p >= tau."})
    block_length: int | None = field(default=None, metadata={"help": "Semi-AR block length over the reasoning "
                                                                     "block (must divide reasoning_length)."})
    exit_gamma: float | None = field(default=None, metadata={"help": "Early exit when H_UB < exit_gamma (nats)."})
    answer_temperature: float | None = field(default=None, metadata={
        "help": "Rollout temperature of the answer block (None: `temperature`); 0 commits the answer the reasoning "
                "makes most likely. Needs loss_on_answer: false (its tokens are not drawn at the trained "
                "temperature)."})
    prune_phi: float | None = field(default=None, metadata={
        "help": "Prune a rollout once phi(t) < prune_phi (nats, < 0): the gold answer has become nearly impossible, "
                "so the row is confidently wrong; it commits its answer at once (scored as usual). None: off."})
    # Canvas (see rollout.TemplateConfig).
    layout: str = field(default="infill", metadata={"help": "infill (reasoning + answer blocks) or plain."})
    reasoning_length: int = field(default=128, metadata={"help": "R: masked reasoning positions."})
    answer_length: int = field(default=16, metadata={"help": "A: masked answer positions."})
    delimiter: str = field(default="\nThe answer is ", metadata={"help": "Text between reasoning and answer."})
    suffix: str = field(default="", metadata={"help": "Text after the answer block."})
    chat_prompts: bool = field(default=False, metadata={"help": "Wrap each prompt as a user turn (plus system_prompt) "
                                                                "so the tokenizer's chat template formats it "
                                                                "(instruct models)."})
    system_prompt: str | None = field(default=None, metadata={"help": "Optional system turn (chat prompts)."})
    pad_with: str = field(default="eos", metadata={"help": "Token padding gold answers: eos or pad."})
    # Likelihood and advantages.
    logprob_estimator: str = field(default="trajectory", metadata={"help": "mean_field, coupled or trajectory."})
    trajectory_buckets: int = field(default=8, metadata={"help": "S: forwards of the trajectory estimator."})
    trajectory_sample_steps: bool = field(default=False, metadata={
        "help": "trajectory: score S decode steps drawn at random per row and round, each from its exact state "
                "(other tokens sit out that update), instead of S contiguous buckets scored from their first state."})
    loss_on_answer: bool = field(default=True, metadata={
        "help": "infill layout: keep the answer block's tokens in the loss. False trains the reasoning only: the "
                "answer block stays the SFT model's reader of the reasoning, so an outcome reward cannot teach it to "
                "guess answers that ignore the reasoning (its tokens still decide the reward)."})
    skip_zero_advantage_rows: bool = field(default=True, metadata={
        "help": "GRPO: leave rows without any non-zero advantage in the loss (e.g. groups with identical rewards) "
                "out of the likelihood forward and backward. Exact - the loss and gradients are unchanged, their "
                "terms are 0 - and applied only when it is: loss_type dapo or cispo, beta 0, no entropy bonus or "
                "entropy mask. One row per micro-batch is always kept, so every process runs a backward."})
    prompt_mask_prob: float = field(default=0.15, metadata={"help": "mean_field: prompt masking probability."})
    dense_coef: float = field(default=0.0, metadata={"help": "Weight of the per-token phi shaping term in the "
                                                             "advantage; 0 is outcome-only."})
    dense_credit: str = field(default="return_to_go", metadata={"help": "phi credit: return_to_go or immediate."})
    heldout_eval_steps: int = field(default=0, metadata={"help": "Evaluate on the task's held-out split every N "
                                                                 "steps (and before/after training); 0 = off."})
    heldout_size: int = field(default=200, metadata={"help": "Held-out rows per evaluation (first N of the split)."})
    heldout_dataset_path: str | None = field(default=None, metadata={"help": "Held-out hub dataset or local jsonl "
                                                                             "(None: the task's test split)."})
    heldout_policy: str | None = field(default=None, metadata={
        "help": "Held-out sampler policy (None: the rollout policy); the other sampler fields are shared."})
    heldout_temperature: float = field(default=0.0, metadata={"help": "Held-out sampling temperature (0: greedy)."})
    bf16: str = field(default="auto", metadata={
        "help": "Mixed precision: auto (bf16 autocast where the hardware has native bf16: CUDA with bf16, CPUs with "
                "AVX512-BF16/AMX; else fp32), true or false. true on a CPU without native bf16 runs emulated and "
                "warns (25-55x slower matmuls). Resolved to true/false at start; the run's recipe.yaml records it."})
    rollout_log_dir: str | None = field(
        default=None, metadata={"help": "Per-step rollout JSONL folder (default output_dir/rollouts; empty = off)."}
    )

    def __post_init__(self) -> None:
        self.bf16 = resolve_bf16(self.bf16, on_cpu=self.use_cpu or not torch.cuda.is_available())
        super().__post_init__()
        self.sampler_config()  # validates the policy fields with their own messages
        self.template_config()
        if self.logprob_estimator not in ESTIMATORS:
            raise ValueError(f"logprob_estimator={self.logprob_estimator!r}; choose one of {', '.join(ESTIMATORS)}.")
        if self.trajectory_buckets < 1:
            raise ValueError(f"trajectory_buckets must be >= 1, got {self.trajectory_buckets}.")
        if not 0 <= self.prompt_mask_prob < 1:
            raise ValueError(f"prompt_mask_prob must be in [0, 1), got {self.prompt_mask_prob}.")
        if self.dense_credit not in ("return_to_go", "immediate"):
            raise ValueError(f"dense_credit={self.dense_credit!r}; use 'return_to_go' or 'immediate'.")
        if self.dense_coef < 0:
            raise ValueError(f"dense_coef must be >= 0, got {self.dense_coef}.")
        if self.answer_temperature not in (None, self.temperature) and self.loss_on_answer:
            raise ValueError(f"answer_temperature={self.answer_temperature} differs from "
                             f"temperature={self.temperature}: the loss would score answer tokens under a "
                             "distribution they were not drawn from. Set loss_on_answer: false (train the reasoning "
                             "only) or drop answer_temperature.")
        if not self.loss_on_answer and self.layout != "infill":
            raise ValueError("loss_on_answer=False needs layout='infill': the 'plain' layout has no answer block.")
        if self.dense_coef > 0 and self.layout != "infill":
            raise ValueError("dense_coef > 0 needs layout='infill': phi is read from the answer block.")
        if self.heldout_eval_steps < 0 or self.heldout_size < 1:
            raise ValueError(f"heldout_eval_steps must be >= 0 and heldout_size >= 1; got {self.heldout_eval_steps}, "
                             f"{self.heldout_size}.")
        self.heldout_sampler_config()
        if self.block_length is not None and self.reasoning_length % self.block_length:
            raise ValueError(f"block_length={self.block_length} must divide reasoning_length={self.reasoning_length}.")

    def sampler_config(self) -> SamplerConfig:
        names = {f.name for f in dataclasses.fields(SamplerConfig)} - {"temperature", "seed"}
        return SamplerConfig(**{n: getattr(self, n) for n in names}, temperature=self.temperature, seed=self.seed)

    def heldout_sampler_config(self) -> SamplerConfig:
        """The held-out evaluation sampler: the rollout sampler with `heldout_policy` and `heldout_temperature`."""
        return dataclasses.replace(self.sampler_config(), policy=self.heldout_policy or self.policy,
                                   temperature=self.heldout_temperature, answer_temperature=None,
                                   prune_phi=None)  # no gold-answer peeking

    def template_config(self) -> TemplateConfig:
        names = {f.name for f in dataclasses.fields(TemplateConfig)} - {"chat_template", "max_prompt_length"}
        return TemplateConfig(**{n: getattr(self, n) for n in names}, chat_template=False,
                              max_prompt_length=getattr(self, "max_prompt_length", None))


@dataclass
class DiffusionGRPOConfig(DiffusionArgs, GRPOConfig):
    """`trl.GRPOConfig` plus the diffusion fields of `DiffusionArgs`."""


@dataclass
class DiffusionRLOOConfig(DiffusionArgs, RLOOConfig):
    """`trl.RLOOConfig` plus the diffusion fields of `DiffusionArgs`."""
