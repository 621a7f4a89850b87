"""Checkpoints: atomic directories, exact resuming of the TRL trainers, and a clean stop on SIGTERM / SIGINT.

Atomic writes. A directory `NAME` is written as `.NAME.partial/NAME`, completed, then renamed onto `NAME`. A run
killed at any point leaves either the previous `NAME` (or none) plus a stale `.NAME.partial` that the next save
removes, never a half-written `NAME`. The final model (`save_final_model`) and the training checkpoints
`checkpoint-N` (the HF Trainer's own, staged by `ResumableMixin`) are both written this way.

Exact resuming. `ResumableMixin`, mixed in before a TRL trainer class, completes each HF checkpoint (model or
adapter, optimizer, scheduler, RNG states, trainer state) with `STATE_NAME`: TRL's micro-step, the subclass's own
state (the diffusion trainers: the rollout round that seeds every row's sampler stream) and, when the checkpoint
falls mid-way through a reused generation (`num_iterations` > 1, or `steps_per_generation` >
`gradient_accumulation_steps`), that generation's buffered batches. It also shuffles the prompts of epoch e from
(seed, e) alone (`EpochSampler`; epoch 0 is TRL's order), so a run resumed in a later epoch draws the prompts an
uninterrupted one would (TRL advances one generator across epochs, which a resumed process has not done).
`last_checkpoint(output_dir)` is the newest complete `checkpoint-N`; staging dirs and checkpoints lacking the
state files are skipped with a warning.

Stopping. `StopOnSignal` turns the first SIGTERM or SIGINT into "finish the current optimizer step, save a
checkpoint, stop"; a second signal gets the previous handler (Ctrl-C twice stops at once; the atomic save keeps
the last complete checkpoint intact either way).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch.utils.data import Sampler
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

logger = logging.getLogger(__name__)

STATE_NAME = "resume_state.json"  # written last into a staged checkpoint: its presence marks it complete
TRAINER_STATE_NAME = "trainer_state.json"  # the HF Trainer's
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def sibling(path: str, tag: str) -> str:
    path = os.path.abspath(path)
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{tag}")


def staging_dir(path: str) -> str:
    """Where `path` is written before it is renamed into place: `.NAME.partial/NAME` next to it."""
    path = os.path.abspath(path)
    return os.path.join(sibling(path, "partial"), os.path.basename(path))


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


@contextmanager
def staged(path: str, writer: bool = True, barrier: Callable[[], None] = lambda: None) -> Iterator[str]:
    """Yield the staging dir of `path`; on a clean exit rename it onto `path` (atomically replacing it).

    Every process enters; only `writer` creates, renames and cleans up. `barrier` synchronises the processes
    around that (all of them may write into the staging dir). On an exception nothing is renamed.
    """
    tmp = staging_dir(path)
    if writer:
        shutil.rmtree(os.path.dirname(tmp), ignore_errors=True)  # a stale one from an interrupted save
        os.makedirs(tmp)
    barrier()
    yield tmp
    barrier()
    if writer:
        replace_dir(tmp, path)
        shutil.rmtree(os.path.dirname(tmp), ignore_errors=True)
    barrier()


def save_final_model(trainer, final_dir: str, extra_files: dict[str, str] | None = None) -> str:
    """Save the trainer's model (and tokenizer) to `final_dir` atomically; returns the absolute path.

    Every process must call this (DeepSpeed ZeRO-3 gathers the weights collectively); the main process writes.
    For a PEFT model only the adapter is saved; its `adapter_config.json` names the base model.
    """
    final_dir = os.path.abspath(final_dir)
    main = trainer.is_world_process_zero()
    with staged(final_dir, main, trainer.accelerator.wait_for_everyone) as tmp:
        trainer.save_model(tmp)
        if main:
            for name, text in (extra_files or {}).items():
                with open(os.path.join(tmp, name), "w") as f:
                    f.write(text)
    if main:
        logger.info("Saved the final model to %s.", final_dir)
    return final_dir


# Resuming ---------------------------------------------------------------------------------------------------------
def is_complete(path: str) -> bool:
    """True if `path` is a checkpoint that `ResumableMixin` finished writing."""
    return all(os.path.isfile(os.path.join(path, name)) for name in (TRAINER_STATE_NAME, STATE_NAME))


def stale_staging(output_dir: str) -> list[str]:
    """Names of the checkpoint staging dirs (`.checkpoint-N.partial`) in `output_dir`."""
    if not os.path.isdir(output_dir):
        return []
    prefix = f".{PREFIX_CHECKPOINT_DIR}-"
    return sorted(n for n in os.listdir(output_dir) if n.startswith(prefix) and n.endswith(".partial"))


def last_checkpoint(output_dir: str) -> str | None:
    """The complete `checkpoint-N` with the largest N in `output_dir`, or None; incomplete ones are skipped."""
    if not os.path.isdir(output_dir):
        return None
    found = sorted(((int(m.group(1)), name) for name in os.listdir(output_dir) if (m := _CHECKPOINT.match(name))),
                   reverse=True)
    stale = stale_staging(output_dir)
    if stale:
        logger.warning("Ignoring %s in %s: checkpoint(s) whose saving was interrupted.", ", ".join(stale),
                       output_dir)
    for _, name in found:
        path = os.path.join(output_dir, name)
        if is_complete(path):
            return path
        logger.warning("Ignoring %s: it lacks %s or %s (an interrupted or non-atomic save).", path,
                       TRAINER_STATE_NAME, STATE_NAME)
    return None


def resolve_resume(output_dir: str, resume: bool, fresh_if_missing: bool, explicit: str | None) -> str | None:
    """The checkpoint a run continues from: `explicit` (HF's resume_from_checkpoint), else with `resume` the last
    complete one in `output_dir`; None starts fresh. Raises a ValueError that says what to do otherwise."""
    if explicit:
        if not is_complete(explicit):
            raise ValueError(f"resume_from_checkpoint={explicit!r} is not a complete checkpoint of these trainers (it "
                             f"needs {TRAINER_STATE_NAME} and {STATE_NAME}); use --resume to take the last complete "
                             "one in output_dir.")
        return explicit
    found = last_checkpoint(output_dir)
    if not resume:
        if found:
            logger.warning("%s holds checkpoints of an earlier run (latest %s); this run starts fresh and may "
                           "overwrite them. Pass --resume to continue it instead.", output_dir, found)
        return None
    if found is None:
        if fresh_if_missing:
            logger.info("--resume: no complete checkpoint in %s; starting fresh (fresh_if_no_checkpoint).", output_dir)
            return None
        raise ValueError(f"--resume: no complete checkpoint-N in output_dir={output_dir!r}. Check output_dir (and "
                         "that the earlier run had save_strategy: steps or was stopped with SIGTERM/Ctrl-C), or add "
                         "--fresh_if_no_checkpoint to start fresh when there is none.")
    return found


def read_state(checkpoint: str) -> dict | None:
    path = os.path.join(checkpoint, STATE_NAME)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_state(checkpoint: str, state: dict) -> None:
    with open(os.path.join(checkpoint, STATE_NAME), "w") as f:
        json.dump(state, f, indent=1)


# Stopping ---------------------------------------------------------------------------------------------------------
class StopOnSignal(TrainerCallback):
    """On the first SIGTERM or SIGINT: let the current optimizer step finish, then save a checkpoint and stop.

    The handler only records the signal; `on_step_end` asks the Trainer to save and stop (in every process: the
    flag is max-reduced across processes, so a signal seen by one rank stops all of them at the same step).
    `received` holds the signal number afterwards (0: none).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.received = 0
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        self.received = signum
        previous = self._previous.get(signum)
        signal.signal(signum, signal.SIG_DFL if previous is None else previous)  # a second signal is not deferred

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            logger.warning("Training runs outside the main thread: SIGTERM/SIGINT will not save a checkpoint.")
            return
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def on_step_end(self, args, state, control, **kwargs):
        received = self.received
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([received], device=self.accelerator.device)
            received = int(self.accelerator.reduce(flag, reduction="max").item())
        if received:
            self.received = received
            if self.accelerator.is_main_process:
                logger.warning("Received %s: saving a checkpoint at step %d and stopping.",
                               signal.Signals(received).name, state.global_step)
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def restore(self) -> None:
        """Put the previous handlers back (idempotent; also called when training raises)."""
        for sig, handler in self._previous.items():
            if signal.getsignal(sig) == self._handle:
                signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()


class EpochSampler(Sampler):
    """Wraps TRL's `RepeatSampler` so that epoch `e` shuffles with seed `seed + e` (epoch 0: TRL's own order).

    The Trainer announces the epoch through `set_epoch` (the diffusion trainers also set it themselves, since
    accelerate does not forward it through every dataloader wrapper); without it the epoch advances after each
    full pass.
    """

    def __init__(self, inner):
        self.inner = inner
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        generator, seed = getattr(self.inner, "generator", None), getattr(self.inner, "seed", None)
        if getattr(self.inner, "shuffle", False) and generator is not None and seed is not None:
            generator.manual_seed(seed + self.epoch)
        yield from self.inner
        self.epoch += 1


class ResumableMixin:
    """Exact, atomic checkpoints for a TRL trainer (GRPO/RLOO); mixed in before the TRL class.

    Subclasses call `_init_resume()` at the end of `__init__` and may override `_resume_state` /
    `_load_resume_state` to carry their own JSON-serialisable state in `STATE_NAME`.
    """

    def _init_resume(self) -> None:
        self._staging_root: str | None = None
        self._train_sampler: EpochSampler | None = None
        self._stop = StopOnSignal(self.accelerator)
        self.add_callback(self._stop)

    def _resume_state(self) -> dict:
        return {}

    def _load_resume_state(self, state: dict) -> None:
        pass

    @property
    def stop_signal(self) -> int:
        """The signal (SIGTERM/SIGINT) that stopped the last `train()` after saving a checkpoint; 0 if none."""
        return self._stop.received

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            self._stop.restore()

    def _get_train_sampler(self, dataset=None):
        self._train_sampler = EpochSampler(super()._get_train_sampler(dataset))
        return self._train_sampler

    def _run_epoch(self, *args, **kwargs):
        if self._train_sampler is not None and "epoch" in kwargs:  # accelerate does not always forward set_epoch
            self._train_sampler.set_epoch(kwargs["epoch"])
        return super()._run_epoch(*args, **kwargs)

    def _get_output_dir(self, trial):
        return getattr(self, "_staging_root", None) or super()._get_output_dir(trial)

    @property
    def _generate_every(self) -> int:
        return self.args.steps_per_generation * self.num_iterations  # micro-steps per generation (TRL)

    def _save_checkpoint(self, model, trial):
        """TRL's checkpoint (model or adapter, optimizer, scheduler, RNG, trainer state) plus the resume state,
        staged in `.checkpoint-N.partial/` and renamed onto `checkpoint-N` once complete."""
        run_dir = self._get_output_dir(trial)
        final = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            for name in stale_staging(run_dir):  # only one save runs at a time: any other one was interrupted
                shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)
        with staged(final, self.args.should_save, self.accelerator.wait_for_everyone) as tmp:
            self._staging_root = os.path.dirname(tmp)  # TRL writes <output dir>/checkpoint-N: make that `tmp`
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._staging_root = None
            self._write_resume_state(tmp, final)
        if self.args.should_save:  # TRL rotated inside the staging dir; rotate the real ones
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True)

    def _write_resume_state(self, tmp: str, final: str) -> None:
        buffered = self._step % self._generate_every != 0 and self._buffered_inputs is not None
        if buffered:  # mid-way through a reused generation: the rest of it is replayed on resume, not regenerated
            rank = self.accelerator.process_index
            torch.save(self._buffered_inputs, os.path.join(tmp, f"buffered_inputs_rank{rank}.pt"))
        if not self.args.should_save:
            return
        if self.state.best_model_checkpoint and os.path.abspath(self.state.best_model_checkpoint) == tmp:
            self.state.best_model_checkpoint = final
            self.state.save_to_json(os.path.join(tmp, TRAINER_STATE_NAME))
        write_state(tmp, {"global_step": self.state.global_step, "micro_step": self._step, "buffered": buffered,
                          "num_processes": self.accelerator.num_processes, "seed": self.args.seed,
                          "generate_every": self._generate_every, **self._resume_state()})

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self._read_resume_state(checkpoint)

    def _read_resume_state(self, checkpoint: str) -> None:
        state = read_state(checkpoint)
        if state is None:
            raise ValueError(f"{checkpoint} has no {STATE_NAME}: it was not written by these trainers (or not "
                             "completely), so the rollout streams cannot be continued. Resume from a checkpoint "
                             "they wrote (rl.checkpoint.last_checkpoint finds the last complete one).")
        self._step = state["micro_step"]
        self._load_resume_state(state)
        now = {"num_processes": self.accelerator.num_processes, "seed": self.args.seed,
               "generate_every": self._generate_every}
        changed = {k: (state.get(k), v) for k, v in now.items() if state.get(k) != v}
        if changed:
            logger.warning("Resuming %s with changed settings %s (saved, now): the run goes on, but not as the "
                           "uninterrupted run would have.", checkpoint, changed)
        path = os.path.join(checkpoint, f"buffered_inputs_rank{self.accelerator.process_index}.pt")
        if state["buffered"] and not changed and os.path.isfile(path):
            device = self.accelerator.device  # CPU DDP reports cpu:<rank>, which torch.load cannot map to
            location = "cpu" if device.type == "cpu" else device
            self._buffered_inputs = torch.load(path, map_location=location, weights_only=True)
        elif state["buffered"]:
            logger.warning("Not replaying the buffered generation of %s; the next step generates afresh.", checkpoint)
        if self.accelerator.is_main_process:
            logger.info("Resumed from %s at step %d (micro-step %d, state %s).", checkpoint, self.state.global_step,
                        self._step, self._resume_state())
