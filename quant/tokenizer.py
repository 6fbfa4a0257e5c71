"""The HF tokenizer.json → GGUF `gpt2` BPE vocabulary (tokens, types, merges), as llama.cpp reads it."""

from __future__ import annotations

import json
from pathlib import Path

from gguf import GGUFValueType, TokenType

from quant import keys as K
from quant.errors import CheckpointError
from v4cli.prompt.template import chat_template


def tokenizer_kv(model_dir: Path, vocab_size: int, bos: int, eos: int) -> list[tuple[str, object, GGUFValueType]]:
    """GGUF tokenizer keys from model_dir/tokenizer.json, padded to the model's vocab size, and our chat template."""
    path = Path(model_dir) / "tokenizer.json"
    try:
        raw = path.read_text(encoding="utf-8")
        tj = json.loads(raw)
        vocab: dict[str, int] = tj["model"]["vocab"]
        merges = tj["model"]["merges"]
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing", hint="the model folder needs the official tokenizer.json") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a BPE tokenizer.json ({e})") from None
    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    by_id: dict[int, str] = {i: s for s, i in vocab.items()}
    by_id.update({i: t["content"] for i, t in added.items()})
    if max(by_id) >= vocab_size:
        raise CheckpointError(f"{path}: token id {max(by_id)} ≥ the model's vocab_size {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    merge_strs = [m if isinstance(m, str) else " ".join(m) for m in merges]
    A, S, U, B = GGUFValueType.ARRAY, GGUFValueType.STRING, GGUFValueType.UINT32, GGUFValueType.BOOL
    return [
        (K.Tokenizer.MODEL, "gpt2", S),
        (K.Tokenizer.PRE, "deepseek-v3", S),
        (K.Tokenizer.TOKENS, tokens, A),
        (K.Tokenizer.TOKEN_TYPE, [int(t) for t in types], A),
        (K.Tokenizer.MERGES, merge_strs, A),
        (K.Tokenizer.BOS_ID, bos, U),
        (K.Tokenizer.EOS_ID, eos, U),
        # what llama.cpp's converter writes for V4 (tokenizer_config's pad_token is EOS)
        (K.Tokenizer.PAD_ID, eos, U),
        # BOS is written as text by the prompt encoder (tokenizer_config add_bos_token is false)
        (K.Tokenizer.ADD_BOS, False, B),
        (K.Tokenizer.ADD_EOS, False, B),
        (K.Tokenizer.HF_JSON, raw, S),
        # GGUF tools (llama-server, LM Studio, llama-cpp-python) build prompts from this, not from our encoder
        (K.Tokenizer.CHAT_TEMPLATE, chat_template(), S),
    ]


# `tokenizer.ggml.pre` names under which GGUF tools file V4's pre-tokenizer: we write "deepseek-v3" (V4 splits text
# exactly as V3 does); llama.cpp's converter hashes V4's tokenizer to "joyai-llm", which tokenizes the same.
V4_PRE_TOKENIZERS = ("deepseek-v3", "joyai-llm")


def tokenizer_json_from_kv(md: dict, template_json: str) -> str:
    """A tokenizer.json built from a GGUF's standard `tokenizer.ggml.*` keys (what every GGUF tool writes).

    The vocabulary, merges and special tokens come from the file; the pre-tokenizer, decoder and post-processor
    come from `template_json` (the official V4 tokenizer.json), since a GGUF names its pre-tokenizer only by a
    `pre` string. CONTROL tokens become special added tokens, USER_DEFINED ones plain added tokens (as llama.cpp
    treats them); UNUSED padding entries are left out.
    """
    model, pre = md.get(K.Tokenizer.MODEL), md.get(K.Tokenizer.PRE)
    if model != "gpt2":
        raise CheckpointError(f"the model file's tokenizer is {model!r}, not DeepSeek-V4's byte-level BPE ('gpt2')")
    if pre not in V4_PRE_TOKENIZERS:
        raise CheckpointError(f"the model file's pre-tokenizer is {pre!r}, not DeepSeek-V4's "
                              f"({' or '.join(V4_PRE_TOKENIZERS)})", hint="is this a DeepSeek-V4 GGUF?")
    tokens, types, merges = md.get(K.Tokenizer.TOKENS), md.get(K.Tokenizer.TOKEN_TYPE), md.get(K.Tokenizer.MERGES)
    if not isinstance(tokens, list) or not isinstance(merges, list) or not tokens:
        raise CheckpointError("the model file has no tokenizer.ggml.tokens / merges",
                              hint="convert it again with v4 quantize or llama.cpp's converter")
    if not isinstance(types, list) or len(types) != len(tokens):
        raise CheckpointError(f"the model file has {len(tokens)} tokens but "
                              f"{len(types) if isinstance(types, list) else 'no'} token types")
    if not all(isinstance(t, str) for t in tokens) or not all(isinstance(m, str) for m in merges):
        raise CheckpointError("the model file's tokens and merges must be strings")
    vocab: dict[str, int] = {}
    added = []
    for i, (tok, typ) in enumerate(zip(tokens, types)):
        if typ == TokenType.UNUSED:
            continue
        if tok in vocab:
            raise CheckpointError(f"the model file's vocabulary lists token {tok!r} twice (ids {vocab[tok]} and {i})")
        vocab[tok] = i
        if typ in (TokenType.CONTROL, TokenType.USER_DEFINED):
            added.append({"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": typ == TokenType.CONTROL})
    tj = json.loads(template_json)
    tj["added_tokens"] = added
    tj["model"]["vocab"] = vocab
    tj["model"]["merges"] = merges
    return json.dumps(tj, ensure_ascii=False)
