"""The batched sampler against an exact oracle, and its trace, accounting and invariances."""

import dataclasses
import itertools
import math

import pytest
import torch
from doubles import DELIM, MASK, OracleModel, ShiftedTwin, oracle_canvas, tiny_model

from rollout import MDLMAdapter, SamplerConfig, sample

VOCAB = 10
CONTENT = [4, 5, 6]


def dependent_joint(seed: int = 0) -> dict:
    """A joint over 3 reasoning slots + 1 answer slot with strong dependence and structural zeros."""
    g = torch.Generator().manual_seed(seed)
    joint = {}
    for seq in itertools.product(CONTENT, repeat=4):
        w = math.exp(1.5 * torch.randn(1, generator=g).item())
        if seq[0] == seq[1]:
            w *= 6.0  # slots 0 and 1 like to agree
        if seq[3] != CONTENT[(seq[0] + seq[2]) % 3]:
            w = 0.0  # the answer is a function of slots 0 and 2
        if w:
            joint[seq] = w
    return joint


def oracle_setup(joint, batch, n_reasoning=3, n_answer=1, prompt_lens=None, gold=None):
    canvas, slots = oracle_canvas(batch, n_reasoning, n_answer, prompt_lens, gold)
    model = OracleModel(joint, VOCAB, canvas.gen_length, slots)
    return MDLMAdapter(model, mask_id=MASK, pad_id=0, eos_ids=(1,)), canvas, slots


def empirical(out, slots) -> dict:
    seqs = out.generation[:, slots]
    counts = {}
    for row in seqs.tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    return counts


def chi2_pvalue(counts: dict, probs: dict, n: int) -> float:
    stat = sum((counts.get(s, 0) - n * p) ** 2 / (n * p) for s, p in probs.items())
    dof = len(probs) - 1
    return torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2)).item()


def normalised(joint):
    z = sum(joint.values())
    return {s: w / z for s, w in joint.items()}


N_GOF = 12000


@pytest.mark.parametrize("policy", ["left_to_right", "entropy", "confidence", "margin", "med"])
def test_one_token_per_step_matches_the_exact_joint(policy):
    joint = dependent_joint()
    probs = normalised(joint)
    adapter, canvas, slots = oracle_setup(joint, N_GOF)
    config = SamplerConfig(policy=policy, k=1, med_lambda=1e-3, temperature=1.0, seed=123)
    counts = empirical(sample(adapter, canvas, config), slots)
    assert set(counts) <= set(probs), "sampled an out-of-support sequence"
    assert chi2_pvalue(counts, probs, N_GOF) > 1e-3


def test_goodness_of_fit_test_detects_a_five_percent_error():
    """The same statistic at the same sample size rejects a distribution 5% (in mixture weight) off."""
    probs = normalised(dependent_joint())
    seqs = list(probs)
    p = torch.tensor([probs[s] for s in seqs])
    q = 0.95 * p + 0.05 * torch.full_like(p, 1 / len(p))
    draws = torch.multinomial(q, N_GOF, replacement=True, generator=torch.Generator().manual_seed(0))
    counts = {seqs[i]: c for i, c in enumerate(torch.bincount(draws, minlength=len(p)).tolist())}
    assert chi2_pvalue(counts, probs, N_GOF) < 1e-3


def copy_joint():
    """Slot 1 copies slot 0 (a fair coin): high-entropy dependence. Slot 2 and the answer are fixed."""
    return {(4, 4, 6, 5): 0.5, (5, 5, 6, 5): 0.5}


def test_fixed_k2_breaks_dependence_med_does_not():
    adapter, canvas, slots = oracle_setup(copy_joint(), 2000)
    out = sample(adapter, canvas, SamplerConfig(policy="left_to_right", k=2, temperature=1.0))
    seqs = out.generation[:, slots]
    bad = (seqs[:, 0] != seqs[:, 1]).float().mean().item()
    assert 0.4 < bad < 0.6  # the two coin flips are drawn independently: half disagree
    out = sample(adapter, canvas, SamplerConfig(policy="med", med_lambda=0.1, med_k_max=4, temperature=1.0))
    seqs = out.generation[:, slots]
    assert (seqs[:, 0] == seqs[:, 1]).all()


def test_med_uses_fewer_nfe_where_positions_are_near_deterministic():
    joint = {(4, 5, 6, 4): 1.0 - 1e-6, (5, 5, 6, 4): 1e-6}
    adapter, canvas, slots = oracle_setup(joint, 64)
    k1 = sample(adapter, canvas, SamplerConfig(policy="entropy", k=1, temperature=1.0))
    medo = sample(adapter, canvas, SamplerConfig(policy="med", med_lambda=0.2, temperature=1.0))
    assert (k1.nfe == 4).all()  # 3 reasoning steps + 1 answer step
    assert (medo.nfe == 2).all()  # all reasoning in one step, then the answer block
    assert (medo.generation[:, slots] == torch.tensor([4, 5, 6, 4])).all()


