"""Fused one-token halves of a block (decode): what they need, their reference, and the fast-path dispatch.

At one token each half of a block (`Block.pre`: mHC collapse, norm, attention projections, their norms and RoPE;
`Block.post`: output projection, mHC expand, the FFN half with routing and experts) is a few weight streams wrapped
in ~20-40 small ops, and on CPU those ops cost more than the arithmetic. Each half's weights are described once in a
`PreWeights` / `PostWeights` (v4cli/engine/specialize.py builds them from a loaded block and swaps the fused halves
in); a fast kernel in `block_pre_op` / `block_post_op` (kernels/dispatch.py; kernels.fast_decode files the compiled
CPU one) runs a whole half in one call. `reference_pre` / `reference_post` are the same halves written with the
kernels' own ops, equal to the model's Block.pre / Block.post (tests/test_fused_decode.py); the swapped halves run
the block's own methods whenever `block_pre` / `block_post` return None.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kernels.dispatch import Op
from kernels.linear import QWeight, linear, linear_many, routed_experts
from kernels.mhc import MixerParams, hc_post, hc_pre
from kernels.norm import rms_norm


@dataclass(frozen=True, eq=False)
class PreWeights:
    """`Block.pre`'s weights: the attention mixer and norm, the q/kv projections with their norms, RoPE."""

    mixer: MixerParams
    norm: torch.Tensor  # attn_norm [D]
    wq_a: QWeight  # [q_lora, D]
    wkv: QWeight  # [d, D]
    wq_b: QWeight  # [H·d, q_lora]
    q_norm: torch.Tensor  # [q_lora]
    kv_norm: torch.Tensor  # [d]
    heads: int
    head_dim: int
    inv_freq: torch.Tensor  # RoPE frequencies [rope_dim / 2]
    eps: float
    # a fast kernel's own view of these weights (e.g. C structs of their pointers), built on its first call
    plans: dict = field(default_factory=dict, repr=False)


@dataclass(frozen=True, eq=False)
class PostWeights:
    """`Block.post`'s weights: grouped output projection, the FFN mixer and norm, the router and the experts."""

    wo_a: QWeight  # [groups · o_rank, H·d / groups]
    wo_b: QWeight  # [D, groups · o_rank]
    groups: int
    heads: int
    head_dim: int
    rope_dim: int
    mixer: MixerParams
    norm: torch.Tensor  # ffn_norm [D]
    gate: torch.Tensor  # router [E, D] f32
    bias: torch.Tensor | None  # [E] (score routing)
    tid2eid: torch.Tensor | None  # [vocab, k] int64 (hash routing)
    k: int
    route_scale: float
    experts: tuple[QWeight, QWeight, QWeight]  # w1, w3 [E, I, D], w2 [E, D, I]
    shared: tuple[QWeight, QWeight, QWeight]  # the shared expert as a stack of one: [1, Is, D], [1, Is, D], [1, D, Is]
    limit: float
    eps: float
    plans: dict = field(default_factory=dict, repr=False)


def _caller_runs_reference(*args) -> None:
    """None: the caller runs its own composition, the reference of both halves."""
    return None


# fast `block_pre(w, X, pos)` / `block_post(w, out, cs, X, post, comb, ids)` by X's device type; may return None
block_pre_op = Op("block_pre", _caller_runs_reference, device=lambda w, X, pos: X.device.type)
block_post_op = Op("block_post", _caller_runs_reference, device=lambda w, out, cs, X, *rest: X.device.type)


def block_pre(w: PreWeights, X: torch.Tensor, pos: torch.Tensor):
    """Streams X [1, S, D] at pos [1] → (x, q, kv, qr, cs, post, comb) as Block.pre returns them, or None (no fast
    kernel, or it declined: the caller runs the reference)."""
    return block_pre_op(w, X, pos)


