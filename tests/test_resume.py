"""Resuming (issue 7): a run killed mid-way continues from its last complete checkpoint exactly as an uninterrupted
run would (same prompts, rollouts, losses, weights), an interrupted save leaves the previous checkpoint usable, and
SIGTERM saves a checkpoint before exiting. The end-to-end runs are subprocesses of `scripts/grpo.py` (slow)."""

import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from doubles import one_thread, save_scratch_policy, text_hash, tiny_model, tiny_tokenizer  # noqa: F401 (one_thread: autouse fixture)
from trl.trainer.utils import RepeatSampler

from rl.checkpoint import STATE_NAME, EpochSampler, StopOnSignal, is_complete, last_checkpoint, resolve_resume
from rl.config import DiffusionGRPOConfig, DiffusionRLOOConfig
from rl.tasks import TaskConfig, load_task
from rl.trainer import DiffusionGRPOTrainer, DiffusionRLOOTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
TASK = dict(test_size=8, train_size=16, min_ops=1, max_ops=1, max_operand=5, max_multiplier=2, max_result=10)
WORDS = "one two three four plus is The answer".split()



# In-process: the trainers on a tiny random model --------------------------------------------------------------------
def _trainer(out, cls, **overrides):
    tok = tiny_tokenizer(WORDS)
    rows = [{"prompt": f"{a} plus {b} is", "answer": "two"} for a in ("one", "two") for b in ("one", "two")]
    config_cls = DiffusionGRPOConfig if cls is DiffusionGRPOTrainer else DiffusionRLOOConfig
    args = config_cls(
        output_dir=str(out), use_cpu=True, bf16=False, per_device_train_batch_size=4, num_generations=4, max_steps=3,
        logging_steps=1, reasoning_length=4, answer_length=2, delimiter="The answer is", learning_rate=1e-2,
        report_to=[], temperature=1.0, beta=0.0, seed=3, save_strategy="steps", save_steps=1, disable_tqdm=True,
        **overrides,
    )
    return cls(model=tiny_model(len(tok), layers=2, hidden=32), reward_funcs=[text_hash], args=args,
               train_dataset=Dataset.from_list(rows * 4), processing_class=tok)


def _steps(history: list[dict]) -> dict[int, dict]:
    return {h["step"]: h for h in history if "loss" in h}


def _rollouts(out) -> dict[str, list[dict]]:
    folder = os.path.join(out, "rollouts")
    return {name: [json.loads(x) for x in open(os.path.join(folder, name))] for name in sorted(os.listdir(folder))}


@pytest.mark.parametrize("cls", [DiffusionGRPOTrainer, DiffusionRLOOTrainer])
def test_save_interrupted_mid_way_keeps_the_previous_checkpoint_and_resume_matches(tmp_path, cls):
    overrides = {"dense_coef": 0.5} if cls is DiffusionRLOOTrainer else {}  # RLOO: the per-token loss path too
    full = _trainer(tmp_path / "full", cls, **overrides)
    full.train()

    # A "kill" while checkpoint-2 is being written: the process dies after the model and optimizer are saved.
    broken = _trainer(tmp_path / "run", cls, **overrides)
    saves = {"n": 0}
    save_rng_state = broken._save_rng_state

    def dies_on_second_save(output_dir):
        saves["n"] += 1
        if saves["n"] == 2:
            raise KeyboardInterrupt("killed while saving")
        save_rng_state(output_dir)

    broken._save_rng_state = dies_on_second_save
    with pytest.raises(KeyboardInterrupt):
        broken.train()
    run = tmp_path / "run"
    assert is_complete(run / "checkpoint-1") and not (run / "checkpoint-2").exists()
    assert (run / ".checkpoint-2.partial" / "checkpoint-2" / "optimizer.pt").exists()  # the half-written one
    assert last_checkpoint(str(run)) == str(run / "checkpoint-1")

    resumed = _trainer(run, cls, **overrides)
    resumed.train(resume_from_checkpoint=last_checkpoint(str(run)))
    assert resumed.state.global_step == 3 and resumed._round == full._round
    assert not (run / ".checkpoint-2.partial").exists() and is_complete(run / "checkpoint-2")
    expected, got = _steps(full.state.log_history), _steps(resumed.state.log_history)
    for step in (2, 3):  # the steps after the checkpoint: same loss and gradient as the uninterrupted run
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], abs=1e-6)
        assert got[step]["grad_norm"] == pytest.approx(expected[step]["grad_norm"], rel=1e-5)
        assert got[step]["grad_norm"] > 0
    assert _rollouts(run) == _rollouts(tmp_path / "full")
    for a, b in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_epoch_order_depends_only_on_seed_and_epoch():
    def sampler():
        return RepeatSampler(list(range(8)), mini_repeat_count=2, batch_size=4, repeat_count=1, shuffle=True, seed=5)

    uninterrupted = EpochSampler(sampler())
    epochs = [list(uninterrupted) for _ in range(3)]
    assert epochs[0] == list(sampler())  # epoch 0 is TRL's own order
    assert epochs[1] != epochs[0]
    restarted = EpochSampler(sampler())  # a resumed process that starts in epoch 2
    restarted.set_epoch(2)
    assert list(restarted) == epochs[2]