def random_model_setup(batch=6, prompt_lens=None, gold=True, scale=1.0):
    torch.manual_seed(0)
    model = tiny_model(VOCAB, layers=2, hidden=32)
    if scale != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(scale)
    canvas, _ = oracle_canvas(batch, 8, 3, prompt_lens or [1 + i % 4 for i in range(batch)],
                              gold=[[4, 5, 1]] * batch if gold else None)
    return MDLMAdapter(model, mask_id=MASK, pad_id=0, eos_ids=(1,), max_length=256), canvas


def test_eb_with_zero_gamma_equals_top1_entropy():
    adapter, canvas = random_model_setup()
    eb = sample(adapter, canvas, SamplerConfig(policy="eb", eb_gamma=0.0, temperature=1.0, seed=5))
    top1 = sample(adapter, canvas, SamplerConfig(policy="entropy", k=1, temperature=1.0, seed=5))
    assert torch.equal(eb.sequences, top1.sequences)
    assert torch.equal(eb.decode_step, top1.decode_step)


def test_early_exit_fires_exactly_when_h_ub_drops_below_gamma():
    adapter, canvas = random_model_setup(batch=8, scale=4.0)
    base = sample(adapter, canvas, SamplerConfig(policy="entropy", temperature=1.0, seed=3))
    valid = base.h_ub[~torch.isnan(base.h_ub)]
    gamma = valid.median().item()
    out = sample(adapter, canvas, SamplerConfig(policy="entropy", temperature=1.0, seed=3, exit_gamma=gamma))
    R = canvas.reasoning.stop
    n_exit = 0
    for i in range(canvas.input_ids.shape[0]):
        below = torch.nonzero(base.h_ub[i, :R] < gamma).squeeze(-1)  # reasoning steps only
        if below.numel():
            t = int(below[0])
            n_exit += 1
            assert out.exit_step[i] == t and out.nfe[i] == t + 1
            assert (out.h_ub[i, :t] >= gamma).all() and out.h_ub[i, t] < gamma
            assert (out.decode_step[i, canvas.answer] == t).all()  # the answer block filled at the exit step
            never = out.decode_step[i, canvas.reasoning] == -1
            assert never.sum() == R - t  # the rest of the reasoning is "not generated"
            assert (out.generation[i, canvas.reasoning][never] == MASK).all()
        else:
            assert out.exit_step[i] == -1 and torch.equal(out.sequences[i], base.sequences[i])
        # Identical trajectory up to the exit step.
        steps = int(out.nfe[i])
        assert torch.allclose(out.h_ub[i, :steps], base.h_ub[i, :steps], atol=1e-6, equal_nan=True)
    assert 0 < n_exit < canvas.input_ids.shape[0] + 1


def test_phi_pruning_stops_a_row_at_its_first_step_below_the_threshold():
    adapter, canvas = random_model_setup(batch=6, scale=3.0)
    config = SamplerConfig(policy="left_to_right", temperature=1.0, seed=2)
    full = sample(adapter, canvas, config)
    R = canvas.reasoning.stop
    threshold = float(full.phi[:, :R].nanmedian())  # some rows cross it during the reasoning, some may not
    pruned = sample(adapter, canvas, dataclasses.replace(config, prune_phi=threshold))
    crossed = 0
    for i in range(6):
        below = (full.phi[i, :R] < threshold).nonzero()
        if not len(below):  # never below: the same row as without pruning
            assert not pruned.pruned[i] and torch.equal(pruned.sequences[i], full.sequences[i])
            continue
        t = int(below[0])
        crossed += 1
        assert pruned.pruned[i] and pruned.exit_step[i] == t and pruned.nfe[i] == t + 1
        # Left to right: the same tokens up to the prune step, then the whole answer block at step t.
        early = full.decode_step[i] < t
        assert torch.equal(pruned.decode_step[i][early], full.decode_step[i][early])
        assert (pruned.decode_step[i][canvas.answer] == t).all()
        assert (pruned.decode_step[i][:R] == -1).sum() == R - t
    assert crossed >= 2
    assert pruned.row(0)["pruned"] == bool(pruned.pruned[0])
    with pytest.raises(ValueError, match="prune_phi must be < 0"):
        SamplerConfig(prune_phi=0.5)
    with pytest.raises(ValueError, match="needs gold answers"):
        sample(adapter, random_model_setup(batch=2, gold=False)[1], SamplerConfig(prune_phi=-1.0))


