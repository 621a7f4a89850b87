"""Ablation runner: per-run recipes, launching and skipping runs, and the table computed from the runs' logs."""

import json
import math
import os
import sys

import pytest
import yaml

from rl.ablate import Ablation, load_ablation, run_all, run_recipe
from rl.ablate_report import read_run, report, summarize


def write_run(folder, evals, rollouts):
    """evals: {step: [correct, ...]}; rollouts: {step: [(nfe, reward), ...]} in the trainer's file layout."""
    (folder / "heldout").mkdir(parents=True)
    (folder / "rollouts").mkdir(parents=True)
    (folder / "final").mkdir(parents=True)  # a finished run
    for step, correct in evals.items():
        rows = [{"correct": c, "nfe": 9} for c in correct]
        (folder / "heldout" / f"step{step:06d}_rank0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for step, rows in rollouts.items():
        text = "".join(json.dumps({"nfe": n, "rewards": [r, 0.5]}) + "\n" for n, r in rows)
        (folder / "rollouts" / f"step{step:06d}_rank0.jsonl").write_text(text)


def ablation(tmp_path, **kw):
    base = tmp_path / "base.yaml"
    base.write_text("learning_rate: 1.0e-4\nmax_steps: 10\n")
    return Ablation(base=str(base), arms={"outcome": {}, "dense": {"dense_coef": 0.1}}, seeds=2,
                    output_dir=str(tmp_path / "abl"), **kw)


def test_read_run_counts_nfe_spent_before_each_evaluation(tmp_path):
    write_run(tmp_path, {0: [1, 0, 0, 0], 2: [1, 1, 0, 0]},
              {0: [(10, 1.0), (6, 0.0)], 1: [(8, 1.0), (8, 1.0)]})
    run = read_run(str(tmp_path))
    assert run["train"] == [(0, 0.5, 16), (1, 1.0, 32)]  # the first reward function is the outcome reward
    assert run["eval"] == [(0, 0.25, 0), (2, 0.5, 32)]


def test_decoding_curves_against_hand_computed_values(tmp_path):
    from rl.ablate_report import plot_decoding

    write_run(tmp_path, {0: [1, 0]}, {})
    rows = [  # decode_step -1: never decoded; h_ub None: after the row's last step
        {"nfe": 2, "rewards": [1.0], "decode_step": [0, 0, 1, -1], "token_logprob": [-0.5, -1.0, -1.5, 0.0],
         "h_ub": [2.0, 1.0, None]},
        {"nfe": 3, "rewards": [0.0], "decode_step": [0, 1, 2, 2], "token_logprob": [0.0, -2.0, -1.0, -1.0],
         "h_ub": [3.0, 0.5, 0.25, None]},
    ]
    (tmp_path / "rollouts" / "step000000_rank0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    step, tokens_per_nfe, nll, entropy = read_run(str(tmp_path))["decoding"][0]
    assert step == 0 and tokens_per_nfe == 7 / 5  # 3 + 4 decoded tokens over 2 + 3 forwards
    assert nll == (0.5 + 1.0 + 1.5 + 0.0 + 2.0 + 1.0 + 1.0) / 7
    assert entropy == (1.0 + 0.25) / 2
    png = plot_decoding({"arm": {0: read_run(str(tmp_path))}}, str(tmp_path), "t")
    assert os.path.getsize(png) > 10_000


def test_summary_table_against_hand_computed_values(tmp_path):
    abl = ablation(tmp_path)
    roll = {0: [(10, 0.0)], 1: [(10, 1.0)], 2: [(10, 1.0)], 3: [(10, 1.0)]}
    # outcome arm: final accuracies 0.5 and 0.75 -> target 0.625.
    write_run(tmp_path / "abl/outcome/seed0", {0: [0, 0, 0, 1], 2: [0, 1, 0, 1], 4: [0, 1, 0, 1]}, roll)
    write_run(tmp_path / "abl/outcome/seed1", {0: [0, 0, 0, 1], 2: [0, 0, 0, 1], 4: [1, 1, 0, 1]}, roll)
    # dense arm: reaches 0.625+ at step 2 (seed 0, 20 NFE spent) and step 4 (seed 1, 40 NFE); finals 0.75, 1.0.
    write_run(tmp_path / "abl/dense/seed0", {0: [0, 0, 0, 1], 2: [1, 1, 0, 1], 4: [1, 1, 0, 1]}, roll)
    write_run(tmp_path / "abl/dense/seed1", {0: [0, 0, 0, 1], 2: [0, 1, 0, 1], 4: [1, 1, 1, 1]}, roll)
    table, _ = summarize(abl)
    rows = {r["arm"]: r for r in table}
    assert rows["outcome"]["target_accuracy"] == pytest.approx(0.625)
    assert rows["outcome"]["final_accuracy_mean"] == pytest.approx(0.625)
    assert rows["outcome"]["final_accuracy_std"] == pytest.approx(math.sqrt(2) * 0.125)
    assert rows["outcome"]["seeds_reaching_target"] == 1  # seed 0 never reaches 0.625; seed 1 at step 4
    assert rows["outcome"]["steps_to_target_mean"] == 4
    assert rows["dense"]["final_accuracy_mean"] == pytest.approx(0.875)
    assert rows["dense"]["steps_to_target_mean"] == 3 and rows["dense"]["seeds_reaching_target"] == 2
    assert rows["dense"]["nfe_to_target_mean"] == 30 and rows["dense"]["steps_to_target_std"] == pytest.approx(
        math.sqrt(2))
    # paired against outcome, problem by problem: seed 0 gains problem 0, seed 1 gains problem 2; 8 pairs
    # d = [1, 0, 0, 0, 0, 0, 1, 0]: mean 0.25, sd sqrt(1.5 / 7), SE sd / sqrt(8)
    se = math.sqrt(1.5 / 7) / math.sqrt(8)
    assert rows["dense"]["delta_vs_reference"] == pytest.approx(0.25)
    assert rows["dense"]["delta_se"] == pytest.approx(se)
    assert (rows["dense"]["gained"], rows["dense"]["lost"], rows["dense"]["pairs"]) == (2, 0, 8)
    out = report(abl, title="test")
    md = (tmp_path / "abl/results.md").read_text()
    assert ("| dense | 2 (0, 0) | 0.250 | 0.875 ± 0.177 | +25.0 ± 16.4 pts (z +1.5; +2/-0 of 8) | 2/2 | 3.0 ± 1.4 | "
            "30 ± 14 | n/a |") in md
    assert (tmp_path / "abl/curves.png").stat().st_size > 10_000 and out["csv"].endswith("results.csv")


FAKE_TRAINER = """
import json, os, sys, yaml
recipe = yaml.safe_load(open(sys.argv[1]))
if recipe.get("dense_coef") == 0.5:
    sys.exit(3)
out = recipe["output_dir"]
for sub in ("heldout", "rollouts", "final"):
    os.makedirs(os.path.join(out, sub), exist_ok=True)
with open(os.path.join(out, "heldout", "step000000_rank0.jsonl"), "w") as f:
    f.write(json.dumps({"correct": recipe["seed"] % 2 == 0}) + "\\n")
with open(os.path.join(out, "seen.json"), "w") as f:
    json.dump(recipe, f)
"""


def test_run_all_launches_each_arm_and_seed_once_and_reports_failures(tmp_path):
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    abl = ablation(tmp_path, script=str(script), launcher=sys.executable, common={"max_steps": 3})
    abl.arms["broken"] = {"dense_coef": 0.5}
    runs = run_all(abl)
    assert [(r["arm"], r["seed"], r["status"]) for r in runs][:4] == [
        ("outcome", 0, "ok"), ("outcome", 1, "ok"), ("dense", 0, "ok"), ("dense", 1, "ok")]
    assert all(r["status"].startswith("failed (exit 3") for r in runs[4:])
    launched = sorted((tmp_path / "abl").glob("*/seed*/seen.json"), key=lambda p: p.stat().st_mtime_ns)
    assert [(p.parts[-3], p.parts[-2]) for p in launched] == [  # seed-major: a stopped ablation stays paired
        ("outcome", "seed0"), ("dense", "seed0"), ("outcome", "seed1"), ("dense", "seed1")]
    seen = json.loads((tmp_path / "abl/dense/seed1/seen.json").read_text())
    assert seen == {"learning_rate": 1e-4, "max_steps": 3, "dense_coef": 0.1, "seed": 1,
                    "output_dir": str(tmp_path / "abl/dense/seed1")}
    again = run_all(abl)  # finished runs are skipped; the failed ones run again
    assert [r["status"] for r in again[:4]] == ["done"] * 4


def test_bad_ablation_recipes_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="reference_arm"):
        ablation(tmp_path, reference_arm="nope")
    with pytest.raises(ValueError, match="seed"):
        Ablation(base="b.yaml", arms={"a": {"seed": 1}})
    path = tmp_path / "abl.yaml"
    path.write_text(yaml.safe_dump({"base": "b.yaml", "arms": {"a": {}}, "armz": 1}))
    with pytest.raises(ValueError, match="unknown key"):
        load_ablation(str(path))
    assert run_recipe(ablation(tmp_path), "dense", 0)["dense_coef"] == 0.1


@pytest.mark.parametrize("name", ["tiny_credit", "tiny_credit_sparse"])
def test_shipped_ablation_recipe_builds_valid_training_recipes(tmp_path, name):
    import importlib.util

    from rl.recipe import parse

    spec = importlib.util.spec_from_file_location("script_grpo", "scripts/grpo.py")
    grpo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(grpo)

    abl = load_ablation(f"recipes/ablations/{name}.yaml")
    assert abl.seeds >= 3 and len(abl.arms) >= 5
    for arm in abl.arms:
        path = tmp_path / f"{arm}.yaml"
        path.write_text(yaml.safe_dump(run_recipe(abl, arm, 0)))
        parse(grpo.configs(), [str(path), "--use_cpu", "true"])  # every key is a field of the GRPO script's configs


def test_failed_runs_wall_time_and_a_reference_that_did_not_improve(tmp_path):
    abl = ablation(tmp_path)
    roll = {0: [(10, 0.0)], 1: [(10, 1.0)]}
    write_run(tmp_path / "abl/outcome/seed0", {0: [0, 1, 0, 1], 2: [0, 1, 0, 1]}, roll)  # no gain: 0.5 -> 0.5
    write_run(tmp_path / "abl/outcome/seed1", {0: [1, 1, 0, 1], 2: [0, 1, 0, 1]}, roll)  # 0.75 -> 0.5
    write_run(tmp_path / "abl/dense/seed0", {0: [0, 1, 0, 1], 2: [1, 1, 1, 1]}, roll)
    (tmp_path / "abl/dense/seed1").mkdir(parents=True)
    for arm, seed, record in (("outcome", 0, {"status": "ok", "seconds": 100.0}),
                              ("outcome", 1, {"status": "ok", "seconds": 140.0}),
                              ("dense", 0, {"status": "ok", "seconds": 90.0}),
                              ("dense", 1, {"status": "failed (exit 1, see train.log)", "seconds": 3.0})):
        (tmp_path / f"abl/{arm}/seed{seed}/run.json").write_text(json.dumps(record))
    table, _ = summarize(abl)
    rows = {r["arm"]: r for r in table}
    assert not rows["outcome"]["reference_improved"]  # 0.625 -> 0.5: steps/NFE to target say nothing
    assert math.isnan(rows["dense"]["steps_to_target_mean"]) and rows["dense"]["seeds_reaching_target"] == 0
    assert rows["dense"]["failed"] == 1 and rows["dense"]["seeds"] == 1  # the failed run is out of the means
    assert rows["dense"]["final_accuracy_mean"] == 1.0 and rows["dense"]["pairs"] == 4  # seed 0 only
    assert rows["outcome"]["wall_seconds_mean"] == 120.0 and rows["dense"]["wall_seconds_mean"] == 90.0
    report(abl, title="test")
    md = (tmp_path / "abl/results.md").read_text()
    assert "did not improve" in md and "| dense | 1 (1, 0) |" in md


def test_an_unknown_arm_key_fails_before_anything_is_launched(tmp_path):
    abl = ablation(tmp_path, script="scripts/grpo.py", launcher="false")
    abl.arms["typo"] = {"dense_coeff": 0.1}
    with pytest.raises(ValueError, match="arm 'typo' sets 'dense_coeff'.*Did you mean dense_coef"):
        run_all(abl)
    assert not (tmp_path / "abl").exists()  # no run was prepared, let alone launched
    abl.arms.pop("typo")
    abl.common["learning_rat"] = 1.0
    with pytest.raises(ValueError, match="common sets 'learning_rat'"):
        run_all(abl)


SLOW_TRAINER = """
import os, sys, time, yaml
recipe = yaml.safe_load(open(sys.argv[1]))
os.makedirs(recipe["output_dir"], exist_ok=True)
open(os.path.join(recipe["output_dir"], "pid"), "w").write(str(os.getpid()))
time.sleep(120)
"""


def test_an_interrupted_ablation_stops_its_running_runs(tmp_path):
    import os
    import signal
    import time

    script = tmp_path / "slow_trainer.py"
    script.write_text(SLOW_TRAINER)
    abl = ablation(tmp_path, script=str(script), launcher=sys.executable, parallel=2)

    def interrupt(*_):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    signal.alarm(3)  # Ctrl-C three seconds in, while two runs are running
    try:
        with pytest.raises(KeyboardInterrupt):
            run_all(abl)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    pids = [int((tmp_path / f"abl/{arm}/seed0/pid").read_text()) for arm in ("outcome", "dense")]  # seed-major
    time.sleep(0.5)
    for pid in pids:
        with pytest.raises(ProcessLookupError):  # terminated and reaped: no run outlives the ablation
            os.kill(pid, 0)


def test_credit_diagnostics_against_hand_computed_values(tmp_path):
    from rl.ablate_report import credit_diagnostics

    rows = [  # two groups of 2; phi per step (None: undefined after the answer step)
        {"rewards": [1.0], "phi": [-3.0, -2.0, -1.0, None]},  # group 0: no outcome spread, phi_T -1 vs -1.5
        {"rewards": [1.0], "phi": [-2.0, -1.5]},
        {"rewards": [0.0], "phi": [-4.0, -4.0, -4.0]},  # group 1: spread
        {"rewards": [1.0], "phi": [-1.0, -0.5, -0.5]},
    ]
    (tmp_path / "rollouts").mkdir()
    (tmp_path / "rollouts" / "step000000_rank0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "train.log").write_text("{'advantage/dense_share': '0.2'}\n{'advantage/dense_share': '0.4'}\n")
    d = credit_diagnostics(str(tmp_path), group_size=2)
    assert d["groups"] == 2 and d["zero_spread"] == 0.5 and d["zero_spread_phi_varies"] == 1.0
    assert d["dense_share"] == pytest.approx(0.3)

    def pearson(x, y):
        mx, my = sum(x) / len(x), sum(y) / len(y)
        cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
        return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))

    rewards = [1.0, 1.0, 0.0, 1.0]
    assert d["phi_corr"][1.0] == pytest.approx(pearson([-1.0, -1.5, -4.0, -0.5], rewards))  # phi_T
    assert d["phi_corr"][0.0] == pytest.approx(pearson([-3.0, -2.0, -4.0, -1.0], rewards))  # before reasoning
    # halfway: index round(0.5 * (n - 1)) of the defined steps, Python's round (half to even): 1, 0, 1, 1
    assert d["phi_corr"][0.5] == pytest.approx(pearson([-2.0, -2.0, -4.0, -0.5], rewards))


