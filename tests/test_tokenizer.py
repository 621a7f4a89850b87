"""The offline word-level tokenizer: digits split, numbers decode whole, special tokens, save/load round trip."""

from transformers import AutoTokenizer

from rl.tokenizer import SPECIAL_TOKENS, build_tokenizer

TEXTS = ["Mia has 12 apples.", "Buying 5 more, 12 + 5 = 17.", "How many apples does Mia have now?"]


def test_numbers_are_digit_tokens_and_decode_whole():
    tok = build_tokenizer(TEXTS, extra_words=["The", "answer", "is"])
    ids = tok("Mia has 170 apples.")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<bos>", "Mia", "has", "1", "##7", "##0", "apples", "."]
    assert tok.decode(ids, skip_special_tokens=True) == "Mia has 170 apples."
    assert tok("305", add_special_tokens=False)["input_ids"] == tok.convert_tokens_to_ids(["3", "##0", "##5"])
    for text in TEXTS:
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_special_tokens_and_unknown_words():
    tok = build_tokenizer(TEXTS)
    assert tok.convert_ids_to_tokens(list(range(5))) == list(SPECIAL_TOKENS)
    ids = (tok.pad_token_id, tok.eos_token_id, tok.mask_token_id, tok.bos_token_id, tok.unk_token_id)
    assert ids == (0, 1, 2, 3, 4)
    assert tok("Mia has 3 zebras", add_special_tokens=False)["input_ids"][-1] == tok.unk_token_id
    assert "12" not in tok.get_vocab()  # numbers are never whole tokens


def test_save_pretrained_round_trip_with_chat_template(tmp_path):
    tok = build_tokenizer(TEXTS)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.mask_token_id == tok.mask_token_id and len(loaded) == len(tok)
    assert loaded(TEXTS[1])["input_ids"] == tok(TEXTS[1])["input_ids"]
    chat = loaded.apply_chat_template([{"role": "user", "content": TEXTS[2]}], add_generation_prompt=True,
                                      tokenize=False)
    assert chat.endswith("assistant : ")
    assert loaded.unk_token_id not in loaded(chat, add_special_tokens=False)["input_ids"]
