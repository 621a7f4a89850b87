"""One RL run from resolved configs: data, tokenizer, policy (+ LoRA), rewards, trainer, train, atomic save.

`--resume` continues the run in output_dir from its last complete checkpoint (see `rl.checkpoint`). A run stopped
by SIGTERM or Ctrl-C saves a checkpoint at the end of the current step and exits with status 128 + the signal
number, without a final model.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
from dataclasses import dataclass, field

from rl.checkpoint import resolve_resume, save_final_model
from rl.config import mirror_fields
from rl.models import ModelConfig, load_config_dict, load_pretrained, load_tokenizer, set_cpu_threads
from rl.recipe import recipe_yaml
from rl.sft.config import LoraArguments
from rl.tasks import TaskConfig, load_task

logger = logging.getLogger(__name__)


ModelFields = mirror_fields(ModelConfig, "ModelFields", {"trust_remote_code", "adapter_path"}, {
    "cpu_threads": "accelerate launch otherwise sets 1 per process."})
"""`rl.models.ModelConfig`'s fields, declared there once: `trust_remote_code` is TRL's own config field, and RL
trains a fresh LoRA adapter (`use_peft`) rather than loading one."""


@dataclass
class PolicyModelArgs(ModelFields):
    """The policy to train: `ModelConfig`'s fields (`ModelFields`) plus 4-bit loading. Field names are recipe keys."""

    load_in_4bit: bool = field(default=False, metadata={"help": "Load the base weights in 4-bit NF4 (bitsandbytes, "
                                                                "CUDA only) and train LoRA on top (QLoRA)."})

    def __post_init__(self) -> None:
        ModelConfig.__post_init__(self)  # the same checks (dtype, cpu_threads)


@dataclass
class RewardArgs:
    """Outcome rewards by registered name or import path. Field names are recipe keys."""

    rewards: list[str] = field(default_factory=lambda: ["math"], metadata={"help": "Reward names or import paths "
                                                                                   "(weights: TRL's reward_weights)."})
    final_model_dir: str | None = field(default=None, metadata={"help": "Final model dir (default output_dir/final)."})


@dataclass
class ResumeArgs:
    """Continuing an interrupted run (HF's own `resume_from_checkpoint` takes a path). Field names are recipe keys."""

    resume: bool = field(default=False, metadata={
        "help": "Continue from the last complete checkpoint-N in output_dir: same step, data order, rollout seeds, "
                "optimizer and scheduler. An error if there is none (see fresh_if_no_checkpoint)."})
    fresh_if_no_checkpoint: bool = field(default=False, metadata={
        "help": "With resume: start fresh instead of failing when output_dir has no complete checkpoint."})


def run_rl(trainer_cls, task: TaskConfig, model_cfg: PolicyModelArgs, lora: LoraArguments, rewards: RewardArgs,
           args, resume: ResumeArgs | None = None) -> str:
    """Train `trainer_cls` (Diffusion{GRPO,RLOO}Trainer) and write the final model; returns its path."""
    resume = resume or ResumeArgs()
    checkpoint = resolve_resume(args.output_dir, resume.resume, resume.fresh_if_no_checkpoint,
                                args.resume_from_checkpoint)  # before any loading: a bad request fails fast
    trainer = build_trainer(trainer_cls, task, model_cfg, lora, rewards, args)
    if checkpoint:
        logger.info("Resuming from checkpoint %s.", checkpoint)
    trainer.train(resume_from_checkpoint=checkpoint)
    if trainer.stop_signal:
        if trainer.is_world_process_zero():
            logger.warning("Stopped by %s after step %d; checkpoint saved in %s. Continue with --resume.",
                           signal.Signals(trainer.stop_signal).name, trainer.state.global_step, args.output_dir)
        raise SystemExit(128 + trainer.stop_signal)
    final = rewards.final_model_dir or f"{args.output_dir.rstrip('/')}/final"
    text = recipe_yaml(task, model_cfg, lora, rewards, args)
    # TRL derives generation_batch_size from steps_per_generation (or the reverse) and refuses both set: keep the
    # saved recipe reusable as a recipe by dropping the derived one.
    text = "".join(line for line in text.splitlines(keepends=True) if not line.startswith("generation_batch_size:"))
    return save_final_model(trainer, final, {"recipe.yaml": text})


def build_trainer(trainer_cls, task: TaskConfig, model_cfg: PolicyModelArgs, lora: LoraArguments,
                  rewards: RewardArgs, args):
    """The recipe's trainer: data, tokenizer, policy (+ LoRA), rewards and held-out split, ready to train."""
    from rewards.registry import get_rewards

    if not model_cfg.model_name_or_path:
        raise ValueError("Set model_name_or_path (a hub id or a local dir, e.g. outputs/tiny/sft/final).")
    if model_cfg.load_in_4bit and not lora.use_peft:
        raise ValueError("load_in_4bit trains LoRA adapters on frozen 4-bit weights: set use_peft: true.")
    set_cpu_threads(model_cfg.cpu_threads, args.use_cpu)
    reward_funcs = get_rewards(rewards.rewards)  # unknown names fail here, before any model is loaded
    path = model_cfg.model_name_or_path
    tokenizer = load_tokenizer(model_cfg.tokenizer_name_or_path or path, args.trust_remote_code)
    model = load_pretrained(path, args.trust_remote_code, model_cfg.dtype, model_cfg.load_in_4bit,
                            model_cfg.mask_token_id)
    if not lora.use_peft and args.beta > 0 and model.config.model_type in ("mdlm_llada", "mdlm_dream") \
            and getattr(model, "name_or_path", "") == path and load_config_dict(path).get("model_type") != \
            model.config.model_type:
        raise ValueError(f"Full fine-tuning with beta > 0 makes TRL load the reference policy from {path} with its "
                         "own loader, which cannot read the published LLaDA / Dream layout. Use LoRA (use_peft: true; "
                         "the reference is the base with the adapter disabled), or beta: 0.")
    data = load_task(task, split=task.split or "train")
    if args.chat_prompts:
        system = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
        def as_chat(row: dict) -> dict:
            return {"prompt": [*system, {"role": "user", "content": row["prompt"]}]}

        data.dataset = data.dataset.map(as_chat)
    logger.info("RL on %d rows of %s (left out: %s).", len(data.dataset), data.source, dict(data.bad_rows.counts))
    heldout = None
    if args.heldout_eval_steps > 0:
        if task.dataset_path and task.dataset_path.endswith((".jsonl", ".json")) and not args.heldout_dataset_path:
            raise ValueError(f"dataset_path {task.dataset_path} is one local file: set heldout_dataset_path (e.g. "
                             "../shared/data/gsm8k_test.jsonl): the held-out evaluation must not reuse training rows.")
        held_task = dataclasses.replace(task, dataset_path=args.heldout_dataset_path or task.dataset_path,
                                        num_samples=None)
        held = load_task(held_task, split="test")
        heldout = held.dataset
        logger.info("Held-out evaluation every %d steps on %d rows of %s.", args.heldout_eval_steps,
                    min(args.heldout_size, len(heldout)), held.source)
    trainer = trainer_cls(
        model=model, reward_funcs=reward_funcs, args=args, train_dataset=data.dataset, processing_class=tokenizer,
        peft_config=lora.peft_config() if lora.use_peft else None, heldout_dataset=heldout,
        rows_skipped=data.bad_rows.total,
    )
    acc = trainer.accelerator
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    zero = f" (ZeRO stage {plugin.zero_stage})" if plugin is not None else ""
    logger.info("Distributed: %s%s, %d process(es).", acc.distributed_type.value, zero, acc.num_processes)
    return trainer
