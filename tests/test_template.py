"""Canvas layout, the model adapter, and bad input to both."""

import pytest
import torch
from doubles import BOS, EOS, MASK, PAD, tiny_model, tiny_tokenizer

from rollout import MDLMAdapter, TemplateConfig, build_canvas, decode_block

WORDS = "what is one plus two three four five six The answer is user assistant :".split()


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(WORDS)


def test_infill_layout_left_padded_with_shared_generation_columns(tok):
    cfg = TemplateConfig(reasoning_length=4, answer_length=3, delimiter="The answer is", suffix="six")
    cv = build_canvas(tok, ["what is one plus two", "two"], cfg, MASK, answers=["three", "four five"])
    ids = tok.convert_tokens_to_ids
    delim = ids(["The", "answer", "is"])
    assert cv.gen_start == 6 and cv.input_ids.shape == (2, 6 + 4 + 3 + 3 + 1)
    assert cv.input_ids[1, :4].tolist() == [PAD] * 4 and cv.attention_mask[1].tolist() == [0] * 4 + [1] * 13
    assert cv.input_ids[1, 4:6].tolist() == [BOS, ids("two")]
    gen = cv.generation
    assert (gen[:, :4] == MASK).all() and gen[0, 4:7].tolist() == delim
    assert (gen[:, cv.answer] == MASK).all() and gen[0, -1].item() == ids("six")
    assert cv.gold.tolist() == [[ids("three"), EOS, EOS], [ids("four"), ids("five"), EOS]]
    # phi scores the answer's tokens and the first padding token (where it ends), not the rest of the padding
    assert cv.gold_scored.tolist() == [[True, True, False], [True, True, True]]
    assert cv.phi_weights().tolist() == [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
    filled = cv.fill_answer()
    assert torch.equal(filled.generation[:, cv.answer], cv.gold) and (cv.generation[:, cv.answer] == MASK).all()


def test_plain_layout_and_chat_template(tok):
    cfg = TemplateConfig(layout="plain", reasoning_length=5, chat_template=True)
    cv = build_canvas(tok, ["one plus two"], cfg, MASK)
    assert cv.answer is None and cv.gen_length == 5 and (cv.generation == MASK).all()
    rendered = tok.decode(cv.input_ids[0, : cv.gen_start])
    assert "user" in rendered and "assistant" in rendered
    with pytest.raises(ValueError, match="infill"):
        build_canvas(tok, ["one"], cfg, MASK, answers=["two"])


def test_decode_block_stops_at_eos_and_drops_never_generated(tok):
    ids = tok.convert_tokens_to_ids
    block = torch.tensor([ids("one"), MASK, ids("two"), EOS, ids("three")])
    assert decode_block(tok, block, (EOS,), MASK) == "one two"


def test_bad_canvas_input_is_reported(tok):
    cfg = TemplateConfig(reasoning_length=4, answer_length=2)
    with pytest.raises(ValueError, match="empty"):
        build_canvas(tiny_tokenizer_no_bos(), [""], cfg, MASK)
    with pytest.raises(ValueError, match="exceeds the model context"):
        build_canvas(tok, ["one " * 50], cfg, MASK, max_length=32)
    ok = build_canvas(tok, ["one " * 50], TemplateConfig(reasoning_length=4, answer_length=2, max_prompt_length=10),
                      MASK, max_length=32)
    assert ok.report["prompts_truncated"] == 1 and ok.gen_start == 10
    with pytest.raises(ValueError, match="do not fit"):
        build_canvas(tok, ["one"], cfg, MASK, answers=["one two three"])
    cut = build_canvas(tok, ["one", "two"], cfg, MASK, answers=["one two three", "one"], answer_overflow="truncate")
    assert cut.report["answers_truncated"] == 1
    with pytest.raises(ValueError, match="no prompts"):
        build_canvas(tok, [], cfg, MASK)
    for bad in ({"layout": "x"}, {"reasoning_length": 0}, {"answer_length": 0}, {"max_prompt_length": 0}):
        with pytest.raises(ValueError):
            TemplateConfig(**bad)


def tiny_tokenizer_no_bos():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<mask>": 2, "<unk>": 3, "one": 4}
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="<eos>", mask_token="<mask>",
                                   unk_token="<unk>")


def test_adapter_reads_ids_from_tokenizer_and_rejects_missing_mask(tok):
    model = tiny_model(len(tok))
    ad = MDLMAdapter.from_pretrained(model, tok)
    assert (ad.mask_id, ad.pad_id, ad.eos_ids[0], ad.shift_logits, ad.max_length) == (MASK, PAD, EOS, False, 256)
    x = torch.tensor([[BOS, 5, MASK, MASK]])
    logits = ad.logits(x, torch.ones_like(x), keep_last=2)
    assert logits.shape == (1, 2, len(tok)) and torch.isinf(logits[..., MASK]).all()
    tok2 = tiny_tokenizer(WORDS)
    tok2.mask_token = None
    with pytest.raises(ValueError, match="no mask token"):
        MDLMAdapter.from_pretrained(model, tok2)
    with pytest.raises(ValueError):
        MDLMAdapter(model, mask_id=MASK, pad_id=PAD, attention_mask_style="causal")
