"""scripts/bench_gpu.py: a CPU smoke run of every measurement on a tiny model, and the real 8B run on a GPU."""

import importlib.util
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", os.path.join(ROOT, "scripts", "bench_gpu.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_bench_measures_forwards_rollouts_and_one_grpo_step():
    result = _bench().main(["--tiny", "--device", "cpu", "--repeats", "2", "--rows", "4"])
    assert result["ms_per_nfe"] > 0 and result["logit_temperature"] > 0
    k1, med = result["rollouts"]["left_to_right_k1"], result["rollouts"]["med_0.2"]
    assert k1["nfe_per_row"] == 24 + 4 and k1["tokens_per_nfe"] == 1.0  # one token per forward over R + A
    assert med["tokens_per_nfe"] >= 1.0 and med["nfe_per_row"] <= k1["nfe_per_row"]
    assert 0 <= result["rollouts"]["med_0.2_exit"]["exit_rate"] <= 1
    assert all(0 <= r["sampler_overhead"] < 1 for r in result["rollouts"].values())
    assert result["grpo_step"]["trainable_params"] > 0 and result["grpo_step"]["peak_memory_gib"] is None
    cache = result["cache"]
    assert set(cache) == {f"{p}/{c}" for p in ("k1", "med", "med_exit") for c in ("none", "prefix", "dual")}
    assert cache["k1/none"]["speedup_vs_no_cache"] == 1.0 and cache["k1/dual"]["nfe_per_row"] == 24 + 4
    assert cache["k1/dual"]["columns_run"] < cache["k1/prefix"]["columns_run"] < cache["k1/none"]["columns_run"]
    for estimator in ("buckets", "sampled_steps"):
        assert result["update_memory"][estimator]["loss_tokens"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_8b_shaped_bench_on_gpu():
    result = _bench().main([])
    assert result["params_billion"] > 7 and result["grpo_step"]["peak_memory_gib"] > 0
    assert result["update_memory"]["buckets"]["peak_memory_gib"] > 0
    assert result["cache"]["med/prefix"]["rows_per_s"] > 0
