"""The HF tokenizer.json → GGUF `gpt2` BPE vocabulary (tokens, types, merges), as llama.cpp reads it."""

from __future__ import annotations

import json
from pathlib import Path

from gguf import GGUFValueType, TokenType

from quant import keys as K
from v4cli.errors import CheckpointError


def tokenizer_kv(model_dir: Path, vocab_size: int, bos: int, eos: int) -> list[tuple[str, object, GGUFValueType]]:
    """GGUF tokenizer keys from model_dir/tokenizer.json, padded to the model's vocab size."""
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
        # BOS is written as text by the prompt encoder (tokenizer_config add_bos_token is false)
        (K.Tokenizer.ADD_BOS, False, B),
        (K.Tokenizer.ADD_EOS, False, B),
        (K.Tokenizer.HF_JSON, raw, S),
    ]
