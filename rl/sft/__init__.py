"""Masked-diffusion SFT: the MDLM loss, canvas batches, a thin Trainer subclass (`rl.sft.trainer`) and the run
that ties them together (`rl.sft.run`). The trainer and the run are imported from their modules so that reading
the configs stays light."""

from rl.sft.config import DiffusionSFTConfig, LoraArguments
from rl.sft.data import SFTCollator, fit_to_canvas
from rl.sft.loss import mdlm_loss, sample_noise

__all__ = ["DiffusionSFTConfig", "LoraArguments", "SFTCollator", "fit_to_canvas", "mdlm_loss", "sample_noise"]
