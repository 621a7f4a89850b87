"""Test doubles: an exact oracle "model", a shifted twin, a tiny random bidirectional transformer, a tokenizer."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
from torch import nn

PAD, EOS, MASK, BOS = 0, 1, 2, 3
SPECIALS = ["<pad>", "<eos>", "<mask>", "<bos>"]


class OracleModel(nn.Module):
    """A "model" whose conditionals are the exact conditionals of a known joint distribution.

    The joint is over `n` free slots of the generation region (the last `gen_length` canvas columns, at
    `slot_cols`); every other column predicts a uniform distribution. At a masked slot the logits are the log
    of the exact marginal given every observed slot (masked slots marginalised out).
    """

    def __init__(self, joint: dict[tuple[int, ...], float], vocab_size: int, gen_length: int, slot_cols: list[int]):
        super().__init__()
        configs = torch.tensor(list(joint.keys()), dtype=torch.long)  # [M, n]
        probs = torch.tensor(list(joint.values()), dtype=torch.float64)
        self.register_buffer("configs", configs)
        self.register_buffer("probs", probs / probs.sum())
        self.vocab_size, self.gen_length, self.slot_cols = vocab_size, gen_length, slot_cols
        self.onehot = nn.functional.one_hot(configs, vocab_size).double()  # [M, n, V]
        self.calls = 0

    def conditionals(self, slots: torch.Tensor) -> torch.Tensor:
        """[B, n] observed slot values (MASK = unknown) -> [B, n, V] exact conditional of each slot."""
        known = slots != MASK  # [B, n]
        match = (self.configs[None] == slots[:, None]) | ~known[:, None]  # [B, M, n]
        weight = self.probs[None] * match.all(-1)  # [B, M]
        marg = torch.einsum("bm,mnv->bnv", weight, self.onehot)
        return marg / marg.sum(-1, keepdim=True)

    def forward(self, input_ids, attention_mask=None):
        self.calls += 1
        B, L = input_ids.shape
        cols = [L - self.gen_length + c for c in self.slot_cols]
        cond = self.conditionals(input_ids[:, cols])
        logits = torch.zeros(B, L, self.vocab_size, dtype=torch.float64)
        logits[:, cols] = cond.log()
        return SimpleNamespace(logits=logits)

    def joint_prob(self, seq: tuple[int, ...]) -> float:
        match = (self.configs == torch.tensor(seq)).all(-1)
        return float(self.probs[match].sum())


class ShiftedTwin(nn.Module):
    """Wraps a model so that its logits at column i are the original's at column i + 1 (Dream convention)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None):
        logits = self.inner(input_ids=input_ids, attention_mask=attention_mask).logits
        shifted = torch.cat([logits[:, 1:], torch.zeros_like(logits[:, :1]).fill_(7.0)], 1)
        return SimpleNamespace(logits=shifted)


def all_sequences(vocab: list[int], n: int):
    return list(itertools.product(vocab, repeat=n))


def tiny_tokenizer(words: list[str]):
    """A word-level fast tokenizer with <pad>, <eos>, <mask>, <bos> at ids 0..3 and a simple chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + sorted(set(words) | {"<unk>"}))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", mask_token="<mask>", bos_token="<bos>",
        unk_token="<unk>",
    )
    fast.chat_template = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}assistant :"
    return fast


def tiny_model(vocab_size: int, layers: int = 2, hidden: int = 64, seed: int = 0):
    """A random bidirectional Gemma3 text model (native transformers architecture)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2, max_position_embeddings=256,
        use_bidirectional_attention=True, layer_types=["full_attention"] * layers, pad_token_id=PAD,
        eos_token_id=EOS, bos_token_id=BOS, final_logit_softcapping=None,
    )
    return Gemma3ForCausalLM(config).eval()


DELIM = 7  # a fixed delimiter token between the oracle's reasoning slots and its answer slot


def oracle_canvas(batch: int, n_reasoning: int, n_answer: int = 1, prompt_lens: list[int] | None = None, gold=None):
    """A hand-built infill canvas: [pad][bos ...][R masks][DELIM][A masks]; slots = reasoning + answer columns."""
    from rollout.template import Canvas

    prompt_lens = prompt_lens or [1] * batch
    P = max(prompt_lens)
    gen = [MASK] * n_reasoning + [DELIM] + [MASK] * n_answer
    ids = torch.full((batch, P + len(gen)), PAD, dtype=torch.long)
    am = torch.zeros_like(ids)
    for i, n in enumerate(prompt_lens):
        ids[i, P - n : P] = BOS
        am[i, P - n :] = 1
    ids[:, P:] = torch.tensor(gen)
    answer = slice(n_reasoning + 1, n_reasoning + 1 + n_answer)
    gold_t = None if gold is None else torch.as_tensor(gold, dtype=torch.long).reshape(batch, n_answer)
    return Canvas(ids, am, P, slice(0, n_reasoning), answer, gold_t, MASK), list(range(n_reasoning)) + list(
        range(answer.start, answer.stop)
    )


def save_scratch_policy(path, texts, seed: int = 0) -> str:
    """Save an untrained 1-layer bidirectional Gemma3 with a word-level tokenizer over `texts` (a policy dir)."""
    from rl.models import ScratchModelConfig, build_scratch_model
    from rl.tokenizer import build_tokenizer

    tok = build_tokenizer(texts)
    model = build_scratch_model(ScratchModelConfig(scratch_layers=1, scratch_hidden=32, scratch_heads=2,
                                                   scratch_kv_heads=1, scratch_max_length=128), tok, seed=seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and the cores are shared with other jobs (autouse where imported)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def text_hash(completions, **kwargs):
    """A deterministic reward with variance on an untrained model: a hash of the completion text in [0, 1)."""
    return [sum(map(ord, c)) % 13 / 13 for c in completions]