def test_shifted_twin_gives_identical_samples():
    adapter, canvas = random_model_setup()
    twin = MDLMAdapter(ShiftedTwin(adapter.model), mask_id=MASK, pad_id=0, shift_logits=True)
    config = SamplerConfig(policy="med", med_lambda=0.5, temperature=1.0, seed=11)
    a, b = sample(adapter, canvas, config), sample(twin, canvas, config)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.decode_step, b.decode_step)
    assert torch.allclose(a.token_logprob, b.token_logprob) and torch.allclose(a.phi, b.phi, equal_nan=True)


@pytest.mark.parametrize("policy", ["med", "eb", "threshold"])
def test_batch_invariance_alone_versus_in_a_mixed_batch(policy):
    adapter, canvas = random_model_setup(batch=5, prompt_lens=[1, 4, 2, 6, 3], scale=3.0)
    config = SamplerConfig(policy=policy, med_lambda=0.5, eb_gamma=0.5, tau=0.3, temperature=1.0,
                           exit_gamma=4.0, block_length=4)
    seeds = [101, 7, 55, 3, 9]
    batch = sample(adapter, canvas, config, seeds=seeds)
    for i in range(5):
        n = int(canvas.attention_mask[i].sum()) - canvas.gen_length  # this row's prompt length
        single, _ = oracle_canvas(1, 8, 3, [n], gold=[[4, 5, 1]])
        alone = sample(adapter, single, config, seeds=[seeds[i]])
        assert torch.equal(alone.generation[0], batch.generation[i])
        assert torch.equal(alone.decode_step[0], batch.decode_step[i])
        assert alone.nfe[0] == batch.nfe[i] and alone.exit_step[0] == batch.exit_step[i]
        assert torch.allclose(alone.token_logprob[0], batch.token_logprob[i], atol=1e-5)
        steps = int(alone.nfe[0])
        assert torch.allclose(alone.phi[0, :steps], batch.phi[i, :steps], atol=1e-5, equal_nan=True)


def test_phi_matches_a_separate_forward_at_every_step():
    adapter, canvas = random_model_setup(batch=3, scale=2.0)
    # row 0 scores all three gold positions, rows 1 and 2 leave trailing padding out (Canvas.gold_scored)
    scored = torch.tensor([[True, True, True], [True, True, False], [True, False, False]])
    canvas = dataclasses.replace(canvas, gold_scored=scored)
    config = SamplerConfig(policy="med", med_lambda=0.5, temperature=1.0, seed=1)
    out = sample(adapter, canvas, dataclasses.replace(config, record_answer_guess=True))
    plain = sample(adapter, canvas, config)
    assert torch.equal(out.sequences, plain.sequences) and plain.answer_guess is None  # recording changes nothing
    assert out.stats["row_forwards"] == plain.stats["row_forwards"]  # and costs no forward
    undefined = torch.isnan(out.h_ub)  # [B, S]
    assert (out.answer_guess[undefined] == -1).all() and (out.answer_guess[~undefined] >= 0).all()
    calls = adapter.forward_calls
    g0 = canvas.gen_start
    checked = 0
    for t in range(int(out.nfe.max())):
        state = out.state_at(t)  # [B, G]
        for i in range(3):
            if t >= out.nfe[i] or torch.isnan(out.phi[i, t]):
                continue
            ids = torch.cat([canvas.input_ids[i, :g0], state[i]])[None]
            am = canvas.attention_mask[i][None]
            with torch.no_grad():
                logits = adapter.model(input_ids=ids, attention_mask=am).logits[0, g0:].double()
            logits[:, MASK] = -math.inf  # the mask token is never a prediction
            logp = torch.log_softmax(logits[canvas.answer], -1)
            direct = logp.gather(-1, canvas.gold[i][:, None]).squeeze(-1)[scored[i]].sum().item()
            assert out.phi[i, t].item() == pytest.approx(direct, abs=1e-5)
            assert torch.equal(out.answer_guess[i, t], logp.argmax(-1))  # the answer it would give now
            checked += 1
    assert checked >= 3 * canvas.reasoning.stop  # every reasoning step + the first answer step of each row
    assert adapter.forward_calls == calls  # the checks above bypassed the adapter
    assert out.stats["row_forwards"] == int(out.nfe.sum())  # phi cost no extra forward