def test_ctrl_c_asks_for_a_checkpoint_at_the_step_end_and_a_second_one_stops_at_once():
    from transformers import TrainerControl, TrainerState

    one_process = SimpleNamespace(num_processes=1, is_main_process=True, device="cpu")
    stop, control, state = StopOnSignal(one_process), TrainerControl(), TrainerState()
    outer = signal.getsignal(signal.SIGINT)  # whatever earlier tests or libraries left installed
    signal.signal(signal.SIGINT, signal.default_int_handler)
    before = signal.default_int_handler
    stop.on_train_begin(None, state, control)
    try:
        os.kill(os.getpid(), signal.SIGINT)  # deferred: training goes on to the end of the step
        time.sleep(0.1)
        stop.on_step_end(None, state, control)
        assert stop.received == signal.SIGINT and control.should_save and control.should_training_stop
        with pytest.raises(KeyboardInterrupt):  # the second Ctrl-C gets Python's own handler back
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        stop.restore()
        restored = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, outer)
    assert restored is before


def test_resume_without_a_checkpoint_is_a_clear_error_or_starts_fresh(tmp_path):
    with pytest.raises(ValueError, match="no complete checkpoint-N.*fresh_if_no_checkpoint"):
        resolve_resume(str(tmp_path), resume=True, fresh_if_missing=False, explicit=None)
    assert resolve_resume(str(tmp_path), resume=True, fresh_if_missing=True, explicit=None) is None
    (tmp_path / "checkpoint-4").mkdir()  # written without the resume state (interrupted, or not by us)
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text("{}")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path), resume=False, fresh_if_missing=False, explicit=str(tmp_path / "checkpoint-4"))
    with pytest.raises(ValueError, match="no complete checkpoint-N"):
        resolve_resume(str(tmp_path), resume=True, fresh_if_missing=False, explicit=None)


# End to end: scripts/grpo.py as a subprocess ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    rows = [*load_task(TaskConfig(**TASK), split="train").dataset, *load_task(TaskConfig(**TASK), "test").dataset]
    texts = [t for r in rows for t in (r["prompt"], r["reasoning"], r["answer"])] + ["The answer is"]
    return save_scratch_policy(tmp_path_factory.mktemp("policy"), texts)


def _command(out, model_dir, *flags) -> list[str]:
    """The tiny GRPO recipe on a 1-layer policy, pinned where the test depends on it: LoRA with dropout (the RNG
    state matters), 2 micro-batches per step and each generation used for 2 steps (`num_iterations`)."""
    recipe = os.path.join(ROOT, "recipes", "tiny", "grpo.yaml")
    return [sys.executable, os.path.join(ROOT, "scripts", "grpo.py"), recipe, *(f"--{k}={v}" for k, v in TASK.items()),
            f"--model_name_or_path={model_dir}", f"--output_dir={out}", "--reasoning_length=8", "--answer_length=2",
            "--delimiter=The answer is", "--block_length=null", "--per_device_train_batch_size=4",
            "--num_generations=4", "--gradient_accumulation_steps=2", "--num_iterations=2", "--use_peft=true",
            "--lora_r=4", "--lora_alpha=8", "--lora_dropout=0.1", "--learning_rate=1e-2", "--heldout_eval_steps=0",
            "--logging_steps=1", "--disable_tqdm=true", "--cpu_threads=1",
            "--rewards=test_resume:text_hash", *flags]


ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, ROOT]), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def _run(cmd) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _wait_for(predicate, proc, timeout: float = 300) -> None:
    start = time.monotonic()
    while not predicate():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before the point it was to be stopped at"
        assert time.monotonic() - start < timeout, "timed out waiting for the run"
        time.sleep(0.02)


