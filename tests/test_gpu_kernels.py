"""Parity of the Triton kernels (kernels/gpu.py) with the torch references in kernels/linear.py.

Runs on a CUDA GPU; without one, `TRITON_INTERPRET=1 pytest tests/test_gpu_kernels.py` runs the same kernels on
CPU tensors through Triton's interpreter (where Triton is installed). Tolerances (relative RMS error against the
f32 reference): the fused kernels dequantize exactly and sum in f32, ≤ 1e-5; BF16/F16 weights go to cuBLAS with
activations rounded to bf16/f16, ≤ 1e-2 (measured ~3e-3).
"""

from __future__ import annotations

import os

import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from test_cpu_kernels import make_weight as make_k_weight, rel_rms
from test_iq_kernels import TYPES as IQ_TYPES
from test_iq_kernels import make_weight as make_iq_weight

from kernels.linear import QWeight, reference_linear, reference_routed_experts

pytest.importorskip("triton")
gpu = pytest.importorskip("kernels.gpu")
if torch.cuda.is_available():
    DEV = "cuda"
elif os.environ.get("TRITON_INTERPRET") == "1":
    DEV = "cpu"
else:
    pytest.skip("needs a CUDA GPU (or TRITON_INTERPRET=1)", allow_module_level=True)
pytestmark = pytest.mark.gpu

FUSED_TOL, BF16_TOL = 1e-5, 1e-2


def on_dev(w: QWeight) -> QWeight:
    return w.to(DEV)


def make_weight(qtype: Q, shape: tuple[int, ...], seed: int = 0) -> QWeight:
    """Random blocks: for the I-quants every lattice index, sign pattern and sub-scale occurs."""
    return (make_iq_weight if qtype in IQ_TYPES else make_k_weight)(qtype, shape, seed)


@pytest.mark.parametrize("M", [1, 3])
# 288: a row that ends mid-step (Q8_0 / MXFP4 only); 2048: split over K-chunks (few rows, long K)
@pytest.mark.parametrize("K", [512, 288, 2048])
@pytest.mark.parametrize("qtype", gpu.TYPES, ids=lambda t: t.name)
def test_fused_rows_match_reference(qtype, K, M):
    if K % 256 and qtype not in (Q.Q8_0, Q.MXFP4):
        pytest.skip("K-quant rows are whole 256-element super-blocks")
    w = make_weight(qtype, (37, K), seed=M)  # 37 rows: the last program is partly masked
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
    ref = reference_linear(x, w)
    got = gpu.gpu_linear(x.to(DEV), on_dev(w)).cpu()
    assert got.shape == ref.shape
    assert rel_rms(got, ref) < FUSED_TOL
    if K == 2048:
        assert gpu._split(37, M, K) > 1


@pytest.mark.parametrize("qtype", gpu.TYPES, ids=lambda t: t.name)
def test_dequantize_is_bit_exact(qtype):
    w = make_weight(qtype, (37, 288 if qtype in (Q.Q8_0, Q.MXFP4) else 512), seed=4)
    assert torch.equal(gpu.dequantize(on_dev(w)).cpu(), w.dense())


