"""The compiled fused decode halves (kernels/cpu/decode.cpp) for kernels.decode's ops.

Each `PreWeights` / `PostWeights` is turned once into the C structs decode.cpp reads (pointers, types, shapes; the
spec keeps the tensors alive), kept in the spec's `plans`. A call then costs a few output allocations
and one ctypes call. Declines (None → the model's reference composition) when the library did not build, a weight
type or row length has no row kernel, or the inputs are not one float32 token (int64 position and id).
"""

from __future__ import annotations

import ctypes

import torch

from kernels import cpu_ext, decode
from kernels.linear import QWeight
from kernels.mhc import MixerParams
from quant.errors import BadInput

i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


class _Mixer(ctypes.Structure):
    _fields_ = [("fn", ptr), ("R", i64), ("scale", ptr), ("base", ptr), ("iters", i64), ("eps", f32),
                ("norm_eps", f32)]


class _Linear(ctypes.Structure):
    _fields_ = [("type", i64), ("w", ptr), ("N", i64), ("K", i64), ("row_bytes", i64)]


class _Pre(ctypes.Structure):
    _fields_ = [("S", i64), ("D", i64), ("H", i64), ("d", i64), ("rope_dim", i64), ("eps", f32), ("mix", _Mixer),
                ("norm", ptr), ("wq_a", _Linear), ("wkv", _Linear), ("wq_b", _Linear), ("q_norm", ptr),
                ("kv_norm", ptr), ("inv_freq", ptr)]


class _Post(ctypes.Structure):
    _fields_ = [("S", i64), ("D", i64), ("H", i64), ("d", i64), ("rope_dim", i64), ("groups", i64), ("eps", f32),
                ("wo_a", _Linear), ("wo_b", _Linear), ("mix", _Mixer), ("norm", ptr), ("gate", ptr), ("bias", ptr),
                ("tid2eid", ptr), ("vocab", i64), ("E", i64), ("k", i64), ("route_scale", f32), ("limit", f32),
                ("w1", _Linear), ("w3", _Linear), ("w2", _Linear), ("s1", _Linear), ("s3", _Linear),
                ("s2", _Linear)]


def _f32(*ts: torch.Tensor | None) -> bool:
    return all(t is None or (t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()) for t in ts)


