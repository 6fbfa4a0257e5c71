"""I-quants on 8-wide lattices: IQ2_XXS, IQ2_XS, IQ2_S and IQ1_M, vectorized over blocks.

Each quantizer maps (B, 256) f32 blocks [+ (B, 256) importance] to (B, type_size) uint8 in ggml's layout.

These types store every group of 8 weights as an index into a fixed lattice (256 to 2048 points, gguf-py's
tables, the same ones the decoders use) times a per-sub-block scale `u·(2l+1)` with a small integer `l` and one f16
`u` per 256 weights (IQ2_* also store the signs separately, IQ1_M a ±1/8 shift per group). ggml's quantizer
rounds each group to the cubic lattice {1,3,5}^8 and, when that point is not in the table, tries a short
precomputed list of neighbours; it also assumes grid values {1,3,5} where the decoder really uses {8,25,43}/8.

Here the search is exhaustive and against the decoder's own values. For a group x with weights w at scale s, the
error of lattice point g is Σw·x² − 2s·Σw·x·g + s²·Σw·g²; the last two terms for all N points are one product
(G×16)@(16×N) of [w, −2/s·w·x] with the table [g²; g], so the best point of every group is one matmul and one
argmin. Each coordinate takes one of three values, and the error is separable over coordinates, so rounding each
coordinate on its own gives the best point of the whole cube {3 values}^8 at once: when that point is in the grid
it is the answer and the group skips the product; otherwise its error is a lower bound that can rule a variant out.
The search runs in three steps per 256-block:
  1. a few trial scales per sub-block, each rounded on the cube (cheap: no lattice product) and followed by the
     least-squares refit of the scale, give each sub-block a target scale and its curvature Σw·q² (the cost of
     missing the target);
  2. the block's f16 scale is chosen from a handful of candidates to minimize the curvature-weighted scale
     rounding error of all targets, which puts each sub-block's target between two stored levels `l`;
  3. the exhaustive lattice search runs at the exact stored scale of both levels, and each sub-block keeps the
     one whose decoded values give the least weighted error.
IQ2_XXS and IQ2_XS store 7 sign bits per group and imply the 8th by even parity; a group with an odd number of
negatives must flip one sign, and the search tries flipping each of its two least important elements (smallest
w·|x|) against the full lattice, keeping the better.

Weights: with an importance matrix the error is weighted by the importance itself, the quantity the imatrix
estimates (Σ over calibration inputs of a column's squared activation), so the search minimizes exactly
Σ imatrix·(y−x)². Without one, the weights are ggml's no-imatrix choices: σ²/4 + x² for the IQ2 types
(σ² = 2·mean(x²) over the block, IQ2_S's rule) and x² for IQ1_M.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from gguf import quants as gq

from quant.ggml import QType

QK_K = 256
_f32 = np.float32
# Matmul output elements per search pass (2 MB of f32): small enough to stay in cache for the argmin that reads it
# back (measured 20% faster than 16 MB passes).
_PASS_ELEMS = 1 << 19
# Least important elements tried as the forced sign flip of an odd-parity group (IQ2_XXS, IQ2_XS). The flip costs
# 4s·w·|x|·g; with g in [8, 43] only elements within ~5x of the smallest w·|x| can ever win. Measured on gaussian,
# student-t and llm-like data: two candidates come within 0.02% of the RMSE of trying all eight at 2.5x the speed;
# one (ggml's choice) loses 0.2%.
_FLIP_CANDIDATES = 2


@dataclass(frozen=True)
class _Lattice:
    """One lattice type's search constants."""

    points: np.ndarray  # (N, 8) f32 grid at unit scale: magnitudes for the IQ2 types, ternary for IQ1_M
    shifts: tuple[float, ...]  # offsets a group may add to all its coordinates (IQ1_M's ±1/8), else (0,)
    tables: tuple[np.ndarray, ...]  # per shift, (16, N) f32 [(p+δ)²; p+δ]: the right-hand side of the search product
    values: np.ndarray  # (3,) the coordinate values, sorted
    code_map: np.ndarray  # (3^8,) grid index of each base-3 code of coordinate levels, -1 where not in the grid
    signed: bool  # points carry their own signs (IQ1_M); otherwise the search runs on |x| and signs are stored
    parity: bool  # signs must have even parity (IQ2_XXS, IQ2_XS)
    sub: int  # elements per sub-block scale
    levels: int  # sub-block scale is u·(2l+1), l in [0, levels)
    trials: tuple[float, ...]  # step-1 trial scales, as multiples of sub-block max|x| / largest coordinate


