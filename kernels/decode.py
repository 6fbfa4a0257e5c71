"""Fused one-token halves of a block (decode): what they need, and the fast-path dispatch.

At one token each half of a block (`Block.pre`: mHC collapse, norm, attention projections, their norms and RoPE;
`Block.post`: output projection, mHC expand, the FFN half with routing and experts) is a few weight streams wrapped
in ~20-40 small ops, and on CPU those ops cost more than the arithmetic. The model describes each half once in a
`PreWeights` / `PostWeights`; a fast kernel in `block_pre_op` / `block_post_op` (kernels/dispatch.py;
kernels.fast_decode files the compiled CPU one) runs a whole half in one call. The reference is the model's own
composition (Block.pre / Block.post in v4cli/model/deepseek4.py), which the caller runs whenever these return None.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kernels.dispatch import Op
from kernels.linear import QWeight
from kernels.mhc import MixerParams


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
