"""Compiled CPU kernels (kernels/cpu/qmatmul.cpp) for the `linear`, `linear_many`, `routed_experts` and
`index_scores` ops.

`install()` (called once by kernels.backends.load) builds or loads the library and files `cpu_linear` for every type
of the one type table (quant.ggml.TYPES) that the library has kernels for (it is asked, see `TYPES`), plus the
batched, MoE and indexer kernels. If the build fails, or the CPU lacks AVX2, it files nothing (cpu_ext logs why at
debug level), so everything keeps the torch reference.

Accuracy: integer types quantize activations to int8 per 32 values (scale = absmax/127), as llama.cpp does on
CPU; expect ~0.5 % relative error against the f32 reference. The fused row kernels (few rows) and the int8 GEMM
(many rows) quantize identically and differ only in f32 summation order (~1e-7 relative). BF16 rows on a CPU
with AVX512-BF16 dot activations rounded to bf16 (~1.6e-3 relative, llama.cpp's choice; the BF16 output head
then streams at the memory's rate); otherwise BF16/F16 use f32 activations (summation order only), as does the
tiled dequantize + f32 GEMM they use for many rows.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from typing import NamedTuple

import torch
from gguf import GGMLQuantizationType as Q

from kernels import cpu_ext
from kernels.attention import index_scores_op
from kernels.linear import QWeight, linear_many_op, linear_op, reference_linear, routed_experts_op
from quant import ggml
from quant.errors import BadInput

log = logging.getLogger(__name__)

# The types `linear` runs here, filled in by install(): those of quant.ggml.TYPES for which the library
# reports kernels (v4_supported at a row length every block size divides) over blocks of the table's layout, so a
# type gains its fast path by gaining kernels in the library, with no list here to update.
TYPES: tuple[Q, ...] = ()
_PROBE_K = 256
# From this many activation rows on, the int8 GEMM (v4_gemm) beats the fused row kernels for every type it covers
# (Zen 4, 2048×4096, one thread: a tie at 4 rows, the GEMM 1.4-2x faster at 6; see kernel_bench.py --prefill).
QGEMM_MIN_ROWS = 6
# From this many rows on, types the int8 GEMM does not cover (BF16, F16) dequantize weight tiles and use torch's
# f32 GEMM (measured crossover).
GEMM_MIN_ROWS = 32
# Weight rows per dequantized tile: 256 × 4096 f32 = 4 MB, which stays in L2/L3 for the GEMM that follows.
TILE_ROWS = 256

_lib = None


# Whether the row kernels / the int8 GEMM cover (type, row length), asked of the library once each: a decode step
# makes ~100 kernel calls and each ctypes round trip costs about a microsecond.
@functools.cache
def _supported(qtype: int, K: int) -> bool:
    return _lib.v4_supported(qtype, K) == 1


@functools.cache
def _gemm_supported(qtype: int, K: int) -> bool:
    return _lib.v4_gemm_supported(qtype, K) == 1


def _ready(x: torch.Tensor, w: QWeight) -> bool:
    return (x.dtype == torch.float32 and len(w.shape) == 2 and w.raw.is_contiguous()
            and _supported(int(w.qtype), w.shape[1]))


def _product(entry, x2: torch.Tensor, w: QWeight) -> torch.Tensor:
    """y [M, N] = x2 [M, K] · Wᵀ through one of the library's (type, W, N, K, x, M, y, threads) entry points."""
    M, (N, K) = x2.shape[0], w.shape
    y = torch.empty(M, N, dtype=torch.float32)
    if entry(int(w.qtype), w.raw.data_ptr(), N, K, x2.data_ptr(), M, y.data_ptr(), cpu_ext.threads()) != 0:
        raise RuntimeError(f"{entry.__name__} failed for {w.qtype.name} {w.shape}")  # callers checked the type
    return y


def matvec(x2: torch.Tensor, w: QWeight) -> torch.Tensor:
    """x2 [M, K] f32 contiguous · Wᵀ → [M, N] with the fused integer / float kernels (any M; best for small M)."""
    return _product(_lib.v4_matmul, x2, w)


def qgemm(x2: torch.Tensor, w: QWeight) -> torch.Tensor:
    """x2 [M, K] f32 contiguous · Wᵀ → [M, N] with the int8 GEMM: the activations quantized as in `matvec`, each
    weight tile decoded once and swept over all M rows (best for many rows; types with `has_qgemm`)."""
    return _product(_lib.v4_gemm, x2, w)


def has_qgemm(w: QWeight) -> bool:
    """Whether the int8 GEMM covers w's type and row length (the integer types; not BF16/F16)."""
    return _gemm_supported(int(w.qtype), w.shape[1])


