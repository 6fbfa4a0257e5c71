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


def window_bytes(args: ModelArgs, fmt: str) -> int:
    """The raw sliding-window entries of every layer."""
    return len(_layers(args)) * args.sliding_window * entry_bytes(args, fmt)


def _compressor_state(ratio: int, dim: int, overlap: bool) -> int:
    coff = 2 if overlap else 1
    return 2 * (coff * ratio) * (coff * dim) * STATE_BYTES  # kv and score buffers


def compressor_state_bytes(args: ModelArgs) -> int:
    """fp32 partial-window state of every compressor (attention and indexer); ≈12.2 MB for Flash."""
    total = 0
    for layer in _layers(args):
        ratio = args.layer_ratio(layer)
        if ratio == 0:
            continue
        csa = args.is_csa(layer)
        total += _compressor_state(ratio, args.head_dim, overlap=csa)
        if csa:
            total += _compressor_state(ratio, args.index_head_dim, overlap=True)
    return total


def constant_bytes(args: ModelArgs, fmt: str) -> int:
    """The part that does not grow with the context: windows plus compressor state."""
    return window_bytes(args, fmt) + compressor_state_bytes(args)


def kv_bytes(args: ModelArgs, fmt: str, n_tokens: int) -> int:
    """Exact cache bytes after `n_tokens`: constant part plus the entries of every completed window."""
    if n_tokens < 0:
        raise BadInput(f"token count {n_tokens} is negative")
    grown = 0
    for layer in _layers(args):
        ratio = args.layer_ratio(layer)
        if ratio == 0:
            continue
        entries = n_tokens // ratio  # an entry exists only once its window is complete
        grown += entries * entry_bytes(args, fmt)
        if args.is_csa(layer):
            grown += entries * index_key_bytes(args, fmt)
    return constant_bytes(args, fmt) + grown


def max_tokens(args: ModelArgs, fmt: str, budget: int) -> int:
    """The longest context whose cache fits in `budget` bytes (0 if not even the constant part fits)."""
    if kv_bytes(args, fmt, 0) > budget:
        return 0
    per = bytes_per_token(args, fmt)
    if per == 0:
        return args.max_position_embeddings
    lo, hi = 0, max(1, int((budget - constant_bytes(args, fmt)) / per) + max(args.compress_ratios, default=1))
    while lo < hi:  # kv_bytes is monotone in n_tokens: bisect for the largest fitting count
        mid = (lo + hi + 1) // 2
        if kv_bytes(args, fmt, mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return min(lo, args.max_position_embeddings)
