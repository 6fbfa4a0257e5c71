"""Quantized weights and the linear op the model calls.

`QWeight` keeps a tensor in its GGUF encoding (raw bytes + ggml type + torch-order shape); nothing is
dequantized at load. `linear(x, w)` dispatches on (qtype, device type) to a fast kernel in `linear_op`'s table,
falling back to the reference: dequantize, then matmul. `linear_many` (a layer's small products in one call) and
`routed_experts` (a decode-time MoE over a few (token, expert) pairs) are ops of the same kind (kernels/dispatch.py);
the backends fill their tables when kernels.backends.load runs. Every product's input goes to the function that
`dispatch.observing` installed (v4 imatrix).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from kernels.dispatch import Op, observer
from quant import ggml
from quant.errors import UnsupportedModel

# ggml types that are plain torch dtypes (the type table's `dtype`): viewed in place, never copied
_PLAIN: dict[Q, torch.dtype] = {t: getattr(torch, info.dtype) for t, info in ggml.TYPES.items() if info.dtype}


@dataclass(frozen=True)
class QWeight:
    """One tensor in its GGUF encoding. `raw` is a flat uint8 tensor (usually a zero-copy mmap view)."""

    raw: torch.Tensor
    qtype: Q
    shape: tuple[int, ...]

    def __post_init__(self):
        block, size = GGML_QUANT_SIZES[self.qtype]
        if self.shape[-1] % block:
            raise UnsupportedModel(f"row length {self.shape[-1]} is not a multiple of the {self.qtype.name} block")
        want = self.numel // block * size
        if self.raw.numel() != want:
            raise UnsupportedModel(f"{self.qtype.name} tensor {self.shape}: {self.raw.numel()} bytes, want {want}")

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def row_bytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        return self.shape[-1] // block * size

    @property
    def device(self) -> torch.device:
        return self.raw.device

    def plain(self) -> torch.Tensor | None:
        """The tensor itself (no copy) for F32/F16/BF16/I32, else None."""
        dt = _PLAIN.get(self.qtype)
        return None if dt is None else self.raw.view(dt).view(self.shape)

    def dense(self) -> torch.Tensor:
        """The whole tensor as f32 (a copy for anything but F32). For small tensors and the reference path."""
        p = self.plain()
        if p is not None:
            return p.float()
        from kernels.dequant import dequantize

        return dequantize(self.raw, self.qtype, self.shape).float()

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of a 2-D tensor as f32 [len(ids), cols]; only those rows are dequantized."""
        p = self.plain()
        if p is not None:
            return p[ids].float()
        raw = self.raw.view(self.shape[0], self.row_bytes)[ids]
        from kernels.dequant import dequantize

        return dequantize(raw.reshape(-1), self.qtype, (ids.numel(), self.shape[-1])).float()

    def row_slice(self, start: int, stop: int) -> "QWeight":
        """Rows start:stop of a 2-D tensor, sharing bytes (no copy)."""
        rb = self.row_bytes
        return QWeight(self.raw[start * rb: stop * rb], self.qtype, (stop - start, *self.shape[1:]))

    def expert(self, e: int) -> "QWeight":
        """Expert `e` of a 3-D [E, out, in] tensor, sharing bytes (no copy)."""
        per = self.raw.numel() // self.shape[0]
        return QWeight(self.raw[e * per: (e + 1) * per], self.qtype, tuple(self.shape[1:]))

    def gather_experts(self, idx: torch.Tensor) -> torch.Tensor:
        """Experts `idx` of a 3-D tensor as f32 [len(idx), out, in], with no host sync (for decode)."""
        p = self.plain()
        if p is not None:
            return p[idx].float()
        raw = self.raw.view(self.shape[0], -1)[idx]
        from kernels.dequant import dequantize

        out = dequantize(raw.reshape(-1), self.qtype, (idx.numel() * self.shape[1], self.shape[2]))
        return out.float().view(idx.numel(), self.shape[1], self.shape[2])

    def to(self, device: torch.device | str) -> "QWeight":
        return QWeight(self.raw.to(device), self.qtype, self.shape)


def reference_linear(x: torch.Tensor, w: QWeight) -> torch.Tensor:
    """y = x @ Wᵀ in f32: plain types directly, anything else dequantized first."""
    p = w.plain()
    if p is not None and p.dtype == torch.float32:
        return F.linear(x, p)
    return F.linear(x, w.dense())


# fast kernels per (ggml type, device type); not fused: the observer sees each input in `linear` itself
linear_op = Op("linear", reference_linear, fused=False, qtype=lambda x, w: w.qtype)