ARGV_TRAINER = """
import json, os, sys, yaml
recipe = yaml.safe_load(open(sys.argv[1]))
out = recipe["output_dir"]
os.makedirs(os.path.join(out, "final"), exist_ok=True)
os.makedirs(os.path.join(out, "heldout"), exist_ok=True)
with open(os.path.join(out, "argv.json"), "w") as f:
    json.dump(sys.argv[2:], f)
"""


def test_an_unfinished_run_continues_from_its_checkpoint_unless_its_recipe_or_arguments_changed(tmp_path):
    script = tmp_path / "argv_trainer.py"
    script.write_text(ARGV_TRAINER)
    abl = ablation(tmp_path, script=str(script), launcher=sys.executable)
    abl.arms["other_args"] = {}
    for arm in abl.arms:  # earlier attempts stopped part-way: one as now, one with another recipe, other arguments
        out = tmp_path / f"abl/{arm}/seed0"
        (out / "checkpoint-2").mkdir(parents=True)
        recipe = run_recipe(abl, arm, 0)
        if arm == "dense":
            recipe["learning_rate"] = 9.0
        (out / "run_recipe.yaml").write_text(yaml.safe_dump(recipe))
        (out / "run_args.json").write_text(json.dumps(["--x", "2" if arm == "other_args" else "1"]))
    run_all(abl, extra_args=["--x", "1"])
    argv = {arm: json.loads((tmp_path / f"abl/{arm}/seed0/argv.json").read_text()) for arm in abl.arms}
    assert argv["outcome"] == ["--resume", "--fresh_if_no_checkpoint", "--x", "1"]
    assert (tmp_path / "abl/outcome/seed0/checkpoint-2").is_dir()  # kept for the run to continue from
    for arm in ("dense", "other_args"):  # launched differently: starts over in a clean folder
        assert argv[arm] == ["--x", "1"]
        assert not (tmp_path / f"abl/{arm}/seed0/checkpoint-2").exists()
    assert json.loads((tmp_path / "abl/outcome/seed1/argv.json").read_text()) == ["--x", "1"]


