"""IQ3_XXS, IQ3_S and IQ4_XS quantizers (quant/iq3.py): ggml's byte layout, and error no worse than ggml's own."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import quants as gq

from benchmarks.quant_rmse import GgmlQuantizer, decoded, make_tensors, random_importance, rel_rmse
from quant.formats import quantize
from quant.ggml import QType, byte_shape

TYPES = (QType.IQ3_XXS, QType.IQ3_S, QType.IQ4_XS)
ROWS, COLS = 64, 1024
# Plain relative RMSE on unit gaussians without an imatrix; ours measure ~0.181, 0.133, 0.074 (ggml 0.213, 0.167,
# 0.076).
SANITY = {QType.IQ3_XXS: 0.20, QType.IQ3_S: 0.15, QType.IQ4_XS: 0.085}


@pytest.fixture(scope="module")
def tensors() -> dict[str, np.ndarray]:
    return make_tensors(ROWS, COLS)


@pytest.fixture(scope="module")
def imatrix() -> np.ndarray:
    return random_importance(COLS, seed=1)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
def test_layout_decodes_alike(qtype, with_imatrix, tensors, imatrix):
    x = tensors["llm-like"]
    q = quantize(x, qtype, imatrix if with_imatrix else None)
    assert q.dtype == np.uint8 and q.shape == byte_shape(qtype, x.shape)
    y = decoded(q, qtype, x.shape)
    assert y.shape == x.shape and np.isfinite(y).all()


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_sanity_bound(qtype, tensors):
    x = tensors["gaussian"]
    assert rel_rmse(gq.dequantize(quantize(x, qtype), qtype), x, None) < SANITY[qtype]


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("kind", ["gaussian", "student-t3", "llm-like"])
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
def test_no_worse_than_ggml(qtype, kind, with_imatrix, tensors, imatrix):
    ggml = GgmlQuantizer.load_or_skip()
    x = tensors[kind]
    w = imatrix if with_imatrix else None
    ours = rel_rmse(gq.dequantize(quantize(x, qtype, w), qtype), x, w)
    ref = rel_rmse(gq.dequantize(ggml.quantize(x, qtype, w), qtype), x, w)
    assert ours <= ref, f"{qtype.name} {kind}: ours {ours:.5f} vs ggml {ref:.5f}"


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_all_zero_blocks(qtype, tensors, imatrix):
    x = tensors["gaussian"][:4].copy()
    x[0] = 0
    x[1, :256] = 0  # one zero block in a row that is otherwise not zero
    x[2, 256:288] = 0  # one zero group inside a block
    for w in (None, imatrix):
        y = decoded(quantize(x, qtype, w), qtype, x.shape)
        assert np.isfinite(y).all()
        assert not y[0].any() and not y[1, :256].any()
        # A zero group in a live block keeps the block's smallest codes: small, not exactly zero for the lattices.
        assert np.abs(y[2, 256:288]).max() < 0.1 * np.abs(x[2, 288:512]).max()


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_huge_outlier(qtype, tensors, imatrix):
    x = tensors["gaussian"][:8].copy()
    x[:, 100] = 1e4
    ggml = GgmlQuantizer.find()
    for w in (None, imatrix):
        y = decoded(quantize(x, qtype, w), qtype, x.shape)
        assert np.isfinite(y).all()
        np.testing.assert_allclose(y[:, 100], 1e4, rtol=0.05)
        # The outlier's block has to spend its scale range on it; the other blocks are unaffected.
        assert rel_rmse(y[:, 256:], x[:, 256:], None if w is None else w[256:]) < SANITY[qtype]
        if ggml is not None:
            # The outlier's group dominates the total, and its error turns on which f16 step of d lands nearest
            # that group's best scale: a draw within 0.1% either way, not a quality difference.
            ref = gq.dequantize(ggml.quantize(x, qtype, w), qtype)
            assert rel_rmse(y, x, w) <= 1.001 * rel_rmse(ref, x, w)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("magnitude", [1e-30, 1e30])
def test_extreme_magnitudes(qtype, magnitude, tensors, imatrix):
    x = (tensors["gaussian"][:4] * np.float32(magnitude)).astype(np.float32)
    for w in (None, imatrix):
        y = decoded(quantize(x, qtype, w), qtype, x.shape)
        assert np.isfinite(y).all()
        if magnitude < 1:  # below f16's range: d rounds to zero, as in ggml
            assert not y.any()
        else:  # above it: d saturates at the f16 maximum instead of becoming inf; the shape survives the clipping
            assert np.corrcoef(x.ravel(), y.ravel())[0, 1] > 0.5


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_zeros_in_imatrix(qtype, tensors, imatrix):
    x = tensors["llm-like"]
    w = imatrix.copy()
    w[::3] = 0  # scattered zero columns
    w[64:128] = 0  # two whole groups without importance
    y = decoded(quantize(x, qtype, w), qtype, x.shape)
    assert np.isfinite(y).all()
    # Fully unimportant groups are still quantized as if every value mattered equally, not left arbitrary.
    assert rel_rmse(y[:, 64:128], x[:, 64:128], None) < 1.2 * SANITY[qtype]
    ggml = GgmlQuantizer.find()
    if ggml is not None:
        ref = rel_rmse(gq.dequantize(ggml.quantize(x, qtype, w), qtype), x, w)
        assert rel_rmse(y, x, w) <= ref