@pytest.mark.parametrize("qtype", [t for t in gpu.TYPES if t in IQ_TYPES], ids=lambda t: t.name)
def test_dequantize_extreme_scales(qtype):
    # f16 scales from the smallest normal up to 6e4 and sub-scales at both ends: the products round as the reference's
    w = make_iq_weight(qtype, (4, 256 * 4), seed=7, scale=6e4)
    blocks = w.raw.view(-1, GGML_QUANT_SIZES[qtype][1])
    if qtype != Q.IQ1_M:  # IQ1_M's scale is spread over its sub-scale words; the random ones cover its range
        d = torch.tensor([6.1e-5, 1.0, 3.0e4, 6.0e4], dtype=torch.float16).repeat(blocks.shape[0] // 4)
        blocks[:, 0:2] = d.view(torch.uint8).view(-1, 2)
    assert torch.equal(gpu.dequantize(on_dev(w)).cpu(), w.dense())


def test_many_rows_dequantize_then_gemm():
    w = make_weight(Q.Q4_K, (40, 512), seed=2)
    x = torch.randn(gpu.FUSED_MAX_ROWS + 5, 2, 512)
    got = gpu.gpu_linear(x.to(DEV), on_dev(w)).cpu()
    assert got.shape == (gpu.FUSED_MAX_ROWS + 5, 2, 40)
    assert rel_rms(got, reference_linear(x, w)) < FUSED_TOL


@pytest.mark.parametrize("qtype", (Q.BF16, Q.F16), ids=lambda t: t.name)
def test_float_weights_use_cublas(qtype):
    w = make_weight(qtype, (33, 256), seed=3)
    x = torch.randn(2, 256)
    assert rel_rms(gpu.gpu_linear_bf16(x.to(DEV), on_dev(w)).cpu(), reference_linear(x, w)) < BF16_TOL


# Every type as the gate/up or the down weight. D 1024: gate/up split over two K-chunks, the SwiGLU on the host;
# D 256 (a quarter of the interpreter's time): one chunk, the SwiGLU in the kernel.
@pytest.mark.parametrize("gate_type,down_type,D", [
    (Q.MXFP4, Q.MXFP4, 1024), (Q.Q2_K, Q.Q3_K, 1024), (Q.Q4_K, Q.Q4_K, 1024), (Q.IQ2_XXS, Q.IQ3_XXS, 1024),
    (Q.IQ4_XS, Q.IQ2_XS, 256), (Q.IQ2_S, Q.IQ3_S, 256), (Q.IQ1_M, Q.Q5_K, 256), (Q.Q6_K, Q.Q8_0, 256),
], ids=lambda v: getattr(v, "name", str(v)))
# large gate sums: exp(-g) overflows to inf and silu gives -0, as on a GPU; only the interpreter's numpy warns
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
def test_routed_experts_match_reference(gate_type, down_type, D):
    E, I, T, k = 5, 256, 2, 3
    w1, w3 = make_weight(gate_type, (E, I, D), seed=1), make_weight(gate_type, (E, I, D), seed=2)
    w2 = make_weight(down_type, (E, D, I), seed=3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, D, generator=g)
    idx = torch.tensor([[4, 0, 2], [2, 2, 1]])  # an expert twice in one token's picks, shared across tokens
    wts = torch.rand(T, k, generator=g)
    limit = 0.7  # small enough that the clamps bite
    assert (gpu._split(I, T * k, D) > 1) == (D == 1024)
    ref = reference_routed_experts(x, idx, wts, w1, w3, w2, limit)
    got = gpu.gpu_routed_experts(x.to(DEV), idx.to(DEV), wts.to(DEV), on_dev(w1), on_dev(w3), on_dev(w2), limit)
    assert rel_rms(got.cpu(), ref) < FUSED_TOL


def test_unsupported_inputs_fall_back():
    w = make_weight(Q.Q4_0, (8, 256))  # no Triton decoder: the dispatcher keeps the reference
    assert Q.Q4_0 not in gpu.TYPES
    x = torch.randn(1, 256)
    assert torch.allclose(gpu.gpu_linear(x.to(DEV), on_dev(w)).cpu(), reference_linear(x, w), rtol=1e-5, atol=1e-5)
    w1 = make_weight(Q.Q4_0, (2, 256, 256))
    assert gpu.gpu_routed_experts(x.to(DEV), torch.zeros(1, 1, dtype=torch.long, device=DEV),
                                  torch.ones(1, 1, device=DEV), on_dev(w1), on_dev(w1), on_dev(w1), 1.0) is None


@pytest.mark.parametrize("T,S,D", [(1, 4, 4096), (5, 4, 64), (3, 2, 16)])
def test_mixer_pre_matches_reference(T, S, D):
    from kernels import mhc

    g = torch.Generator().manual_seed(T + D)
    R = (2 + S) * S
    p = mhc.MixerParams(torch.randn(R, S * D, generator=g) * 0.05, torch.rand(3, generator=g) + 0.5,
                        torch.randn(R, generator=g), S, 20, 1e-6, 1e-6)
    X = torch.randn(T, S, D, generator=g) * 3
    want = mhc.reference_pre(X, p)
    got = gpu.GpuMixers().pre(X.to(DEV), mhc.MixerParams(*(t.to(DEV) for t in p[:3]), *p[3:]))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=2e-5, atol=2e-5)
    assert gpu.GpuMixers().pre(X.to(DEV), p._replace(S=3)) is None  # not a power of two: the reference runs
