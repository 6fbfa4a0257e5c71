"""IQ2_XXS / IQ2_XS / IQ2_S / IQ1_M quantizers: ggml's byte layout, quality against ggml's own quantizer, edge cases."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import quants as gq

from benchmarks.quant_rmse import GgmlQuantizer, decoded, make_tensors, random_importance, rel_rmse
from quant.formats import quantize
from quant.ggml import QType, byte_shape

TYPES = (QType.IQ2_XXS, QType.IQ2_XS, QType.IQ2_S, QType.IQ1_M)
# Loose ceilings on the imatrix-weighted relative RMSE of gaussian data (measured: about 0.24, 0.21, 0.19, 0.33).
SANITY = {QType.IQ2_XXS: 0.28, QType.IQ2_XS: 0.24, QType.IQ2_S: 0.22, QType.IQ1_M: 0.37}
# Without an imatrix the search weighs errors by x²-like weights, so plain RMSE is higher (measured: about 0.36,
# 0.31, 0.26, 0.52).
SANITY_PLAIN = {QType.IQ2_XXS: 0.40, QType.IQ2_XS: 0.34, QType.IQ2_S: 0.29, QType.IQ1_M: 0.57}
ROWS, COLS = 64, 1024
# ggml builds its IQ2_S and IQ1_M neighbour tables on first use, ~5 s and ~14 s of its own: those comparisons are
# marked slow.
VS_GGML = [*TYPES[:2], *(pytest.param(t, marks=pytest.mark.slow) for t in TYPES[2:])]


@pytest.fixture(scope="module")
def tensors() -> dict[str, np.ndarray]:
    return make_tensors(ROWS, COLS, seed=3)


@pytest.fixture(scope="module")
def imatrix() -> np.ndarray:
    return random_importance(COLS, seed=5)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_layout_decodes_alike(qtype, tensors, imatrix):
    x = tensors["gaussian"]
    b = quantize(x, qtype, imatrix)
    assert b.dtype == np.uint8 and b.shape == byte_shape(qtype, x.shape)
    y = decoded(b, qtype, x.shape)
    assert y.shape == x.shape
    assert rel_rmse(y, x, imatrix) < SANITY[qtype]


@pytest.mark.parametrize("kind", ["gaussian", "llm-like", "student-t3"])
@pytest.mark.parametrize("qtype", VS_GGML, ids=lambda t: t.name)
def test_no_worse_than_ggml(qtype, kind, tensors, imatrix):
    ggml = GgmlQuantizer.load_or_skip()
    x = tensors[kind]
    ours = rel_rmse(decoded(quantize(x, qtype, imatrix), qtype, x.shape), x, imatrix)
    ref = rel_rmse(gq.dequantize(ggml.quantize(x, qtype, imatrix), qtype), x, imatrix)
    assert ours <= ref, f"{qtype.name} {kind}: ours {ours:.5f} vs ggml {ref:.5f}"


@pytest.mark.parametrize("kind", ["gaussian", "llm-like"])
@pytest.mark.parametrize("qtype", VS_GGML[2:], ids=lambda t: t.name)
def test_no_imatrix_no_worse_than_ggml(qtype, kind, tensors):
    """Plain RMSE where ggml accepts no imatrix (IQ2_S, IQ1_M)."""
    ggml = GgmlQuantizer.load_or_skip()
    x = tensors[kind]
    ours = rel_rmse(decoded(quantize(x, qtype), qtype, x.shape), x, None)
    ref = rel_rmse(gq.dequantize(ggml.quantize(x, qtype), qtype), x, None)
    assert ours <= ref, f"{qtype.name} {kind}: ours {ours:.5f} vs ggml {ref:.5f}"


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_without_imatrix(qtype, tensors):
    x = tensors["gaussian"][:8]
    y = decoded(quantize(x, qtype), qtype, x.shape)
    assert rel_rmse(y, x, None) < SANITY_PLAIN[qtype]


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_edge_cases(qtype, imatrix):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((6, COLS)).astype(np.float32)
    x[0] = 0  # all-zero blocks decode to zero
    x[1, 300] = 1e4  # one huge outlier: it must come back large, the rest of its block near zero
    x[2] *= np.float32(1e-30)  # below f16's range: the block scale underflows to zero
    x[3, :256] = 0  # one zero block in a live row
    imx = imatrix.copy()
    imx[:256] = 0  # a whole block without importance, and scattered zeros
    imx[512::7] = 0
    for w in (imatrix, imx, None):
        y = decoded(quantize(x, qtype, w), qtype, x.shape)
        assert np.all(np.isfinite(y))
        assert not y[0].any() and not y[2].any() and not y[3, :256].any()
        assert y[1, 300] > 2e3
        assert np.abs(y[1, 256:512]).max() <= np.abs(y[1, 300])
        live = x[4:]
        assert rel_rmse(y[4:], live, None) < 0.6


def test_zero_importance_columns_still_quantized(imatrix):
    x = make_tensors(4, COLS, seed=4)["gaussian"]
    imx = imatrix.copy()
    imx[::2] = 0
    for qtype in TYPES:
        y = decoded(quantize(x, qtype, imx), qtype, x.shape)
        # Zero-importance columns carry no error weight, yet they get their nearest value, not garbage.
        assert rel_rmse(y[:, ::2], x[:, ::2], None) < 0.8
