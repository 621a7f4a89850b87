"""Intrinsic rewards on hand-written traces with hand-computed values, telescoping, and one real sampler trace."""

import math

import pytest
import torch

from rewards.intrinsic import held, neg_h_ub, phi_final, phi_step_rewards, phi_token_credit
from rewards.registry import INTRINSIC_REWARDS, get_intrinsic_reward

NAN = float("nan")

# Row 0: 4 reasoning positions decoded at steps 0, 1, 1, 2; the answer block (last 2 columns) at step 3.
# Row 1: early exit at step 1: reasoning position 0 at step 0, positions 1-3 never decoded, answer at step 1.
# Row 2: answer block prefilled (posterior sampling): phi never defined.
PHI = torch.tensor(
    [
        [-5.0, -4.0, -2.5, -1.0, NAN],
        [-3.0, -3.5, NAN, NAN, NAN],
        [NAN, NAN, NAN, NAN, NAN],
    ],
    dtype=torch.float64,
)  # [B=3, S=5]
DECODE = torch.tensor(
    [
        [0, 1, 1, 2, 3, 3],
        [0, -1, -1, -1, 1, 1],
        [0, 1, 2, 3, -1, -1],
    ]
)  # [B=3, G=6]


def test_step_rewards_by_hand():
    expected = torch.tensor(
        [
            [1.0, 1.5, 1.5, 0.0, 0.0],  # phi(t+1) - phi(t); phi held at phi_T = -1 from step 3 on
            [-0.5, 0.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0, 0.0],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(phi_step_rewards(PHI), expected)


def test_token_credit_by_hand():
    rtg = torch.tensor(
        [
            [4.0, 3.0, 3.0, 1.5, 0.0, 0.0],  # phi_T - phi(s_i) with phi_T = -1
            [-0.5, 0.0, 0.0, 0.0, 0.0, 0.0],  # phi_T = -3.5; never-decoded positions get 0
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        ],
        dtype=torch.float64,
    )
    immediate = torch.tensor(
        [
            [1.0, 1.5, 1.5, 1.5, 0.0, 0.0],
            [-0.5, 0.0, 0.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(phi_token_credit(DECODE, PHI, "return_to_go"), rtg)
    torch.testing.assert_close(phi_token_credit(DECODE, PHI, "immediate"), immediate)


def test_phi_final_and_entropy_by_hand():
    out = phi_final(PHI)
    assert out[:2].tolist() == [-1.0, -3.5] and math.isnan(out[2])
    h_ub = torch.tensor([[4.0, 2.0, 0.5, NAN], [3.0, NAN, NAN, NAN], [NAN] * 4], dtype=torch.float64)
    final, mean = neg_h_ub(h_ub, "final"), neg_h_ub(h_ub, "mean")
    assert final[:2].tolist() == [-0.5, -3.0] and math.isnan(final[2])
    assert mean[:2].tolist() == [-6.5 / 3, -3.0] and math.isnan(mean[2])


def test_held_forward_fills_and_extends():
    expected = torch.tensor([[-5.0, -4.0, -2.5, -1.0, -1.0, -1.0]], dtype=torch.float64)
    torch.testing.assert_close(held(PHI[:1]), expected)


def test_return_to_go_telescopes_on_random_traces():
    g = torch.Generator().manual_seed(0)
    B, S, G = 16, 12, 20
    phi = torch.randn(B, S, generator=g, dtype=torch.float64).cumsum(-1)
    defined = torch.randint(1, S + 1, (B,), generator=g)  # rows define phi for steps < defined[b]
    phi[torch.arange(S)[None] >= defined[:, None]] = NAN
    decode = torch.randint(-1, S, (B, G), generator=g)
    rtg = phi_token_credit(decode, phi, "return_to_go")
    r = phi_step_rewards(phi)  # [B, S]
    suffix = r.flip(-1).cumsum(-1).flip(-1)  # [B, S] sum_{t >= s} r_t
    s = decode.clamp(min=0)
    expected = torch.where(decode >= 0, suffix.gather(-1, s), torch.zeros_like(rtg))
    torch.testing.assert_close(rtg, expected)
    # ... and equals phi_T - phi(s_i), with phi(s) = phi_T past the last defined step.
    phi_T = phi_final(phi)
    phi_s = torch.where(s < defined[:, None], phi.nan_to_num().gather(-1, s), phi_T[:, None])
    torch.testing.assert_close(rtg, torch.where(decode >= 0, phi_T[:, None] - phi_s, torch.zeros_like(rtg)))
    torch.testing.assert_close(r.sum(-1), phi_T - phi[:, 0])
    imm = phi_token_credit(decode, phi, "immediate")
    torch.testing.assert_close(imm, torch.where(decode >= 0, r.gather(-1, s), torch.zeros_like(imm)))


def test_phi_final_matches_the_samplers_own_reader():
    from rollout.sampler import SampleOutput

    phi = torch.randn(5, 7, dtype=torch.float64)
    phi[1, 3:] = NAN
    phi[2] = NAN
    torch.testing.assert_close(phi_final(phi), SampleOutput.final_index(None, phi), equal_nan=True)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="mode"):
        phi_token_credit(DECODE, PHI, "discounted")
    with pytest.raises(ValueError, match="beyond"):
        phi_token_credit(torch.full((3, 6), 5), PHI)
    with pytest.raises(ValueError, match="inf"):
        phi_final(torch.tensor([[0.0, -float("inf")]]))
    with pytest.raises(ValueError, match="reduction"):
        neg_h_ub(PHI, "max")


def test_on_a_real_sampler_trace():
    from doubles import EOS, MASK, PAD, tiny_model, tiny_tokenizer

    from rollout import MDLMAdapter, SamplerConfig, TemplateConfig, build_canvas, sample

    tok = tiny_tokenizer("what is one plus two three four the answer".split())
    adapter = MDLMAdapter(tiny_model(len(tok)), mask_id=MASK, pad_id=PAD, eos_ids=(EOS,))
    config = TemplateConfig(reasoning_length=8, answer_length=2, delimiter="the answer")
    canvas = build_canvas(tok, ["what is one plus two", "one plus"], config, MASK, answers=["three", "four four"])
    out = sample(adapter, canvas, SamplerConfig(policy="med", temperature=1.0))
    credit = get_intrinsic_reward("phi_return_to_go")(out)  # [B, G]
    assert credit.shape == out.decode_step.shape
    assert (credit[:, out.answer] == 0).all() and (credit[out.decode_step < 0] == 0).all()
    at_zero = out.decode_step == 0  # tokens decoded by the first forward carry the whole phi_T - phi(0)
    assert at_zero.any(-1).all()
    expected = (out.phi_final - out.phi[:, 0])[:, None].expand_as(credit)
    torch.testing.assert_close(credit[at_zero], expected[at_zero])
    assert set(INTRINSIC_REWARDS) >= {"phi_return_to_go", "phi_immediate", "phi_final", "neg_h_ub_final"}
    torch.testing.assert_close(get_intrinsic_reward("phi_final")(out), out.phi_final)


def test_stepwise_verifier_credit_on_a_written_out_trace():
    from rewards.intrinsic import verifier_step_scores

    # Gold answers: row 0 "7", row 1 "3". One answer position (A=1); -1: the answer block was no longer masked.
    # Row 0 guesses 5, 5, 7, 7 at the inputs of steps 0-3 (step 3 commits the answer): right from step 2 on.
    # Row 1 guesses 3, then 4 (its step-1 tokens made the answer wrong), then commits at step 2.
    guess = torch.tensor([[[5], [5], [7], [7]], [[3], [4], [4], [-1]]])
    words = {5: "5", 7: "7", 3: "3", 4: "4"}
    golds = ["7", "3"]
    calls = []

    def verify(rows, texts):
        calls.append(list(zip(rows, texts)))
        return [float(t == golds[r]) for r, t in zip(rows, texts)]

    v = verifier_step_scores(guess, lambda ids: words[ids[0]], verify)
    assert v.tolist()[0] == [0.0, 0.0, 1.0, 1.0]
    assert v[1, :3].tolist() == [1.0, 0.0, 0.0] and math.isnan(v[1, 3])
    assert len(calls) == 1 and sorted(calls[0]) == [(0, "5"), (0, "7"), (1, "3"), (1, "4")]  # each guess once
    # Reasoning positions decoded at: row 0 steps 0, 1, 1, 2 (answer at 3); row 1 steps 0, 1, -1, -1 (answer at 2).
    decode_step = torch.tensor([[0, 1, 1, 2, 3], [0, 1, -1, -1, 2]])
    credit = phi_token_credit(decode_step, v, "immediate")
    # token at step s gets v(s + 1) - v(s): row 0's step-1 tokens made the answer right (+1); row 1's step-0 token
    # made it wrong (-1); the committing step gets 0 (v held after its last defined step).
    assert credit.tolist() == [[0.0, 1.0, 1.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0, 0.0]]
    none = verifier_step_scores(guess, lambda ids: words[ids[0]], lambda rows, texts: [None] * len(rows))
    assert torch.isnan(none).all()  # unscorable guesses: no credit
    assert phi_token_credit(decode_step, none, "immediate").abs().sum() == 0