def test_answer_temperature_draws_the_answer_greedily_and_leaves_the_reasoning_draws_alone():
    adapter, canvas = random_model_setup(batch=6, scale=0.5)  # flat logits: T=1 answers are rarely the argmax
    config = SamplerConfig(policy="entropy", temperature=1.0, seed=7)
    hot = sample(adapter, canvas, config)
    cold = sample(adapter, canvas, dataclasses.replace(config, answer_temperature=0.0))
    R, g0 = canvas.reasoning, canvas.gen_start
    assert torch.equal(cold.generation[:, R], hot.generation[:, R])  # same reasoning draws, same streams
    mismatches = 0
    for i in range(6):
        for col in range(canvas.answer.start, canvas.answer.stop):
            state = cold.state_at(int(cold.decode_step[i, col]))[i]
            ids = torch.cat([canvas.input_ids[i, :g0], state])[None]
            with torch.no_grad():
                logits = adapter.model(input_ids=ids, attention_mask=canvas.attention_mask[i][None]).logits
            logits = logits[0, g0 + col]
            logits[MASK] = -math.inf
            assert int(cold.generation[i, col]) == int(logits.argmax())  # greedy given the state it was decoded in
            hot_state = hot.state_at(int(hot.decode_step[i, col]))[i]
            mismatches += not torch.equal(hot_state, state) or int(hot.generation[i, col]) != int(logits.argmax())
    assert mismatches > 0  # at T=1 some answer tokens were not the argmax: the setting changed something
    with pytest.raises(ValueError, match="answer_temperature"):
        SamplerConfig(answer_temperature=-0.5)


def test_nfe_accounting_is_exact_and_finished_rows_leave_the_batch():
    adapter, canvas = random_model_setup(batch=4)
    R, A = 8, 3
    for k in (1, 3):
        out = sample(adapter, canvas, SamplerConfig(policy="left_to_right", k=k))
        assert (out.nfe == math.ceil(R / k) + math.ceil(A / k)).all()
        assert out.stats["forwards"] == int(out.nfe.max()) and out.stats["row_forwards"] == int(out.nfe.sum())
        assert out.stats["tokens_decoded"] == 4 * (R + A)
    # Rows with different amounts of work: the batch forward count follows the slowest row only.
    joint = {(4, 5, 6, 4): 1.0 - 1e-6, (5, 5, 6, 4): 1e-6}
    adapter, canvas, _ = oracle_setup(joint, 3)
    canvas.input_ids[0, canvas.gen_start : canvas.gen_start + 2] = torch.tensor([4, 5])  # row 0 pre-filled
    sizes = []
    orig = adapter.model.forward

    def recording(input_ids, attention_mask=None):
        sizes.append(input_ids.shape[0])
        return orig(input_ids, attention_mask)

    adapter.model.forward = recording
    out = sample(adapter, canvas, SamplerConfig(policy="left_to_right", k=1))
    assert out.nfe.tolist() == [2, 4, 4]
    assert sizes == [3, 3, 2, 2]


def test_prefilled_answer_posterior_sampling_keeps_the_answer():
    adapter, canvas = random_model_setup(batch=3)
    post = canvas.fill_answer()
    out = sample(adapter, post, SamplerConfig(policy="left_to_right", temperature=1.0))
    assert torch.equal(out.generation[:, canvas.answer], canvas.gold)
    assert (out.nfe == 8).all() and (out.decode_step[:, canvas.answer] == -1).all()
    assert torch.isnan(out.phi).all()  # the answer is given, so there is no answer-block potential


def test_semi_ar_blocks_are_decoded_in_order_and_answer_last():
    adapter, canvas = random_model_setup(batch=4, scale=3.0)
    out = sample(adapter, canvas, SamplerConfig(policy="med", med_lambda=1.0, block_length=4, temperature=1.0))
    ds = out.decode_step
    assert (ds[:, 0:4].max(-1).values < ds[:, 4:8].min(-1).values).all()
    assert (ds[:, 4:8].max(-1).values < ds[:, canvas.answer].min(-1).values).all()


def test_greedy_is_deterministic_and_records_t1_logprob():
    adapter, canvas = random_model_setup(batch=2)
    a = sample(adapter, canvas, SamplerConfig(policy="entropy", seed=0))
    b = sample(adapter, canvas, SamplerConfig(policy="entropy", seed=99))
    assert torch.equal(a.sequences, b.sequences)
    assert (a.token_logprob[a.generated] < 0).all()


def test_bad_sampler_input_is_rejected():
    adapter, canvas = random_model_setup(batch=2)
    with pytest.raises(ValueError, match="does not divide"):
        sample(adapter, canvas, SamplerConfig(block_length=3))
    for bad in ({"temperature": -1.0}, {"exit_gamma": 0.0}, {"exit_gamma": -2.0}, {"block_length": 0}):
        with pytest.raises(ValueError):
            SamplerConfig(**bad)
    with pytest.raises(ValueError, match="seeds"):
        sample(adapter, canvas, SamplerConfig(), seeds=[1, 2, 3])
    plain = canvas
    plain.answer = None
    with pytest.raises(ValueError, match="plain"):
        sample(adapter, plain, SamplerConfig(exit_gamma=1.0))
    assert DELIM not in (MASK,)
