"""Diffusion log-prob estimators: exactness of the trajectory replay, determinism (on-policy ratio 1)."""

import torch
from doubles import MASK, oracle_canvas, tiny_model

from rl.logprobs import (
    ESTIMATORS,
    EstimatorOptions,
    coupled_logps,
    mean_field_logps,
    step_weights,
    trajectory_logps,
    trajectory_steps,
)
from rollout import MDLMAdapter, SamplerConfig, sample


def rollout(temperature=0.7, exit_gamma=None):
    model = tiny_model(10, layers=2, hidden=32, seed=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)
    adapter = MDLMAdapter(model, mask_id=MASK, pad_id=0, eos_ids=(1,))
    canvas, _ = oracle_canvas(6, 8, 3, [1, 3, 2, 5, 1, 4], gold=[[4, 5, 1]] * 6)
    config = SamplerConfig(policy="med", med_lambda=0.6, temperature=temperature, exit_gamma=exit_gamma)
    return adapter, sample(adapter, canvas, config, seeds=list(range(6)))


def test_trajectory_with_one_bucket_per_step_equals_the_samplers_logprobs():
    _, probe = rollout()
    adapter, out = rollout(exit_gamma=probe.h_ub[~probe.h_ub.isnan()].median().item())
    assert out.exited.any() and (out.nfe > 1).any()
    S = int(out.nfe.max())
    with torch.no_grad():
        lp, _ = trajectory_logps(adapter.logits, out.sequences, out.attention_mask, out.gen_start, out.decode_step,
                              out.nfe, MASK, buckets=S, temperature=0.7)
    gen = out.generated
    assert torch.allclose(lp[gen], out.token_logprob[gen], atol=1e-5)
    assert (lp[~gen] == 0).all()


def test_trajectory_with_fewer_buckets_uses_the_bucket_start_state():
    adapter, out = rollout()
    with torch.no_grad():
        one, _ = trajectory_logps(adapter.logits, out.sequences, out.attention_mask, out.gen_start, out.decode_step,
                               out.nfe, MASK, buckets=1, temperature=0.7)
        mf, _ = mean_field_logps(adapter.logits, out.sequences, out.attention_mask, out.gen_start, out.generated,
                              torch.arange(6), MASK, temperature=0.7, prompt_mask_prob=0.0)
    # One bucket = the state at step 0 = every generated token masked = mean field without prompt masking.
    assert torch.allclose(one, mf, atol=1e-6)


def test_estimators_are_deterministic_and_batch_invariant():
    adapter, out = rollout()
    seeds = torch.tensor([11, 12, 13, 14, 15, 16])
    args = (adapter.logits, out.sequences, out.attention_mask, out.gen_start, out.generated, seeds, MASK, 0.7)
    with torch.no_grad():
        for fn in (mean_field_logps, coupled_logps):
            (a, ea), (b, _) = fn(*args), fn(*args)
            assert torch.equal(a, b)  # old == current before an update: ratio exactly 1
            rows = [1, 4]
            sub, _ = fn(adapter.logits, out.sequences[rows], out.attention_mask[rows], out.gen_start,
                     out.generated[rows], seeds[rows], MASK, 0.7)
            assert torch.allclose(sub, a[rows], atol=1e-5)
            assert (a[out.generated] < 0).all() and (a[~out.generated] == 0).all()
            assert (ea[out.generated] > 0).all() and (ea[~out.generated] == 0).all()


def test_coupled_scores_each_token_once_in_the_pass_where_it_is_masked():
    adapter, out = rollout()
    seeds = torch.arange(6)
    with torch.no_grad():
        lp, _ = coupled_logps(adapter.logits, out.sequences, out.attention_mask, out.gen_start, out.generated, seeds,
                           MASK, 1.0)
        g = torch.Generator().manual_seed(0)
        first = (torch.rand(out.generated.shape[1], generator=g, dtype=torch.float64) < 0.5) & out.generated[0]
        x = out.sequences[:1].clone()
        x[0, out.gen_start:][first] = MASK
        logits = adapter.logits(x, out.attention_mask[:1], out.generation.shape[1])[0]
        direct = torch.log_softmax(logits, -1).gather(-1, out.generation[0][:, None]).squeeze(-1)
    assert first.any() and torch.allclose(lp[0][first], direct[first], atol=1e-5)


