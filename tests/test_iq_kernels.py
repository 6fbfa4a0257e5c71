"""Parity of the compiled CPU kernels for the I-quants and the 32-block fallbacks (kernels/cpu/iquant_isa.inc) with
the torch references.

Same bounds as tests/test_cpu_kernels.py: activations are quantized to int8 per 32 values, so products are held to
relative RMS error ≤ 1e-2 against the f32 reference (measured ~5e-3); the row dequantizers are bit-exact with
kernels/dequant.py; the AVX2 build agrees with the widest one up to f32 summation order (≤ 1e-5; measured ≤ 3e-6,
the lattice types bit-identical), as do the int8 GEMM and the row kernels on the same quantized activations.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from kernels import cpu_ext, fast
from kernels.linear import QWeight, linear, linear_many, reference_linear, reference_routed_experts

pytestmark = [pytest.mark.skipif(cpu_ext.usable() is None, reason="CPU kernels did not build (no compiler or no AVX2)"),
              pytest.mark.usefixtures("fast_kernels")]  # conftest defaults the suite to the reference kernels

TYPES = (Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S, Q.IQ1_S, Q.IQ1_M, Q.IQ4_XS, Q.IQ4_NL, Q.Q4_0, Q.Q5_0)
SUPERBLOCK = tuple(t for t in TYPES if GGML_QUANT_SIZES[t][0] == 256)
INT_TOL, ISA_TOL = 1e-2, 1e-5
# byte offsets of the f16 scales in a block (IQ1_M spreads its one over the top nibbles of bytes 48-55)
F16_AT = {Q.IQ2_XXS: 0, Q.IQ2_XS: 0, Q.IQ2_S: 0, Q.IQ3_XXS: 0, Q.IQ3_S: 0, Q.IQ1_S: 0, Q.IQ4_XS: 0, Q.IQ4_NL: 0,
          Q.Q4_0: 0, Q.Q5_0: 0}


def make_weight(qtype: Q, shape: tuple[int, ...], seed: int = 0, scale: float = 0.01) -> QWeight:
    """Random blocks (every lattice index, sign pattern and sub-scale occurs) with f16 scales in [scale/10, scale]."""
    rng = np.random.default_rng(seed)
    bs, ts = GGML_QUANT_SIZES[qtype]
    nb = int(np.prod(shape)) // bs
    b = rng.integers(0, 256, size=(nb, ts), dtype=np.uint8)
    d = rng.uniform(scale / 10, scale, nb).astype(np.float16)
    if qtype == Q.IQ1_M:
        bits = d.view(np.uint16)
        for i in range(4):
            w = b[:, 48 + 2 * i: 50 + 2 * i].copy().view(np.uint16).reshape(nb)
            w = (w & 0x0FFF) | (((bits >> (4 * i)) & 0xF) << 12)
            b[:, 48 + 2 * i: 50 + 2 * i] = w.astype(np.uint16).view(np.uint8).reshape(nb, 2)
    else:
        b[:, F16_AT[qtype]: F16_AT[qtype] + 2] = d.view(np.uint8).reshape(nb, 2)
    return QWeight(torch.from_numpy(b.reshape(-1).copy()), qtype, shape)


def rel_rms(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).norm() / ref.norm())


def with_avx2(fn):
    """fn() under the AVX2 build (on a CPU whose widest build is another), or skip on an AVX2-only CPU."""
    native = fast._lib.v4_isa()
    if native < 2:
        pytest.skip("this CPU has only the AVX2 build")
    assert fast._lib.v4_set_isa(1) == 1
    try:
        return fn()
    finally:
        fast._lib.v4_set_isa(native)


def dense_f32(w: QWeight) -> QWeight:
    """w as an F32 QWeight through the library's dequantizer (bit-exact with kernels/dequant.py, tested below): an
    f32 reference for shapes too large for the torch dequantizers to be quick."""
    rows = fast.dequantize(QWeight(w.raw, w.qtype, (w.numel // w.shape[-1], w.shape[-1])))
    return QWeight(rows.reshape(-1).view(torch.uint8), Q.F32, w.shape)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_registered_and_dispatched(qtype):
    # the dispatcher's type list comes from the library (no list of these types in kernels/fast.py)
    assert qtype in fast.TYPES
    w = make_weight(qtype, (19, 256))
    x = torch.randn(2, 256)
    y = linear(x, w)
    assert torch.equal(y, fast.cpu_linear(x, w))
    assert not torch.equal(y, reference_linear(x, w))  # int8 activations: proves the fast path ran
    assert fast.has_qgemm(w)


def test_bad_tables_are_refused_and_change_nothing():
    from kernels import cpu_ext

    good = cpu_ext._tables(fast._lib)[Q.IQ2_XXS]
    bad = good.copy()
    bad[5] = 44  # above the lattice's largest value
    lib = fast._lib
    assert lib.v4_set_grid(int(Q.IQ2_XXS), bad.ctypes.data, bad.size) == -1
    assert lib.v4_set_grid(int(Q.IQ2_XXS), good.ctypes.data, good.size - 8) == -1
    assert lib.v4_set_grid(int(Q.Q4_K), good.ctypes.data, 16) == -1  # a type without a table
    w = make_weight(Q.IQ2_XXS, (8, 256))
    assert torch.equal(fast.dequantize(w), w.dense())  # the table in use is still gguf-py's


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_is_bit_exact(qtype):
    w = make_weight(qtype, (37, 512), scale=10.0)
    ref = w.dense()
    assert torch.equal(fast.dequantize(w), ref)
    assert torch.equal(with_avx2(lambda: fast.dequantize(w)), ref)


@pytest.mark.parametrize("qtype", SUPERBLOCK, ids=lambda t: t.name)
def test_dequantize_extreme_scales(qtype):
    # sub-scales at both ends and f16 scales from the smallest normal up: the products round as the reference's
    w = make_weight(qtype, (4, 256 * 9), seed=7, scale=6e4)
    blocks = w.raw.view(-1, GGML_QUANT_SIZES[qtype][1])
    if qtype != Q.IQ1_M:
        d = torch.tensor([6.1e-5, 1.0, 3.0e4, 6.0e4], dtype=torch.float16).repeat(blocks.shape[0] // 4 + 1)
        blocks[:, 0:2] = d[: blocks.shape[0]].view(torch.uint8).view(-1, 2)
    assert torch.equal(fast.dequantize(w), w.dense())


@pytest.mark.parametrize("M", [1, 2, 3, 4])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matvec_matches_reference_and_avx2(qtype, M):
    w = make_weight(qtype, (64, 256 * 3), seed=M)
    x = torch.randn(M, 256 * 3, generator=torch.Generator().manual_seed(M))
    y = fast.matvec(x, w)
    assert rel_rms(y, reference_linear(x, w)) <= INT_TOL
    assert rel_rms(with_avx2(lambda: fast.matvec(x, w)), y) <= ISA_TOL


@pytest.mark.parametrize("M", [6, 17, 64])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_gemm_matches_reference_and_avx2(qtype, M):
    # 37 rows: two whole 16-row tiles and a partial one; 9 superblocks a row
    w = make_weight(qtype, (37, 256 * 9), seed=M)
    x = torch.randn(M, 256 * 9, generator=torch.Generator().manual_seed(M))
    y = fast.qgemm(x, w)
    assert rel_rms(y, reference_linear(x, w)) <= INT_TOL
    assert rel_rms(with_avx2(lambda: fast.qgemm(x, w)), y) <= ISA_TOL
    # the same quantized activations as the row kernels; the offsets leave in integers here, in f32 there
    assert rel_rms(fast.matvec(x, w), y) <= ISA_TOL
    assert torch.equal(fast.cpu_linear(x, w), y)  # the dispatcher takes the GEMM from QGEMM_MIN_ROWS on


@pytest.mark.parametrize("K", [2048, 4096])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_v4_row_lengths(qtype, K):
    # the routed experts' widths (Flash: 4096 in, 2048 for the down projection)
    w = make_weight(qtype, (48, K), seed=K)
    x = torch.randn(1, K, generator=torch.Generator().manual_seed(K))
    y = fast.matvec(x, w)
    assert rel_rms(y, x @ fast.dequantize(w).t()) <= INT_TOL
    assert rel_rms(with_avx2(lambda: fast.matvec(x, w)), y) <= ISA_TOL


@pytest.mark.parametrize("M", [1, 3])
def test_linear_many_equals_separate_calls(M):
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, 512, generator=g)
    ws = [make_weight(t, (16 + 3 * i, 512), i) for i, t in enumerate(TYPES)]
    pairs = [(x, w) for w in ws]
    got = linear_many(pairs)
    for y, (xi, w) in zip(got, pairs):
        assert torch.equal(y, fast.cpu_linear(xi, w))  # same quantized inputs, same row kernels: bit-identical


MOE_CASES = {  # gate, up, down
    "iq2xxs-iq3xxs": (Q.IQ2_XXS, Q.IQ2_XXS, Q.IQ3_XXS),
    "iq2xs-iq2s-iq4xs": (Q.IQ2_XS, Q.IQ2_S, Q.IQ4_XS),
    "iq1s-iq1m-iq3s": (Q.IQ1_S, Q.IQ1_M, Q.IQ3_S),
    "iq4nl-q4_0-q5_0": (Q.IQ4_NL, Q.Q4_0, Q.Q5_0),
}


def _moe_inputs(t1, t3, t2, E, D, I, k, T, seed):
    w1, w3 = make_weight(t1, (E, I, D), seed + 1), make_weight(t3, (E, I, D), seed + 2)
    w2 = make_weight(t2, (E, D, I), seed + 3)
    g = torch.Generator().manual_seed(seed)
    limit = 6.0
    # gate/up pre-activations of std limit/2, so the clamps bite in the tails (as tests/test_cpu_kernels.py)
    std = float(fast.dequantize(QWeight(w1.raw, t1, (E * I, D)).row_slice(0, 64)).std())
    x = torch.randn(T, D, generator=g) * (limit / 2) / (std * D ** 0.5)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    wts = torch.rand(T, k, generator=g)
    return x, idx, wts, w1, w3, w2, limit


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("case", list(MOE_CASES))
def test_routed_experts_match_reference(case, T):
    x, idx, wts, w1, w3, w2, limit = _moe_inputs(*MOE_CASES[case], E=5, D=256, I=512, k=3, T=T, seed=T)
    ref = reference_routed_experts(x, idx, wts, w1, w3, w2, limit)
    y = fast.cpu_routed_experts(x, idx, wts, w1, w3, w2, limit)
    assert rel_rms(y, ref) <= 2 * INT_TOL  # two rounded activations in a row
    assert rel_rms(with_avx2(lambda: fast.cpu_routed_experts(x, idx, wts, w1, w3, w2, limit)), y) <= ISA_TOL


@pytest.mark.parametrize("case", ["iq2xxs-iq3xxs", "iq1s-iq1m-iq3s"])
def test_routed_experts_at_v4_widths(case):
    # Flash's expert shapes (D 4096, I 2048), against an f32 reference over the library's bit-exact dequantization
    x, idx, wts, w1, w3, w2, limit = _moe_inputs(*MOE_CASES[case], E=3, D=4096, I=2048, k=2, T=1, seed=5)
    y = fast.cpu_routed_experts(x, idx, wts, w1, w3, w2, limit)
    ref = reference_routed_experts(x, idx, wts, dense_f32(w1), dense_f32(w3), dense_f32(w2), limit)
    assert rel_rms(y, ref) <= 2 * INT_TOL