def test_a_finished_run_launched_differently_is_an_error_not_a_result(tmp_path):
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    abl = ablation(tmp_path, script=str(script), launcher=sys.executable, common={"max_steps": 3})
    assert [r["status"] for r in run_all(abl, extra_args=["--model_name_or_path", "A"])] == ["ok"] * 4
    assert [r["status"] for r in run_all(abl, extra_args=["--model_name_or_path", "A"])] == ["done"] * 4
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "abl").glob("*/seed*/seen.json")}
    with pytest.raises(ValueError, match="other arguments") as err:
        run_all(abl, extra_args=["--model_name_or_path", "B"])
    assert "dense/seed1" in str(err.value) and "Nothing was launched" in str(err.value)
    abl.common["max_steps"] = 4
    with pytest.raises(ValueError, match="another recipe"):
        run_all(abl, extra_args=["--model_name_or_path", "A"])
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "abl").glob("*/seed*/seen.json")}


def test_a_resumed_run_evaluates_only_on_its_schedule():
    from types import SimpleNamespace

    from rl.callbacks import HeldOutEvalCallback

    cb = HeldOutEvalCallback(trainer=None, dataset=[{"prompt": "p", "answer": "1"}], sampler=None, every=10,
                             template=None)
    ran = []
    cb.run = ran.append
    for step in (0, 27, 20):  # fresh start; resumed off-schedule (no eval); resumed at a scheduled step
        cb.on_train_begin(None, SimpleNamespace(global_step=step), None)
    assert ran == [0, 20]
