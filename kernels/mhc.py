"""The mHC (manifold-constrained hyper-connection) mixers: plain torch references and the fast-path dispatch.

Each block mixes S residual streams X [T, S, D]: `hc_pre` collapses them into the block input and gives the
weights `post` [T, S] and the Sinkhorn-balanced `comb` [T, S, S] that `hc_post` uses to expand the block output
back; `hc_collapse` is the head's version (weights only, no post/comb). The references are the model's math
step by step. Each mixer is an op (kernels/dispatch.py): kernels.fast_mhc files the compiled CPU mixers in their
tables and kernels.gpu the CUDA Sinkhorn; a fast mixer may return None to decline, and the reference runs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from kernels.dispatch import Op


class MixerParams(NamedTuple):
    """One mixer's weights and constants: fn [R, S·D], scale [3] (or [1] for the head), base [R]."""

    fn: torch.Tensor
    scale: torch.Tensor
    base: torch.Tensor
    S: int
    iters: int
    eps: float
    norm_eps: float


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


def _weights(X: torch.Tensor, p: MixerParams) -> torch.Tensor:
    """The mixing logits m [T, R] = rmsnorm(X flattened) · fnᵀ."""
    return F.linear(_rms(X.flatten(1), p.norm_eps), p.fn)


def pre_parts(X: torch.Tensor, p: MixerParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`hc_pre` up to the Sinkhorn: (block input [T, D], post [T, S], comb logits [T, S, S])."""
    S = p.S
    m = _weights(X, p)
    pre = torch.sigmoid(m[:, :S] * p.scale[0] + p.base[:S]) + p.eps
    post = 2 * torch.sigmoid(m[:, S: 2 * S] * p.scale[1] + p.base[S: 2 * S])
    logits = (m[:, 2 * S:] * p.scale[2] + p.base[2 * S:]).view(-1, S, S)
    return (pre[..., None] * X).sum(1), post, logits


def reference_sinkhorn(logits: torch.Tensor, p: MixerParams) -> torch.Tensor:
    """comb [T, S, S]: row softmax, then `iters` rounds of column / row normalization (ending on columns)."""
    comb = torch.softmax(logits, dim=-1) + p.eps
    comb = comb / (comb.sum(-2, keepdim=True) + p.eps)
    for _ in range(p.iters - 1):  # Sinkhorn: alternate row and column normalization
        comb = comb / (comb.sum(-1, keepdim=True) + p.eps)
        comb = comb / (comb.sum(-2, keepdim=True) + p.eps)
    return comb


def reference_pre(X: torch.Tensor, p: MixerParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, post, logits = pre_parts(X, p)
    return x, post, reference_sinkhorn(logits, p)


def reference_collapse(X: torch.Tensor, p: MixerParams) -> torch.Tensor:
    pre = torch.sigmoid(_weights(X, p) * p.scale + p.base) + p.eps
    return (pre[..., None] * X).sum(1)


def reference_post(y: torch.Tensor, X: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    return post[..., None] * y[:, None, :] + torch.einsum("tjk,tjd->tkd", comb, X)


# The mixers see only activations and their own small f32 weights, never a QWeight: not fused for the observer.
hc_pre_op = Op("hc_pre", reference_pre, fused=False)
hc_collapse_op = Op("hc_collapse", reference_collapse, fused=False)
hc_post_op = Op("hc_post", reference_post, fused=False, device=lambda y, X, post, comb: X.device.type)


def hc_pre(X: torch.Tensor, p: MixerParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """X [T, S, D] → (block input [T, D], post [T, S], comb [T, S, S])."""
    return hc_pre_op(X, p)


def hc_collapse(X: torch.Tensor, p: MixerParams) -> torch.Tensor:
    """The head's collapse: X [T, S, D] → Σ_s sigmoid-weight[s]·X[:, s] [T, D] (before the head's RMSNorm)."""
    return hc_collapse_op(X, p)


def hc_post(y: torch.Tensor, X: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """X'[:, k] = post[:, k]·y + Σ_j comb[:, j, k]·X[:, j]  ([T, S, D])."""
    return hc_post_op(y, X, post, comb)
