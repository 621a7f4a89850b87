"""Accuracy-vs-NFE frontier: exit simulation and calibration by hand, paired deltas by hand, the config grid, the
script end to end on a tiny untrained model (CSV = JSONL records, exact NFE per policy), input errors, the recipe."""

import json
import math
import os
import runpy
import sys

import pytest
import torch
from doubles import save_scratch_policy

from rl.evaluate import EvalConfig, evaluate
from rl.frontier import (
    COLUMNS,
    GAMMA_GRID,
    FrontierConfig,
    add_deltas,
    calibrate_exit_gamma,
    check_inputs,
    claims,
    exit_outcome,
    frontier_points,
    read_csv,
    read_records,
    simulate_exit,
)
from rl.models import ModelConfig, load_for_inference
from rl.recipe import load_recipe, parse
from rl.tasks import TaskConfig, load_task
from rollout import MDLMAdapter, SamplerConfig, TemplateConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "frontier.py")
TASK = TaskConfig(test_size=8, train_size=50, min_ops=1, max_ops=2)
R, A, BLOCK = 8, 3, 4
TEMPLATE = TemplateConfig(reasoning_length=R, answer_length=A)
TASK_ARGS = ["--test_size", "8", "--train_size", "50", "--min_ops", "1", "--max_ops", "2", "--reasoning_length",
             str(R), "--answer_length", str(A), "--block_length", str(BLOCK), "--batch_size", "8"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matmuls: on a shared 2-core machine, OpenMP threads spin-waiting on each other cost ~6x the work.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("frontier_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Two hand-made no-exit traces. Row 1 is right and becomes sure of the gold answer; row 2 is wrong throughout.
RECORDS = [
    {"h_ub": [2.0, 0.5, 0.05, None], "phi": [-1.5, -0.1, -0.01, None], "nfe": 4, "correct": True},
    {"h_ub": [3.0, 1.0, 0.8, None], "phi": [-2.0, -1.2, -0.9, None], "nfe": 4, "correct": False},
]


def test_exit_simulation_cuts_the_trace_at_the_first_step_below_gamma():
    assert exit_outcome(RECORDS[0], 0.1, greedy=True) == (3, 1.0)  # H_UB 0.05 < 0.1 at step 2: 3 NFE
    assert exit_outcome(RECORDS[0], 0.6, greedy=True) == (2, 1.0)  # exp(-0.1) > 1/2: greedy commits the gold
    assert exit_outcome(RECORDS[0], 2.5, greedy=True) == (1, 0.0)  # exp(-1.5) < 1/2: too early, wrong
    assert exit_outcome(RECORDS[1], 0.6, greedy=True) == (4, 0.0)  # never below 0.6: the recorded run
    assert exit_outcome(RECORDS[0], 0.6, greedy=False) == (2, pytest.approx(math.exp(-0.1)))
    assert simulate_exit(RECORDS, 0.1, greedy=True) == (0.5, 3.5)
    assert simulate_exit(RECORDS, 0.9, greedy=True) == (0.5, 2.5)
    assert simulate_exit(RECORDS, 2.5, greedy=True) == (0.0, 1.5)


def test_calibration_takes_the_largest_gamma_whose_smaller_ones_all_keep_accuracy():
    got = calibrate_exit_gamma(RECORDS, tolerance_points=1.0, greedy=True, grid=(0.1, 0.6, 0.9, 1.6, 2.5))
    assert got["exit_gamma"] == 1.6 and got["estimated_accuracy"] == 0.5 and got["estimated_mean_nfe"] == 2.0
    assert got["accuracy"] == 0.5 and got["mean_nfe"] == 4.0
    assert calibrate_exit_gamma(RECORDS, 1.0, True, grid=(2.5, 0.6, 1.6, 0.1))["exit_gamma"] == 1.6  # any order
    # Sure of the gold answer at step 0, talked out of it at step 1: gamma 1.0 is right again, but the scan stops
    # at the first gamma that loses accuracy (0.5), so the chosen gamma never sits beyond a loss.
    flip = [{"h_ub": [0.9, 0.3, None], "phi": [-0.1, -2.0, None], "nfe": 3, "correct": True}]
    assert simulate_exit(flip, 0.5, True) == (0.0, 2.0) and simulate_exit(flip, 1.0, True) == (1.0, 1.0)
    assert calibrate_exit_gamma(flip, 1.0, True, grid=(0.1, 0.5, 1.0))["exit_gamma"] == 0.1
    assert calibrate_exit_gamma(RECORDS, 60.0, True, grid=(0.6, 2.5))["exit_gamma"] == 2.5  # tolerance 60 points
    with pytest.raises(ValueError, match="record_phi"):
        calibrate_exit_gamma([{k: v for k, v in r.items() if k != "phi"} for r in RECORDS], 1.0, True)
    assert GAMMA_GRID[0] == 0.001 and GAMMA_GRID[-1] == 10 and GAMMA_GRID[10] == 0.01


def test_deltas_are_paired_against_the_first_row():
    rows = [{"name": "ref", "accuracy": 0.5, "mean_nfe": 20.0}, {"name": "fast", "accuracy": 0.25, "mean_nfe": 5.0},
            {"name": "same", "accuracy": 0.5, "mean_nfe": 10.0}]
    correct = {"ref": [1, 1, 0, 0], "fast": [1, 0, 0, 0], "same": [0, 1, 1, 0]}
    add_deltas(rows, correct, match_points=2.0)
    assert (rows[0]["acc_delta_pts"], rows[0]["delta_se_pts"], rows[0]["nfe_ratio"]) == (0.0, 0.0, 1.0)
    # fast: diffs 0,-1,0,0 -> mean -0.25, sample var 0.25, SE sqrt(0.25/4) = 0.25
    assert (rows[1]["acc_delta_pts"], rows[1]["delta_se_pts"], rows[1]["nfe_ratio"]) == (-25.0, 25.0, 0.25)
    # same accuracy, different rows right: diffs -1,0,1,0 -> var 2/3, SE sqrt(1/6)
    assert rows[2]["acc_delta_pts"] == 0.0 and rows[2]["delta_se_pts"] == round(100 * math.sqrt(1 / 6), 2)
    assert [r["matches_ref"] for r in rows] == [False, False, True]


def test_claims_read_the_no_exit_rows():
    rows = [
        {"name": "l2r", "family": "left_to_right", "exit_gamma": None, "matches_ref": False, "acc_delta_pts": 0},
        {"name": "k2", "family": "fixed_k", "k": 2, "exit_gamma": None, "matches_ref": False, "acc_delta_pts": -5.0},
        {"name": "k4", "family": "fixed_k", "k": 4, "exit_gamma": None, "matches_ref": True, "acc_delta_pts": -1.0},
        {"name": "med", "family": "med", "exit_gamma": None, "matches_ref": True, "acc_delta_pts": -1.5},
        {"name": "eb", "family": "eb", "exit_gamma": None, "matches_ref": False, "acc_delta_pts": -3.0},
        {"name": "eb_x", "family": "eb", "exit_gamma": 0.5, "matches_ref": True, "acc_delta_pts": 0.0},
    ]
    assert claims(rows, 2.0) == {"fixed_k_matches_ref": True, "med_matches_ref": True, "eb_matches_ref": False,
                                 "entropy_k2_loses_accuracy": True, "entropy_k4_loses_accuracy": False}


def test_points_sweep_the_families_and_pair_each_with_its_exit_twin():
    base = SamplerConfig(policy="med", eb_gamma=0.3, tau=0.8, block_length=8, med_k_max=4)
    points = frontier_points(base, FrontierConfig(), exit_gamma=0.5)
    names = ["left_to_right_k1", "entropy_k2", "entropy_k4", "med_0.1", "med_0.2", "med_0.3", "eb_0.3",
             "threshold_0.8"]
    assert [p.name for p in points] == [n + s for n in names for s in ("", "_exit")]
    by_name = {p.name: p for p in points}
    assert (by_name["left_to_right_k1"].sampler.policy, by_name["left_to_right_k1"].sampler.k) == ("left_to_right", 1)
    assert (by_name["entropy_k4_exit"].sampler.policy, by_name["entropy_k4_exit"].sampler.k) == ("entropy", 4)
    assert by_name["med_0.3"].sampler.med_lambda == 0.3 and by_name["med_0.3"].params() == {
        "med_lambda": 0.3, "med_k_max": 4}
    assert by_name["threshold_0.8"].params() == {"tau": 0.8}
    assert all(p.sampler.exit_gamma == (0.5 if p.name.endswith("_exit") else None) for p in points)
    assert all(p.sampler.block_length == 8 for p in points)
    only = frontier_points(base, FrontierConfig(samplers=["med"], med_lambdas=[0.2]), exit_gamma=None)
    assert [p.name for p in only] == ["left_to_right_k1", "med_0.2"]  # the reference always runs
    with pytest.raises(ValueError, match="Unknown sampler famil"):
        FrontierConfig(samplers=["med", "mdm"])
    with pytest.raises(ValueError, match="fixed_k"):
        FrontierConfig(fixed_k=[0, 2])
    with pytest.raises(ValueError, match="twice"):
        FrontierConfig(med_lambdas=[0.1, 0.1])


def test_inputs_the_frontier_cannot_honour_are_clear_errors():
    base, frontier, ev = SamplerConfig(), FrontierConfig(), EvalConfig()
    with pytest.raises(ValueError, match=r"sets \['k', 'policy'\] per config"):
        check_inputs({"policy", "k", "tau"}, TASK, "test", TEMPLATE, base, ev, frontier)
    with pytest.raises(ValueError, match="remove output_file"):
        check_inputs({"output_file"}, TASK, "test", TEMPLATE, base, ev, frontier)
    with pytest.raises(ValueError, match="with_exit is false"):
        check_inputs(set(), TASK, "test", TEMPLATE, SamplerConfig(exit_gamma=0.2), ev, FrontierConfig(with_exit=False))
    with pytest.raises(ValueError, match="infill"):
        check_inputs(set(), TASK, "test", TemplateConfig(layout="plain"), base, ev, frontier)
    with pytest.raises(ValueError, match="evaluated rows"):
        check_inputs(set(), TASK, "train", TEMPLATE, base, ev, frontier)
    with pytest.raises(ValueError, match="record_phi"):
        check_inputs(set(), TASK, "test", TEMPLATE, base, EvalConfig(record_phi=False), frontier)
    check_inputs(set(), TASK, "train", TEMPLATE, SamplerConfig(exit_gamma=0.2), ev, frontier)  # explicit gamma: fine
    with pytest.raises(ValueError, match="med_lambdas"):  # wired into the script, before any model is loaded
        _script().main(["--model_name_or_path", "nowhere", "--med-lambda", "0.1"])


def test_tiny_recipe_parses_and_shares_model_task_and_canvas_with_eval():
    path = os.path.join(ROOT, "recipes", "tiny", "frontier.yaml")
    script = _script()
    *_, sampler, _, frontier = parse(script.configs(), [path])
    assert sampler.exit_gamma is None and frontier.with_exit and frontier.med_lambdas == [0.1, 0.2, 0.3]
    assert not set(load_recipe(path)) & {"policy", "k", "med_lambda", "output_file"}
    ev = load_recipe(os.path.join(ROOT, "recipes", "tiny", "eval.yaml"))
    fr = load_recipe(path)
    shared = ("model_name_or_path", "task", "split", "task_seed", "train_size", "test_size", "min_ops", "max_ops",
              "max_operand", "max_multiplier", "max_result", "layout", "reasoning_length", "answer_length",
              "delimiter", "suffix", "pad_with", "block_length", "temperature", "seed", "med_k_max")
    assert {k: fr[k] for k in shared} == {k: ev[k] for k in shared}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    data = load_task(TASK, split="test").dataset
    texts = [*data["prompt"], *data["reasoning"], *data["answer"], TEMPLATE.delimiter]
    return save_scratch_policy(tmp_path_factory.mktemp("tiny"), texts, seed=2)


def _gamma_between_rows(model_dir, tmp_path) -> float:
    """An exit gamma halfway between two rows' first H_UB under left-to-right: some rows exit, some do not."""
    model, tok = load_for_inference(ModelConfig(model_name_or_path=model_dir), "cpu")
    data = load_task(TASK, split="test").dataset
    sampler = SamplerConfig(policy="left_to_right", block_length=BLOCK)
    evaluate(MDLMAdapter.from_pretrained(model, tok), tok, data, TEMPLATE, sampler, EvalConfig(batch_size=8),
             str(tmp_path / "probe.jsonl"), progress=False)
    first = sorted(r["h_ub"][0] for r in read_records(str(tmp_path / "probe.jsonl")))
    return (first[3] + first[4]) / 2


def test_frontier_runs_every_config_and_its_csv_matches_the_traces(tmp_path, model_dir, caplog):
    gamma = _gamma_between_rows(model_dir, tmp_path)
    out = tmp_path / "frontier"
    with caplog.at_level("INFO", logger="rl.frontier"):
        summary = _script().main(["--model_name_or_path", model_dir, *TASK_ARGS, "--exit_gamma", str(gamma),
                                  "--frontier_dir", str(out)])
    assert "[16/16] threshold_0.9_exit" in caplog.text  # progress per config
    assert summary["exit_gamma"] == gamma and summary["exit_gamma_source"] == "recipe" and summary["n"] == 8
    assert summary == json.loads((out / "frontier.json").read_text())

    with open(out / "frontier.csv") as f:
        assert f.readline().strip().split(",") == list(COLUMNS)
    rows = {r["name"]: r for r in read_csv(str(out / "frontier.csv"))}
    assert len(rows) == 16 and [c["name"] for c in summary["configs"]] == list(rows)
    ref = rows["left_to_right_k1"]
    for name, row in rows.items():
        records = read_records(row["output_file"])
        assert [r["index"] for r in records] == list(range(8)) and row["n"] == 8
        assert row["accuracy"] == sum(r["correct"] for r in records) / 8
        assert row["mean_nfe"] == sum(r["nfe"] for r in records) / 8
        assert row["exit_rate"] == sum(r["exit_step"] >= 0 for r in records) / 8
        assert row["acc_delta_pts"] == round(100 * (row["accuracy"] - ref["accuracy"]), 2)
        assert row["nfe_ratio"] == round(row["mean_nfe"] / ref["mean_nfe"], 4)
        assert row["exit_gamma"] == (gamma if name.endswith("_exit") else None)
        assert row["block_length"] == BLOCK and row["wall_seconds"] > 0

    def nfes(name):
        return [r["nfe"] for r in read_records(rows[name]["output_file"])]

    # Left-to-right k=1 decodes one masked position per forward: R reasoning + A answer positions.
    assert nfes("left_to_right_k1") == [R + A] * 8
    # Fixed k inside each semi-AR block, then the answer block: ceil(size / k) per block, about 1/k of the forwards.
    def fixed_k_nfe(k):
        return (R // BLOCK) * math.ceil(BLOCK / k) + math.ceil(A / k)

    assert nfes("entropy_k2") == [fixed_k_nfe(2)] * 8 == [6] * 8 and rows["entropy_k2"]["nfe_ratio"] < 0.55
    assert nfes("entropy_k4") == [fixed_k_nfe(4)] * 8 == [3] * 8
    assert rows["entropy_k2"]["tokens_per_nfe"] == pytest.approx((R + A) / 6)
    # An untrained model's entropies are near log V: the adaptive samplers fall back to one token per step.
    for name in ("med_0.1", "med_0.2", "med_0.3", "eb_0.1", "threshold_0.9"):
        assert nfes(name) == [R + A] * 8, name
    # Every config scores 0 untrained: fixed k matches k=1 at fewer NFE, the adaptive ones do not save any NFE.
    assert summary["claims"] == {"fixed_k_matches_ref": True, "med_matches_ref": False, "eb_matches_ref": False,
                                 "threshold_matches_ref": False, "entropy_k2_loses_accuracy": False,
                                 "entropy_k4_loses_accuracy": False}
    # With exit, a row's NFE is its no-exit trace cut at the first step with H_UB < gamma.
    no_exit = read_records(ref["output_file"])
    assert nfes("left_to_right_k1_exit") == [exit_outcome(r, gamma, greedy=True)[0] for r in no_exit]
    assert 0 < rows["left_to_right_k1_exit"]["exit_rate"] < 1
    assert rows["left_to_right_k1_exit"]["mean_nfe"] < ref["mean_nfe"]
    for name in rows:
        if name.endswith("_exit"):
            assert all(a <= b for a, b in zip(nfes(name), nfes(name.removesuffix("_exit")))), name

    png = (out / "frontier.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_null_exit_gamma_is_calibrated_on_the_train_split_and_the_summary_is_printed_last(
        tmp_path, model_dir, monkeypatch, capsys):
    out = tmp_path / "frontier"
    argv = ["--model_name_or_path", model_dir, *TASK_ARGS, "--samplers", "left_to_right", "--exit_calibration_size",
            "5", "--frontier_dir", str(out)]
    monkeypatch.setattr(sys, "argv", [SCRIPT, *argv])
    runpy.run_path(SCRIPT, run_name="__main__")  # as the command line runs it, without a second interpreter
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    calibration = read_records(str(out / "calibration.jsonl"))
    train = load_task(TASK, split="train").dataset
    assert [r["prompt"] for r in calibration] == train["prompt"][:5]
    assert summary["exit_gamma_source"] == "calibrated" and summary["exit_gamma"] in GAMMA_GRID
    expected = calibrate_exit_gamma(calibration, 1.0, greedy=True)
    assert summary["exit_gamma"] == expected["exit_gamma"] and summary["calibration"]["n"] == 5
    assert [c["name"] for c in summary["configs"]] == ["left_to_right_k1", "left_to_right_k1_exit"]
