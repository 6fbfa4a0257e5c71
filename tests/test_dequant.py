"""Torch reference dequantizers == gguf-py's numpy dequantizers, bit for bit, for every supported type."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import quants as gq

from kernels.dequant import DEQUANTIZABLE, dequantize, dequantize_rows
from quant.ggml import SUPPORTED, QType, type_info
from quant.errors import BadInput, UnsupportedModel

# Byte offsets of the f16 scale fields in each block; random bytes there could be Inf/NaN, so they get real scales.
F16_FIELDS: dict[QType, tuple[int, ...]] = {
    QType.Q8_0: (0,),
    QType.Q2_K: (80, 82),
    QType.Q3_K: (108,),
    QType.Q4_K: (0, 2),
    QType.Q5_K: (0, 2),
    QType.Q6_K: (208,),
    QType.IQ2_XXS: (0,),
    QType.IQ3_XXS: (0,),
    QType.IQ4_XS: (0,),
    QType.Q4_0: (0,),
    QType.Q4_1: (0, 2),
    QType.Q5_0: (0,),
    QType.Q5_1: (0, 2),
    QType.IQ4_NL: (0,),
    QType.IQ2_XS: (0,),
    QType.IQ2_S: (0,),
    QType.IQ3_S: (0,),
    QType.IQ1_S: (0,),
    # IQ1_M keeps its f16 scale in the top nibbles of four u16 words: random bytes may make it Inf/NaN, which
    # both implementations carry through the same way
}


def random_blocks(qtype: QType, rows: int, n: int, seed: int = 0) -> np.ndarray:
    """Random ggml bytes of shape (rows, row_bytes) with finite random f16 scales."""
    info = type_info(qtype)
    rng = np.random.default_rng(seed)
    nb = rows * n // info.block_size
    raw = rng.integers(0, 256, size=(nb, info.type_size), dtype=np.uint8)
    for off in F16_FIELDS.get(qtype, ()):
        d = (rng.standard_normal(nb) * 10.0 ** rng.uniform(-4, 1, nb)).astype(np.float16)
        raw[:, off : off + 2] = d.view(np.uint8).reshape(nb, 2)
    return raw.reshape(rows, -1)


def assert_same_f32(ours: torch.Tensor, ref: np.ndarray) -> None:
    """Bit-equal float32, with NaN positions compared as positions (payloads may differ between libraries)."""
    assert ours.dtype == torch.float32
    ref_t = torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32))
    assert ours.shape == ref_t.shape
    nan_o, nan_r = torch.isnan(ours), torch.isnan(ref_t)
    assert torch.equal(nan_o, nan_r)
    bits_o = torch.where(nan_o, 0, ours).view(torch.int32)
    bits_r = torch.where(nan_r, 0, ref_t).view(torch.int32)
    mismatch = (bits_o != bits_r).nonzero()
    assert mismatch.numel() == 0, f"{mismatch.shape[0]} elements differ, first at {mismatch[0].tolist()}"


# MXFP4's top exponents overflow to inf in both implementations, which numpy warns about.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("qtype", DEQUANTIZABLE, ids=lambda t: t.name)
def test_matches_gguf_py(qtype: QType) -> None:
    rows, n = 8, 512
    raw = random_blocks(qtype, rows, n, seed=int(qtype))
    ref = gq.dequantize(raw, qtype).reshape(rows, n)
    ours = dequantize(torch.from_numpy(raw), qtype, (rows, n))
    assert_same_f32(ours, ref)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("qtype", [QType.Q4_K, QType.MXFP4, QType.IQ2_XXS, QType.BF16], ids=lambda t: t.name)
def test_leading_shape_and_3d(qtype: QType) -> None:
    # Experts are stored 3-D (E, out, in); the bytes may arrive with any leading shape.
    E, out, n = 3, 4, 256
    raw = random_blocks(qtype, E * out, n, seed=7)
    ref = gq.dequantize(raw, qtype).reshape(E, out, n)
    flat = torch.from_numpy(raw.reshape(-1))
    assert_same_f32(dequantize(flat, qtype, (E, out, n)), ref)
    assert_same_f32(dequantize(torch.from_numpy(raw).reshape(E, out, -1), qtype, (E, out, n)), ref)


@pytest.mark.parametrize("qtype", [QType.Q8_0, QType.Q6_K, QType.IQ3_XXS, QType.F16], ids=lambda t: t.name)
def test_dequantize_rows(qtype: QType) -> None:
    rows, n = 16, 256
    raw = random_blocks(qtype, rows, n, seed=3)
    ref = gq.dequantize(raw, qtype).reshape(rows, n)
    pick = torch.tensor([5, 0, 15, 5])
    assert_same_f32(dequantize_rows(torch.from_numpy(raw), qtype, n, pick), ref[pick.numpy()])
    assert dequantize_rows(torch.from_numpy(raw), qtype, n, torch.tensor([], dtype=torch.long)).shape == (0, n)
    with pytest.raises(BadInput):
        dequantize_rows(torch.from_numpy(raw), qtype, n, torch.tensor([rows]))


def test_special_values() -> None:
    # Zero scales give zeros (not NaN); an MXFP4 exponent of 0 gives ggml's subnormal half-scale.
    raw = np.zeros((1, 144), np.uint8)
    raw[0, 16:] = 0xFF
    assert torch.equal(dequantize(torch.from_numpy(raw), QType.Q4_K, (1, 256)), torch.zeros(1, 256))
    mx = np.zeros((1, 17), np.uint8)
    mx[0, 1] = 0x07  # element 0 = code 7 (doubled value 12)
    assert dequantize(torch.from_numpy(mx), QType.MXFP4, (1, 32))[0, 0].item() == 12 * 2.0**-149 * 2**21


def test_errors() -> None:
    raw = torch.zeros(34, dtype=torch.uint8)
    with pytest.raises(BadInput):
        dequantize(raw, QType.Q8_0, (64,))  # 64 elements need two blocks
    with pytest.raises(BadInput):
        dequantize(raw, QType.Q8_0, (34,))  # not a multiple of the block size
    with pytest.raises(BadInput):
        dequantize(raw.view(torch.int8), QType.Q8_0, (32,))
    with pytest.raises(UnsupportedModel):
        dequantize(raw, QType.Q8_1, (32,))  # a runtime-only ggml type no file carries


def test_every_table_type_dequantizes() -> None:
    # the one type table (quant.ggml.TYPES) and the reference kernels cover the same types; I32 is read as itself
    assert set(DEQUANTIZABLE) == set(SUPPORTED) - {QType.I32}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("qtype", DEQUANTIZABLE, ids=lambda t: t.name)
def test_cuda_matches_cpu(qtype: QType) -> None:
    raw = torch.from_numpy(random_blocks(qtype, 8, 512, seed=1))
    cpu = dequantize(raw, qtype, (8, 512))
    gpu = dequantize(raw.cuda(), qtype, (8, 512)).cpu()
    assert torch.equal(torch.isnan(cpu), torch.isnan(gpu))
    assert torch.equal(cpu.nan_to_num(0.0).view(torch.int32), gpu.nan_to_num(0.0).view(torch.int32))
    rows = torch.tensor([3, 1])
    assert torch.equal(
        dequantize_rows(raw.cuda(), qtype, 512, rows.cuda()).cpu().nan_to_num(0.0), cpu[rows].nan_to_num(0.0)
    )
