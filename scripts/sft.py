"""Masked-diffusion SFT of an MDLM on gold reasoning laid out on the reasoning-as-infilling canvas.

    python scripts/sft.py recipes/tiny/sft.yaml                       # tiny model + tokenizer + data, from scratch
    accelerate launch scripts/sft.py recipes/sft_llada_gsm8k.yaml     # LLaDA-8B-Base, LoRA, GSM8K gold traces
    python scripts/sft.py recipes/tiny/sft.yaml --max_steps 50 --output_dir /tmp/sft

The recipe keys are the fields of TaskConfig, ModelConfig, ScratchModelConfig, LoraArguments, TemplateConfig and
DiffusionSFTConfig (a transformers TrainingArguments); flags override the recipe. The objective is in
`rl/sft/loss.py`; the final model (or LoRA adapter), its tokenizer, the resolved recipe and a data report are
written atomically to `final_model_dir` (default `<output_dir>/final`).
"""

from __future__ import annotations

import logging


def configs() -> list[type]:
    """The dataclasses whose fields are this script's recipe keys."""
    from rl.models import ModelConfig, ScratchModelConfig
    from rl.sft.config import DiffusionSFTConfig, LoraArguments
    from rl.tasks import TaskConfig
    from rollout.template import TemplateConfig

    return [TaskConfig, ModelConfig, ScratchModelConfig, LoraArguments, TemplateConfig, DiffusionSFTConfig]


def main(argv: list[str] | None = None) -> str:
    from rl.cli import exit_if_help

    exit_if_help("sft", argv, __doc__)
    from rl.recipe import parse

    # Logging first: resolving the config logs the chosen precision.
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    task, model_cfg, scratch, lora, template, args = parse(configs(), argv, description=__doc__.split("\n\n")[0])
    logging.getLogger().setLevel(logging.INFO if args.should_log else logging.WARNING)

    from rl.sft.run import run_sft

    return run_sft(task, model_cfg, scratch, lora, template, args)


if __name__ == "__main__":
    final = main()
    print(final)