def dequantize(w: QWeight) -> torch.Tensor:
    """A 2-D QWeight as f32 [N, K], bit-identical to kernels.dequant (multithreaded C++)."""
    N, K = w.shape
    out = torch.empty(N, K, dtype=torch.float32)
    if _lib.v4_dequant(int(w.qtype), w.raw.data_ptr(), N, K, out.data_ptr(), cpu_ext.threads()) != 0:
        raise RuntimeError(f"v4_dequant failed for {w.qtype.name} {w.shape}")
    return out


def tiled_gemm(x2: torch.Tensor, w: QWeight) -> torch.Tensor:
    """x2 [M, K] · Wᵀ for large M: dequantize TILE_ROWS weight rows at a time into one reused f32 buffer, GEMM each."""
    M, (N, K) = x2.shape[0], w.shape
    rb = w.row_bytes
    yt = torch.empty(N, M, dtype=torch.float32)  # (N, M): each tile's result is a contiguous row block
    tile = torch.empty(min(TILE_ROWS, N), K, dtype=torch.float32)
    base, nt = w.raw.data_ptr(), cpu_ext.threads()
    for n0 in range(0, N, TILE_ROWS):
        n = min(TILE_ROWS, N - n0)
        _lib.v4_dequant(int(w.qtype), base + n0 * rb, n, K, tile.data_ptr(), nt)
        torch.mm(tile[:n], x2.t(), out=yt[n0:n0 + n])
    return yt.t().contiguous()


def cpu_linear(x: torch.Tensor, w: QWeight) -> torch.Tensor:
    """`linear` for CPU tensors: fused kernels for few rows, the int8 GEMM (or, for float types, tiled dequantize +
    f32 GEMM) for many."""
    if not _ready(x, w):
        return reference_linear(x, w)
    N, K = w.shape
    x2 = x.reshape(-1, K).contiguous()  # (M, K)
    M = x2.shape[0]
    if has_qgemm(w):
        y = matvec(x2, w) if M < QGEMM_MIN_ROWS else qgemm(x2, w)
    else:
        y = matvec(x2, w) if M < GEMM_MIN_ROWS else tiled_gemm(x2, w)
    return y.view(*x.shape[:-1], N)


class _Weights(NamedTuple):
    """One batch's weight side as ctypes arrays, and where each product's output starts in one shared buffer."""

    types: ctypes.Array
    ptrs: ctypes.Array
    Ns: ctypes.Array
    Ks: ctypes.Array
    offsets: tuple[int, ...]
    total: int


# Keyed by each weight's (address, type, shape): the arrays depend on nothing else, so an entry stays right even if
# a weight is freed and another lands at its address. A decode step makes the same few batches every layer.
_batches: dict[tuple, _Weights | None] = {}


def _batch_weights(pairs) -> _Weights | None:
    key = tuple((w.raw.data_ptr(), w.qtype, w.shape) for _, w in pairs)
    got = _batches.get(key, False)
    if got is not False:
        return got
    ok = all(len(w.shape) == 2 and w.raw.is_contiguous() and _supported(int(w.qtype), w.shape[1]) for _, w in pairs)
    got = None
    if ok:
        n, Ns = len(pairs), [w.shape[0] for _, w in pairs]
        offsets = tuple(sum(Ns[:j]) for j in range(n))
        got = _Weights((ctypes.c_int * n)(*(int(w.qtype) for _, w in pairs)),
                       (ctypes.c_void_p * n)(*(w.raw.data_ptr() for _, w in pairs)),
                       (ctypes.c_int64 * n)(*Ns), (ctypes.c_int64 * n)(*(w.shape[1] for _, w in pairs)), offsets, sum(Ns))
    if len(_batches) > 4096:  # many models loaded one after another in one process: start over
        _batches.clear()
    _batches[key] = got
    return got