_POW3 = 3 ** np.arange(8)
_POW3F = _POW3.astype(np.float32)  # codes stay below 3^8, exact in f32


def _lattice(points: np.ndarray, shifts: tuple[float, ...] = (0.0,), **kw) -> _Lattice:
    points = np.ascontiguousarray(points, dtype=np.float32)
    tables = tuple(np.ascontiguousarray(np.concatenate([(points.T + d) ** 2, points.T + d]), dtype=np.float32)
                   for d in shifts)
    values = np.unique(points)
    code_map = np.full(3**8, -1, np.int64)
    code_map[np.searchsorted(values, points) @ _POW3] = np.arange(points.shape[0])
    return _Lattice(points=points, shifts=shifts, tables=tables, values=values, code_map=code_map, **kw)


def _grid(cls: type) -> np.ndarray:
    cls.init_grid()
    return np.asarray(cls.grid, dtype=np.float32).reshape(cls.grid_shape)


# Step-1 trial scales. Steps of 0.15 measured as good as steps of 0.1; the low end matters for heavy tails (a
# sub-block's best scale can clip its largest element).
_TRIALS_IQ2 = (0.5, 0.65, 0.8, 0.95, 1.1)
_TRIALS_IQ1 = (0.4, 0.55, 0.7, 0.85, 1.0)

# IQ2 grids hold 8x their values: the decoder computes d·(0.5+l)/4·grid = d·(2l+1)·(grid/8), so the search runs on
# grid/8 with sub-block scale u·(2l+1), u = d. IQ1_M decodes d·(2l+1)·(grid ± 1/8) directly.
_LATTICES: dict[QType, Callable[[], _Lattice]] = {
    QType.IQ2_XXS: lambda: _lattice(_grid(gq.IQ2_XXS) / 8, signed=False, parity=True, sub=32, levels=16,
                                    trials=_TRIALS_IQ2),
    QType.IQ2_XS: lambda: _lattice(_grid(gq.IQ2_XS) / 8, signed=False, parity=True, sub=16, levels=16,
                                   trials=_TRIALS_IQ2),
    QType.IQ2_S: lambda: _lattice(_grid(gq.IQ2_S) / 8, signed=False, parity=False, sub=16, levels=16,
                                  trials=_TRIALS_IQ2),
    QType.IQ1_M: lambda: _lattice(_grid(gq.IQ1_M), shifts=(gq.IQ1_M.delta, -gq.IQ1_M.delta), signed=True,
                                  parity=False, sub=16, levels=8, trials=_TRIALS_IQ1),
}
_cache: dict[QType, _Lattice] = {}


def _get(qtype: QType) -> _Lattice:
    lat = _cache.get(qtype)
    if lat is None:
        lat = _cache[qtype] = _LATTICES[qtype]()
    return lat


# ---------------------------------------------------------------------------------------------------------------
# The lattice search


@dataclass
class _Rows:
    """The search problems of a chunk's groups, independent of the scale: one row per (group, variant).

    A variant is one choice the lattice leaves to the group besides its point: which element takes the forced
    sign flip (odd-parity groups of IQ2_XXS/IQ2_XS) or which shift (IQ1_M).
    """

    w: np.ndarray  # (R, 8) weights
    v: np.ndarray  # (R, 8) target values: |x| (one flipped negative in a flip variant) or x for signed lattices
    wv: np.ndarray  # (R, 8) w·v
    group: np.ndarray  # (R,) group of each row
    slot: np.ndarray  # (R,) the row's variant number within its group
    shift: np.ndarray  # (R,) index into the lattice's shifts
    flip: np.ndarray  # (G, slots) element flipped by each variant (-1: none)
    sel: np.ndarray = field(init=False)  # (G, slots) row of each (group, variant); -1: the group lacks it

    def __post_init__(self):
        self.sel = np.full(self.flip.shape, -1)
        self.sel[self.group, self.slot] = np.arange(self.group.size)

    def per_group(self, obj: np.ndarray) -> np.ndarray:
        """(R,) row values → (G, slots), +inf for missing variants."""
        return np.where(self.sel >= 0, obj[self.sel], np.inf)


