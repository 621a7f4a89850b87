"""Trainer configs: TRL's GRPO/RLOO configs plus the diffusion fields, nothing else.

Sampler and canvas settings are flat fields with the same names as `rollout.SamplerConfig` and
`rollout.TemplateConfig` (so a recipe is one flat YAML), except `temperature` and `seed`, which are TRL's own.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

import torch
from trl import GRPOConfig, RLOOConfig

from rl.logprobs import ESTIMATORS
from rl.precision import resolve_bf16
from rollout import SamplerConfig, TemplateConfig

# TRL options the diffusion trainers cannot honour, refused (when set to a non-default value) before any model loads:
# name -> (TRL's default, why, and what to use instead).
_SAMPLER = ("the diffusion sampler ignores it; use policy, med_lambda, med_k_max, eb_gamma, tau, block_length, "
            "exit_gamma, temperature and answer_temperature instead")
_GENERATION = "generation is the diffusion sampler's own; leave it unset"
REFUSED_TRL_OPTIONS: dict[str, tuple[object, str]] = {
    "max_completion_length": (512, "it has no effect: the completion is the canvas's generation region, "
                                   "reasoning_length + len(delimiter) + answer_length + len(suffix) tokens; use "
                                   "reasoning_length and answer_length instead"),
    "top_p": (1.0, _SAMPLER),
    "top_k": (0, _SAMPLER),
    "min_p": (None, _SAMPLER),
    "repetition_penalty": (1.0, _SAMPLER),
    "generation_kwargs": (None, _SAMPLER),
    "cache_implementation": (None, _GENERATION),
    "use_transformers_paged": (False, _GENERATION),
    "use_transformers_continuous_batching": (False, _GENERATION),
    "use_vllm": (False, "vLLM cannot run the diffusion sampler, and TRL would correct the loss with the sampler's "
                        "log-probs, which differ from the likelihood estimator's; leave it unset"),
    "off_policy_mask_threshold": (None, "it compares the estimator's log-probs with the sampler's, which differ by "
                                        "construction (other states are scored); leave it unset and bound "
                                        "off-policyness with num_iterations and epsilon"),
    "mask_truncated_completions": (False, "every infill row whose canvas ends in a suffix or an unfilled block has no "
                                          "final EOS, so TRL would zero it; leave it unset: positions the sampler "
                                          "did not decode are already out of the loss"),
}


DENSE_CREDITS = ("return_to_go", "immediate", "verifier_step")


def refuse_trl_options(args) -> None:
    """Raise if `args` sets a TRL option the diffusion trainers cannot honour (see `REFUSED_TRL_OPTIONS`)."""
    for name, (default, instead) in REFUSED_TRL_OPTIONS.items():
        value = getattr(args, name, default)
        if value != default and not (name == "top_k" and value is None):
            raise ValueError(f"{name}={value!r} is not supported by the diffusion trainers: {instead}.")
    if getattr(args, "loss_type", None) == "dr_grpo":
        raise ValueError("loss_type='dr_grpo' divides the loss by max_completion_length, which is not the diffusion "
                         "completion's length: use loss_type 'dapo' (token sum over the generation batch's loss "
                         "tokens), 'grpo' or 'bnpo' instead.")
    if args.temperature <= 0:
        raise ValueError(f"temperature={args.temperature}: RL needs sampled rollouts (temperature > 0). For a "
                         "greedily committed answer use answer_temperature: 0 with loss_on_answer: false instead; "
                         "for greedy held-out evaluation, heldout_temperature: 0.")


def mirror_fields(cls: type, name: str, skip: set[str], notes: dict[str, str]) -> type:
    """A dataclass with the init fields of `cls` (same names, types and defaults) minus `skip`, so another config
    inherits them instead of declaring them again; help = the field's own help (metadata or attribute docstring) +
    `notes[name]`."""
    from rl.recipe import _attribute_docs

    hints, docs = typing.get_type_hints(cls), _attribute_docs(cls)
    specs = []
    for f in dataclasses.fields(cls):
        if f.init and f.name not in skip:
            own = f.metadata.get("help") or docs.get(f.name, "")
            text = " ".join(x for x in (own, notes.get(f.name, "")) if x)
            default = {"default": f.default} if f.default is not dataclasses.MISSING else {
                "default_factory": f.default_factory}
            specs.append((f.name, hints[f.name], field(**default, metadata={"help": text})))
    return dataclasses.make_dataclass(name, specs)


SamplerFields = mirror_fields(SamplerConfig, "SamplerFields", {"temperature", "seed", "record_answer_guess"}, {
    "answer_temperature": "RL: needs loss_on_answer: false (its tokens are not drawn at the trained temperature).",
    "prune_phi": "RL: saves NFE, but biases the gradient: the rollout process then depends on the gold label (which "
                 "rows finish their reasoning), so the policy is trained on trajectories it would not produce at "
                 "evaluation, where no gold exists.",
    "block_length": "Must divide reasoning_length.",
})
"""The sampler's fields (`rollout.SamplerConfig`), declared there once; `temperature` and `seed` are TRL's, and
`record_answer_guess` follows `dense_credit`."""
CanvasFields = mirror_fields(TemplateConfig, "CanvasFields", {"chat_template", "max_prompt_length"}, {})
"""The canvas fields (`rollout.TemplateConfig`), declared there once; `chat_prompts` and TRL's `max_prompt_length`
stand for the other two."""


@dataclass
class DiffusionArgs(SamplerFields, CanvasFields):
    """Diffusion-specific training fields shared by the GRPO and RLOO configs.

    The sampler and canvas fields are inherited from `SamplerFields` / `CanvasFields`, mirrors of the rollout
    configs, so each is declared once.

    TRL options the diffusion trainers cannot honour are refused at construction (`REFUSED_TRL_OPTIONS`), each with
    the diffusion setting to use instead.
    """

    chat_prompts: bool = field(default=False, metadata={"help": "Wrap each prompt as a user turn (plus system_prompt) "
                                                                "so the tokenizer's chat template formats it "
                                                                "(instruct models)."})
    # Likelihood and advantages.
    logprob_estimator: str = field(default="trajectory", metadata={
        "help": "Likelihood surrogate: mean_field (d1: one forward, every generated token masked - the answer is "
                "scored with no reasoning visible), coupled (two complementary random masks), trajectory (replay of "
                "the sampler's states in S forwards; exact when S >= the row's NFE)."})
    trajectory_buckets: int = field(default=8, metadata={"help": "S: forwards of the trajectory estimator. In "
                                                                 "contiguous buckets (trajectory_sample_steps false) "
                                                                 "a bucket's tokens are scored from its first state, "
                                                                 "so with S < NFE the answer block is scored with its "
                                                                 "last reasoning steps still masked."})
    trajectory_sample_steps: bool = field(default=False, metadata={
        "help": "trajectory: score S decode steps drawn at random per row and round, each from its exact state "
                "(other tokens sit out that update), instead of S contiguous buckets scored from their first state. "
                "Row i's scored log-probs are weighted NFE_i / S (an unbiased estimate of the full replay's sum). "
                "GRPO: needs loss_type dapo or cispo (their token-sum normaliser matches the weighting)."})
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
    dense_coef: float = field(default=0.0, metadata={
        "help": "Weight of the per-token phi credit added to the outcome advantage, in units of the credit's "
                "standard deviation within the group of num_generations rollouts (standardised over the group's loss "
                "tokens, clipped to +-dense_clip): the same meaning for every task, answer length, GRPO and RLOO. "
                "0 is outcome-only. phi = sum of log p(gold token) over the gold answer's own tokens and the first "
                "padding token (pad_with) after them, which says where the answer ends; the rest of the padding "
                "is not scored, so phi's scale follows the answer, not answer_length. Rows without a gold answer get "
                "no credit (all rows: a warning, outcome-only)."})
    dense_credit: str = field(default="return_to_go", metadata={
        "help": "Dense credit of a token decoded at step s: return_to_go = phi_T - phi(s) (the step rewards "
                "telescope: optimises E[R + c phi_T] with the per-step baseline phi(s), not policy-invariant "
                "shaping, since phi_T depends on the policy), immediate = phi(s+1) - phi(s) (myopic: credits the "
                "step's change only), or verifier_step = v(s+1) - v(s), v(t) = step_verifier's verdict on the "
                "answer block's greedy guess at the input of step t (the MDPO / EGSPO-SA stepwise verifier; read "
                "from the sampler's own forwards, no extra NFE; +-1 for the step that made the model's answer right "
                "or wrong). All read the gold label: it enters the advantage, never the rollout (unless "
                "prune_phi)."})
    step_verifier: str = field(default="math", metadata={
        "help": "dense_credit verifier_step: the outcome reward (registered name or import path) that judges each "
                "step's answer guess; called as f(completions, answer=golds, answer_texts=guesses)."})
    dense_clip: float = field(default=3.0, metadata={"help": "Bound on the standardised phi credit (|z| <= "
                                                             "dense_clip) before dense_coef weighs it."})
    heldout_eval_steps: int = field(default=0, metadata={"help": "Evaluate on the task's held-out split every N "
                                                                 "steps (and before/after training); 0 = off."})
    heldout_size: int = field(default=200, metadata={"help": "Held-out rows per evaluation (first N of the split)."})
    heldout_dataset_path: str | None = field(default=None, metadata={"help": "Held-out hub dataset or local jsonl "
                                                                             "(None: the task's test split)."})
    heldout_policy: str | None = field(default=None, metadata={
        "help": "Held-out sampler policy (None: the rollout policy); the other sampler fields are shared."})
    heldout_temperature: float = field(default=0.0, metadata={"help": "Held-out sampling temperature (0: greedy)."})
    disable_dropout: bool = field(default=True, metadata={
        "help": "Set every dropout (including LoRA's lora_dropout) to p=0 at start (TRL's disable_dropout; its "
                "default there is false). Needed for an exact on-policy ratio of 1: with dropout, TRL's old log-probs "
                "(computed in train mode) and the current ones differ before any update."})
    bf16: str = field(default="auto", metadata={
        "help": "Mixed precision: auto (bf16 autocast where the hardware has native bf16: CUDA with bf16, CPUs with "
                "AVX512-BF16/AMX; else fp32), true or false. true on a CPU without native bf16 runs emulated and "
                "warns (25-55x slower matmuls). Resolved to true/false at start; the run's recipe.yaml records it."})
    rollout_log_dir: str | None = field(
        default=None, metadata={"help": "Per-step rollout JSONL folder (default output_dir/rollouts; empty = off)."}
    )

    def __post_init__(self) -> None:
        refuse_trl_options(self)  # before TRL's own checks: the message names the diffusion equivalent
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
        if self.dense_credit not in DENSE_CREDITS:
            raise ValueError(f"dense_credit={self.dense_credit!r}; use one of {', '.join(DENSE_CREDITS)}.")
        if self.dense_credit == "verifier_step" and self.layout != "infill":
            raise ValueError("dense_credit verifier_step reads the answer block's guesses: it needs layout infill.")
        if self.dense_coef < 0:
            raise ValueError(f"dense_coef must be >= 0, got {self.dense_coef}.")
        if not self.dense_clip > 0:
            raise ValueError(f"dense_clip must be > 0, got {self.dense_clip}.")
        loss_type = getattr(self, "loss_type", None)  # GRPO only; RLOO's loss is a sequence sum
        if self.logprob_estimator == "trajectory" and self.trajectory_sample_steps and loss_type not in (
                None, "dapo", "cispo"):
            raise ValueError(f"trajectory_sample_steps weights row i's scored tokens by NFE_i / S, which matches a "
                             f"token-sum normaliser only: use loss_type 'dapo' or 'cispo' instead of {loss_type!r}.")
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
        names = {f.name for f in dataclasses.fields(SamplerFields)}
        guesses = self.dense_coef > 0 and self.dense_credit == "verifier_step"
        return SamplerConfig(**{n: getattr(self, n) for n in names}, temperature=self.temperature, seed=self.seed,
                             record_answer_guess=guesses)

    def heldout_sampler_config(self) -> SamplerConfig:
        """The held-out evaluation sampler: the rollout sampler with `heldout_policy` and `heldout_temperature`."""
        return dataclasses.replace(self.sampler_config(), policy=self.heldout_policy or self.policy,
                                   temperature=self.heldout_temperature, answer_temperature=None,
                                   prune_phi=None, record_answer_guess=False)  # no gold-answer peeking

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
