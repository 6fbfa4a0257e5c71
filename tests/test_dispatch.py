"""The kernel dispatcher (kernels/dispatch.py) and the one backend loader (kernels/backends.py), with stand-in kernels."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from kernels import backends, dispatch
from kernels.dispatch import Op
from kernels.linear import QWeight, linear, linear_op
from kernels.norm import rms_norm, rms_norm_op, reference_rms_norm


def f32_weight(rows: int, cols: int) -> QWeight:
    return QWeight(torch.randn(rows, cols).view(-1).view(torch.uint8), Q.F32, (rows, cols))


@pytest.fixture
def fast_mode():
    dispatch.use_reference(False)  # conftest's teardown puts back what $V4_KERNELS says


def test_fast_implementation_runs_and_a_decline_falls_back(fast_mode):
    calls = []
    op = Op("double", lambda x: x * 2)
    op.register("cpu", lambda x: calls.append("fast") or (x + x if x.numel() > 1 else None))
    assert torch.equal(op(torch.tensor([1.0, 2.0])), torch.tensor([2.0, 4.0])) and calls == ["fast"]
    assert torch.equal(op(torch.tensor([3.0])), torch.tensor([6.0]))  # declined: the reference ran
    assert calls == ["fast", "fast"]


def test_a_kernel_for_one_device_type_is_not_used_for_another(fast_mode, monkeypatch):
    w, x = f32_weight(3, 8), torch.randn(2, 8)
    monkeypatch.setitem(linear_op.table, (Q.F32, "cuda"), lambda x, w: pytest.fail("cuda kernel on a cpu tensor"))
    monkeypatch.setitem(linear_op.table, (Q.Q8_0, "cpu"), lambda x, w: pytest.fail("Q8_0 kernel for an F32 weight"))
    torch.testing.assert_close(linear(x, w), x @ w.dense().T)
    monkeypatch.setitem(linear_op.table, (Q.F32, "cpu"), lambda x, w: torch.zeros(2, 3))
    assert torch.equal(linear(x, w), torch.zeros(2, 3))


def test_reference_at_load_wins_over_registered_kernels(monkeypatch):
    backends.load(reference=False)  # the backends' own kernels first, so that the stand-in below stays filed
    monkeypatch.setitem(rms_norm_op.table, "cpu", lambda x, weight, eps: torch.zeros_like(x))
    x = torch.randn(4, 16)
    monkeypatch.setenv("V4_KERNELS", "reference")
    assert backends.load() == {}
    torch.testing.assert_close(rms_norm(x, None, 1e-6), reference_rms_norm(x, None, 1e-6), rtol=0, atol=0)
    monkeypatch.delenv("V4_KERNELS")
    assert torch.equal(rms_norm(x, None, 1e-6), reference_rms_norm(x, None, 1e-6))  # read at load, not per call
    backends.load()
    assert torch.equal(rms_norm(x, None, 1e-6), torch.zeros_like(x))


def test_fused_ops_decline_while_observing_and_linear_shows_its_input(fast_mode, monkeypatch):
    seen = []
    w, x = f32_weight(3, 16), torch.randn(2, 16)
    monkeypatch.setitem(rms_norm_op.table, "cpu", lambda x, weight, eps: torch.zeros_like(x))
    monkeypatch.setitem(linear_op.table, (Q.F32, "cpu"), lambda x, w: torch.ones(2, 3))
    with dispatch.observing(lambda x, w: seen.append(w)):
        assert torch.equal(rms_norm(x, None, 1e-6), reference_rms_norm(x, None, 1e-6))
        assert torch.equal(linear(x, w), torch.ones(2, 3))  # not fused: its kernel still runs
    assert seen == [w]
    assert torch.equal(rms_norm(x, None, 1e-6), torch.zeros_like(x))


def test_backends_install_once(monkeypatch):
    calls = []
    monkeypatch.setattr(backends, "_installed", None)
    for m in (backends.fast, backends.fast_mhc, backends.fast_decode, backends.gpu):
        monkeypatch.setattr(m, "install", lambda m=m: calls.append(m.__name__) or False)
    monkeypatch.delenv("V4_KERNELS", raising=False)
    first = backends.load()
    assert backends.load() is first and backends.load(reference=False) is first
    assert sorted(calls) == sorted(first) == ["kernels.fast", "kernels.fast_decode", "kernels.fast_mhc", "kernels.gpu"]


def test_importing_the_ops_imports_no_backend():
    code = ("import sys, kernels.linear, kernels.mhc, kernels.norm, kernels.attention, kernels.decode, kernels.offload;"
            "print(sorted(m for m in sys.modules if m in ('kernels.fast', 'kernels.fast_mhc', 'kernels.fast_decode',"
            " 'kernels.gpu', 'kernels.backends', 'kernels.cpu_ext')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_backends_serve_types_of_the_one_table():
    # the compiled library's block layouts agree with quant.ggml.TYPES wherever it has kernels, and fast.TYPES is
    # exactly the table's types it has kernels for; the GPU's and the dequantizers' types come from the same table
    from kernels import cpu_ext, dequant, fast, gpu
    from quant import ggml

    assert set(gpu.TYPES) | set(gpu.FLOAT_TYPES) <= set(ggml.TYPES)
    assert set(dequant.DEQUANTIZABLE) == set(ggml.TYPES) - {Q.I32}
    lib = cpu_ext.usable()
    if lib is None:
        pytest.skip("CPU kernels did not build (no compiler or no AVX2)")
    backends.load(reference=False)
    served = {t for t, info in ggml.TYPES.items() if cpu_ext.layout(lib, t) != (0, 0)}
    for t in served:
        assert cpu_ext.layout(lib, t) == (ggml.TYPES[t].block_size, ggml.TYPES[t].type_size), t.name
    assert set(fast.TYPES) == served and {Q.Q8_0, Q.Q4_K, Q.IQ2_XXS, Q.MXFP4, Q.BF16} <= served
    assert all((t, "cpu") in linear_op.table for t in fast.TYPES)