def linear(x: torch.Tensor, w: QWeight) -> torch.Tensor:
    """x [..., in] f32 → [..., out] f32 through the best registered kernel for w."""
    obs = observer()
    if obs is not None:
        obs(x, w)
    return linear_op(x, w)


def separate_linears(pairs: Sequence[tuple[torch.Tensor, QWeight]]) -> list[torch.Tensor]:
    """`linear_many`'s reference: one `linear` kernel call per pair."""
    return [linear_op(x, w) for x, w in pairs]


linear_many_op = Op("linear_many", separate_linears, device=lambda pairs: pairs[0][0].device.type)


def linear_many(pairs: Sequence[tuple[torch.Tensor, QWeight]]) -> list[torch.Tensor]:
    """[linear(x, w) for x, w in pairs], in one kernel call where one is registered: at decode a layer's small
    projections cost more in per-call overhead than in arithmetic."""
    obs = observer()
    if obs is not None:
        for x, w in pairs:
            obs(x, w)
    return linear_many_op(pairs) if pairs else []


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """DeepSeek-V4's clamped SwiGLU: silu(min(gate, L)) · clamp(up, −L, L)."""
    return F.silu(gate.clamp(max=limit)) * up.clamp(-limit, limit)


def reference_routed_experts(x: torch.Tensor, idx: torch.Tensor, wts: torch.Tensor, w1: QWeight, w3: QWeight,
                             w2: QWeight, limit: float) -> torch.Tensor:
    """Σ_j wts[t,j]·W2[e](silu(min(W1[e] x_t, L))·clamp(W3[e] x_t, ±L)), e = idx[t,j]: gathers the experts' f32."""
    T, k = idx.shape
    flat = idx.reshape(-1)
    xs = x.repeat_interleave(k, dim=0)[:, :, None]  # (T·k, D, 1)
    g = torch.bmm(w1.gather_experts(flat), xs)
    u = torch.bmm(w3.gather_experts(flat), xs)
    h = swiglu(g, u, limit)
    y = torch.bmm(w2.gather_experts(flat), h)[..., 0] * wts.reshape(-1, 1)  # (T·k, D)
    return y.view(T, k, -1).sum(1)


routed_experts_op = Op("routed_experts", reference_routed_experts)


def routed_experts(x: torch.Tensor, idx: torch.Tensor, wts: torch.Tensor, w1: QWeight, w3: QWeight, w2: QWeight,
                   limit: float) -> torch.Tensor:
    """Routed MoE output [T, D] for x [T, D], expert ids idx [T, k] (int64), weights wts [T, k] (f32).

    w1 / w3 (gate / up) are 3-D [E, I, D] and w2 (down) [E, D, I]. Meant for decode-sized batches; a fast kernel
    reads each selected expert's bytes once without building f32 copies. While `observing`, one product per expert.
    """
    if observer() is not None:
        return grouped_experts(x, idx, wts, w1, w3, w2, limit)
    return routed_experts_op(x, idx, wts, w1, w3, w2, limit)


def grouped_experts(x: torch.Tensor, idx: torch.Tensor, wts: torch.Tensor, w1: QWeight, w3: QWeight, w2: QWeight,
                    limit: float, stage: Callable | None = None) -> torch.Tensor:
    """`routed_experts` for many tokens (prefill): one product per active expert over the tokens routed to it.

    `stage(counts)`, if given, yields (e, (w1[e], w3[e], w2[e])) for each expert with a nonzero count, in id order,
    from elsewhere (kernels/offload.py streams them to x's device); by default the experts are read in place."""
    k, E = idx.shape[1], w1.shape[0]
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    tok = order // k
    counts = torch.bincount(flat, minlength=E).tolist()
    starts = [0, *itertools.accumulate(counts)]
    wsorted = wts.reshape(-1)[order]
    experts = (stage(counts) if stage is not None else
               ((e, (w1.expert(e), w3.expert(e), w2.expert(e))) for e, c in enumerate(counts) if c))
    out = torch.zeros_like(x)
    for e, (g, u, d) in experts:
        sl = slice(starts[e], starts[e + 1])
        t = tok[sl]
        xs = x[t]
        out.index_add_(0, t, linear(swiglu(linear(xs, g), linear(xs, u), limit), d) * wsorted[sl, None])
    return out


def embedding(ids: torch.Tensor, w: QWeight) -> torch.Tensor:
    """Token embedding lookup: dequantizes only the rows asked for."""
    return w.rows(ids.reshape(-1)).view(*ids.shape, w.shape[-1])
