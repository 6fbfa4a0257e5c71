"""Compiled CPU mHC mixers and RMSNorm (kernels/cpu/mhc.cpp) for the ops of kernels.mhc and kernels.norm.

One C call replaces the ~130 small torch ops of a block's pre-mix (the Sinkhorn rounds alone are 6 ops × 20), which
at decode cost more than the arithmetic: ~0.6 ms per call, four calls per layer pair. Results match the references
to f32 rounding (the RMS scale is applied after the dots instead of before). If the library did not build, or
the CPU lacks AVX2, `install()` files nothing and the references run.
"""

from __future__ import annotations

import ctypes

import torch

from kernels import cpu_ext, mhc
from kernels.norm import rms_norm_op


def _ok(*ts: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in ts)


class CpuMixers:
    def __init__(self, lib: ctypes.CDLL):
        i64, i32, ptr, f32 = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
        lib.v4_hc_pre.restype = i32
        lib.v4_hc_pre.argtypes = [ptr, i64, i64, i64, ptr, i64, ptr, ptr, i32, f32, f32, ptr, ptr, ptr, i32]
        lib.v4_hc_post.restype = i32
        lib.v4_hc_post.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, ptr, i32]
        lib.v4_rms_norm.restype = i32
        lib.v4_rms_norm.argtypes = [ptr, i64, i64, ptr, f32, ptr, i32]
        self.lib = lib

    def _run(self, X: torch.Tensor, p: mhc.MixerParams, full: bool):
        T, S, D = X.shape
        if not _ok(X, p.fn, p.scale, p.base) or S != p.S:
            return None
        X, fn, scale, base = (t.contiguous() for t in (X, p.fn, p.scale, p.base))
        out = torch.empty(T, D)
        post, comb = (torch.empty(T, S), torch.empty(T, S, S)) if full else (None, None)
        rc = self.lib.v4_hc_pre(X.data_ptr(), T, S, D, fn.data_ptr(), fn.shape[0], scale.data_ptr(), base.data_ptr(),
                                p.iters, p.eps, p.norm_eps, out.data_ptr(), post.data_ptr() if full else None,
                                comb.data_ptr() if full else None, cpu_ext.threads())
        if rc != 0:
            return None
        return (out, post, comb) if full else out

    def pre(self, X, p):
        return self._run(X, p, True) if p.fn.shape[0] == (2 + p.S) * p.S else None

    def collapse(self, X, p):
        return self._run(X, p, False) if p.fn.shape[0] == p.S else None

    def post(self, y, X, post, comb):
        T, S, D = X.shape
        if not _ok(y, X, post, comb):
            return None
        y, X, post, comb = (t.contiguous() for t in (y, X, post, comb))
        out = torch.empty(T, S, D)
        rc = self.lib.v4_hc_post(y.data_ptr(), X.data_ptr(), post.data_ptr(), comb.data_ptr(), T, S, D, out.data_ptr(),
                                 cpu_ext.threads())
        return out if rc == 0 else None

    def rms_norm(self, x, weight, eps):
        D = x.shape[-1]
        if not _ok(x) or (weight is not None and (not _ok(weight) or weight.shape != (D,))) or x.numel() == 0:
            return None
        x = x.contiguous()
        w = weight.contiguous() if weight is not None else None
        y = torch.empty_like(x)
        rc = self.lib.v4_rms_norm(x.data_ptr(), x.numel() // D, D, w.data_ptr() if w is not None else None, eps,
                                  y.data_ptr(), cpu_ext.threads())
        return y if rc == 0 else None


def install() -> bool:
    """File the mixers and RMSNorm in their ops' "cpu" tables; False (nothing filed) without a usable library."""
    lib = cpu_ext.usable()
    if lib is None:
        return False
    cpu = CpuMixers(lib)
    mhc.hc_pre_op.register("cpu", cpu.pre)
    mhc.hc_collapse_op.register("cpu", cpu.collapse)
    mhc.hc_post_op.register("cpu", cpu.post)
    rms_norm_op.register("cpu", cpu.rms_norm)
    return True
