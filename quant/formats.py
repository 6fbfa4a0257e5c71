"""Numpy quantizers into ggml block layouts, and decoders for the official checkpoint's FP8/FP4 formats.

`quantize(x, qtype)` returns uint8 bytes shaped `(*rows, row_bytes)`, laid out exactly as ggml stores them.
Q8_0, F16 and BF16 match gguf-py bit for bit. The K-quants follow ggml's own searches (`quantize_row_q{2,3,4,6}_K_ref`
in ggml-quants.c, or the `_impl` variants when an importance matrix is given) vectorized over blocks: every
per-block loop of the C code becomes array math over all blocks at once; only the fixed search steps of each
algorithm are Python loops. Against libggml they agree on >99% of output bytes (float summation order differs).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from gguf.quants import dequantize

from quant import iq2, iq3
from quant.ggml import TYPES, QType, byte_shape, type_info
from quant.errors import BadInput, UnsupportedModel

QK_K = 256
GROUP_MAX_EPS = np.float32(1e-15)  # ggml's "all zero" threshold for a group
# Elements per work chunk: big enough to amortize numpy call overhead, small enough that the dozen temporaries
# (1 MB each) stay in cache; measured best of 2^14..2^20. Q3_K's descent works on per-group vectors, so it gains
# from bigger chunks instead.
_CHUNK_ELEMS = 1 << 18
_CHUNK_ELEMS_Q3_K = 1 << 20

_f32 = np.float32


# ---------------------------------------------------------------------------------------------------------------
# Shared helpers


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: the 1.5*2^23 trick rounds half to even, which is what np.rint does."""
    return np.rint(v)


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """roundf(): ties away from zero, computed without the 0.5-addition rounding error."""
    a = np.abs(v)
    fl = np.floor(a)
    return np.sign(v) * (fl + np.floor(2 * (a - fl)))


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    """(N,) f32 → (N, 2) uint8 little-endian f16 (round to nearest even, as GGML_FP32_TO_FP16)."""
    return np.ascontiguousarray(v, dtype=np.float32).astype(np.float16).view(np.uint8).reshape(-1, 2)


def _f16_roundtrip(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16).astype(np.float32)


def _absmax_signed(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of (G, n): the element with the largest |x| (first on ties, as ggml's strict `>`), and |it|."""
    idx = np.abs(x).argmax(axis=-1)
    mx = np.take_along_axis(x, idx[:, None], axis=-1)[:, 0]
    return mx, np.abs(mx)


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """(B, 256) values 0..3 → (B, 64) bytes; byte h*32+l holds L[h*128 + k*32 + l] at bits 2k (q2_K/q3_K)."""
    L = L.reshape(-1, 2, 4, 32).astype(np.uint8)
    q = L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)
    return q.reshape(-1, 64)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b != 0, a / np.where(b != 0, b, 1), 0).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# ggml's per-group scale searches, vectorized over groups.
# Arrays are element-major, (n, G): one column per group. Per-group sums then run down axis 0 as whole-row adds,
# which numpy vectorizes; summing the short last axis of a (G, n) array is an order of magnitude slower.


