"""Diffusion GRPO: MED rollouts on the reasoning-as-infilling canvas, outcome + dense phi advantages, TRL's loss.

    python scripts/grpo.py recipes/tiny/grpo.yaml                         # tiny default on CPU
    accelerate launch --config_file recipes/accelerate/zero2.yaml scripts/grpo.py recipes/gsm8k.yaml
    python scripts/grpo.py recipes/tiny/grpo.yaml --dense_coef 0.1 --max_steps 20

Recipe keys are the fields of TaskConfig, PolicyModelArgs, LoraArguments, RewardArgs and DiffusionGRPOConfig
(trl.GRPOConfig + the diffusion fields); flags override the recipe.
"""

from __future__ import annotations

import logging


def main(argv: list[str] | None = None) -> str:
    from rl.config import DiffusionGRPOConfig
    from rl.recipe import parse
    from rl.rl_run import PolicyModelArgs, RewardArgs, run_rl
    from rl.sft.config import LoraArguments
    from rl.tasks import TaskConfig
    from rl.trainer import DiffusionGRPOTrainer

    task, model_cfg, lora, rewards, args = parse(
        [TaskConfig, PolicyModelArgs, LoraArguments, RewardArgs, DiffusionGRPOConfig], argv,
        description=__doc__.split("\n\n")[0],
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    return run_rl(DiffusionGRPOTrainer, task, model_cfg, lora, rewards, args)


if __name__ == "__main__":
    print(main())
