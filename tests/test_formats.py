"""ggml type table, numpy quantizers (bit-exact where gguf-py has one, ggml-quality K-quants) and official decoders."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import quants as gq

from kernels.dequant import dequantize
from quant.formats import (
    QUANTIZABLE,
    dequant_fp4_official,
    dequant_fp8_blocks,
    e8m0_to_f32,
    fp8_e4m3_to_f32,
    mxfp4_from_official,
    quantize,
)
from quant.ggml import QType, byte_shape, row_bytes, tensor_bytes, type_info
from quant.errors import BadInput, UnsupportedModel

K_QUANTS = (QType.Q6_K, QType.Q4_K, QType.Q3_K, QType.Q2_K)
# Relative RMSE (error RMS / data RMS) of ggml's reference quantizers on this data, with a little headroom:
# gaussian measured 0.0177 / 0.0714 / 0.151 / 0.297, ggml's own C quantizer gives the same to 3 digits.
RMSE_BOUND = {QType.Q6_K: 0.019, QType.Q4_K: 0.074, QType.Q3_K: 0.157, QType.Q2_K: 0.305}
# Student-t(3) rows of test_k_quant_heavy_tails_and_edges: ggml's C quantizer gives 0.0257 / 0.0897 / 0.185 / 0.317.
HEAVY_BOUND = {QType.Q6_K: 0.027, QType.Q4_K: 0.093, QType.Q3_K: 0.19, QType.Q2_K: 0.325}


def _load_benchmark():
    """benchmarks/quant_rmse.py by path: it holds the ctypes binding of ggml's quantizer."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "quant_rmse.py"
    spec = importlib.util.spec_from_file_location("v4_bench_quant_rmse", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rel_rmse(y: np.ndarray, x: np.ndarray, w: np.ndarray | None = None) -> float:
    w = np.ones_like(x) if w is None else np.broadcast_to(w, x.shape)
    return float(np.sqrt(np.sum(w * (y - x) ** 2) / np.sum(w * x**2)))


def gaussian(rows: int = 32, n: int = 4096, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, n)).astype(np.float32)


# ---- quant/ggml.py


def test_type_table_comes_from_gguf() -> None:
    assert (type_info(QType.Q4_K).block_size, type_info(QType.Q4_K).type_size) == (256, 144)
    assert type_info("mxfp4").type_size == 17
    assert type_info(int(QType.Q8_0)).bits_per_weight == 8.5
    assert row_bytes(QType.Q6_K, 4096) == 16 * 210
    assert row_bytes(QType.BF16, 7) == 14
    assert tensor_bytes(QType.MXFP4, (256, 2048, 4096)) == 256 * 2048 * 128 * 17
    assert tensor_bytes(QType.F32, ()) == 4
    assert byte_shape(QType.Q8_0, (3, 64)) == (3, 68)


def test_type_table_errors() -> None:
    with pytest.raises(BadInput, match="multiple of the Q4_K block size 256"):
        row_bytes(QType.Q4_K, 4000)
    with pytest.raises(UnsupportedModel):
        type_info(QType.Q8_1)  # runtime-only: no file carries it
    with pytest.raises(UnsupportedModel):
        type_info("Q9_9")


# ---- bit-exact quantizers


def special_data(tiny: float = 1e-40) -> np.ndarray:
    """Gaussian rows plus the edge cases: exact rounding ties, zero block, tiny (subnormal) values, huge values."""
    x = gaussian(8, 256, seed=1) * np.float32(3)
    x[0, :32] = 0
    x[1, :32] = np.arange(-16, 16, dtype=np.float32) + 0.5  # ties after scaling by 127/amax
    x[1, 0] = 127
    x[2, :32] = np.float32(tiny)
    x[3, :32] = np.float32(6e4)
    x[4, :3] = [np.float32(1) + np.float32(2**-8), np.float32(1) + np.float32(3 * 2**-8), -1e-45]  # bf16 ties
    return x


@pytest.mark.parametrize("qtype", [QType.Q8_0, QType.BF16, QType.F16], ids=lambda t: t.name)
def test_bit_exact_vs_gguf_py(qtype: QType) -> None:
    # A subnormal Q8_0 block makes 1/d overflow and the int8 cast undefined in ggml and gguf-py alike (its f16
    # scale is 0 either way), so Q8_0 gets tiny normal values there instead.
    x = special_data(1e-30 if qtype == QType.Q8_0 else 1e-40)
    ours = quantize(x, qtype)
    ref = gq.quantize(x, qtype).view(np.uint8).reshape(ours.shape)
    assert ours.dtype == np.uint8 and ours.shape == byte_shape(qtype, x.shape)
    assert np.array_equal(ours, ref)


