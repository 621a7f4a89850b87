"""Evaluation: answer checking, per-row seeds independent of batching, the script's JSONL and JSON summary,
LoRA adapter directories, and a model without a mask token."""

import json
import os
import subprocess
import sys

import pytest
import torch
from doubles import save_scratch_policy

from rl.evaluate import EvalConfig, check_answers, check_reasoning, evaluate, row_seed
from rl.models import ModelConfig, load_for_inference
from rl.tasks import TaskConfig, load_task
from rollout import MDLMAdapter, SamplerConfig, TemplateConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = TaskConfig(test_size=7, min_ops=1, max_ops=2)
TEMPLATE = TemplateConfig(reasoning_length=16, answer_length=3)


def test_answer_checking_is_the_math_reward():
    golds = ["12", "12", "1200", "18", "12", "12", "#### 7", "\\frac{1}{2}", "\\frac{1}{2}"]
    answers = ["12", " 12.", "1,200", "18.0", "", "13", "7 apples", "\\frac {1}{2}", "0.25"]
    assert check_answers(golds, answers) == [True, True, True, True, False, False, True, True, False]
    assert row_seed(0, 1) != row_seed(1, 0)


def test_reasoning_checks_read_the_chain_conclusion_and_compare_the_answer_to_it():
    golds = ["9", "9", "9", "9"]
    reasonings = ["Add 5 to get 12. Subtract 3 to get 9.", "Add 5 to get 12. Subtract 3 to get 8.",
                  "Add 5 to get 12. Subtract 3 to get 8.", "no number here"]
    answers = ["9", "9", "8", "9"]
    right, follows = check_reasoning(golds, reasonings, answers)
    assert right == [True, False, False, False]
    assert follows == [True, False, True, False]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved, untrained tiny model with its word-level tokenizer."""
    data = load_task(TASK, split="test").dataset
    texts = [*data["prompt"], *data["reasoning"], *data["answer"], TEMPLATE.delimiter]
    return save_scratch_policy(tmp_path_factory.mktemp("tiny"), texts, seed=1)


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_results_do_not_depend_on_batch_size(tmp_path, model_dir):
    model, tok = load_for_inference(ModelConfig(model_name_or_path=model_dir), "cpu")
    adapter = MDLMAdapter.from_pretrained(model, tok)
    data = load_task(TASK, split="test").dataset
    # Left-to-right at T=1: the order is fixed and every token is a Gumbel draw from the row's own stream. (An
    # untrained model's entropies are near-ties, so entropy-ranked orders would flip on float noise.)
    sampler = SamplerConfig(policy="left_to_right", k=2, temperature=1.0, seed=3)
    runs = []
    for bs in (1, 3, 7):
        out = tmp_path / f"bs{bs}.jsonl"
        summary = evaluate(adapter, tok, data, TEMPLATE, sampler, EvalConfig(batch_size=bs), str(out), progress=False)
        runs.append([{k: r[k] for k in ("index", "reasoning", "answer", "decode_step", "nfe")} for r in _records(out)])
        assert summary["n"] == 7
    assert runs[0] == runs[1] == runs[2]


def test_script_writes_traces_and_prints_summary_last(tmp_path, model_dir):
    out = tmp_path / "samples.jsonl"
    args = ["--model_name_or_path", model_dir, "--test_size", "7", "--min_ops", "1", "--max_ops", "2",
            "--reasoning_length", "16", "--answer_length", "3", "--policy", "left_to_right", "--exit_gamma", "5.0",
            "--output_file", str(out)]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "evaluate.py"), *args],
                          capture_output=True, text=True, check=True)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["n"] == 7 and summary["policy"] == "left_to_right"
    assert {"accuracy", "mean_nfe", "exit_rate", "wall_seconds", "bad_rows"} <= set(summary)
    records = _records(out)
    assert len(records) == 7
    first = records[0]
    assert {"prompt", "gold", "reasoning", "answer", "correct", "nfe", "decode_step", "h_ub", "phi"} <= set(first)
    assert summary["accuracy"] == sum(r["correct"] for r in records) / 7
    assert summary["mean_nfe"] == sum(r["nfe"] for r in records) / 7
    assert summary["exit_rate"] == sum(r["exit_step"] >= 0 for r in records) / 7
    assert summary["reasoning_accuracy"] == sum(r["reasoning_correct"] for r in records) / 7
    assert summary["answer_follows_reasoning"] == sum(r["answer_follows_reasoning"] for r in records) / 7


def test_lora_adapter_dir_is_merged_onto_its_base(tmp_path, model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                                LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(adapter_dir)
    merged, tok = load_for_inference(ModelConfig(model_name_or_path=str(adapter_dir)), "cpu")
    ids = torch.tensor([tok("Mia has 3 apples.")["input_ids"]])
    expected = peft_model.eval()(input_ids=ids).logits
    assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-5)
    base = load_for_inference(ModelConfig(model_name_or_path=model_dir), "cpu")[0]
    assert not torch.allclose(base(input_ids=ids).logits, expected, atol=1e-3)


def test_model_without_mask_token_is_a_clear_error(tmp_path, model_dir):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = AutoTokenizer.from_pretrained(model_dir)
    no_mask = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, pad_token="<pad>", eos_token="<eos>")
    path = tmp_path / "nomask"
    load_for_inference(ModelConfig(model_name_or_path=model_dir), "cpu")[0].save_pretrained(path)
    no_mask.save_pretrained(path)
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_script", os.path.join(ROOT, "scripts", "evaluate.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(ValueError, match="no mask token"):
        script.main(["--model_name_or_path", str(path), "--test_size", "7",
                     "--output_file", str(tmp_path / "x.jsonl")])


def test_cpu_threads_sets_torch_threads_and_rejects_negatives(model_dir):
    with pytest.raises(ValueError, match="cpu_threads"):
        ModelConfig(model_name_or_path=model_dir, cpu_threads=-1)
    before = torch.get_num_threads()
    try:
        load_for_inference(ModelConfig(model_name_or_path=model_dir, cpu_threads=1), "cpu")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
