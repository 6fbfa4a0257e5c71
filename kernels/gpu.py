"""Triton kernels for CUDA, for the `linear`, `routed_experts` and mHC ops.

Decode on a GPU is bound by the bytes of weights read, so each quantized type gets a fused dequantize-and-multiply
kernel that reads the GGUF blocks in place (no f32 or bf16 copy of the weight is ever made) for few activation
rows; the routed-expert MoE uses the same kernel with the expert ids read on the device (no host sync, so a CUDA
graph can capture it), gate and up in one pass with the clamped SwiGLU applied before the store. Many rows
(prefill) dequantize the weight to f32 with the same block decoders in one launch and hand the product to cuBLAS:
there the arithmetic, not the bytes, is the bound, and on an H100 the torch reference's dozen small dequantize ops
per product made prefill launch-bound. (A bf16 GEMM cut the GEMMs' GPU time 5x, but its casts added launches:
512 tokens took 140 vs 115 ms with it, so products stay in f32, which also keeps them exact.)

The mHC mixers' Sinkhorn rounds (~120 small ops per mixer, two mixers a layer) run as one launch too.

Accuracy: the decoders dequantize exactly as kernels/dequant.py; the fused kernels sum in f32 (summation order
only, ~1e-6 relative against the reference). BF16/F16 weights go to cuBLAS with activations rounded to their dtype
(~4e-3 relative).

`install()` (called once by kernels.backends.load) files nothing unless Triton imports and a CUDA device is present
(or TRITON_INTERPRET=1, which runs the same kernels on CPU tensors for the parity tests).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

from kernels import mhc
from kernels.dequant import tables
from kernels.linear import QWeight, linear_op, reference_linear, routed_experts_op, swiglu
from kernels.mhc import MixerParams
from quant import ggml

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install: install() files nothing, so CUDA keeps the torch reference
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# ggml type → (the kernels' type code, sub-steps per 256-element step): the Python side of `_decode`'s switch.
# A K-step is 256 elements: one super-block (their rows are whole super-blocks by construction), eight Q8_0 / MXFP4
# blocks (masked where a row ends mid-step). Q2_K / Q3_K decode a step in four sub-steps.
_KINDS: dict[Q, tuple[int, int]] = {
    Q.Q8_0: (0, 1), Q.MXFP4: (1, 1), Q.Q4_K: (2, 1), Q.Q2_K: (3, 4), Q.Q3_K: (4, 4), Q.IQ4_XS: (5, 1),
    Q.Q5_K: (6, 1), Q.Q6_K: (7, 1), Q.IQ2_XXS: (8, 1), Q.IQ2_XS: (9, 1), Q.IQ2_S: (10, 1), Q.IQ3_XXS: (11, 1),
    Q.IQ3_S: (12, 1), Q.IQ1_M: (13, 1),
}
_CODES: dict[Q, int] = {t: kind[0] for t, kind in _KINDS.items()}
# the types of the one table the fused kernels decode, and those cuBLAS takes as stored (BF16, F16)
TYPES: tuple[Q, ...] = tuple(t for t in ggml.TYPES if t in _CODES)
FLOAT_TYPES: tuple[Q, ...] = tuple(t for t, info in ggml.TYPES.items() if info.is_float and t != Q.F32)
# Up to this many activation rows the fused kernel runs (each row re-reads the weight, from L2 after the first);
# decode and MTP verification stay below it.
FUSED_MAX_ROWS = 8
ROWS_PER_PROGRAM = 16  # weight rows per program
# Programs a launch aims for (split-K makes up the rest): ~4 per SM of an H100 keeps enough loads in flight.
TARGET_PROGRAMS = 512
WARPS = 4
DEQUANT_ROWS = 8  # rows per program of the dequantizer: 8 × 256 f32 = 8 KB stored per program


if triton is not None:

    @triton.jit
    def _f16_at(w8, byte_off):
        """The f16 stored at even byte offsets `byte_off`, as f32."""
        w16 = w8.to(tl.pointer_type(tl.int16))
        return tl.load(w16 + byte_off // 2).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _fp4(n):
        """MXFP4 nibbles → the e2m1 value doubled (0, ±1, ±2, ±3, ±4, ±6, ±8, ±12), as ggml's table holds it.

        Built as f32 bits: a magnitude m ≥ 2 is 2^(m//2)·(1 + (m&1)/2), i.e. bits (m + 254) << 22; 1 is 1.0."""
        m = n & 7
        bits = tl.where(m > 1, (m + 254) << 22, m * 0x3F800000) | ((n & 8) << 28)
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _u16(w8, byte_off):
        """The little-endian u16 at even byte offsets `byte_off`, as int32."""
        return tl.load(w8.to(tl.pointer_type(tl.int16)) + byte_off // 2).to(tl.int32) & 0xFFFF

    @triton.jit
    def _k4_scale_min(w8, base, s):
        """Q4_K's 6-bit (scale, min) of sub-blocks `s` [S] for super-blocks at byte offsets `base` [BN]."""
        sc_at = w8 + base[:, None] + 4
        a = tl.load(sc_at + s[None, :]).to(tl.int32)  # scales[s]
        c = tl.load(sc_at + s[None, :] + 4).to(tl.int32)  # scales[s + 4]
        p = tl.load(sc_at + (s[None, :] & 3)).to(tl.int32)  # scales[s - 4] where s >= 4
        lowhalf = s[None, :] < 4
        sc = tl.where(lowhalf, a & 63, (c & 0xF) | ((p >> 6) << 4))
        mn = tl.where(lowhalf, c & 63, (c >> 4) | ((a >> 6) << 4))
        return sc.to(tl.float32), mn.to(tl.float32)

    # Each decoder below decodes one 256-element step of BN rows (or one sub-step of it) into (weights, k): a 4-D
    # f32 tile of the weights and the column of each (a tile of the same shape less the row axis), in a layout
    # fixed per type. The matvec
    # multiplies by x[k] and adds tiles, reducing once at the end (the loop body is loads and FMAs, no
    # cross-thread reduction); the dequantizer stores the tile at [row, k]. Values match kernels/dequant.py bit
    # for bit when compiled without FMA contraction (its multiply-then-subtract order).

    @triton.jit
    def _q8_0(w8, row, kk, K):
        """Q8_0: 34-byte blocks (f16 d, 32 × int8), read as int16 words (the blocks are 2-aligned) → [BN, 8, 16, 2]."""
        b = tl.arange(0, 8)
        i = tl.arange(0, 16)
        base = row[:, None] + ((kk // 32 + b) * 34)[None, :]  # [BN, 8]
        ok = (kk + 32 * b) < K
        d = tl.where(ok[None, :], _f16_at(w8, base), 0.0)[:, :, None]
        w16 = w8.to(tl.pointer_type(tl.int16))
        pair = tl.load(w16 + (base // 2 + 1)[:, :, None] + i[None, None, :], mask=ok[None, :, None], other=0)
        lo = ((pair << 8) >> 8).to(tl.float32) * d  # the even element, sign-extended
        hi = (pair >> 8).to(tl.float32) * d
        k = kk + 32 * b[:, None] + 2 * i[None, :]  # [8, 16]
        return tl.join(lo, hi), tl.join(k, k + 1)

    @triton.jit
    def _mxfp4(w8, row, kk, K):
        """MXFP4: 17-byte blocks (e8m0 exponent, 16 bytes: element j low nibble, j + 16 high) → [BN, 8, 16, 2]."""
        b = tl.arange(0, 8)
        i = tl.arange(0, 16)
        base = row[:, None] + ((kk // 32 + b) * 17)[None, :]
        ok = (kk + 32 * b) < K
        e = tl.load(w8 + base, mask=ok[None, :], other=0).to(tl.int32)
        bits = tl.where(e < 2, 0x00200000 << e, (e - 1) << 23)  # 2^(e-128), subnormals for e < 2
        d = tl.where(ok[None, :], bits.to(tl.float32, bitcast=True), 0.0)[:, :, None]
        q = tl.load(w8 + base[:, :, None] + 1 + i[None, None, :], mask=ok[None, :, None], other=0).to(tl.int32)
        k = kk + 32 * b[:, None] + i[None, :]
        return tl.join(d * _fp4(q & 15), d * _fp4(q >> 4)), tl.join(k, k + 16)

    @triton.jit
    def _q4_k(w8, row, kk, K):
        """Q4_K: 144 bytes (d, dmin, 12 scale bytes, 128 bytes: sub-block 2p low nibbles, 2p+1 high) → [BN, 4, 32, 2]."""
        base = row + (kk // 256) * 144
        d = _f16_at(w8, base)[:, None]
        dmin = _f16_at(w8, base + 2)[:, None]
        p = tl.arange(0, 4)
        i = tl.arange(0, 32)
        q = tl.load(w8 + base[:, None, None] + 16 + (32 * p)[None, :, None] + i[None, None, :]).to(tl.int32)
        sc_l, mn_l = _k4_scale_min(w8, base, 2 * p)
        sc_h, mn_h = _k4_scale_min(w8, base, 2 * p + 1)
        wl = (d * sc_l)[:, :, None] * (q & 15).to(tl.float32) - (dmin * mn_l)[:, :, None]
        wh = (d * sc_h)[:, :, None] * (q >> 4).to(tl.float32) - (dmin * mn_h)[:, :, None]
        k = kk + 64 * p[:, None] + i[None, :]
        return tl.join(wl, wh), tl.join(k, k + 32)

    @triton.jit
    def _q2_k(w8, row, kk, K, j):
        """Q2_K: 84 bytes (16 scale/min bytes, 64 bytes of 2-bit quants, d, dmin); bit pair j → [BN, 1, 4, 16]."""
        # element 128h + 32j + 16g' + i sits in byte 32h + 16g' + i at bits 2j; its sub-block is 8h + 2j + g'
        base = row + (kk // 256) * 84
        d = _f16_at(w8, base + 80)[:, None]
        dmin = _f16_at(w8, base + 82)[:, None]
        g = tl.arange(0, 4)  # g = 2h + g'
        i = tl.arange(0, 16)
        q = tl.load(w8 + base[:, None, None] + 16 + (16 * g)[None, :, None] + i[None, None, :]).to(tl.int32)
        sm = tl.load(w8 + base[:, None] + (8 * (g // 2) + 2 * j + (g % 2))[None, :]).to(tl.int32)  # [BN, 4]
        wq = (d * (sm & 0xF).to(tl.float32))[:, :, None] * ((q >> (2 * j)) & 3).to(tl.float32)
        w = wq - (dmin * (sm >> 4).to(tl.float32))[:, :, None]
        k = kk + (128 * (g // 2) + 32 * j + 16 * (g % 2))[:, None] + i[None, :]
        return w[:, None], k[None]

    @triton.jit
    def _q3_k(w8, row, kk, K, j):
        """Q3_K: 110 bytes (32 high-bit bytes, 64 bytes of low 2 bits, 12 scale bytes, d); bit pair j →
        [BN, 1, 4, 16]."""
        base = row + (kk // 256) * 110
        d = _f16_at(w8, base + 108)[:, None]
        g = tl.arange(0, 4)
        i = tl.arange(0, 16)
        q = tl.load(w8 + base[:, None, None] + 32 + (16 * g)[None, :, None] + i[None, None, :]).to(tl.int32)
        hm = tl.load(w8 + base[:, None, None] + (16 * (g % 2))[None, :, None] + i[None, None, :]).to(tl.int32)
        sub = 8 * (g // 2) + 2 * j + (g % 2)  # [4]
        lo4 = (tl.load(w8 + base[:, None] + 96 + (sub % 8)[None, :]).to(tl.int32) >> (4 * (sub // 8))[None, :]) & 0xF
        hi2 = (tl.load(w8 + base[:, None] + 104 + (sub % 4)[None, :]).to(tl.int32) >> (2 * (sub // 4))[None, :]) & 3
        sc = d * ((lo4 | (hi2 << 4)) - 32).to(tl.float32)  # [BN, 4]
        hbit = (hm >> (4 * (g // 2) + j)[None, :, None]) & 1
        v = (((q >> (2 * j)) & 3) - 4 * (1 - hbit)).to(tl.float32)
        k = kk + (128 * (g // 2) + 32 * j + 16 * (g % 2))[:, None] + i[None, :]
        return (sc[:, :, None] * v)[:, None], k[None]

    @triton.jit
    def _q5_k(w8, row, kk, K):
        """Q5_K: 176 bytes (d, dmin, 12 scale bytes, 32 bytes of fifth bits, 128 bytes of nibbles as Q4_K's)
        → [BN, 4, 32, 2]."""
        base = row + (kk // 256) * 176
        d = _f16_at(w8, base)[:, None]
        dmin = _f16_at(w8, base + 2)[:, None]
        p = tl.arange(0, 4)
        i = tl.arange(0, 32)
        q = tl.load(w8 + base[:, None, None] + 48 + (32 * p)[None, :, None] + i[None, None, :]).to(tl.int32)
        qh = tl.load(w8 + base[:, None, None] + 16 + i[None, None, :]).to(tl.int32)  # bit s: sub-block s
        ql = (q & 15) | (((qh >> (2 * p)[None, :, None]) & 1) << 4)
        qv = (q >> 4) | (((qh >> (2 * p + 1)[None, :, None]) & 1) << 4)
        sc_l, mn_l = _k4_scale_min(w8, base, 2 * p)
        sc_h, mn_h = _k4_scale_min(w8, base, 2 * p + 1)
        wl = (d * sc_l)[:, :, None] * ql.to(tl.float32) - (dmin * mn_l)[:, :, None]
        wh = (d * sc_h)[:, :, None] * qv.to(tl.float32) - (dmin * mn_h)[:, :, None]
        k = kk + 64 * p[:, None] + i[None, :]
        return tl.join(wl, wh), tl.join(k, k + 32)

    @triton.jit
    def _q6_k(w8, row, kk, K):
        """Q6_K: 210 bytes (128 bytes of low nibbles, 64 of high bit pairs, 16 int8 scales, d) → [BN, 8, 2, 16]:
        element 128h + 32j + 16g + i at [r = 4h + j, g, i], its scale 2r + g."""
        base = row + (kk // 256) * 210
        d = _f16_at(w8, base + 208)[:, None, None, None]
        r = tl.arange(0, 8)[:, None, None]
        g = tl.arange(0, 2)[None, :, None]
        i = tl.arange(0, 16)[None, None, :]
        h = r // 4
        j = r % 4
        lo = (tl.load(w8 + base[:, None, None, None] + (64 * h + 32 * (j % 2) + 16 * g + i)[None]).to(tl.int32)
              >> (4 * (j // 2))[None]) & 15
        hi = (tl.load(w8 + base[:, None, None, None] + (128 + 32 * h + 16 * g + i)[None]).to(tl.int32)
              >> (2 * j)[None]) & 3
        sc = tl.load(w8.to(tl.pointer_type(tl.int8)) + base[:, None, None, None] + 192 + (2 * r + g)[None])
        w = (d * sc.to(tl.float32)) * ((lo | (hi << 4)) - 32).to(tl.float32)
        return w, 128 * h + 32 * j + 16 * g + i + kk

    @triton.jit
    def _iq4_xs(w8, row, kk, K, kvalues):
        """IQ4_XS: 136 bytes (d, u16 of high scale bits, 4 bytes of low scale nibbles, 128 bytes: sub-block b's
        element i low nibble of byte 16b + i, element i + 16 high) → [BN, 8, 16, 2]."""
        base = row + (kk // 256) * 136
        d = _f16_at(w8, base)[:, None]
        b = tl.arange(0, 8)
        i = tl.arange(0, 16)
        sh = _u16(w8, base + 2)[:, None]
        sl = (tl.load(w8 + base[:, None] + 4 + (b // 2)[None, :]).to(tl.int32) >> (4 * (b % 2))[None, :]) & 15
        dl = (d * ((sl | (((sh >> (2 * b)[None, :]) & 3) << 4)) - 32).to(tl.float32))[:, :, None]
        q = tl.load(w8 + base[:, None, None] + 8 + (16 * b)[None, :, None] + i[None, None, :]).to(tl.int32)
        k = kk + 32 * b[:, None] + i[None, :]
        return tl.join(dl * tl.load(kvalues + (q & 15)), dl * tl.load(kvalues + (q >> 4))), tl.join(k, k + 16)

    # The lattice types decode to [BN, 8, 4, 8]: element 32b + 8l + m at [b, l, m] (b the 32-element group, l its
    # 8-element run). `grid` is gguf-py's lattice as f32 [entries, 8 or 4], `ksigns` its 128 sign patterns.

    @triton.jit
    def _lattice_k(kk):
        b = tl.arange(0, 8)[:, None, None]
        l = tl.arange(0, 4)[None, :, None]
        m = tl.arange(0, 8)[None, None, :]
        return kk + 32 * b + 8 * l + m

    @triton.jit
    def _signed(w, signs, m):
        """w negated where bit m of `signs` [BN, 8, 4] is set (exact, as the reference's ±1 product)."""
        return tl.where(((signs[:, :, :, None] >> m) & 1) == 0, w, -w)

    @triton.jit
    def _iq2_xxs(w8, row, kk, K, grid, ksigns):
        """IQ2_XXS: 66 bytes (d; per group 4 lattice-index bytes, a u32 of four 7-bit sign indices and a 4-bit
        scale) → [BN, 8, 4, 8]."""
        base = row + (kk // 256) * 66
        b = tl.arange(0, 8)
        l = tl.arange(0, 4)
        m = tl.arange(0, 8)[None, None, None, :]
        at = base[:, None] + 2 + 8 * b[None, :]  # [BN, 8]
        aux = _u16(w8, at + 4) | (_u16(w8, at + 6) << 16)
        db = _f16_at(w8, base)[:, None] * (0.5 + ((aux >> 28) & 15).to(tl.float32)) * 0.25
        idx = tl.load(w8 + at[:, :, None] + l[None, None, :]).to(tl.int32)  # [BN, 8, 4]
        w = db[:, :, None, None] * tl.load(grid + (8 * idx)[:, :, :, None] + m)
        signs = tl.load(ksigns + ((aux[:, :, None] >> (7 * l)[None, None, :]) & 127)).to(tl.int32)
        return _signed(w, signs, m), _lattice_k(kk)

    @triton.jit
    def _iq3_xxs(w8, row, kk, K, grid, ksigns):
        """IQ3_XXS: 98 bytes (d, 64 lattice-index bytes of 4 values each, 8 u32 of sign indices and scale as
        IQ2_XXS's) → [BN, 8, 4, 8]."""
        base = row + (kk // 256) * 98
        b = tl.arange(0, 8)
        l = tl.arange(0, 4)
        m = tl.arange(0, 8)[None, None, None, :]
        at = base[:, None] + 66 + 4 * b[None, :]
        aux = _u16(w8, at) | (_u16(w8, at + 2) << 16)
        db = _f16_at(w8, base)[:, None] * (0.5 + ((aux >> 28) & 15).to(tl.float32)) * 0.5
        qs = (base[:, None] + 2 + 8 * b[None, :])[:, :, None, None] + (2 * l)[None, None, :, None] + m // 4
        idx = tl.load(w8 + qs).to(tl.int32)  # [BN, 8, 4, 8]
        w = db[:, :, None, None] * tl.load(grid + 4 * idx + m % 4)
        signs = tl.load(ksigns + ((aux[:, :, None] >> (7 * l)[None, None, :]) & 127)).to(tl.int32)
        return _signed(w, signs, m), _lattice_k(kk)

    @triton.jit
    def _iq2_xs(w8, row, kk, K, grid, ksigns):
        """IQ2_XS: 74 bytes (d, 32 u16: 9-bit lattice index, 7-bit sign index; 8 bytes of 4-bit scales, one per 16
        elements) → [BN, 8, 4, 8]."""
        base = row + (kk // 256) * 74
        b = tl.arange(0, 8)[None, :, None]
        l = tl.arange(0, 4)[None, None, :]
        m = tl.arange(0, 8)[None, None, None, :]
        q = _u16(w8, base[:, None, None] + 2 + 8 * b + 2 * l)  # [BN, 8, 4]
        sc = (tl.load(w8 + base[:, None, None] + 66 + b).to(tl.int32) >> (4 * (l // 2))) & 15
        db = _f16_at(w8, base)[:, None, None] * (0.5 + sc.to(tl.float32)) * 0.25
        w = db[:, :, :, None] * tl.load(grid + (8 * (q & 511))[:, :, :, None] + m)
        return _signed(w, tl.load(ksigns + (q >> 9)).to(tl.int32), m), _lattice_k(kk)

    @triton.jit
    def _iq2_s(w8, row, kk, K, grid):
        """IQ2_S: 82 bytes (d, 32 low index bytes, 32 sign bytes, 8 bytes of 2-bit index highs, 8 of 4-bit scales)
        → [BN, 8, 4, 8]."""
        base = row + (kk // 256) * 82
        b = tl.arange(0, 8)[None, :, None]
        l = tl.arange(0, 4)[None, None, :]
        m = tl.arange(0, 8)[None, None, None, :]
        at = base[:, None, None] + 4 * b + l  # [BN, 8, 4]: byte t = 4b + l of each array
        qh = (tl.load(w8 + base[:, None, None] + 66 + b).to(tl.int32) >> (2 * l)) & 3
        idx = tl.load(w8 + at + 2).to(tl.int32) | (qh << 8)
        sc = (tl.load(w8 + base[:, None, None] + 74 + b).to(tl.int32) >> (4 * (l // 2))) & 15
        db = _f16_at(w8, base)[:, None, None] * (0.5 + sc.to(tl.float32)) * 0.25
        w = db[:, :, :, None] * tl.load(grid + (8 * idx)[:, :, :, None] + m)
        return _signed(w, tl.load(w8 + at + 34).to(tl.int32), m), _lattice_k(kk)

    @triton.jit
    def _iq3_s(w8, row, kk, K, grid):
        """IQ3_S: 110 bytes (d, 64 low index bytes of 4 values each, 8 bytes of index high bits, 32 sign bytes,
        4 bytes of 4-bit scales) → [BN, 8, 4, 8]."""
        base = row + (kk // 256) * 110
        b = tl.arange(0, 8)[None, :, None]
        l = tl.arange(0, 4)[None, None, :]
        m = tl.arange(0, 8)[None, None, None, :]
        bit = (2 * l)[:, :, :, None] + m // 4  # index t = 8b + bit
        lo = tl.load(w8 + (base[:, None, None] + 2 + 8 * b)[:, :, :, None] + bit).to(tl.int32)
        hi = (tl.load(w8 + base[:, None, None] + 66 + b).to(tl.int32)[:, :, :, None] >> bit) & 1
        sc = (tl.load(w8 + base[:, None, None] + 106 + b // 2).to(tl.int32) >> (4 * (b % 2))) & 15
        db = _f16_at(w8, base)[:, None, None] * (1 + 2 * sc).to(tl.float32)  # [BN, 8, 1]
        w = db[:, :, :, None] * tl.load(grid + 4 * (lo | (hi << 8)) + m % 4)
        return _signed(w, tl.load(w8 + base[:, None, None] + 74 + 4 * b + l).to(tl.int32), m), _lattice_k(kk)

    @triton.jit
    def _iq1_m(w8, row, kk, K, grid):
        """IQ1_M: 56 bytes (32 low index bytes, 16 bytes of nibbles: 3 index bits and the delta's sign per 8
        elements, 4 u16 of 3-bit scales per 16 elements whose top nibbles hold the f16 d) → [BN, 8, 4, 8]."""
        base = row + (kk // 256) * 56
        b = tl.arange(0, 8)[None, :, None]
        l = tl.arange(0, 4)[None, None, :]
        m = tl.arange(0, 8)[None, None, None, :]
        s0 = _u16(w8, base + 48)
        s1 = _u16(w8, base + 50)
        s2 = _u16(w8, base + 52)
        s3 = _u16(w8, base + 54)
        dbits = (s0 >> 12) | ((s1 >> 8) & 0xF0) | ((s2 >> 4) & 0xF00) | (s3 & 0xF000)
        d = dbits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)[:, None, None]
        sw = _u16(w8, base[:, None, None] + 48 + 2 * (b // 2))  # [BN, 8, 1]
        dl = d * (2 * ((sw >> (3 * (2 * (b % 2) + l // 2))) & 7) + 1).to(tl.float32)  # [BN, 8, 4]
        h = (tl.load(w8 + base[:, None, None] + 32 + 2 * b + l // 2).to(tl.int32) >> (4 * (l % 2))) & 15
        idx = tl.load(w8 + base[:, None, None] + 4 * b + l).to(tl.int32) | ((h & 7) << 8)
        delta = tl.where((h & 8) == 0, 0.125, -0.125)
        w = dl[:, :, :, None] * (tl.load(grid + (8 * idx)[:, :, :, None] + m) + delta[:, :, :, None])
        return w, _lattice_k(kk)

    @triton.jit
    def _zeros(QT: tl.constexpr, BN: tl.constexpr):
        """The accumulator of type QT's step tile."""
        if QT <= 1 or QT == 5:
            z = tl.zeros([BN, 8, 16, 2], dtype=tl.float32)
        elif QT == 2 or QT == 6:
            z = tl.zeros([BN, 4, 32, 2], dtype=tl.float32)
        elif QT <= 4:
            z = tl.zeros([BN, 1, 4, 16], dtype=tl.float32)
        elif QT == 7:
            z = tl.zeros([BN, 8, 2, 16], dtype=tl.float32)
        else:
            z = tl.zeros([BN, 8, 4, 8], dtype=tl.float32)
        return z

    @triton.jit
    def _decode(w8, row, kk, K, j, grid, ksigns, QT: tl.constexpr):
        """(weights, k) of sub-step j of the 256 elements from kk for rows at byte offsets `row` [BN]: type QT's
        decoder (codes in _KINDS). Q2_K / Q3_K take four sub-steps (one per 2-bit plane, each decoded on its own:
        one 4-D tile of all four needed twice the registers and ran at half the speed); the others one."""
        if QT == 0:
            w, k = _q8_0(w8, row, kk, K)
        elif QT == 1:
            w, k = _mxfp4(w8, row, kk, K)
        elif QT == 2:
            w, k = _q4_k(w8, row, kk, K)
        elif QT == 3:
            w, k = _q2_k(w8, row, kk, K, j)
        elif QT == 4:
            w, k = _q3_k(w8, row, kk, K, j)
        elif QT == 5:
            w, k = _iq4_xs(w8, row, kk, K, grid)
        elif QT == 6:
            w, k = _q5_k(w8, row, kk, K)
        elif QT == 7:
            w, k = _q6_k(w8, row, kk, K)
        elif QT == 8:
            w, k = _iq2_xxs(w8, row, kk, K, grid, ksigns)
        elif QT == 9:
            w, k = _iq2_xs(w8, row, kk, K, grid, ksigns)
        elif QT == 10:
            w, k = _iq2_s(w8, row, kk, K, grid)
        elif QT == 11:
            w, k = _iq3_xxs(w8, row, kk, K, grid, ksigns)
        elif QT == 12:
            w, k = _iq3_s(w8, row, kk, K, grid)
        else:
            w, k = _iq1_m(w8, row, kk, K, grid)
        return w, k

    @triton.jit
    def _step(w8, row, kk, K, xp, j, grid, ksigns, QT: tl.constexpr):
        """W[row, k]·x[k] for sub-step j of the 256 elements from kk, elementwise (the caller sums)."""
        w, k = _decode(w8, row, kk, K, j, grid, ksigns, QT)
        return w * tl.load(xp + k, mask=k < K, other=0.0)[None]

    @triton.jit
    def _rows_kernel(w_ptr, w2_ptr, g_ptr, s_ptr, x_ptr, y_ptr, e_ptr, N, K, k_chunk, row_bytes, expert_bytes, x_stride, x_div,
                     limit, QT: tl.constexpr, NJ: tl.constexpr, GLU: tl.constexpr, FUSE: tl.constexpr,
                     HAS_E: tl.constexpr, BN: tl.constexpr):
        """y[s, p, n] = Σ_{k in chunk s} W_e[n, k]·x[p // x_div, k] for output pair p (program axis 1), K-chunk s
        (axis 2), e = e_ptr[p] or 0. GLU: W is the gate and w2 the up weight; FUSE (one chunk): y = silu(min(g, L))
        ·clamp(u, ±L), DeepSeek-V4's SwiGLU; else the gate's partial sums go to y[s] and the up's to y[S + s]."""
        p = tl.program_id(1)
        s = tl.program_id(2)
        P = tl.num_programs(1)
        S = tl.num_programs(2)
        rows = tl.program_id(0) * BN + tl.arange(0, BN)
        row = tl.minimum(rows, N - 1).to(tl.int64) * row_bytes
        if HAS_E:
            row += tl.load(e_ptr + p).to(tl.int64) * expert_bytes
        xp = x_ptr + (p // x_div).to(tl.int64) * x_stride
        acc = _zeros(QT, BN)
        acc2 = _zeros(QT, BN)
        for kk in range(s * k_chunk, tl.minimum(K, (s + 1) * k_chunk), 256):
            for j in tl.static_range(NJ):
                acc += _step(w_ptr, row, kk, K, xp, j, g_ptr, s_ptr, QT)
                if GLU:
                    acc2 += _step(w2_ptr, row, kk, K, xp, j, g_ptr, s_ptr, QT)
        y = tl.sum(tl.sum(tl.sum(acc, axis=3), axis=2), axis=1)
        out = y_ptr + (s * P + p).to(tl.int64) * N + rows
        if GLU:
            u = tl.sum(tl.sum(tl.sum(acc2, axis=3), axis=2), axis=1)
            if FUSE:
                g = tl.minimum(y, limit)
                y = g / (1.0 + tl.exp(-g)) * tl.minimum(tl.maximum(u, -limit), limit)
            else:
                tl.store(out + S * P * N, u, mask=rows < N)
        tl.store(out, y, mask=rows < N)

    @triton.jit
    def _dequant_kernel(w_ptr, g_ptr, s_ptr, y_ptr, N, K, row_bytes, QT: tl.constexpr, NJ: tl.constexpr, BN: tl.constexpr):
        """W [N, K] → f32 y [N, K]: one 256-element step of BN rows per program (axis 0 rows, axis 1 steps)."""
        rows = tl.program_id(0) * BN + tl.arange(0, BN)
        row = tl.minimum(rows, N - 1).to(tl.int64) * row_bytes
        for j in tl.static_range(NJ):
            w, k = _decode(w_ptr, row, tl.program_id(1) * 256, K, j, g_ptr, s_ptr, QT)
            at = y_ptr + rows.to(tl.int64)[:, None, None, None] * K + k[None]
            tl.store(at, w, mask=(rows < N)[:, None, None, None] & (k < K)[None])

    @triton.jit
    def _sinkhorn_kernel(c_ptr, out_ptr, iters, eps, S: tl.constexpr):
        """One token's S×S mixing logits → its Sinkhorn-balanced comb (kernels/mhc.py reference_sinkhorn)."""
        at = tl.program_id(0).to(tl.int64) * S * S + tl.arange(0, S)[:, None] * S + tl.arange(0, S)[None, :]
        x = tl.load(c_ptr + at)
        x = tl.exp(x - tl.max(x, axis=1)[:, None])
        x = x / tl.sum(x, axis=1)[:, None] + eps
        x = x / (tl.sum(x, axis=0)[None, :] + eps)
        for _ in range(iters - 1):
            x = x / (tl.sum(x, axis=1)[:, None] + eps)
            x = x / (tl.sum(x, axis=0)[None, :] + eps)
        tl.store(out_ptr + at, x)


def _lattices(qtype: Q, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(the type's value table, as the type table names it, ksigns) from kernels/dequant.py's tables (any tensor for
    a type without one: the kernel never reads it)."""
    t = tables(device)
    return t[ggml.TYPES[qtype].values or "IQ4_NL"], t["ksigns"]


def _split(N: int, pairs: int, K: int) -> int:
    """K-chunks per output row: enough programs to keep every SM streaming (a 2048-row expert alone is only 128
    row blocks), with at least two 256-element steps per chunk."""
    progs = triton.cdiv(N, ROWS_PER_PROGRAM) * pairs
    return max(1, min(triton.cdiv(TARGET_PROGRAMS, progs), K // 512))


def _rows(w: QWeight, x2: torch.Tensor, pairs: int, *, w2: QWeight | None = None,
          experts: torch.Tensor | None = None, x_div: int = 1, limit: float = 0.0) -> torch.Tensor:
    """[pairs, N] f32 from the fused kernel: pair p multiplies x2[p // x_div] by W (expert experts[p] if given);
    with w2, the SwiGLU of W's and w2's products."""
    N, K = w.shape[-2:]
    split = _split(N, pairs, K)
    k_chunk = triton.cdiv(triton.cdiv(K, 256), split) * 256
    split = triton.cdiv(K, k_chunk)
    glu = w2 is not None
    y = torch.empty((2 if glu and split > 1 else 1) * split, pairs, N, dtype=torch.float32, device=x2.device)
    per_expert = w.raw.numel() // w.shape[0] if experts is not None else 0
    grid = (triton.cdiv(N, ROWS_PER_PROGRAM), pairs, split)
    _rows_kernel[grid](w.raw, (w2 or w).raw, *_lattices(w.qtype, w.raw.device), x2, y, experts if experts is not None else y, N, K, k_chunk,
                       w.row_bytes, per_expert, x2.stride(0), x_div, float(limit), QT=_CODES[w.qtype],
                       NJ=_KINDS[w.qtype][1], GLU=glu,
                       FUSE=glu and split == 1, HAS_E=experts is not None, BN=ROWS_PER_PROGRAM, num_warps=WARPS)
    if split == 1:
        return y[0]
    if glu:
        return swiglu(*y.view(2, split, pairs, N).sum(1), limit)
    return y.sum(0)


def dequantize(w: QWeight) -> torch.Tensor:
    """A 2-D quantized weight → f32 [N, K] in one launch, bit-identical to kernels/dequant.py."""
    N, K = w.shape
    y = torch.empty(N, K, dtype=torch.float32, device=w.device)
    grid = (triton.cdiv(N, DEQUANT_ROWS), triton.cdiv(K, 256))
    # no FMA contraction: the K-quants' scale·q − min must round twice, as the reference does
    _dequant_kernel[grid](w.raw, *_lattices(w.qtype, w.raw.device), y, N, K, w.row_bytes, QT=_CODES[w.qtype],
                          NJ=_KINDS[w.qtype][1], BN=DEQUANT_ROWS, num_warps=4, enable_fp_fusion=False)
    return y


def _fits(x: torch.Tensor, w: QWeight, ndim: int) -> bool:
    return x.dtype == torch.float32 and len(w.shape) == ndim and w.raw.is_contiguous() and w.qtype in _CODES


def gpu_linear(x: torch.Tensor, w: QWeight) -> torch.Tensor:
    """`linear` on CUDA: the fused kernel for few rows, else one-launch dequantize + f32 cuBLAS."""
    if not _fits(x, w, 2):
        return reference_linear(x, w)
    N, K = w.shape
    x2 = x.reshape(-1, K)
    if x2.shape[0] > FUSED_MAX_ROWS:
        return F.linear(x, dequantize(w))
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return _rows(w, x2, x2.shape[0]).view(*x.shape[:-1], N)


def gpu_linear_bf16(x: torch.Tensor, w: QWeight) -> torch.Tensor:
    """`linear` on CUDA for BF16 / F16 weights: cuBLAS on the stored tensor, activations rounded to its dtype."""
    p = w.plain()
    if x.dtype != torch.float32 or p is None:
        return reference_linear(x, w)
    return F.linear(x.to(p.dtype), p).float()


def gpu_routed_experts(x: torch.Tensor, idx: torch.Tensor, wts: torch.Tensor, w1: QWeight, w3: QWeight,
                       w2: QWeight, limit: float) -> torch.Tensor | None:
    """`routed_experts` on CUDA in two launches (gate+up with the SwiGLU, then down) plus a weighted sum; the
    expert ids stay on the device. None (→ reference) for unsupported inputs."""
    E, I, D = w1.shape
    if not (w3.qtype == w1.qtype and w3.shape == w1.shape and w2.shape == (E, D, I)
            and _fits(x, w1, 3) and _fits(x, w2, 3)):
        return None
    T, k = idx.shape
    x = x.contiguous()
    flat = idx.reshape(-1).to(torch.int32).contiguous()
    h = _rows(w1, x, T * k, w2=w3, experts=flat, x_div=k, limit=limit)  # (T·k, I)
    y = _rows(w2, h, T * k, experts=flat)  # (T·k, D)
    return (y.view(T, k, D) * wts.to(torch.float32).view(T, k, 1)).sum(1)


def sinkhorn(logits: torch.Tensor, p: MixerParams) -> torch.Tensor:
    """`reference_sinkhorn` in one launch (the reference is ~6 small ops per round, 20 rounds per mixer)."""
    T, S, _ = logits.shape
    logits = logits.contiguous()
    out = torch.empty_like(logits)
    _sinkhorn_kernel[(T,)](logits, out, p.iters, float(p.eps), S=S, num_warps=1)
    return out


class GpuMixers:
    """mHC mixers on CUDA: the reference's few ops for the weights, the Sinkhorn rounds in one Triton launch."""

    def pre(self, X: torch.Tensor, p: MixerParams):
        if X.dtype != torch.float32 or p.S & (p.S - 1) or p.S > 16:  # the kernel's tile is a power of two
            return None
        x, post, logits = mhc.pre_parts(X, p)
        return x, post, sinkhorn(logits, p)

    def collapse(self, X: torch.Tensor, p: MixerParams):
        return None

    def post(self, y, X, post, comb):
        return None


def available() -> bool:
    """Whether the kernels can run here: Triton imports and there is a CUDA device (or TRITON_INTERPRET=1)."""
    return triton is not None and (torch.cuda.is_available() or INTERPRET)


def install() -> bool:
    """File the kernels in the ops' "cuda" tables; False (nothing filed) where they cannot run."""
    if not available():
        return False
    linear_op.register("cuda", gpu_linear, qtypes=TYPES)
    linear_op.register("cuda", gpu_linear_bf16, qtypes=FLOAT_TYPES)
    routed_experts_op.register("cuda", gpu_routed_experts)
    mhc.hc_pre_op.register("cuda", GpuMixers().pre)
    return True