def test_bf16_nan_inf_like_ggml() -> None:
    x = np.array([np.nan, -np.inf, np.inf, 3.0e38, -0.0], dtype=np.float32)
    x[0] = np.frombuffer(np.uint32(0x7F800001).tobytes(), np.float32)[0]  # signalling NaN is forced quiet
    ours = quantize(x, QType.BF16)
    assert np.array_equal(ours, gq.quantize(x, QType.BF16).view(np.uint8))
    assert ours.view(np.uint16)[0] == 0x7FC0


def test_f32_is_the_bytes() -> None:
    x = gaussian(2, 10)
    assert np.array_equal(quantize(x, QType.F32), x.view(np.uint8))


# ---- K-quants


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda t: t.name)
def test_k_quant_round_trip(qtype: QType) -> None:
    x = gaussian()
    q = quantize(x, qtype)
    assert q.dtype == np.uint8 and q.shape == byte_shape(qtype, x.shape)
    y = gq.dequantize(q, qtype)
    assert rel_rmse(y, x) < RMSE_BOUND[qtype]
    # Our torch kernel reads our bytes exactly as gguf-py does.
    assert torch.equal(dequantize(torch.from_numpy(q), qtype, x.shape), torch.from_numpy(y))


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda t: t.name)
def test_k_quant_heavy_tails_and_edges(qtype: QType) -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_t(3, size=(16, 1024)).astype(np.float32)
    x[0] = 0  # an all-zero row must come back exactly zero
    x[1] = 0.25  # constant row
    x[2, 100] = 1e4  # one outlier in a block
    x[3] = np.float32(1e-20) * rng.standard_normal(1024).astype(np.float32)  # below ggml's f16 scale range
    x[4] = -np.abs(x[4])  # one-signed rows exercise the min handling
    x[5] = np.abs(x[5])
    y = gq.dequantize(quantize(x, qtype), qtype)
    assert np.all(np.isfinite(y))
    assert np.all(y[0] == 0)
    assert abs(y[1] - 0.25).max() < 0.02
    rest = np.r_[4:16]
    assert rel_rmse(y[rest], x[rest]) < HEAVY_BOUND[qtype]
    assert abs(y[2, 100] - 1e4) < 1e-3 * 1e4  # the outlier sets its block's scale, so it survives almost exactly
    assert np.all(y[3] == 0)  # scales below f16 range flush to zero, as in ggml


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda t: t.name)
def test_imatrix_lowers_weighted_error(qtype: QType) -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((32, 1024)).astype(np.float32)
    imx = (3 * rng.standard_normal(1024) ** 2 + 0.01).astype(np.float32)
    plain = rel_rmse(gq.dequantize(quantize(x, qtype), qtype), x, imx)
    q = quantize(x, qtype, imatrix=imx)
    weighted = rel_rmse(gq.dequantize(q, qtype), x, imx)
    assert weighted < 0.97 * plain
    assert torch.equal(dequantize(torch.from_numpy(q), qtype, x.shape), torch.from_numpy(gq.dequantize(q, qtype)))
    # Degenerate inputs: all-zero data stays exactly zero; an all-zero importance vector gives finite values.
    y = gq.dequantize(quantize(np.zeros_like(x), qtype, imatrix=imx), qtype)
    assert np.all(y == 0)
    assert np.all(np.isfinite(gq.dequantize(quantize(x, qtype, imatrix=np.zeros_like(imx)), qtype)))


def test_quantize_errors() -> None:
    with pytest.raises(BadInput):
        quantize(np.zeros((2, 300), np.float32), QType.Q4_K)
    with pytest.raises(UnsupportedModel):
        quantize(np.zeros((2, 256), np.float32), QType.IQ1_S)  # read-only: no quantizer
    with pytest.raises(BadInput):
        quantize(np.zeros((2, 256), np.float32), QType.Q4_K, imatrix=np.ones(128, np.float32))
    with pytest.raises(BadInput):
        quantize(np.zeros((2, 256), np.float32), QType.Q2_K, imatrix=-np.ones(256, np.float32))
    with pytest.raises(BadInput):
        quantize(np.zeros((2, 256), np.float32), QType.Q8_0, imatrix=np.ones(256, np.float32))
    assert set(QUANTIZABLE) == {QType.F32, QType.F16, QType.BF16, QType.Q8_0, *K_QUANTS, QType.IQ4_XS, QType.IQ3_S,
                                QType.IQ3_XXS, QType.IQ2_S, QType.IQ2_XS, QType.IQ2_XXS, QType.IQ1_M}


@pytest.mark.llama
@pytest.mark.parametrize("qtype", (QType.Q8_0, *K_QUANTS), ids=lambda t: t.name)
def test_matches_ggml_c_quantizer(qtype: QType) -> None:
    ggml = _load_benchmark().GgmlQuantizer.load_or_skip()
    x = gaussian(16, 4096, seed=11)
    ours, ref = quantize(x, qtype), ggml.quantize(x, qtype)
    # Same algorithm; only float summation order (and FMA contraction in C) differs, so nearly every byte agrees.
    assert np.mean(ours == ref) > 0.99
    assert rel_rmse(gq.dequantize(ours, qtype), x) <= 1.002 * rel_rmse(gq.dequantize(ref, qtype), x)


