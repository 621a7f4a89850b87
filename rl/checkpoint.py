"""Writing a final model directory atomically.

The model is saved into a hidden sibling (`.NAME.partial`), completed with its extra files, then renamed onto
`NAME`. A run interrupted at any point leaves either the previous `NAME` (or none) plus a stale `.partial` that
the next save removes, never a half-written `NAME`. An existing `NAME` is replaced (it is moved aside to
`.NAME.old` first, so the rename onto `NAME` is itself atomic).
"""

from __future__ import annotations

import logging
import os
import shutil

logger = logging.getLogger(__name__)


def sibling(path: str, tag: str) -> str:
    path = os.path.abspath(path)
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{tag}")


def replace_dir(src: str, dst: str) -> None:
    """Move the finished directory `src` onto `dst` with renames only (same filesystem)."""
    dst = os.path.abspath(dst)
    old = sibling(dst, "old")
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(dst):
        logger.warning("Replacing the existing %s.", dst)
        os.rename(dst, old)
    os.rename(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def save_final_model(trainer, final_dir: str, extra_files: dict[str, str] | None = None) -> str:
    """Save the trainer's model (and tokenizer) to `final_dir` atomically; returns the absolute path.

    Every process must call this (DeepSpeed ZeRO-3 gathers the weights collectively); the main process writes.
    For a PEFT model only the adapter is saved; its `adapter_config.json` names the base model.
    """
    final_dir = os.path.abspath(final_dir)
    tmp = sibling(final_dir, "partial")
    main = trainer.is_world_process_zero()
    if main:
        os.makedirs(os.path.dirname(final_dir), exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(tmp)
    if main:
        for name, text in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
        replace_dir(tmp, final_dir)
        logger.info("Saved the final model to %s.", final_dir)
    trainer.accelerator.wait_for_everyone()
    return final_dir
