"""KV-cache sizes of a DeepSeek-V4 model, from ModelArgs alone (facts §5).

What grows with the context: each compressed layer stores one `head_dim` entry per `ratio` tokens (CSA ratio 4,
HCA e.g. 128), and CSA layers also one indexer key (`index_head_dim`) per 4 tokens. Sliding-window-only layers
store nothing per token. What is constant: every layer's raw window (`sliding_window` entries of `head_dim`), and
every compressor's partial-window state in fp32, laid out as DeepSeek's reference keeps it: kv and score buffers
of `coff·ratio` slots × `coff·dim` (coff = 2 for the overlapped CSA/indexer compressors, 1 for HCA).

Formats of one stored entry:
- `bf16` / `f32`: every value 2 / 4 bytes.
- `fp8` (what the model was trained against): the non-rope dims as FP8 with one power-of-two (E8M0) scale byte per
  64 values, the rope dims as BF16; indexer keys as FP4 (two per byte) with one scale byte per 32 values.
Only the main layers are counted; an MTP draft block would add one more window.
"""

from __future__ import annotations

import math

from quant.config import ModelArgs
from quant.errors import BadInput

# The one table of KV-cache formats: what ModelCache stores (v4cli/model/cache.py codecs) and the planners size.
# f32 is exact and meant for tests; bf16 is the default (exact enough, no rounding of the rope dims); fp8 is
# DeepSeek's own runtime format at about half of bf16.
KV_FORMATS = ("bf16", "fp8", "f32")
DEFAULT_KV_FORMAT = "bf16"
FP8_SCALE_BLOCK = 64  # values per E8M0 scale byte in FP8 KV entries
FP4_SCALE_BLOCK = 32  # values per E8M0 scale byte in FP4 indexer keys
STATE_BYTES = 4  # compressor partial-window state is fp32 in every format

_ELEM_BYTES = {"bf16": 2, "f32": 4}


def _check(fmt: str) -> None:
    if fmt not in KV_FORMATS:
        raise BadInput(f"unknown KV cache format {fmt!r}", hint=f"use one of {', '.join(KV_FORMATS)}")


def entry_bytes(args: ModelArgs, fmt: str) -> int:
    """Bytes of one stored KV entry (one `head_dim` vector, window or compressed)."""
    _check(fmt)
    if fmt in _ELEM_BYTES:
        return args.head_dim * _ELEM_BYTES[fmt]
    nope = args.head_dim - args.qk_rope_head_dim
    return nope + math.ceil(nope / FP8_SCALE_BLOCK) + 2 * args.qk_rope_head_dim


def index_key_bytes(args: ModelArgs, fmt: str) -> int:
    """Bytes of one stored lightning-indexer key (`index_head_dim` values)."""
    _check(fmt)
    if fmt in _ELEM_BYTES:
        return args.index_head_dim * _ELEM_BYTES[fmt]
    return math.ceil(args.index_head_dim / 2) + math.ceil(args.index_head_dim / FP4_SCALE_BLOCK)


def _layers(args: ModelArgs) -> range:
    return range(args.num_hidden_layers)


def bytes_per_token(args: ModelArgs, fmt: str) -> float:
    """Average growth of the cache per token of context (6,880 B for Flash in bf16)."""
    total = 0.0
    for layer in _layers(args):
        ratio = args.layer_ratio(layer)
        if ratio == 0:
            continue
        total += entry_bytes(args, fmt) / ratio
        if args.is_csa(layer):
            total += index_key_bytes(args, fmt) / ratio
    return total


def window_bytes(args: ModelArgs, fmt: str, n_tokens: int) -> int:
    """The raw sliding-window rows of every layer after `n_tokens`: the cache keeps `sliding_window - 1` (the next
    token's own row joins them when it attends)."""
    return len(_layers(args)) * min(n_tokens, args.sliding_window - 1) * entry_bytes(args, fmt)


def _compressors(args: ModelArgs):
    """(ratio, dim, overlapped) of every compressor: each compressed layer's, and a CSA layer's indexer's."""
    for layer in _layers(args):
        ratio = args.layer_ratio(layer)
        if ratio:
            csa = args.is_csa(layer)
            yield ratio, args.head_dim, csa
            if csa:
                yield ratio, args.index_head_dim, True


def _state(ratio: int, dim: int, overlap: bool, n_tokens: int) -> int:
    """One compressor's fp32 state after `n_tokens`, as v4cli/model/cache.py CompressorState holds it: kv and score
    rows of the unfinished window (2·dim wide when windows overlap) and, once a window has closed, an overlapped
    compressor's previous-window Ca half (ratio rows of dim, kv and score)."""
    count, rest = divmod(n_tokens, ratio)
    width = 2 * dim if overlap else dim
    prev = 2 * ratio * dim if overlap and count else 0
    return (2 * rest * width + prev) * STATE_BYTES


def compressor_state_bytes(args: ModelArgs, n_tokens: int) -> int:
    """fp32 partial-window state of every compressor (attention and indexer) after exactly `n_tokens`."""
    return sum(_state(r, d, o, n_tokens) for r, d, o in _compressors(args))


def _entries_bytes(args: ModelArgs, fmt: str, n_tokens: int) -> int:
    grown = 0
    for layer in _layers(args):
        ratio = args.layer_ratio(layer)
        if ratio == 0:
            continue
        entries = n_tokens // ratio  # an entry exists only once its window is complete
        grown += entries * entry_bytes(args, fmt)
        if args.is_csa(layer):
            grown += entries * index_key_bytes(args, fmt)
    return grown


def kv_bytes(args: ModelArgs, fmt: str, n_tokens: int) -> int:
    """Exact cache bytes after `n_tokens`: the windows, every completed window's entries, the compressor state."""
    if n_tokens < 0:
        raise BadInput(f"token count {n_tokens} is negative")
    return (window_bytes(args, fmt, n_tokens) + _entries_bytes(args, fmt, n_tokens)
            + compressor_state_bytes(args, n_tokens))