def _rows(lat: _Lattice, w: np.ndarray, x: np.ndarray) -> _Rows:
    """Rows for groups x, w of shape (G, 8)."""
    G = x.shape[0]
    if lat.signed:
        n = len(lat.shifts)
        rw, rv = np.tile(w, (n, 1)), np.tile(x, (n, 1))
        slot = np.repeat(np.arange(n), G)
        return _Rows(rw, rv, rw * rv, np.tile(np.arange(G), n), slot, slot, np.full((G, n), -1))
    v = np.abs(x)
    if not lat.parity:
        zero = np.zeros(G, np.int64)
        return _Rows(w, v, w * v, np.arange(G), zero, zero, np.full((G, 1), -1))
    odd = np.count_nonzero(x < 0, axis=1) % 2 == 1
    k = _FLIP_CANDIDATES
    flip = np.full((G, k), -1)
    go, ge = np.nonzero(odd)[0], np.nonzero(~odd)[0]
    cand = np.argsort(w[go] * v[go], axis=1, kind="stable")[:, :k]
    flip[go] = cand
    vo = np.repeat(v[go], k, axis=0)  # k consecutive rows per odd group, one per flip candidate
    vo[np.arange(vo.shape[0]), cand.reshape(-1)] *= -1
    rv = np.concatenate([v[ge], vo])
    rw = np.concatenate([w[ge], np.repeat(w[go], k, axis=0)])
    group = np.concatenate([ge, np.repeat(go, k)])
    slot = np.concatenate([np.zeros(ge.size, np.int64), np.tile(np.arange(k), go.size)])
    return _Rows(rw, rv, rw * rv, group, slot, np.zeros(group.size, np.int64), flip)