@pytest.mark.slow
def test_killed_run_resumes_with_the_same_prompts_rollouts_losses_and_weights(tmp_path, model_dir):
    from safetensors.torch import load_file

    steps = ["--max_steps=8", "--save_strategy=steps", "--save_steps=3"]  # checkpoint-3 is mid-way through a rollout
    full, run = tmp_path / "full", tmp_path / "run"
    _run(_command(full, model_dir, *steps))

    proc = subprocess.Popen(_command(run, model_dir, *steps), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: is_complete(run / "checkpoint-3"), proc)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not (run / "final").exists()
    # Leftovers of interrupted saves: a staging dir, and a checkpoint written without its state (non-atomically).
    (run / ".checkpoint-7.partial" / "checkpoint-7").mkdir(parents=True)
    (run / "checkpoint-99").mkdir()
    (run / "checkpoint-99" / "trainer_state.json").write_text("{}")
    start = last_checkpoint(str(run))
    assert start in (str(run / "checkpoint-3"), str(run / "checkpoint-6"))

    proc = _run(_command(run, model_dir, *steps, "--resume"))
    log = proc.stdout + proc.stderr
    assert f"Resuming from checkpoint {start}." in log and f"Resumed from {start} at step" in log
    assert not (run / ".checkpoint-7.partial").exists()  # the next save cleared it
    # Same prompts (and whole rollouts) at every step, whichever process generated them.
    expected, got = _rollouts(full), _rollouts(run)
    assert list(got) == list(expected) == [f"step{s:06d}_rank0.jsonl" for s in (0, 2, 4, 6)]
    for name in expected:
        assert [r["prompt"] for r in got[name]] == [r["prompt"] for r in expected[name]], name
        assert got[name] == expected[name], name
    # Same loss and gradient norm at every step after the checkpoint, and the same final adapter.
    history = {d: _steps(json.loads((d / "checkpoint-8" / "trainer_state.json").read_text())["log_history"])
               for d in (full, run)}
    first = int(start.rsplit("-", 1)[1]) + 1
    for step in range(first, 9):
        assert history[run][step]["loss"] == pytest.approx(history[full][step]["loss"], abs=1e-6), step
        assert history[run][step]["grad_norm"] == pytest.approx(history[full][step]["grad_norm"], rel=1e-5), step
    a, b = (load_file(d / "final" / "adapter_model.safetensors") for d in (full, run))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_at_the_step_end_and_the_run_resumes_from_it(tmp_path, model_dir):
    out = tmp_path / "run"
    proc = subprocess.Popen(_command(out, model_dir, "--max_steps=500", "--save_strategy=no"), cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: (out / "rollouts" / "step000002_rank0.jsonl").exists(), proc)
        proc.send_signal(signal.SIGTERM)
        log, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, log[-4000:]
    checkpoint = last_checkpoint(str(out))
    assert checkpoint is not None and not (out / "final").exists()
    step = json.loads(open(os.path.join(checkpoint, STATE_NAME)).read())["global_step"]
    assert checkpoint.endswith(f"checkpoint-{step}") and 3 <= step < 500
    assert "Received SIGTERM: saving a checkpoint" in log and "Continue with --resume" in log
    proc = _run(_command(out, model_dir, f"--max_steps={step + 1}", "--save_strategy=no", "--resume"))
    assert f"Resumed from {checkpoint} at step {step}" in proc.stdout + proc.stderr
    assert (out / "final" / "adapter_model.safetensors").exists()