def _absmax_cols(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column of (n, G): the element with the largest |x| (first on ties, as ggml's strict `>`), and |it|."""
    a = np.abs(x)
    amax, mx = a[0].copy(), x[0].copy()
    for i in range(1, x.shape[0]):  # row by row: argmax down a strided axis is slower
        m = a[i] > amax
        np.copyto(amax, a[i], where=m)
        np.copyto(mx, x[i], where=m)
    return mx, amax


def _make_qkx2_quants(
    x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants: asymmetric `x ≈ scale*L - the_min`, L in [0, nmax]. x, w: (n, G) → (scale, the_min, L)."""
    xmin = np.minimum(x.min(axis=0), 0).astype(np.float32)
    xmax = x.max(axis=0)
    flat = xmax == xmin
    xmax = np.where(flat, xmin + 1, xmax)
    wx = w * x
    sum_w, sum_x = w.sum(axis=0), wx.sum(axis=0)
    sum_wx2 = (wx * x).sum(axis=0).astype(np.float64)
    tmp = np.empty_like(x)

    def quant(iscale: np.ndarray, mn: np.ndarray, out: np.ndarray) -> np.ndarray:
        np.subtract(x, mn, out=out)
        out *= iscale
        np.rint(out, out=out)  # ggml's nearest_int rounds half to even
        return np.clip(out, 0, nmax, out=out)

    def sums(L: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        wl = np.multiply(w, L, out=tmp)
        return wl.sum(axis=0), np.einsum("ig,ig->g", wl, L), np.einsum("ig,ig->g", wl, x)

    def error(scale: np.ndarray, mn: np.ndarray, L: np.ndarray, s_l, s_l2, s_xl) -> np.ndarray:
        if use_mad:
            d = np.multiply(L, scale, out=tmp)
            d += mn
            d -= x
            np.abs(d, out=d)
            return np.einsum("ig,ig->g", w, d).astype(np.float64)
        # Weighted squared error from the sums already at hand: sum w (s*l + m - x)^2, expanded (f64 to keep it exact
        # enough to rank candidates).
        s, m = scale.astype(np.float64), mn.astype(np.float64)
        return s * s * s_l2 + m * m * sum_w + sum_wx2 + 2 * s * m * s_l - 2 * s * s_xl - 2 * m * sum_x

    iscale = _f32(nmax) / (xmax - xmin)
    L = quant(iscale, xmin, np.empty_like(x))
    scale = (1 / iscale).astype(np.float32)
    mn = xmin.copy()
    best = error(scale, mn, L, *(sums(L) if not use_mad else (None,) * 3))
    La = np.empty_like(x)
    for step in range(nstep + 1):
        # As in ggml, later steps measure from the best min found so far, not the data minimum.
        iscale = (_f32(rmin) + _f32(rdelta) * _f32(step) + _f32(nmax)) / (xmax - mn)
        quant(iscale, mn, La)
        sum_l, sum_l2, sum_xl = sums(La)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = np.where(ok, D, _f32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        pos = this_min > 0
        this_min = np.where(pos, _f32(0), this_min)
        this_scale = np.where(pos, _safe_div(sum_xl, sum_l2), this_scale)
        cur = error(this_scale, this_min, La, sum_l, sum_l2, sum_xl)
        better = ok & (cur < best)
        if better.any():
            np.copyto(L, La, where=better[None, :])
            best = np.where(better, cur, best)
            scale = np.where(better, this_scale, scale)
            mn = np.where(better, this_min, mn)
    L[:, flat] = 0
    scale = np.where(flat, _f32(0), scale)
    return scale.astype(np.float32), (-mn).astype(np.float32), L.astype(np.uint8)


def _make_qx_quants(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants (rmse_type 1 or explicit weights): `x ≈ scale*(L - nmax)`. x, w: (n, G) → (scale, L)."""
    mx, amax = _absmax_cols(x)
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, _f32(1), mx)
    wx = w * x
    tmp = np.empty_like(x)

    def trial(iscale: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        np.multiply(x, iscale, out=out)
        np.rint(out, out=out)
        np.clip(out, -nmax, nmax - 1, out=out)
        wl = np.multiply(w, out, out=tmp)
        return np.einsum("ig,ig->g", wx, out), np.einsum("ig,ig->g", wl, out)

    lv, lt = np.empty_like(x), np.empty_like(x)
    sumlx, suml2 = trial(_f32(-nmax) / mx, lv)
    scale = _safe_div(sumlx, suml2)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        slx, sl2 = trial(-(_f32(nmax) + _f32(0.1) * _f32(step)) / mx, lt)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        if better.any():
            np.copyto(lv, lt, where=better[None, :])
            scale = np.where(better, _safe_div(slx, sl2), scale)
            best = np.where(better, scale * slx, best)
    lv += nmax
    lv[:, zero] = 0
    return np.where(zero, _f32(0), scale).astype(np.float32), lv.astype(np.uint8)


def _descend(
    x: np.ndarray,
    w: np.ndarray,
    L: np.ndarray,
    sumlx: np.ndarray,
    suml2: np.ndarray,
    act: np.ndarray,
    lo: int | None,
    hi: int,
    qp: bool,
) -> None:
    """ggml's coordinate descent: up to 5 passes re-rounding one level at a time if it raises sumlx²/suml2.

    Updates L (n, G), sumlx and suml2 in place for the groups `act`. `qp` selects make_qp_quants' variant (both
    partial sums must be positive, no lower clamp) over make_q3_quants'. A group leaves once a pass changes nothing,
    as ggml's loop breaks.
    """
    wx = w * x
    xa, wa, wxa, La = x[:, act], w[:, act], wx[:, act], L[:, act]
    sx, s2 = sumlx[act], suml2[act]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for _ in range(5):
            if act.size == 0:
                break
            changed = np.zeros(act.size, dtype=bool)
            for i in range(x.shape[0]):
                xi, wi, wxi, Li = xa[i], wa[i], wxa[i], La[i]
                slx = sx - wxi * Li
                sl2 = s2 - wi * Li * Li
                pos = (slx > 0) & (sl2 > 0) if qp else slx > 0
                new_l = np.rint(np.where(pos, xi * sl2 / np.where(pos, slx, 1), 0))
                new_l = np.minimum(new_l, hi) if lo is None else np.clip(new_l, lo, hi)
                slx = slx + wxi * new_l
                sl2 = sl2 + wi * new_l * new_l
                take = pos & (new_l != Li) & (slx * slx * s2 > sx * sx * sl2)
                if not qp:
                    take &= sl2 > 0
                if take.any():
                    changed |= take
                    La[i] = np.where(take, new_l, Li)
                    sx = np.where(take, slx, sx)
                    s2 = np.where(take, sl2, s2)
            L[:, act], sumlx[act], suml2[act] = La, sx, s2
            act, xa, wa, wxa, La = act[changed], xa[:, changed], wa[:, changed], wxa[:, changed], La[:, changed]
            sx, s2 = sx[changed], s2[changed]


def _make_q3_quants(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """make_q3_quants with do_rmse: a rounding start, then the descent. x, w: (n, G) → (scale, L in [0, 2*nmax))."""
    mx, amax = _absmax_cols(x)
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, _f32(1), mx)
    L = np.clip(np.rint(x * (_f32(-nmax) / mx)), -nmax, nmax - 1)
    sumlx = (w * x * L).sum(axis=0)
    suml2 = (w * L * L).sum(axis=0)
    # A move is only tried when the rest of the group has sum(w*x*l) > 0. With the start l = round(-nmax*x/max)
    # every x*l is <= 0 unless the group's largest-magnitude element is negative, so only those groups can move
    # (ggml behaves the same way) and the descent runs on them alone.
    _descend(x, w, L, sumlx, suml2, np.nonzero((mx < 0) & ~zero)[0], -nmax, nmax - 1, qp=False)
    scale = np.where(zero, _f32(0), _safe_div(sumlx, suml2))
    L += nmax
    L[:, zero] = 0
    return scale.astype(np.float32), L.astype(np.uint8)


def _make_qp_quants(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """make_qp_quants: non-negative `x ≈ scale*L`, L in [0, nmax], for the block-level scales of the imatrix paths.

    x, w: (n, G) → (scale (G,), L (n, G) uint8).
    """
    mx = np.maximum(x.max(axis=0), 0)
    zero = mx < GROUP_MAX_EPS
    mx = np.where(zero, _f32(1), mx)

    def mse(scale: np.ndarray, L: np.ndarray) -> np.ndarray:
        d = x - scale * L
        return np.einsum("ig,ig->g", w * d, d)

    iscale = _f32(nmax) / mx
    best = mse(1 / iscale, np.rint(iscale * x))
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (_f32(0.1) * _f32(step) + _f32(nmax)) / mx
        cur = mse(1 / iscale_is, np.minimum(nmax, np.rint(iscale_is * x)))
        better = cur < best
        best = np.where(better, cur, best)
        iscale = np.where(better, iscale_is, iscale)
    L = np.minimum(nmax, np.rint(iscale * x))
    sumlx = (w * x * L).sum(axis=0)
    suml2 = (w * L * L).sum(axis=0)
    _descend(x, w, L, sumlx, suml2, np.nonzero(~zero)[0], None, nmax, qp=True)
    scale = np.where(zero, _f32(0), _safe_div(sumlx, suml2))
    L[:, zero] = 0
    return scale.astype(np.float32), L.astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Block quantizers: (B, block_size) f32 [+ (B, block_size) importance] → (B, type_size) uint8


def _groups_t(x: np.ndarray, n: int) -> np.ndarray:
    """(B, block) → element-major (n, B*block/n) groups of n, the layout the searches work in."""
    return np.ascontiguousarray(x.reshape(-1, n).T)


def _q8_0(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    d = np.abs(x).max(axis=-1, keepdims=True) / _f32(127)
    # Subnormal d overflows 1/d exactly as in ggml and gguf-py; keep their bytes, quietly.
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        inv = np.where(d == 0, _f32(0), 1 / d)
        q = _round_half_away(x * inv).astype(np.int8).view(np.uint8)
    return np.concatenate([_f16_bytes(d[:, 0]), q], axis=-1)


def _imatrix_weights(x: np.ndarray, qw: np.ndarray, factor: float) -> np.ndarray:
    """ggml's imatrix error weights: qw * sqrt(sigma2 + x^2), sigma2 = factor * mean(x^2) over the super-block."""
    sigma2 = _f32(factor) * np.einsum("bi,bi->b", x, x) / _f32(QK_K)
    return qw * np.sqrt(sigma2[:, None] + x * x)


def _q2_k(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    B = x.shape[0]
    xt = _groups_t(x, 16)
    if qw is None:  # quantize_row_q2_K_ref
        scales, mins, L = _make_qkx2_quants(xt, np.abs(xt), 3, -0.5, 0.1, 15, True)
        scales, mins = scales.reshape(B, 16), mins.reshape(B, 16)
        max_scale = np.maximum(scales.max(axis=-1), 0)
        max_min = np.maximum(mins.max(axis=-1), 0)
        q4 = _f32(15)
        sc = np.clip(_nearest_int((q4 / np.where(max_scale > 0, max_scale, 1))[:, None] * scales), 0, 15)
        sc = np.where((max_scale > 0)[:, None], sc, 0).astype(np.uint8)
        mn = np.clip(_nearest_int((q4 / np.where(max_min > 0, max_min, 1))[:, None] * mins), 0, 15)
        mn = np.where((max_min > 0)[:, None], mn, 0).astype(np.uint8)
        d16 = np.where(max_scale > 0, max_scale / q4, 0).astype(np.float32)
        m16 = np.where(max_min > 0, max_min / q4, 0).astype(np.float32)
    else:  # quantize_row_q2_K_impl
        wt = _groups_t(_imatrix_weights(x, qw, 1.0), 16)
        scales, mins, L = _make_qkx2_quants(xt, wt, 3, -0.9, 0.05, 36, False)
        sw = wt.sum(axis=0).reshape(B, 16).T
        d16, sc = _make_qp_quants(np.ascontiguousarray(scales.reshape(B, 16).T), 15, sw)
        m16, mn = _make_qp_quants(np.ascontiguousarray(mins.reshape(B, 16).T), 15, sw)
        sc, mn = sc.T, mn.T
    L = L.T.reshape(B, 16, 16)
    d = _f16_roundtrip(d16)[:, None] * sc.astype(np.float32)
    dm = _f16_roundtrip(m16)[:, None] * mn.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        Lr = np.clip(_nearest_int((x.reshape(B, 16, 16) + dm[..., None]) / d[..., None]), 0, 3)
    L = np.where((d != 0)[..., None], Lr, L)
    scale_bytes = sc.astype(np.uint8) | (mn.astype(np.uint8) << 4)
    return np.concatenate([scale_bytes, _pack_2bit(L), _f16_bytes(d16), _f16_bytes(m16)], axis=-1)


def _q3_k(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    B = x.shape[0]
    xt = _groups_t(x, 16)
    if qw is None:  # quantize_row_q3_K_ref
        scales, L = _make_q3_quants(xt, 4, xt * xt)
        scales = scales.reshape(B, 16)
        max_scale, _ = _absmax_signed(scales)
        nz = max_scale != 0
        iscale = _f32(-32) / np.where(nz, max_scale, 1)
        ls = (np.clip(_nearest_int(iscale[:, None] * scales), -32, 31) + 32).astype(np.uint8)
        ls = np.where(nz[:, None], ls, 0).astype(np.uint8)
        d16 = np.where(nz, 1 / iscale, 0).astype(np.float32)
    else:  # quantize_row_q3_K_impl
        wt = _groups_t(_imatrix_weights(x, qw, 2.0), 16)
        scales, L = _make_qx_quants(xt, 4, wt)
        sw = wt.sum(axis=0).reshape(B, 16).T
        d16, ls = _make_qx_quants(np.ascontiguousarray(scales.reshape(B, 16).T), 32, sw)
        ls = ls.T
    L = L.T.reshape(B, 16, 16)
    sbytes = np.empty((B, 12), np.uint8)
    sbytes[:, :8] = (ls[:, :8] & 0xF) | ((ls[:, 8:] & 0xF) << 4)
    hi = ls.reshape(B, 4, 4) >> 4
    sbytes[:, 8:] = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    d = _f16_roundtrip(d16)[:, None] * (ls.astype(np.float32) - 32)
    with np.errstate(divide="ignore", invalid="ignore"):
        Lr = np.clip(_nearest_int(x.reshape(B, 16, 16) / d[..., None]), -4, 3) + 4
    L = np.where((d != 0)[..., None], Lr, L).reshape(B, 8, 32).astype(np.uint8)
    high = L > 3
    hmask = np.zeros((B, 32), np.uint8)
    for k in range(8):
        hmask |= high[:, k].astype(np.uint8) << k
    L = np.where(high, L - 4, L)
    return np.concatenate([hmask, _pack_2bit(L), sbytes, _f16_bytes(d16)], axis=-1)


def _q4_k(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    B = x.shape[0]
    xt = _groups_t(x, 32)
    if qw is None:  # quantize_row_q4_K_ref
        av_x = np.sqrt((xt * xt).sum(axis=0) / _f32(32))
        scales, mins, L = _make_qkx2_quants(xt, av_x + np.abs(xt), 15, -1.0, 0.1, 20, False)
        scales, mins = scales.reshape(B, 8), mins.reshape(B, 8)
        max_scale = np.maximum(scales.max(axis=-1), 0)
        max_min = np.maximum(mins.max(axis=-1), 0)
        inv_scale = np.where(max_scale > 0, _f32(63) / np.where(max_scale > 0, max_scale, 1), 0).astype(np.float32)
        inv_min = np.where(max_min > 0, _f32(63) / np.where(max_min > 0, max_min, 1), 0).astype(np.float32)
        ls = np.clip(_nearest_int(inv_scale[:, None] * scales), 0, 63).astype(np.uint8)
        lm = np.clip(_nearest_int(inv_min[:, None] * mins), 0, 63).astype(np.uint8)
        d16 = (max_scale / _f32(63)).astype(np.float32)
        m16 = (max_min / _f32(63)).astype(np.float32)
    else:  # quantize_row_q4_K_impl
        wt = _groups_t(_imatrix_weights(x, qw, 2.0), 32)
        scales, mins, L = _make_qkx2_quants(xt, wt, 15, -0.9, 0.05, 36, False)
        sw = wt.sum(axis=0).reshape(B, 8).T
        d16, ls = _make_qp_quants(np.ascontiguousarray(scales.reshape(B, 8).T), 63, sw)
        m16, lm = _make_qp_quants(np.ascontiguousarray(mins.reshape(B, 8).T), 63, sw)
        ls, lm = ls.T, lm.T
    L = L.T.reshape(B, 8, 32)
    sbytes = np.empty((B, 12), np.uint8)
    sbytes[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    sbytes[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    sbytes[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    d = _f16_roundtrip(d16)[:, None] * ls.astype(np.float32)
    dm = _f16_roundtrip(m16)[:, None] * lm.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        Lr = np.clip(_nearest_int((x.reshape(B, 8, 32) + dm[..., None]) / d[..., None]), 0, 15)
    L = np.where((d != 0)[..., None], Lr, L).astype(np.uint8).reshape(B, 4, 2, 32)
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(B, 128)
    return np.concatenate([_f16_bytes(d16), _f16_bytes(m16), sbytes, qs], axis=-1)


def _q6_k(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    B = x.shape[0]
    xt = _groups_t(x, 16)
    # The ref path weights errors by x^2; quantize_row_q6_K_impl uses the importance as the weight directly.
    w = xt * xt if qw is None else _groups_t(qw, 16)
    scales, L = _make_qx_quants(xt, 32, w)
    scales, L = scales.reshape(B, 16), L.T.reshape(B, 16, 16)
    max_scale, max_abs = _absmax_signed(scales)
    zero = max_abs < GROUP_MAX_EPS
    iscale = _f32(-128) / np.where(zero, 1, max_scale)
    sc = np.minimum(127, _nearest_int(iscale[:, None] * scales)).astype(np.int8)
    d16 = np.where(zero, 0, 1 / iscale).astype(np.float32)
    d = _f16_roundtrip(d16)[:, None] * sc.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        Lr = np.clip(_nearest_int(x.reshape(B, 16, 16) / d[..., None]), -32, 31) + 32
    L = np.where((d != 0)[..., None], Lr, L).astype(np.uint8).reshape(B, 2, 4, 32)
    lo, hi = L & 0xF, L >> 4
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=-1)  # (B, 2, 64)
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)  # (B, 2, 32)
    out = np.concatenate([ql.reshape(B, 128), qh.reshape(B, 64), sc.view(np.uint8), _f16_bytes(d16)], axis=-1)
    out[zero] = 0  # ggml memsets an all-zero super-block
    return out


_BLOCK_QUANTIZERS: dict[QType, Callable[[np.ndarray, np.ndarray | None], np.ndarray]] = {
    QType.Q8_0: _q8_0,
    QType.Q2_K: _q2_k,
    QType.Q3_K: _q3_k,
    QType.Q4_K: _q4_k,
    QType.Q6_K: _q6_k,
    **iq2.QUANTIZERS,
    **iq3.QUANTIZERS,
}

# I-quants whose block starts with its f16 scale d, rescaled after the search (see `_unbias`)
_UNBIASED = (QType.IQ2_XXS, QType.IQ2_XS, QType.IQ2_S, QType.IQ3_XXS, QType.IQ3_S, QType.IQ4_XS)
_F16_MAX = 65504.0


def _unbias(b: np.ndarray, x: np.ndarray, w: np.ndarray | None, qtype: QType) -> None:
    """Rescale each block's d (in place) so that its importance-weighted gain Σw·x·y / Σw·x² is 1.

    The lattice searches minimize the weighted error, and the least-error reconstruction of a coarse code is a
    shrunk copy of the weights (at 2 bits about 0.88 of them): every product the layer computes comes out ~12 %
    small, the same way in every row, and the shortfall compounds through the layers. On the trained tiny model
    that cost more than the lower error gained (KL vs the lossless file 0.145 vs llama.cpp's 0.116 for IQ2_XXS
    experts; 0.115 once unbiased: benchmarks/recipe_quality.py). One scalar per block restores the gain at a
    small cost in RMSE."""
    y = dequantize(b, qtype).reshape(x.shape).astype(np.float64)
    wx = x.astype(np.float64) if w is None else w.astype(np.float64) * x
    num, den = np.einsum("bi,bi->b", wx, x), np.einsum("bi,bi->b", wx, y)
    ok = (den > 0) & (num > 0)
    c = np.clip(np.where(ok, num / np.where(ok, den, 1), 1.0), 0.5, 2.0)
    d = b[:, :2].copy().view(np.float16)[:, 0].astype(np.float64)
    b[:, :2] = np.clip(d * c, -_F16_MAX, _F16_MAX).astype(np.float16).view(np.uint8).reshape(-1, 2)


# Types `quantize` can write: the table's float types and the block quantizers' types, in the table's order; every
# block quantizer but Q8_0 honours an importance matrix (ggml's Q8_0 ignores it).
QUANTIZABLE: tuple[QType, ...] = tuple(t for t, info in TYPES.items() if info.is_float or t in _BLOCK_QUANTIZERS)
IMATRIX_TYPES = tuple(t for t in _BLOCK_QUANTIZERS if t != QType.Q8_0)


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """f32 → bf16 as ggml_compute_fp32_to_bf16: NaN forced quiet, otherwise round to nearest even."""
    n = x.view(np.uint32)
    n = np.where((n & 0x7FFFFFFF) > 0x7F800000, (n & np.uint32(0xFFFF0000)) | np.uint32(64 << 16), n)
    return ((n.astype(np.uint64) + (0x7FFF + ((n >> 16) & 1))) >> 16).astype(np.uint16)


def quantize(array: np.ndarray, qtype: QType, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Quantize a float array to ggml bytes: uint8 of shape (*rows, row_bytes) in ggml's block layout.

    `imatrix` (optional; not for Q8_0/F16/BF16/F32) holds one non-negative importance per column (length = row
    length). With it, each K-quant runs ggml's importance-weighted search (`quantize_row_*_K_impl`, what
    llama-quantize uses with --imatrix) instead of the reference one, and each I-quant weighs its lattice search
    by it. Without one, the I-quants weigh errors by the weights' own magnitudes, as ggml does (quant/iq2.py,
    quant/iq3.py say exactly how); llama.cpp refuses the `imatrix_only` types without one, and so does
    `v4 quantize` (quant/convert.py), but the functions here do not.
    """
    qtype = type_info(qtype).qtype
    if qtype not in QUANTIZABLE:
        raise UnsupportedModel(f"no quantizer for {qtype.name}; supported: {', '.join(t.name for t in QUANTIZABLE)}")
    if imatrix is not None and qtype not in IMATRIX_TYPES:
        raise BadInput(f"an importance matrix does not apply to {qtype.name}",
                       hint=f"it applies to {', '.join(t.name for t in IMATRIX_TYPES)}")
    x = np.ascontiguousarray(array, dtype=np.float32)
    if x.ndim == 0:
        x = x.reshape(1)
    out_shape = byte_shape(qtype, x.shape)
    if qtype == QType.F32:
        return x.view(np.uint8).reshape(out_shape)
    if qtype == QType.F16:
        return x.astype(np.float16).view(np.uint8).reshape(out_shape)
    if qtype == QType.BF16:
        return _bf16_bits(x).view(np.uint8).reshape(out_shape)

    info = type_info(qtype)
    n = x.shape[-1]
    qw = None
    if imatrix is not None:
        qw = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
        if qw.shape[0] != n:
            raise BadInput(f"imatrix has {qw.shape[0]} entries but rows have {n} columns")
        if not np.all(np.isfinite(qw)) or (qw < 0).any():
            raise BadInput("imatrix entries must be finite and non-negative")
    blocks = x.reshape(-1, info.block_size)
    n_blocks = blocks.shape[0]
    per_row = n // info.block_size
    out = np.empty((n_blocks, info.type_size), np.uint8)
    # Chunks hold whole rows when an imatrix is given so its columns line up with the blocks.
    elems = _CHUNK_ELEMS_Q3_K if qtype == QType.Q3_K else _CHUNK_ELEMS
    chunk = max(1, elems // n) * per_row if qw is not None else max(1, elems // info.block_size)
    fn = _BLOCK_QUANTIZERS[qtype]
    for s in range(0, n_blocks, chunk):
        e = min(n_blocks, s + chunk)
        w = None if qw is None else np.broadcast_to(qw.reshape(1, n), ((e - s) // per_row, n))
        w = None if w is None else w.reshape(e - s, info.block_size)
        out[s:e] = fn(blocks[s:e], w)
        if qtype in _UNBIASED:
            _unbias(out[s:e], blocks[s:e], w, qtype)
    return out.reshape(out_shape)


# ---------------------------------------------------------------------------------------------------------------
# Official checkpoint formats (facts §3)

# e2m1 code → value; the low 3 bits are magnitude, bit 3 the sign.
FP4_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32)


def _fp8_e4m3_table() -> np.ndarray:
    codes = np.arange(256, dtype=np.int64)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp = (codes >> 3) & 0xF
    man = codes & 0x7
    # e4m3fn: bias 7, exponent 0 is subnormal, S.1111.111 is NaN, there is no infinity.
    mag = np.where(exp == 0, man / 8.0 * 2.0**-6, (1 + man / 8.0) * 2.0 ** (exp - 7))
    val = sign * mag
    val[(codes & 0x7F) == 0x7F] = np.nan
    return val.astype(np.float32)


_FP8_E4M3 = _fp8_e4m3_table()


def fp8_e4m3_to_f32(q: np.ndarray) -> np.ndarray:
    """Decode float8_e4m3fn codes (uint8 or int8 bytes) to float32, exactly."""
    return _FP8_E4M3.take(np.asarray(q).view(np.uint8))


def e8m0_to_f32(b: np.ndarray) -> np.ndarray:
    """Decode E8M0 scale bytes: 2^(b-127); 0xFF is NaN. Built from bits so 2^-127 (b=0) stays exact."""
    b = np.asarray(b).view(np.uint8).astype(np.uint32)
    bits = np.where(b == 0, np.uint32(0x00400000), b << 23)
    bits = np.where(b == 0xFF, np.uint32(0x7FC00000), bits)
    return bits.astype(np.uint32).view(np.float32)


def dequant_fp8_blocks(q: np.ndarray, scale: np.ndarray, block: int = 128) -> np.ndarray:
    """FP8 weight [out, in] with E8M0 scales [ceil(out/128), ceil(in/128)] → f32: W[i,j] = e4m3(q) · s[i//128, j//128]."""
    q = np.asarray(q)
    out_dim, in_dim = q.shape
    want = (-(-out_dim // block), -(-in_dim // block))
    if tuple(scale.shape) != want:
        raise BadInput(f"FP8 scale shape {tuple(scale.shape)} does not match weight {q.shape} (want {want})")
    s = e8m0_to_f32(scale)
    w = fp8_e4m3_to_f32(q)
    if out_dim % block == 0 and in_dim % block == 0:
        # All official shapes are whole tiles: scale in place through a (rows, 128, cols, 128) view.
        w.reshape(want[0], block, want[1], block)[...] *= s[:, None, :, None]
        return w
    return w * np.repeat(np.repeat(s, block, axis=0)[:out_dim], block, axis=1)[:, :in_dim]


def _fp4_check(packed: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, int, int]:
    p = np.asarray(packed).view(np.uint8)
    if p.ndim != 2:
        raise BadInput(f"packed FP4 weight must be 2-D, got shape {p.shape}")
    rows, cols = p.shape[0], p.shape[1] * 2
    if cols % 32 != 0 or tuple(scale.shape) != (rows, cols // 32):
        raise BadInput(f"FP4 scale shape {tuple(scale.shape)} does not match packed weight {p.shape}")
    return p, rows, cols


def dequant_fp4_official(packed: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Official FP4 expert weight → f32 [rows, cols]: low nibble = element 2k, high = 2k+1, times s[o, j//32]."""
    p, rows, cols = _fp4_check(packed, scale)
    codes = np.stack([p & 0xF, p >> 4], axis=-1).reshape(rows, cols)
    s = np.repeat(e8m0_to_f32(scale), 32, axis=1)
    return FP4_VALUES[codes] * s


def mxfp4_from_official(packed: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Lossless repack of official FP4 + E8M0 into ggml block_mxfp4 bytes, uint8 [rows, cols/32, 17].

    ggml's block: the same E8M0 byte (its values are doubled and its scale halved, which cancels), then 16 bytes
    where byte j holds element j in the low nibble and element j+16 in the high nibble.
    """
    p, rows, cols = _fp4_check(packed, scale)
    a = p.reshape(rows, cols // 32, 16)
    lo, hi = a[..., :8], a[..., 8:]  # bytes holding elements 0..15 and 16..31, two per byte
    even = (lo & 0x0F) | (hi << 4)  # element 2k | element 2k+16
    odd = (lo >> 4) | (hi & 0xF0)  # element 2k+1 | element 2k+17
    qs = np.stack([even, odd], axis=-1).reshape(rows, cols // 32, 16)
    e = np.asarray(scale).view(np.uint8).reshape(rows, cols // 32, 1)
    return np.concatenate([e, qs], axis=-1)
