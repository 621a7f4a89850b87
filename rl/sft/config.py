"""SFT configuration: `TrainingArguments` plus the diffusion fields, and LoRA arguments."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from rl.precision import resolve_bf16


@dataclass
class DiffusionSFTConfig(TrainingArguments):
    """`TrainingArguments` plus the diffusion SFT fields. Field names are recipe keys."""

    mask_eps: float = field(default=1e-3, metadata={"help": "Smallest noise level: t ~ U(mask_eps, 1) per sequence."})
    answer_only_rate: float = field(
        default=0.0,
        metadata={"help": "Fraction of rows whose noise masks only the answer block, so the answer is learned "
                          "from the complete reasoning (the state the sampler fills it in). 'infill' layout only."},
    )
    reasoning_corrupt_rate: float = field(
        default=0.0,
        metadata={"help": "Fraction of answer-only rows whose reasoning ends in a wrong number (gold last number "
                          "moved by 1-3) with the answer matching it: the answer learns to follow the reasoning."},
    )
    reasoning_first: bool = field(
        default=False,
        metadata={"help": "Learn p(r | c) p(a | c, r): MDLM rows noise the reasoning only, with the answer block "
                          "masked and unscored, and only answer-only rows (answer_only_rate > 0) train the answer, "
                          "from the complete reasoning. The answer then reads the reasoning instead of solving the "
                          "prompt itself; answer-block entropies before the reasoning is done (early exit) are "
                          "off-distribution. 'infill' layout only."},
    )
    overflow: str = field(
        default="skip",
        metadata={"help": "Gold reasoning/answer longer than its block: 'skip' (count, report, drop) or 'error'."},
    )
    final_model_dir: str | None = field(
        default=None,
        metadata={"help": "Where the trained model goes, written atomically (None: <output_dir>/final)."},
    )
    bf16: str = field(default="auto", metadata={
        "help": "Mixed precision: auto (bf16 autocast where the hardware has native bf16: CUDA with bf16, CPUs with "
                "AVX512-BF16/AMX; else fp32), true or false. true on a CPU without native bf16 runs emulated and "
                "warns (25-55x slower matmuls). Resolved to true/false at start; the saved recipe.yaml records it."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay False: the collator reads the prompt/answer/reasoning columns."}
    )

    def __post_init__(self) -> None:
        self.bf16 = resolve_bf16(self.bf16, on_cpu=self.use_cpu or not torch.cuda.is_available())
        super().__post_init__()
        if not 0 < self.mask_eps < 1:
            raise ValueError(f"mask_eps must be in (0, 1), got {self.mask_eps}.")
        for name in ("answer_only_rate", "reasoning_corrupt_rate"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}.")
        if self.reasoning_first and self.answer_only_rate == 0:
            raise ValueError("reasoning_first trains the answer block only on answer-only rows: set answer_only_rate "
                             "> 0 (for example 0.25).")
        if self.overflow not in ("skip", "error"):
            raise ValueError(f"overflow={self.overflow!r}; use 'skip' or 'error'.")
        if self.remove_unused_columns:
            raise ValueError("remove_unused_columns must be False: the SFT collator needs the raw text columns.")
        if self.final_model_dir is None:
            self.final_model_dir = f"{self.output_dir.rstrip('/')}/final"


@dataclass
class LoraArguments:
    """LoRA through PEFT. Field names are recipe keys."""

    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Module names to adapt, or 'all-linear' (every linear layer except the LM head). LLaDA and "
                          "Dream (native) and Llama/Qwen/Gemma models: q_proj, k_proj, v_proj, o_proj, gate_proj, "
                          "up_proj, down_proj."},
    )

    def __post_init__(self) -> None:
        if self.lora_r < 1:
            raise ValueError(f"lora_r must be >= 1, got {self.lora_r}.")

    def peft_config(self):
        """A LoraConfig with no task type: PEFT then wraps the model as a plain `PeftModel` that passes every forward
        argument through, instead of the causal-LM wrapper (which needs generation hooks a diffusion model need not
        have, e.g. Dream's remote code lacks `prepare_inputs_for_generation`)."""
        from peft import LoraConfig

        targets = self.lora_target_modules
        return LoraConfig(
            r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout, task_type=None,
            target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        )