def _round(lat: _Lattice, rows: _Rows, inv_s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each coordinate rounded on its own to the nearest value at scale 1/inv_s (per row), ignoring the grid.

    Returns (levels (R, 8) f32 in {0, 1, 2}, values q (R, 8), objective (R,)); a row's error is Σw·v² +
    s²·objective. With positive weights the error is separable, so this is the best point of the full cube
    {values}^8: the exact answer whenever that point is in the grid.
    """
    sh = np.asarray(lat.shifts, np.float32)[rows.shift][:, None]
    y = rows.v * inv_s[:, None]
    v0, v1, v2 = (float(a) for a in lat.values)
    up1 = (y > sh + _f32((v0 + v1) / 2)).astype(np.float32)
    up2 = (y > sh + _f32((v1 + v2) / 2)).astype(np.float32)
    q = up1 * _f32(v1 - v0)
    q += sh + _f32(v0)
    q += up2 * _f32(v2 - v1)
    up1 += up2
    # Σw·q² − 2/s·Σw·v·q, as one reduction of w·q·(q − 2·y) with y = v/s
    y *= -2
    y += q
    y *= rows.w
    obj = np.einsum("ri,ri->r", y, q)
    return up1, q, obj


def _pick(rows: _Rows, obj: np.ndarray) -> np.ndarray:
    """Per group, the row of its best variant."""
    G = rows.sel.shape[0]
    return rows.sel[np.arange(G), rows.per_group(obj).argmin(axis=1)]


def _free_fit(lat: _Lattice, rows: _Rows, inv_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Σw·v·q and Σw·q² per group for its best point of the full cube (the grid constraint dropped).

    Cheap (no lattice product) and close enough to steer the scale: step 3 searches the real grid.
    """
    _, q, obj = _round(lat, rows, inv_s[rows.group])
    r = _pick(rows, obj)
    wq = rows.w[r] * q[r]
    return np.einsum("gi,gi->g", wq, rows.v[r]), np.einsum("gi,gi->g", wq, q[r])


def _search(
    lat: _Lattice, rows: _Rows, inv_s: np.ndarray, hint: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best grid point of every group at scale 1/inv_s (per group), exhaustively.

    `hint` (grid index, variant per group), a good point from a nearby scale, only speeds the search up: its
    error bounds what the others must beat. Returns (grid index (G,), variant (G,), objective (G,)); the group's
    error is Σw·x² + s²·objective.
    """
    G = rows.sel.shape[0]
    isr = inv_s[rows.group]
    lv, _, obj = _round(lat, rows, isr)
    idx = lat.code_map[(lv @ _POW3F).astype(np.int64)]
    on = idx >= 0
    # A row whose cube optimum is a grid point is solved. The others need the full search, unless their cube
    # objective (a lower bound) cannot beat the best solved variant of the same group or the hint. Variants are
    # searched one rank at a time so that each one's results tighten the bound for the next.
    bound = rows.per_group(np.where(on, obj, np.inf)).min(axis=1)
    if hint is not None:
        h_idx, h_var = hint
        r = rows.sel[np.arange(G), h_var]
        q = lat.points[h_idx] + np.asarray(lat.shifts, np.float32)[rows.shift[r]][:, None]
        h_obj = np.einsum("gi,gi->g", rows.w[r] * q, q - 2 * inv_s[:, None] * rows.v[r])
        bound = np.minimum(bound, h_obj)
    lower = obj.copy()
    obj[~on] = np.inf
    # Most promising variant first: rank the variants of each group by their lower bound.
    _, k = rows.sel.shape
    order = np.argsort(rows.per_group(lower), axis=1, kind="stable")
    rank = np.empty(rows.group.size, np.int64)
    ranked = rows.sel[np.arange(G)[:, None], order]
    present = ranked >= 0
    rank[ranked[present]] = np.broadcast_to(np.arange(k), (G, k))[present]
    for n in range(k):
        todo = np.nonzero(~on & (rank == n) & (lower < bound[rows.group]))[0]
        for t, table in enumerate(lat.tables):
            rr = todo[rows.shift[todo] == t]
            step = max(1, _PASS_ELEMS // table.shape[1])
            feats = np.empty((min(step, rr.size), 16), np.float32)
            for a in range(0, rr.size, step):
                r = rr[a : a + step]
                f = feats[: r.size]
                f[:, :8] = rows.w[r]
                np.multiply(rows.wv[r], (-2 * isr[r])[:, None], out=f[:, 8:])
                m = f @ table
                i = m.argmin(axis=1)
                idx[r] = i
                obj[r] = np.take_along_axis(m, i[:, None], axis=1)[:, 0]
        g = rows.group[todo]  # one row per group within a rank
        bound[g] = np.minimum(bound[g], obj[todo])
    r = _pick(rows, obj)
    best_idx, best_var, best_obj = idx[r], rows.slot[r], obj[r]
    if hint is not None:
        keep = h_obj < best_obj
        best_idx, best_var = np.where(keep, h_idx, best_idx), np.where(keep, h_var, best_var)
        best_obj = np.where(keep, h_obj, best_obj)
    return best_idx, best_var, best_obj


def _quantize(lat: _Lattice, x: np.ndarray, w: np.ndarray):
    """Steps 1 and 2 on blocks x, weights w (B, 256), both already scaled so max|x| = 1 per block.

    Returns the rows, the unit scale u per block and the target scale of every sub-block.
    """
    B = x.shape[0]
    G = B * QK_K // 8
    gps = lat.sub // 8  # groups per sub-block
    nsub = QK_K // lat.sub
    top = float(lat.values.max() + max(lat.shifts))
    rows = _rows(lat, w.reshape(G, 8), x.reshape(G, 8))

    # 1. trial scales per sub-block; keep the one whose refit explains most of Σw·x² (largest (Σwvq)²/Σwq²).
    smax = np.abs(x).reshape(B * nsub, lat.sub).max(axis=1)
    smax = np.maximum(smax, _f32(1e-30))
    target = np.zeros(B * nsub, np.float32)
    curv = np.zeros(B * nsub, np.float32)
    score = np.full(B * nsub, -1.0, np.float32)
    for t in lat.trials:
        s = smax * _f32(t / top)
        p, q2 = _free_fit(lat, rows, np.repeat(1 / s, gps))
        p, q2 = p.reshape(-1, gps).sum(axis=1), q2.reshape(-1, gps).sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            sc = np.where((q2 > 0) & (p > 0), p * p / q2, 0)
            better = sc > score
            target = np.where(better, p / np.where(q2 > 0, q2, 1), target)
        curv = np.where(better, q2, curv)
        score = np.where(better, sc, score)
    target, curv = target.reshape(B, nsub), curv.reshape(B, nsub)

    # 2. the block unit u: candidates put the largest target at or near the top level; keep the one with the least
    # curvature-weighted rounding error of all targets.
    hi = 2 * lat.levels - 1
    tmax = np.maximum(target.max(axis=1), _f32(1e-30))
    best_cost = np.full(B, np.inf, np.float32)
    u = tmax / hi
    for m in np.linspace(hi - 0.5 * hi / 4, hi + 0.5, 12):
        uc = tmax / _f32(m)
        lv = np.clip(np.rint((target / uc[:, None] - 1) / 2), 0, lat.levels - 1)
        cost = np.einsum("bs,bs->b", curv, (target - uc[:, None] * (2 * lv + 1)) ** 2)
        better = cost < best_cost
        u = np.where(better, uc, u)
        best_cost = np.where(better, cost, best_cost)
    return rows, u, target


def _finish(lat: _Lattice, rows: _Rows, x: np.ndarray, u: np.ndarray, target: np.ndarray):
    """Step 3 at the stored unit u (B,): per sub-block, the better of the two levels around its target."""
    B = x.shape[0]
    G = B * QK_K // 8
    gps = lat.sub // 8
    nsub = QK_K // lat.sub
    u = np.where(u > 0, u, _f32(1)).astype(np.float32)
    cont = ((target / u[:, None] - 1) / 2).reshape(-1)  # the target's level, continuous
    l0 = np.clip(np.rint(cont), 0, lat.levels - 1)
    # The two stored levels around the target. (Adding the far side's level as well gains < 0.3% RMSE for 1.5x
    # the time.)
    candidates = (l0, np.clip(l0 + np.where(cont >= l0, 1, -1), 0, lat.levels - 1))
    ub = np.repeat(u, nsub)
    best = np.full(B * nsub, np.inf, np.float32)
    level = np.zeros(B * nsub, np.int64)
    index = np.zeros(G, np.int64)
    variant = np.zeros(G, np.int64)
    for n, lv in enumerate(candidates):
        s = (ub * (2 * lv + 1)).astype(np.float32)
        # The first level's points seed the second level's search (same groups, a nearby scale).
        hint = (index, variant) if n else None
        idx, var, obj = _search(lat, rows, np.repeat(1 / s, gps), hint)
        err = s * s * obj.reshape(-1, gps).sum(axis=1)
        better = err < best
        best = np.where(better, err, best)
        level = np.where(better, lv, level)
        take = np.repeat(better, gps)
        index = np.where(take, idx, index)
        variant = np.where(take, var, variant)
    return index, variant, level.reshape(B, nsub)


def _signs(rows: _Rows, x: np.ndarray, variant: np.ndarray) -> np.ndarray:
    """(G,) sign bytes: bit i set where element i is decoded negative."""
    G = variant.shape[0]
    neg = (x.reshape(G, 8) < 0).astype(np.uint8)
    f = rows.flip[np.arange(G), variant]
    has = f >= 0
    neg[np.nonzero(has)[0], f[has]] ^= 1
    return np.packbits(neg, axis=1, bitorder="little")[:, 0]


# ---------------------------------------------------------------------------------------------------------------
# Weights, normalization, packing


def _prepare(x: np.ndarray, qw: np.ndarray | None, fallback: Callable[[np.ndarray], np.ndarray]):
    """Blocks scaled to max|x| = 1 (so tiny or huge magnitudes search alike) and weights scaled to mean 1."""
    amax = np.abs(x).max(axis=1)
    xn = x / np.where(amax > 0, amax, 1)[:, None]
    w = fallback(xn) if qw is None else qw.astype(np.float32)
    mean = w.mean(axis=1)
    if qw is not None:
        # A block whose importance is all zero is still given values: the no-imatrix weights.
        dead = mean <= 0
        if dead.any():
            w = w.copy()
            w[dead] = fallback(xn[dead])
            mean = w.mean(axis=1)
    w = w / np.where(mean > 0, mean, 1)[:, None]
    # A floor far below any real weight: a zero-importance element still gets its nearest value, not any value.
    w = (w + _f32(1e-6)).astype(np.float32)
    return xn.astype(np.float32), w, amax


def _iq2_weights(xn: np.ndarray) -> np.ndarray:
    sigma2 = 2 * np.mean(xn * xn, axis=1, keepdims=True)
    return (0.25 * sigma2 + xn * xn).astype(np.float32)


def _iq1_weights(xn: np.ndarray) -> np.ndarray:
    return (xn * xn).astype(np.float32)


def _f16(v: np.ndarray) -> np.ndarray:
    """f32 → f16 with overflow clamped to the largest finite value (ggml would store inf)."""
    return np.minimum(v, _f32(65504)).astype(np.float16)


def _run(qtype: QType, x: np.ndarray, qw: np.ndarray | None, fallback: Callable[[np.ndarray], np.ndarray]):
    """All three steps: (d f16 (B,), rows, normalized x, grid index (G,), variant (G,), levels (B, nsub))."""
    lat = _get(qtype)
    xn, w, amax = _prepare(x, qw, fallback)
    rows, u, target = _quantize(lat, xn, w)
    # The search ran on x/amax, so the stored unit is u·amax; step 3 then searches at the unit as stored.
    d = _f16(u * amax)
    un = (d.astype(np.float32) / np.where(amax > 0, amax, 1)).astype(np.float32)
    index, variant, level = _finish(lat, rows, xn, un, target)
    return d.astype("<f2"), rows, xn, index, variant, level.astype(np.uint8)


def _iq2_core(qtype: QType, x: np.ndarray, qw: np.ndarray | None):
    """Shared IQ2_* search: (d f16 (B,), grid index (B, 32), sign bytes (B, 32), levels (B, nsub))."""
    d, rows, xn, index, variant, level = _run(qtype, x, qw, _iq2_weights)
    B = x.shape[0]
    return d, index.reshape(B, 32), _signs(rows, xn, variant).reshape(B, 32), level


def _nibbles(level: np.ndarray) -> np.ndarray:
    return level[:, 0::2] | (level[:, 1::2] << 4)


def _iq2_xxs(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    d, index, signs, level = _iq2_core(QType.IQ2_XXS, x, qw)
    B = x.shape[0]
    s7 = (signs & 127).astype(np.uint32).reshape(B, 8, 4)
    aux = s7[..., 0] | (s7[..., 1] << 7) | (s7[..., 2] << 14) | (s7[..., 3] << 21) | (level.astype(np.uint32) << 28)
    qs = np.concatenate([index.astype(np.uint8).reshape(B, 8, 4), aux.astype("<u4").view(np.uint8).reshape(B, 8, 4)],
                        axis=2)
    return np.concatenate([d.view(np.uint8).reshape(B, 2), qs.reshape(B, 64)], axis=1)


def _iq2_xs(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    d, index, signs, level = _iq2_core(QType.IQ2_XS, x, qw)
    B = x.shape[0]
    q = (index.astype(np.uint16) | ((signs & 127).astype(np.uint16) << 9)).astype("<u2")
    return np.concatenate([d.view(np.uint8).reshape(B, 2), q.view(np.uint8).reshape(B, 64), _nibbles(level)], axis=1)


def _iq2_s(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    d, index, signs, level = _iq2_core(QType.IQ2_S, x, qw)
    B = x.shape[0]
    h = (index >> 8).astype(np.uint8).reshape(B, 8, 4)
    qh = h[..., 0] | (h[..., 1] << 2) | (h[..., 2] << 4) | (h[..., 3] << 6)
    return np.concatenate([d.view(np.uint8).reshape(B, 2), (index & 255).astype(np.uint8), signs, qh,
                           _nibbles(level)], axis=1)


def _iq1_m(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    d, _, _, grid, shifted, level = _run(QType.IQ1_M, x, qw, _iq1_weights)
    B = x.shape[0]
    shifted = shifted.astype(np.uint8)
    nib = ((grid >> 8).astype(np.uint8) | (shifted << 3)).reshape(B, 16, 2)
    qh = nib[..., 0] | (nib[..., 1] << 4)
    lv = level.astype(np.uint16).reshape(B, 4, 4)
    sc = lv[..., 0] | (lv[..., 1] << 3) | (lv[..., 2] << 6) | (lv[..., 3] << 9)
    # The f16 block scale is spread over the top nibbles of the four scale words.
    dbits = d.view("<u2")[:, None] >> np.array([0, 4, 8, 12], np.uint16)
    sc = (sc | ((dbits & 0xF) << 12)).astype("<u2")
    return np.concatenate([(grid & 255).astype(np.uint8).reshape(B, 32), qh, sc.view(np.uint8).reshape(B, 8)], axis=1)


QUANTIZERS: dict[QType, Callable[[np.ndarray, np.ndarray | None], np.ndarray]] = {
    QType.IQ2_XXS: _iq2_xxs,
    QType.IQ2_XS: _iq2_xs,
    QType.IQ2_S: _iq2_s,
    QType.IQ1_M: _iq1_m,
}
