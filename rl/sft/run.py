"""One SFT run from resolved configs: data, tokenizer, model (+ LoRA), trainer, train, atomic save."""

from __future__ import annotations

import json
import logging

from rl.checkpoint import save_final_model
from rl.models import (
    ModelConfig,
    ScratchModelConfig,
    build_scratch_model,
    load_pretrained,
    load_tokenizer,
    set_cpu_threads,
)
from rl.recipe import recipe_yaml
from rl.sft.config import DiffusionSFTConfig, LoraArguments
from rl.sft.data import fit_to_canvas
from rl.sft.trainer import DiffusionSFTTrainer
from rl.tasks import TaskConfig, load_task
from rl.tokenizer import build_tokenizer
from rollout.adapter import MDLMAdapter
from rollout.template import TemplateConfig

logger = logging.getLogger(__name__)


def build_model_and_tokenizer(model_cfg: ModelConfig, scratch: ScratchModelConfig, dataset, template: TemplateConfig,
                              seed: int):
    """From scratch (tokenizer built from the training text) or from `model_name_or_path`."""
    if scratch.from_scratch:
        if model_cfg.model_name_or_path:
            raise ValueError("Set either from_scratch: true or model_name_or_path, not both.")
        texts = [*dataset["prompt"], *dataset["reasoning"], *dataset["answer"], template.delimiter, template.suffix]
        tokenizer = build_tokenizer(texts)
        return build_scratch_model(scratch, tokenizer, seed=seed), tokenizer
    if not model_cfg.model_name_or_path:
        raise ValueError("Set model_name_or_path (a hub id or local dir), or from_scratch: true for the tiny model.")
    path = model_cfg.model_name_or_path
    tokenizer = load_tokenizer(model_cfg.tokenizer_name_or_path or path, model_cfg.trust_remote_code)
    model = load_pretrained(path, model_cfg.trust_remote_code, model_cfg.dtype, mask_token_id=model_cfg.mask_token_id)
    return model, tokenizer


def run_sft(task: TaskConfig, model_cfg: ModelConfig, scratch: ScratchModelConfig, lora: LoraArguments,
            template: TemplateConfig, args: DiffusionSFTConfig) -> str:
    """Train with the MDLM objective and write the final model directory; returns its path."""
    if lora.use_peft and scratch.from_scratch:
        raise ValueError("use_peft with from_scratch would save an adapter on random, unsaved base weights; "
                         "train the scratch model fully (use_peft: false).")
    set_cpu_threads(model_cfg.cpu_threads, args.use_cpu)  # `accelerate launch` on CPU sets 1 thread otherwise
    data = load_task(task, split=task.split or "train")
    model, tokenizer = build_model_and_tokenizer(model_cfg, scratch, data.dataset, template, args.seed)
    probe = MDLMAdapter.from_pretrained(model, tokenizer)  # fails early and clearly without a mask token
    train_set, report = fit_to_canvas(data.dataset, tokenizer, template, args.overflow, probe.max_length)
    report["bad_rows"] = dict(data.bad_rows.counts)
    if lora.use_peft:
        from peft import get_peft_model

        model = get_peft_model(model, lora.peft_config())
        if args.gradient_checkpointing:
            model.enable_input_require_grads()
        model.print_trainable_parameters()
    logger.info("SFT on %d rows of %s (%s).", len(train_set), data.source, report)
    trainer = DiffusionSFTTrainer(model=model, args=args, template=template, processing_class=tokenizer,
                                  train_dataset=train_set)
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    report.update(train_runtime=result.metrics.get("train_runtime"), train_loss=result.metrics.get("train_loss"),
                  global_step=result.global_step)
    files = {
        "recipe.yaml": recipe_yaml(task, model_cfg, scratch, lora, template, args),
        "sft_report.json": json.dumps(report, indent=2) + "\n",
    }
    return save_final_model(trainer, args.final_model_dir, files)