@pytest.mark.llama
@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda t: t.name)
def test_imatrix_matches_ggml_c_quantizer(qtype: QType) -> None:
    ggml = _load_benchmark().GgmlQuantizer.load_or_skip()
    rng = np.random.default_rng(12)
    x = rng.standard_t(4, size=(16, 2048)).astype(np.float32)
    imx = (3 * rng.standard_normal(2048) ** 2 + 0.01).astype(np.float32)
    ours, ref = quantize(x, qtype, imatrix=imx), ggml.quantize(x, qtype, imatrix=imx)
    # ggml's *_impl searches; their descents amplify float-order differences a little more than the ref paths.
    assert np.mean(ours == ref) > 0.9
    assert rel_rmse(gq.dequantize(ours, qtype), x, imx) <= 1.002 * rel_rmse(gq.dequantize(ref, qtype), x, imx)


# ---- official checkpoint formats


def test_fp8_e4m3_all_codes() -> None:
    codes = np.arange(256, dtype=np.uint8)
    ours = fp8_e4m3_to_f32(codes)
    ref = torch.from_numpy(codes).view(torch.float8_e4m3fn).float().numpy()
    nan = (codes & 0x7F) == 0x7F
    assert np.all(np.isnan(ours[nan])) and np.all(np.isnan(ref[nan]))
    assert np.array_equal(ours[~nan].view(np.uint32), ref[~nan].view(np.uint32))  # -0.0 kept too
    assert fp8_e4m3_to_f32(codes.view(np.int8)).shape == (256,)


def test_e8m0_all_codes() -> None:
    b = np.arange(256, dtype=np.uint8)
    s = e8m0_to_f32(b)
    assert np.isnan(s[255])
    assert all(s[i] == math.ldexp(1.0, i - 127) for i in range(255))


def test_dequant_fp8_blocks_ragged_edges() -> None:
    rng = np.random.default_rng(3)
    q = rng.integers(0, 256, size=(200, 300), dtype=np.uint8)
    q[(q & 0x7F) == 0x7F] = 0  # no NaN codes in this test
    scale = rng.integers(110, 140, size=(2, 3), dtype=np.uint8)
    w = dequant_fp8_blocks(q, scale)
    qf = torch.from_numpy(q).view(torch.float8_e4m3fn).float()
    s = torch.from_numpy(2.0 ** (scale.astype(np.float64) - 127)).float()
    ref = qf * s.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300]
    assert w.dtype == np.float32 and np.array_equal(w, ref.numpy())
    # FP8 x power-of-two scale is exact in BF16 (facts §3): the converter relies on this.
    assert torch.equal(torch.from_numpy(w).bfloat16().float(), torch.from_numpy(w))
    with pytest.raises(BadInput):
        dequant_fp8_blocks(q, scale[:, :2])
    # Whole tiles take the in-place path; same numbers.
    q2, s2 = q[:128, :256], scale[:1, :2]
    assert np.array_equal(dequant_fp8_blocks(q2, s2), ref.numpy()[:128, :256])


def official_fp4(rows: int, cols: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    packed = rng.integers(-128, 128, size=(rows, cols // 2), dtype=np.int8)
    scale = rng.integers(0, 255, size=(rows, cols // 32), dtype=np.uint8)  # 0..254: 0xFF is NaN in the official format
    return packed, scale


def test_fp4_official_layout() -> None:
    packed = np.array([[0x71] + [0] * 15], dtype=np.uint8).view(np.int8)  # element 0 = code 1, element 1 = code 7
    scale = np.array([[128]], dtype=np.uint8)
    w = dequant_fp4_official(packed, scale)
    assert w.shape == (1, 32) and w[0, 0] == 1.0 and w[0, 1] == 12.0 and np.all(w[0, 2:] == 0)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_mxfp4_repack_is_lossless() -> None:
    packed, scale = official_fp4(64, 512, seed=4)
    blocks = mxfp4_from_official(packed, scale)
    assert blocks.shape == (64, 16, 17) and blocks.dtype == np.uint8
    assert np.array_equal(blocks[..., 0], scale)
    ref = dequant_fp4_official(packed, scale)
    # Equal as numbers (ggml's table has +0 where the official one has -0; inf where 6 * 2^127 overflows in both).
    got = gq.dequantize(blocks.reshape(64, -1), QType.MXFP4)
    assert np.array_equal(got, ref) and np.isinf(ref).any()
    tq = dequantize(torch.from_numpy(blocks), QType.MXFP4, (64, 512))
    assert torch.equal(tq, torch.from_numpy(ref))
    with pytest.raises(BadInput):
        mxfp4_from_official(packed, scale[:, :3])
