"""Diffusion RLOO: MED rollouts on the reasoning-as-infilling canvas, outcome + dense phi advantages, TRL's loss.

    python scripts/rloo.py recipes/tiny/rloo.yaml                         # tiny default on CPU
    accelerate launch --config_file recipes/accelerate/zero2.yaml scripts/rloo.py recipes/gsm8k.yaml
    python scripts/rloo.py recipes/tiny/rloo.yaml --dense_coef 0.1 --max_steps 20
    python scripts/rloo.py recipes/tiny/rloo.yaml --save_strategy steps --save_steps 10 --resume   # continue

Recipe keys are the fields of TaskConfig, PolicyModelArgs, LoraArguments, RewardArgs, ResumeArgs and
DiffusionRLOOConfig (trl.RLOOConfig + the diffusion fields); flags override the recipe.
"""

from __future__ import annotations

import logging


def configs() -> list[type]:
    """The dataclasses whose fields are this script's recipe keys."""
    from rl.config import DiffusionRLOOConfig
    from rl.rl_run import PolicyModelArgs, ResumeArgs, RewardArgs
    from rl.sft.config import LoraArguments
    from rl.tasks import TaskConfig

    return [TaskConfig, PolicyModelArgs, LoraArguments, RewardArgs, ResumeArgs, DiffusionRLOOConfig]


def main(argv: list[str] | None = None) -> str:
    from rl.cli import exit_if_help

    exit_if_help("rloo", argv, __doc__)
    from rl.recipe import parse
    from rl.rl_run import run_rl
    from rl.trainer import DiffusionRLOOTrainer

    # Logging first: resolving the config logs the chosen precision.
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    task, model_cfg, lora, rewards, resume, args = parse(configs(), argv, description=__doc__.split("\n\n")[0])
    return run_rl(DiffusionRLOOTrainer, task, model_cfg, lora, rewards, args, resume)


if __name__ == "__main__":
    print(main())
