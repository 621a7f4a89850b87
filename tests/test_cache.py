"""KV cache for semi-AR rollouts: the trajectory estimator replays the cached conditionals exactly (ratio 1, the
sampler's own log-probs), refresh steps are the uncached forward, and bad requests are refused."""

import dataclasses

import pytest
import torch
from doubles import MASK, OracleModel, oracle_canvas, tiny_model

from rl.logprobs import ESTIMATORS, EstimatorOptions, trajectory_logps, trajectory_steps
from rollout import MDLMAdapter, SamplerConfig, sample

V = 19


def _adapter(shift=False):
    model = tiny_model(V, layers=2, hidden=32, seed=2)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    return MDLMAdapter(model, mask_id=MASK, pad_id=0, eos_ids=(1,), shift_logits=shift)


def _rollout(adapter, kv_cache, exit_gamma=None, **kwargs):
    canvas, _ = oracle_canvas(4, 8, 3, [1, 3, 2, 1], gold=[[4, 5, 1]] * 4)
    config = SamplerConfig(policy="med", med_lambda=1.2, block_length=4, temperature=0.9, kv_cache=kv_cache,
                           exit_gamma=exit_gamma, **kwargs)
    return sample(adapter, canvas, config, seeds=[5, 6, 7, 8])


def _replay(adapter, out, buckets=None, steps=None, cache=True):
    return trajectory_logps(adapter.logits, out.sequences, out.attention_mask, out.gen_start, out.decode_step,
                            out.nfe, MASK, buckets=buckets or int(out.nfe.max()), temperature=0.9, steps=steps,
                            cache=out.cache_plan if cache else None)[0]


@pytest.mark.parametrize("mode,shift", [("prefix", False), ("dual", False), ("dual", True)])
def test_the_trajectory_replay_of_a_cached_rollout_gives_the_samplers_log_probs(mode, shift):
    adapter = _adapter(shift)
    out = _rollout(adapter, mode)
    assert out.stats["cached_steps"] > 0 and out.stats["refreshes"] > 0 and out.cache_plan.mode == mode
    with torch.no_grad():
        lp = _replay(adapter, out)
        again = _replay(adapter, out)
        uncached = _replay(adapter, out, cache=False)
    gen = out.generated
    assert torch.equal(lp, again)  # old == current: the on-policy ratio is exactly 1
    assert torch.allclose(lp[gen], out.token_logprob[gen], atol=1e-5) and (lp[~gen] == 0).all()
    assert (uncached[gen] - out.token_logprob[gen]).abs().max() > 1e-3  # the cache changed the conditionals


def test_sampled_steps_of_a_cached_rollout_are_scored_from_their_cached_state():
    adapter = _adapter()
    out = _rollout(adapter, "prefix", exit_gamma=2.0)
    steps = trajectory_steps(torch.arange(4), out.nfe, 3)
    with torch.no_grad():
        lp = _replay(adapter, out, steps=steps)
    chosen = (out.decode_step[:, :, None] == steps[:, None, :]).any(-1) & out.generated
    assert chosen.any() and torch.allclose(lp[chosen], out.token_logprob[chosen], atol=1e-5)


def test_a_block_decoded_in_one_step_is_only_refreshes_and_equals_the_uncached_sampler():
    adapter = _adapter()
    canvas, _ = oracle_canvas(3, 8, 3, [1, 2, 3])
    config = SamplerConfig(policy="entropy", k=4, block_length=4, temperature=0.9)
    plain = sample(adapter, canvas, config, seeds=[1, 2, 3])
    cached = sample(adapter, canvas, dataclasses.replace(config, kv_cache="dual"), seeds=[1, 2, 3])
    assert cached.stats["cached_steps"] == 0 and cached.stats["refreshes"] == plain.stats["forwards"]
    assert torch.equal(plain.sequences, cached.sequences)
    assert torch.allclose(plain.token_logprob, cached.token_logprob, atol=1e-5)


def test_the_registered_estimator_replays_the_cache_and_other_estimators_refuse_it():
    adapter = _adapter()
    out = _rollout(adapter, "dual")
    trace = {"decode_step": out.decode_step, "nfe": out.nfe, "mask_seed": torch.arange(4)}
    options = EstimatorOptions(temperature=0.9, buckets=int(out.nfe.max()), cache=out.cache_plan)
    with torch.no_grad():
        lp, _ = ESTIMATORS["trajectory"](adapter.logits, out.sequences, out.attention_mask, out.gen_start, trace, MASK,
                                         options)
        assert torch.allclose(lp[out.generated], out.token_logprob[out.generated], atol=1e-5)
        for name in ("mean_field", "coupled"):
            with pytest.raises(ValueError, match="only the trajectory estimator replays"):
                ESTIMATORS[name](adapter.logits, out.sequences, out.attention_mask, out.gen_start, trace, MASK,
                                 options)


def test_gradients_flow_through_the_cached_context():
    adapter = _adapter()
    out = _rollout(adapter, "prefix")
    _replay(adapter, out, buckets=3).sum().backward()
    q0 = adapter.model.model.layers[0].self_attn.k_proj.weight.grad
    assert q0 is not None and q0.abs().sum() > 0


def test_a_cache_is_refused_without_blocks_or_for_a_model_that_cannot_use_it():
    with pytest.raises(ValueError, match="needs semi-autoregressive blocks"):
        SamplerConfig(kv_cache="prefix")
    with pytest.raises(ValueError, match="kv_cache='full'"):
        SamplerConfig(kv_cache="full", block_length=4)
    canvas, slots = oracle_canvas(2, 4, 1)
    oracle = MDLMAdapter(OracleModel({(4, 4, 4, 4, 4): 1.0}, 10, canvas.gen_length, slots), mask_id=MASK, pad_id=0)
    with pytest.raises(ValueError, match="cannot use it"):
        sample(oracle, canvas, SamplerConfig(block_length=2, kv_cache="prefix"))


def test_grpo_with_a_cached_sampler_has_ratio_one_and_scores_the_samplers_log_probs(tmp_path):
    from test_trainer import answer_match, setup

    from rl.generation import BATCH_FIELDS
    from rl.trainer import DiffusionGRPOTrainer

    tok, model, ds, args = setup(tmp_path, num_iterations=2, block_length=2, kv_cache="dual", trajectory_buckets=8,
                                 policy="med", med_lambda=2.0, parallel_guard=True)
    trainer = DiffusionGRPOTrainer(model=model, reward_funcs=[answer_match], args=args, train_dataset=ds,
                                   processing_class=tok)
    trainer.model.train()
    batch = trainer._generate_and_score_completions([dict(x) for x in ds.select(range(4))])
    out = trainer.generation.rollout
    assert out.cache_plan is not None and out.stats["cached_steps"] > 0 and int(out.nfe.max()) <= 8
    trainer._trace = {k: batch[k] for k in BATCH_FIELDS if k in batch}  # as `_compute_loss` sets it
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    am = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    keep = batch["completion_ids"].shape[1]
    current, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, am, keep)
    assert torch.equal(current.detach(), batch["old_per_token_logps"])  # ratio exactly 1
    in_loss = batch["loss_mask"].bool()
    assert torch.allclose(current.detach()[in_loss], out.token_logprob[in_loss], atol=1e-5)  # the sampled policy
    trainer._trace = None
    trainer.train()
    logs = trainer.state.log_history[0]
    assert {"rollout/guard_cap", "rollout/guard_alarm", "rollout/answer_entropy", "rollout/decode_nll"} <= set(logs)
