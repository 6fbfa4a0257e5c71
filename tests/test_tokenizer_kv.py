"""The tokenizer built from a GGUF's standard tokenizer.ggml.* keys (what llama.cpp's converter and community
files carry instead of our tokenizer.huggingface.json) tokenizes exactly as the official V4 tokenizer."""

from __future__ import annotations

import pytest
from gguf import TokenType

from quant import keys as K
from quant.tokenizer import tokenizer_kv
from v4cli.engine.detok import tokenizer_from_metadata
from quant.errors import GGUFError
from v4cli.prompt.encoding import load_tokenizer
from v4cli.testing.corpus import mixed_corpus
from v4cli.testing.tiny import official_tokenizer_dir


@pytest.fixture(scope="module")
def standard_keys() -> dict:
    """Our writer's tokenizer keys without the tokenizer.json copy, named as llama.cpp's converter names V4."""
    md = {k: v for k, v, _ in tokenizer_kv(official_tokenizer_dir(), 129280, 0, 1)}
    del md[K.Tokenizer.HF_JSON]
    md[K.Tokenizer.PRE] = "joyai-llm"
    return md


def test_mixed_corpus_tokenizes_identically(standard_keys):
    tok, official = tokenizer_from_metadata(standard_keys), load_tokenizer()
    text = mixed_corpus()
    assert len(text.encode()) >= 1 << 20
    ids = tok.encode(text, add_special_tokens=False).ids
    assert ids == official.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == text
    # the prompt format's anchor (facts §7)
    assert tok.encode("<｜begin▁of▁sentence｜><｜User｜>hello<｜Assistant｜><think>", add_special_tokens=False).ids == [
        0, 128803, 33310, 128804, 128821]


def test_a_vocabulary_that_is_not_v4s_is_one_clear_error(standard_keys):
    md = dict(standard_keys)
    tokens = list(md[K.Tokenizer.TOKENS])
    tokens[128803] = "<｜Human｜>"  # another model's turn token where V4's <｜User｜> must be
    md[K.Tokenizer.TOKENS] = tokens
    with pytest.raises(GGUFError, match="not DeepSeek-V4's.*<｜User｜>"):
        tokenizer_from_metadata(md)
    with pytest.raises(GGUFError, match="pre-tokenizer is 'llama-bpe'"):
        tokenizer_from_metadata({**standard_keys, K.Tokenizer.PRE: "llama-bpe"})
    with pytest.raises(GGUFError, match="'llama'"):
        tokenizer_from_metadata({**standard_keys, K.Tokenizer.MODEL: "llama"})
    types = list(standard_keys[K.Tokenizer.TOKEN_TYPE])
    with pytest.raises(GGUFError, match="token types"):
        tokenizer_from_metadata({**standard_keys, K.Tokenizer.TOKEN_TYPE: types[:-1]})
    assert types[0] == TokenType.CONTROL
