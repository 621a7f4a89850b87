"""4-bit loading (QLoRA) option: the NF4 config on a GPU, clear errors where it cannot work."""

import pytest
import torch

from rl.models import quantization_config


def test_4bit_off_is_none():
    assert quantization_config(False) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_4bit_on_cpu_is_a_clear_error():
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        quantization_config(True)


def test_4bit_without_lora_is_rejected(tmp_path):
    from rl.config import DiffusionGRPOConfig
    from rl.rl_run import PolicyModelArgs, RewardArgs, run_rl
    from rl.sft.config import LoraArguments
    from rl.tasks import TaskConfig

    args = DiffusionGRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[])
    with pytest.raises(ValueError, match="use_peft: true"):
        run_rl(None, TaskConfig(), PolicyModelArgs(model_name_or_path="x", load_in_4bit=True),
               LoraArguments(use_peft=False), RewardArgs(), args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_4bit_config_on_gpu():
    pytest.importorskip("bitsandbytes")
    config = quantization_config(True, "bfloat16")
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