def block_post(w: PostWeights, out: torch.Tensor, cs: torch.Tensor, X: torch.Tensor, post: torch.Tensor,
               comb: torch.Tensor, ids: torch.Tensor) -> torch.Tensor | None:
    """The attention output out [1, H, d] → the streams after the block [1, S, D] as Block.post returns them, or
    None (the caller runs the reference)."""
    return block_post_op(w, out, cs, X, post, comb, ids)


def _rope(x: torch.Tensor, cs: torch.Tensor, dim: int, inverse: bool = False) -> torch.Tensor:
    """x [T, ..., D] with its last `dim` channels rotated by cs [T, dim/2] (each interleaved pair a complex number)."""
    rot = cs.conj() if inverse else cs
    out = x.clone(memory_format=torch.contiguous_format)
    pairs = torch.view_as_complex(out[..., -dim:].unflatten(-1, (-1, 2)))
    pairs.mul_(rot.view((x.shape[0],) + (1,) * (x.dim() - 2) + (rot.shape[-1],)))
    return out


def reference_pre(w: PreWeights, X: torch.Tensor, pos: torch.Tensor):
    """`block_pre`'s reference: streams X [T, S, D] at pos [T] → (x, q, kv, qr, cs, post, comb) as Block.pre
    returns them (block input [T, D], q [T, H, d], kv [T, d], q latent [T, q_lora], RoPE cos/sin complex64
    [T, rope/2], mHC post [T, S], comb [T, S, S])."""
    T, H, d = X.shape[0], w.heads, w.head_dim
    a, post, comb = hc_pre(X, w.mixer)
    x = rms_norm(a, w.norm, w.eps)
    f = pos.float()[:, None] * w.inv_freq.to(pos.device)  # (T, rope/2)
    cs = torch.polar(torch.ones_like(f), f)
    rope = 2 * w.inv_freq.shape[0]
    qa, kv = linear_many([(x, w.wq_a), (x, w.wkv)])
    qr = rms_norm(qa, w.q_norm, w.eps)
    q = _rope(rms_norm(linear(qr, w.wq_b).view(T, H, d), None, w.eps), cs, rope)  # (T, H, d)
    kv = _rope(rms_norm(kv, w.kv_norm, w.eps), cs, rope)  # (T, d)
    return x, q, kv, qr, cs, post, comb


def reference_post(w: PostWeights, out: torch.Tensor, cs: torch.Tensor, X: torch.Tensor, post: torch.Tensor,
                   comb: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """`block_post`'s reference: attention output out [T, H, d] (cs, X, post, comb from `reference_pre`, ids [T]
    the tokens) → the streams after the block [T, S, D] as Block.post returns them. Meant for one token: the routed
    and shared experts go through `routed_experts`, as the model's do at a few (token, expert) pairs."""
    T = out.shape[0]
    o_rank = w.wo_a.shape[0] // w.groups
    og = _rope(out, cs, w.rope_dim, inverse=True).reshape(T, w.groups, -1)  # (T, G, H/G·d)
    y = torch.cat(linear_many([(og[:, g], w.wo_a.row_slice(g * o_rank, (g + 1) * o_rank))
                               for g in range(w.groups)]), dim=-1)
    X = hc_post(linear(y, w.wo_b), X, post, comb)
    a, post, comb = hc_pre(X, w.mixer)
    a = rms_norm(a, w.norm, w.eps)
    scores = torch.sqrt(F.softplus(F.linear(a, w.gate)))  # (T, E)
    idx = w.tid2eid[ids] if w.tid2eid is not None else torch.topk(scores + w.bias, w.k, dim=-1).indices
    wts = scores.gather(1, idx)
    wts = wts / (wts.sum(-1, keepdim=True) + 1e-20) * w.route_scale
    routed = routed_experts(a, idx, wts, *w.experts, w.limit)
    one = torch.zeros(T, 1, dtype=torch.long, device=a.device)
    shared = routed_experts(a, one, torch.ones(T, 1, device=a.device), *w.shared, w.limit)
    return hc_post(routed + shared, X, post, comb)
