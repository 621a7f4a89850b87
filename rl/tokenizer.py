"""An offline word-level tokenizer built from a task's own text (the embedded default needs no download).

Whole words and punctuation marks are single tokens; numbers are split into digits (`12` -> `1`, `##2`), so a
small model sees the same ten digit symbols in every number and arithmetic can generalise. The `##` marker of
continuation digits lets the decoder glue numbers back together (`1 ##2 .` decodes to `12.`). Special tokens
sit at fixed ids 0-4: `<pad>`, `<eos>`, `<mask>`, `<bos>`, `<unk>`; every encoded text starts with `<bos>`.
The result is a `PreTrainedTokenizerFast`: `save_pretrained(dir)` then `AutoTokenizer.from_pretrained(dir)`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<pad>", "<eos>", "<mask>", "<bos>", "<unk>")
DIGITS = tuple(str(d) for d in range(10))
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)
CHAT_WORDS = ("system", "user", "assistant", ":")


def _pre_tokenizer():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.BertPreTokenizer()  # whitespace, then every punctuation/symbol character on its own


def word_vocabulary(texts: Iterable[str]) -> list[str]:
    """Sorted distinct words of `texts` (numbers excluded: they are spelled with digit tokens)."""
    pre = _pre_tokenizer()
    words = set()
    for text in texts:
        for word, _ in pre.pre_tokenize_str(text):
            if not word.isdigit():
                words.add(word)
    return sorted(words)


def build_tokenizer(texts: Iterable[str], extra_words: Iterable[str] = ()):
    """A word-level fast tokenizer whose vocabulary is the words of `texts` plus `extra_words`.

    Args:
        texts: every text the model will read or write (prompts, reasoning, answers, template delimiter/suffix).
        extra_words: words to add even if absent from `texts`.

    Returns:
        A `transformers.PreTrainedTokenizerFast` with pad/eos/mask/bos/unk tokens and a chat template.
    """
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    words = word_vocabulary([*texts, " ".join(CHAT_WORDS), *extra_words])
    words = [w for w in words if w not in SPECIAL_TOKENS and w not in DIGITS]
    tokens = [*SPECIAL_TOKENS, *DIGITS, *(f"##{d}" for d in DIGITS), *words]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token="<unk>", continuing_subword_prefix="##",
                                         max_input_chars_per_word=64))
    backend.pre_tokenizer = _pre_tokenizer()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    bos = vocab["<bos>"]
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", mask_token="<mask>", bos_token="<bos>",
        unk_token="<unk>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    logger.info("Built a word-level tokenizer: %d tokens (%d words).", len(tokens), len(words))
    return tokenizer
