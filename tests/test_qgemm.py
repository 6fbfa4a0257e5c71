"""Parity of the int8 GEMM (kernels/fast.py `qgemm`, kernels/cpu/qgemm_isa.inc) with the fused row kernels and the
f32 reference.

Tolerances: the GEMM quantizes activations exactly as `matvec` does and its integer dots are exact, so the two
differ only in f32 summation order: relative RMS ≤ 1e-5 (measured ~2e-7). Against reference_linear the int8
activations cost the usual ≤ 1e-2 (measured ~5e-3), as in tests/test_cpu_kernels.py.
"""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from test_cpu_kernels import INT_TOL, make_weight, rel_rms

from kernels import cpu_ext, fast
from kernels.linear import linear, reference_linear

pytestmark = [pytest.mark.skipif(cpu_ext.usable() is None, reason="CPU kernels did not build (no compiler or no AVX2)"),
              pytest.mark.usefixtures("fast_kernels")]  # conftest defaults the suite to the reference kernels

GEMM_TYPES = (Q.Q8_0, Q.MXFP4, Q.Q4_K, Q.Q5_K, Q.Q2_K, Q.Q3_K, Q.Q6_K)
ORDER_TOL = 1e-5


@pytest.fixture(params=["native", "avx2"])
def isa(request):
    """Each test runs on the machine's best kernels and again on the AVX2 build (its maddubs dots and the signed
    Q8_0 path), switched in-process; skipped where the CPU has only AVX2, which the first run already covers."""
    lib = fast._lib
    native = lib.v4_isa()
    if request.param == "avx2":
        if native < 2:
            pytest.skip("the native kernels are the AVX2 build")
        assert lib.v4_set_isa(1) == 1
    try:
        yield request.param
    finally:
        lib.v4_set_isa(native)


def _x(M: int, K: int, seed: int) -> torch.Tensor:
    return torch.randn(M, K, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("M", [1, 5, 32, 33, 64, 100, 256])
@pytest.mark.parametrize("qtype", GEMM_TYPES, ids=lambda t: t.name)
def test_gemm_matches_matvec_and_reference(qtype, M, isa):
    # N = 45: two full 16-row tiles and a partial one, whose last 8-row vector is itself partial (masked stores)
    w = make_weight(qtype, (45, 512), seed=M)
    x = _x(M, 512, M)
    y = fast.qgemm(x, w)
    assert y.shape == (M, 45) and torch.isfinite(y).all()
    assert rel_rms(y, fast.matvec(x, w)) <= ORDER_TOL
    assert rel_rms(y, reference_linear(x, w)) <= INT_TOL


@pytest.mark.parametrize("qtype,K", [(Q.Q8_0, 32 * 13), (Q.MXFP4, 32 * 13), (Q.Q6_K, 256 * 3)],
                         ids=lambda v: getattr(v, "name", str(v)))
def test_gemm_odd_row_lengths(qtype, K, isa):
    # an odd number of 32-blocks (and of 256-superblocks): no pair or superblock-pair assumptions
    w = make_weight(qtype, (20, K), seed=K)
    x = _x(37, K, K)
    assert rel_rms(fast.qgemm(x, w), fast.matvec(x, w)) <= ORDER_TOL


def test_gemm_extreme_weights_do_not_saturate(isa):
    # Q8_0 bytes of −128/127 against activations of ±127 in every lane: the worst case for the u8·s8 dots
    # (VNNI: u = w + 128 up to 255; AVX2: maddubs int16 pair sums)
    w = make_weight(Q.Q8_0, (16, 256))
    blocks = w.raw.view(-1, 34)
    blocks[:, 2:] = torch.tensor([0x80, 0x7F], dtype=torch.uint8).repeat(16)
    x = torch.ones(40, 256)
    x[:, 1::2] = -1.0
    # ±1 quantizes exactly to ±127, so the integer dots are exact: compare with the f64 product (an f32 GEMM's own
    # summation order alone differs by ~1e-6 on some CPUs, e.g. torch's oneDNN path on Sapphire Rapids)
    exact = torch.nn.functional.linear(x.double(), w.dense().double()).float()
    assert rel_rms(fast.qgemm(x, w), exact) <= 1e-6


def test_dispatcher_routes_by_rows():
    w = make_weight(Q.MXFP4, (24, 256))
    few, many = _x(fast.QGEMM_MIN_ROWS - 1, 256, 1), _x(fast.QGEMM_MIN_ROWS, 256, 2)
    assert torch.equal(linear(few, w), fast.matvec(few, w))
    assert torch.equal(linear(many, w), fast.qgemm(many, w))
    # float types are not covered: they keep the tiled f32 GEMM for many rows
    wb = make_weight(Q.BF16, (24, 256))
    xb = _x(fast.GEMM_MIN_ROWS, 256, 3)
    assert torch.equal(linear(xb, wb), fast.tiled_gemm(xb, wb))