def cpu_linear_many(pairs) -> list[torch.Tensor] | None:
    """`linear_many` on CPU: one v4_matmul_batch call (inputs shared by several weights quantized once, one thread
    split over all the rows). Declines (None) where each product is better off alone: GEMM-sized inputs."""
    meta = _batch_weights(pairs)
    if meta is None:
        return None
    xs, M = [], None
    for x, w in pairs:
        if x.dtype != torch.float32:
            return None
        x2 = x.reshape(-1, w.shape[1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        M = x2.shape[0] if M is None else M
        if x2.shape[0] != M or M >= QGEMM_MIN_ROWS:
            return None
        xs.append(x2)
    n = len(pairs)
    if M == 1:  # one buffer, each product's output a contiguous view of it
        out = torch.empty(meta.total, dtype=torch.float32)
        ys = [out[o: o + w.shape[0]].view(1, -1) for o, (_, w) in zip(meta.offsets, pairs)]
    else:
        ys = [torch.empty(M, w.shape[0], dtype=torch.float32) for _, w in pairs]
    rc = _lib.v4_matmul_batch(n, meta.types, meta.ptrs, meta.Ns, meta.Ks, (ctypes.c_void_p * n)(*(x.data_ptr() for x in xs)),
                              (ctypes.c_int64 * n)(*(x.stride(0) for x in xs)), M,
                              (ctypes.c_void_p * n)(*(y.data_ptr() for y in ys)), cpu_ext.threads())
    if rc != 0:
        raise RuntimeError(f"v4_matmul_batch failed ({rc})")  # _batch_weights() checked every type
    return [y.view(*x.shape[:-1], w.shape[0]) for y, (x, w) in zip(ys, pairs)]


def cpu_routed_experts(x: torch.Tensor, idx: torch.Tensor, wts: torch.Tensor, w1: QWeight, w3: QWeight,
                       w2: QWeight, limit: float) -> torch.Tensor | None:
    """`routed_experts` on CPU in one C++ call: no f32 expert copies. None (→ reference) for unsupported inputs."""
    E, I, D = w1.shape
    ok = (x.dtype == torch.float32 and len(w1.shape) == 3 and w3.shape == w1.shape and w2.shape == (E, D, I)
          and all(w.raw.is_contiguous() for w in (w1, w3, w2))
          and _lib.v4_supported(int(w1.qtype), D) == 1 and _lib.v4_supported(int(w3.qtype), D) == 1
          and _lib.v4_supported(int(w2.qtype), I) == 1)
    if not ok:
        return None
    T, k = idx.shape
    x = x.contiguous()
    idx = idx.to(torch.int64).contiguous()
    wts = wts.to(torch.float32).contiguous()
    out = torch.empty(T, D, dtype=torch.float32)
    rc = _lib.v4_moe(x.data_ptr(), T, D, idx.data_ptr(), wts.data_ptr(), k,
                     int(w1.qtype), w1.raw.data_ptr(), int(w3.qtype), w3.raw.data_ptr(),
                     int(w2.qtype), w2.raw.data_ptr(), E, I, float(limit), out.data_ptr(), cpu_ext.threads())
    if rc == -2:
        raise BadInput(f"expert id out of range 0..{E - 1}")
    if rc != 0:
        raise RuntimeError(f"v4_moe failed ({rc})")
    return out


def cpu_index_scores(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor | None:
    """`attention.index_scores` for one query (decode) over f32 or bf16 keys in one pass; None for anything else."""
    T, H, d = q.shape
    if (T != 1 or q.dtype != torch.float32 or w.dtype != torch.float32 or keys.dtype not in (torch.float32, torch.bfloat16)
            or keys.dim() != 2 or keys.shape[1] != d or H % 8 or H > 64):
        return None
    q, w, keys = q.contiguous(), w.contiguous(), keys.contiguous()
    out = torch.empty(1, keys.shape[0], dtype=torch.float32)
    rc = _lib.v4_index_scores(q.data_ptr(), w.data_ptr(), keys.data_ptr(), int(keys.dtype == torch.bfloat16),
                              keys.shape[0], d, H, float(scale), out.data_ptr(), cpu_ext.threads())
    return out if rc == 0 else None


def _same_layout(lib, info: ggml.TypeInfo) -> bool:
    """Whether the library's blocks of a type are the table's (the C++ spells the sizes out in its switch)."""
    got = cpu_ext.layout(lib, info.qtype)
    if got != (info.block_size, info.type_size):
        log.warning("the CPU kernels read %s blocks as %s, not %s; %s keeps the torch reference", info.name, got,
                    (info.block_size, info.type_size), info.name)
        return False
    return True


def install() -> bool:
    """File the kernels in the ops' "cpu" tables; False (nothing filed) without a usable library."""
    global _lib, TYPES
    lib = cpu_ext.usable()
    if lib is None:
        return False
    _lib = lib
    TYPES = tuple(t for t, info in ggml.TYPES.items() if lib.v4_supported(int(t), _PROBE_K) == 1
                  and _same_layout(lib, info))
    linear_op.register("cpu", cpu_linear, qtypes=TYPES)
    linear_many_op.register("cpu", cpu_linear_many)
    routed_experts_op.register("cpu", cpu_routed_experts)
    index_scores_op.register("cpu", cpu_index_scores)
    return True
