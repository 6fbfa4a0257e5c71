"""The compiled mHC mixers (kernels/cpu/mhc.cpp) against their torch references (kernels/mhc.py)."""

from __future__ import annotations

import pytest
import torch

from kernels import backends, cpu_ext, fast_mhc, mhc

pytestmark = pytest.mark.skipif(cpu_ext.usable() is None, reason="CPU kernels unavailable (no compiler or no AVX2)")


def params(S: int, D: int, R: int, seed: int, iters: int = 20) -> mhc.MixerParams:
    g = torch.Generator().manual_seed(seed)
    fn = torch.randn(R, S * D, generator=g) * 0.05
    scale = torch.rand(3 if R > S else 1, generator=g) + 0.5
    base = torch.randn(R, generator=g)
    return mhc.MixerParams(fn, scale, base, S, iters, 1e-6, 1e-6)


def streams(T: int, S: int, D: int, seed: int) -> torch.Tensor:
    return torch.randn(T, S, D, generator=torch.Generator().manual_seed(seed)) * 3


FAST = fast_mhc.CpuMixers(fast_mhc.cpu_ext.load())


@pytest.mark.parametrize("T,S,D", [(1, 4, 4096), (3, 4, 64), (17, 4, 1040), (2, 2, 16)])
def test_pre_matches_reference(T, S, D):
    p = params(S, D, (2 + S) * S, seed=T + D)
    X = streams(T, S, D, seed=D)
    got, want = FAST.pre(X, p), mhc.reference_pre(X, p)
    assert got is not None
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-5)
    # the Sinkhorn result is (nearly) doubly stochastic: every column sums to 1 after the last round
    torch.testing.assert_close(got[2].sum(-2), torch.ones(T, S), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("iters", [1, 2, 7])
def test_pre_sinkhorn_rounds(iters):
    p = params(4, 256, 24, seed=iters, iters=iters)
    X = streams(2, 4, 256, seed=iters)
    torch.testing.assert_close(FAST.pre(X, p)[2], mhc.reference_pre(X, p)[2], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("T", [1, 5])
def test_collapse_matches_reference(T):
    p = params(4, 512, 4, seed=T)
    X = streams(T, 4, 512, seed=T + 1)
    torch.testing.assert_close(FAST.collapse(X, p), mhc.reference_collapse(X, p), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("T,S,D", [(1, 4, 4096), (9, 4, 48)])
def test_post_matches_reference(T, S, D):
    g = torch.Generator().manual_seed(T)
    y, X = torch.randn(T, D, generator=g), torch.randn(T, S, D, generator=g)
    post, comb = torch.rand(T, S, generator=g) * 2, torch.rand(T, S, S, generator=g)
    torch.testing.assert_close(FAST.post(y, X, post, comb), mhc.reference_post(y, X, post, comb), rtol=1e-5, atol=1e-5)


def test_unsupported_shapes_fall_back_to_the_reference():
    p = params(4, 40, 24, seed=0)  # D = 40 is not a multiple of 16: the kernel declines
    X = streams(2, 4, 40, seed=0)
    assert FAST.pre(X, p) is None
    got = mhc.hc_pre(X, p)
    for g, w in zip(got, mhc.reference_pre(X, p)):
        torch.testing.assert_close(g, w)
    assert FAST.pre(X.double(), params(4, 40, 24, seed=0)) is None


def test_dispatch_uses_the_kernel_and_env_forces_the_reference(fast_kernels, monkeypatch):
    p = params(4, 64, 24, seed=3)
    X = streams(1, 4, 64, seed=3)
    calls = []
    monkeypatch.setitem(mhc.hc_pre_op.table, "cpu", lambda X, p: calls.append(1) or FAST.pre(X, p))
    mhc.hc_pre(X, p)
    assert calls == [1]
    monkeypatch.setenv("V4_KERNELS", "reference")
    backends.load()  # read at load, as the engine loader does
    mhc.hc_pre(X, p)
    assert calls == [1]


# ------------------------------------------------------------------------------------------------ RMSNorm
@pytest.mark.parametrize("shape", [(1, 4096), (1, 64, 512), (3, 1024), (300, 16), (1, 4, 7, 32)])
@pytest.mark.parametrize("weighted", [True, False])
def test_rms_norm_matches_reference(shape, weighted, fast_kernels):
    from kernels import norm

    g = torch.Generator().manual_seed(shape[-1])
    x = torch.randn(*shape, generator=g) * 5
    w = torch.randn(shape[-1], generator=g) if weighted else None
    got = FAST.rms_norm(x, w, 1e-6)
    assert got is not None and got.shape == x.shape
    torch.testing.assert_close(got, norm.reference_rms_norm(x, w, 1e-6), rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(norm.rms_norm(x, w, 1e-6), got, rtol=0, atol=0)  # the dispatcher takes the kernel


def test_rms_norm_declines_what_it_does_not_handle(fast_kernels):
    from kernels import norm

    x = torch.randn(2, 40)  # 40: not a multiple of 16
    assert FAST.rms_norm(x, None, 1e-6) is None
    assert FAST.rms_norm(torch.randn(2, 32, dtype=torch.float64), None, 1e-6) is None
    assert FAST.rms_norm(torch.randn(2, 32), torch.randn(16), 1e-6) is None  # weight of another width
    torch.testing.assert_close(norm.rms_norm(x, None, 1e-6), norm.reference_rms_norm(x, None, 1e-6), rtol=0, atol=0)
    xt = torch.randn(32, 3).t()  # a transposed view is normalized as the contiguous rows it stands for
    torch.testing.assert_close(FAST.rms_norm(xt, None, 1e-6), norm.reference_rms_norm(xt, None, 1e-6))