def test_sampled_trajectory_steps_score_their_tokens_exactly_and_nothing_else():
    adapter, out = rollout()
    seeds = torch.arange(6) + 100
    steps = trajectory_steps(seeds, out.nfe, 2)
    assert torch.equal(steps, trajectory_steps(seeds, out.nfe, 2))  # seeded: old and current agree
    assert torch.equal(steps[2:4], trajectory_steps(seeds[2:4], out.nfe[2:4], 2))  # per row, batch invariant
    for i, n in enumerate(out.nfe.tolist()):
        picked = steps[i][steps[i] >= 0]
        assert len(picked) == min(2, n) and (picked < n).all() and len(set(picked.tolist())) == len(picked)
    with torch.no_grad():
        lp, _ = trajectory_logps(adapter.logits, out.sequences, out.attention_mask, out.gen_start, out.decode_step,
                                 out.nfe, MASK, buckets=1, temperature=0.7, steps=steps)
    chosen = (out.decode_step[:, :, None] == steps[:, None, :]).any(-1) & out.generated
    assert chosen.any() and (chosen != out.generated).any()
    assert torch.allclose(lp[chosen], out.token_logprob[chosen], atol=1e-5)  # each from its exact state
    assert (lp[~chosen] == 0).all()
    all_steps = trajectory_steps(seeds, out.nfe, int(out.nfe.max()))
    with torch.no_grad():
        full, _ = trajectory_logps(adapter.logits, out.sequences, out.attention_mask, out.gen_start,
                                   out.decode_step, out.nfe, MASK, buckets=1, temperature=0.7, steps=all_steps)
    assert torch.allclose(full[out.generated], out.token_logprob[out.generated], atol=1e-5)


def test_every_estimator_runs_a_fixed_number_of_forwards_whatever_the_data():
    """ZeRO-3 gathers parameters per forward: a data-dependent forward count would hang the processes."""
    adapter, out = rollout()
    calls = []

    def counting(*args):
        calls.append(1)
        return adapter.logits(*args)

    seeds = torch.arange(6)
    for rows in ([0, 1, 2, 3, 4, 5], [int(out.nfe.argmin())]):  # a one-row batch with the fewest steps too
        nfe = out.nfe[rows].clone()
        nfe_one = torch.ones_like(nfe)  # rows that took a single step: 7 of 8 buckets score nothing
        decode_one = torch.where(out.decode_step[rows] >= 0, 0, -1)
        common = (out.sequences[rows], out.attention_mask[rows], out.gen_start)
        with torch.no_grad():
            for decode_step, n in ((out.decode_step[rows], nfe), (decode_one, nfe_one)):
                calls.clear()
                trajectory_logps(counting, *common, decode_step, n, MASK, buckets=8)
                assert len(calls) == 8
                calls.clear()
                steps = trajectory_steps(seeds[rows], n, 3)
                trajectory_logps(counting, *common, decode_step, n, MASK, buckets=8, steps=steps)
                assert len(calls) == 3
            calls.clear()
            mean_field_logps(counting, *common, out.generated[rows], seeds[rows], MASK)
            assert len(calls) == 1
            calls.clear()
            coupled_logps(counting, *common, out.generated[rows], seeds[rows], MASK)
            assert len(calls) == 2


def test_step_weights_are_nfe_over_steps_drawn():
    steps = torch.tensor([[0, 3, 5], [1, -1, -1], [-1, -1, -1]])
    assert torch.equal(step_weights(steps, torch.tensor([9, 4, 2])), torch.tensor([3.0, 4.0, 2.0]))


def test_every_registered_estimator_takes_one_signature():
    adapter, out = rollout()
    trace = {"decode_step": out.decode_step, "nfe": out.nfe, "mask_seed": torch.arange(6)}
    options = EstimatorOptions(temperature=0.7, buckets=3, prompt_mask_prob=0.0)
    with torch.no_grad():
        direct = {
            "mean_field": mean_field_logps(adapter.logits, out.sequences, out.attention_mask, out.gen_start,
                                           out.generated, torch.arange(6), MASK, 0.7, 0.0)[0],
            "coupled": coupled_logps(adapter.logits, out.sequences, out.attention_mask, out.gen_start, out.generated,
                                     torch.arange(6), MASK, 0.7)[0],
            "trajectory": trajectory_logps(adapter.logits, out.sequences, out.attention_mask, out.gen_start,
                                           out.decode_step, out.nfe, MASK, 3, 0.7)[0],
        }
        assert set(ESTIMATORS) == set(direct)
        for name, estimator in ESTIMATORS.items():
            lp, ent = estimator(adapter.logits, out.sequences, out.attention_mask, out.gen_start, trace, MASK, options)
            assert torch.equal(lp, direct[name]) and ent.shape == lp.shape, name