def _linear(lib, w: QWeight) -> _Linear | None:
    """Rows of a 2-D weight, or of a 3-D expert stack as one [E·out, in] matrix; None if no row kernel covers it."""
    K = w.shape[-1]
    if w.device.type != "cpu" or not w.raw.is_contiguous() or lib.v4_supported(int(w.qtype), K) != 1:
        return None
    return _Linear(int(w.qtype), w.raw.data_ptr(), w.numel // K, K, w.row_bytes)


def _mixer(p: MixerParams) -> _Mixer | None:
    if not _f32(p.fn, p.scale, p.base) or p.fn.shape[0] != (2 + p.S) * p.S or not 1 <= p.S <= 16:
        return None
    return _Mixer(p.fn.data_ptr(), p.fn.shape[0], p.scale.data_ptr(), p.base.data_ptr(), p.iters, p.eps, p.norm_eps)


def _all(*parts) -> bool:
    return all(p is not None for p in parts)


class FusedDecode:
    def __init__(self, lib: ctypes.CDLL):
        lib.v4_block_pre.restype = ctypes.c_int
        lib.v4_block_pre.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ctypes.c_int]
        lib.v4_block_post.restype = ctypes.c_int
        lib.v4_block_post.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ctypes.c_int]
        self.lib = lib

    @staticmethod
    def _plan(w, build):
        """w's C struct (None: not one the kernel covers), built once and kept in w.plans."""
        try:
            return w.plans["cpu"]
        except KeyError:
            plan = w.plans["cpu"] = build(w)
            return plan

    def _pre_plan(self, w: decode.PreWeights) -> _Pre | None:
        lib, m = self.lib, w.mixer
        mix = _mixer(m)
        lins = [_linear(lib, q) for q in (w.wq_a, w.wkv, w.wq_b)]
        D = w.norm.shape[0]
        rope_dim = 2 * w.inv_freq.shape[0]
        ok = (_all(mix, *lins) and _f32(w.norm, w.q_norm, w.kv_norm, w.inv_freq) and D % 16 == 0
              and w.head_dim % 16 == 0 and w.wq_a.shape[0] % 16 == 0 and rope_dim <= w.head_dim
              and w.wq_b.shape[0] == w.heads * w.head_dim and w.wkv.shape[0] == w.head_dim)
        if not ok:
            return None
        return _Pre(m.S, D, w.heads, w.head_dim, rope_dim, w.eps, mix, w.norm.data_ptr(), *lins,
                    w.q_norm.data_ptr(), w.kv_norm.data_ptr(), w.inv_freq.data_ptr())

    def _post_plan(self, w: decode.PostWeights) -> _Post | None:
        lib, m = self.lib, w.mixer
        mix = _mixer(m)
        lins = [_linear(lib, q) for q in (w.wo_a, w.wo_b, *w.experts, *w.shared)]
        D = w.norm.shape[0]
        E = w.gate.shape[0]
        hash_ids = w.tid2eid
        ok = (_all(mix, *lins) and _f32(w.norm, w.gate, w.bias) and D % 16 == 0
              and (w.bias is None) != (hash_ids is None)
              and w.wo_a.shape[0] % w.groups == 0 and w.wo_a.shape[1] * w.groups == w.heads * w.head_dim
              and w.experts[0].shape[0] == E and w.shared[0].shape[0] == 1)
        if hash_ids is not None:
            ok = ok and hash_ids.dtype == torch.int64 and hash_ids.is_contiguous() and hash_ids.shape[1] == w.k
        if not ok:
            return None
        return _Post(m.S, D, w.heads, w.head_dim, w.rope_dim, w.groups, w.eps, lins[0], lins[1], mix,
                     w.norm.data_ptr(), w.gate.data_ptr(), w.bias.data_ptr() if w.bias is not None else None,
                     hash_ids.data_ptr() if hash_ids is not None else None,
                     hash_ids.shape[0] if hash_ids is not None else 0, E, w.k, w.route_scale, w.limit, *lins[2:])

    # At decode every torch call here runs with cold caches (the kernel before it has just streamed ~40-200 MB through
    # them), and a torch code path then costs up to ~10x its warm time the first time it runs; so these wrappers
    # use few distinct ones (plain allocations, contiguous, data_ptr), pass the position and token by pointer rather
    # than indexing a tensor, and run nothing after the kernel. Measured in the decode loop (4-layer mini-Flash),
    # against one split buffer with views and int(pos[0]): pre 325 → 188 µs a call, post 175 → 105 µs.

    def pre(self, w: decode.PreWeights, X: torch.Tensor, pos: torch.Tensor):
        if X.shape[0] != 1 or X.dtype != torch.float32 or pos.dtype != torch.int64:
            return None
        plan = self._plan(w, self._pre_plan)
        if plan is None:
            return None
        S, D, H, d = plan.S, plan.D, plan.H, plan.d
        X = X.contiguous()
        f32 = torch.float32
        x, q, kv = torch.empty(1, D, dtype=f32), torch.empty(1, H, d, dtype=f32), torch.empty(1, d, dtype=f32)
        qr, post = torch.empty(1, plan.wq_a.N, dtype=f32), torch.empty(1, S, dtype=f32)
        comb = torch.empty(1, S, S, dtype=f32)
        cs = torch.empty(1, plan.rope_dim // 2, dtype=torch.complex64)  # (cos, sin) pairs: complex64's own layout
        rc = self.lib.v4_block_pre(ctypes.addressof(plan), X.data_ptr(), pos.data_ptr(), x.data_ptr(), q.data_ptr(),
                                   kv.data_ptr(), qr.data_ptr(), cs.data_ptr(), post.data_ptr(), comb.data_ptr(),
                                   cpu_ext.threads())
        if rc != 0:
            raise RuntimeError(f"v4_block_pre failed ({rc})")  # the plan checked every type and shape
        return x, q, kv, qr, cs, post, comb

    def post(self, w: decode.PostWeights, out, cs, X, post, comb, ids):
        if (X.shape[0] != 1 or X.dtype != torch.float32 or out.dtype != torch.float32 or post.dtype != torch.float32
                or comb.dtype != torch.float32 or cs.dtype != torch.complex64 or ids.dtype != torch.int64):
            return None
        plan = self._plan(w, self._post_plan)
        if plan is None:
            return None
        out, cs, X, post, comb = out.contiguous(), cs.contiguous(), X.contiguous(), post.contiguous(), comb.contiguous()
        Xout = torch.empty(X.shape, dtype=torch.float32)
        rc = self.lib.v4_block_post(ctypes.addressof(plan), out.data_ptr(), cs.data_ptr(), X.data_ptr(),
                                    post.data_ptr(), comb.data_ptr(), ids.data_ptr(), Xout.data_ptr(),
                                    cpu_ext.threads())
        if rc == -2:
            raise BadInput(f"token {int(ids[0])} or its expert ids are outside the model's routing table")
        if rc != 0:
            raise RuntimeError(f"v4_block_post failed ({rc})")
        return Xout


def install() -> bool:
    """File the fused halves in their ops' "cpu" tables; False (nothing filed) without a usable library."""
    lib = cpu_ext.usable()
    if lib is None:
        return False
    fused = FusedDecode(lib)
    decode.block_pre_op.register("cpu", fused.pre)
    decode.block_post_op.register("cpu", fused.post)
    return True
