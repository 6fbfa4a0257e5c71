"""Swap placement- and kernel-specific behaviour into a built model's blocks (what gpt-fast does for quantized
linears): the model file knows neither the fused decode kernels nor where the loader left the experts.

- Fused one-token halves: on a device with a fast fused decode kernel (kernels/decode.py), a block's `pre` / `post`
  become `FusedPre` / `FusedPost`, which run the kernel at T = 1 and the block's own method otherwise (or when the
  kernel declines).
- Host experts: where the loader left a layer's routed experts in host memory under a GPU layer (hybrid
  placement), `moe.routed` becomes kernels/offload.py's `host_experts` (the tokens go to the experts, or the
  experts are streamed to the tokens) and the block is marked `split`: its `post` stays the model's mix → experts
  → finish, so that v4cli/engine/cuda_graphs.py graphs `mix` and `finish` around the experts' round trip.

The loader runs `specialize` on every block it builds, before the engine graphs anything.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch

from kernels import decode, offload
from v4cli.model.deepseek4 import Block


def pre_weights(blk: Block) -> decode.PreWeights:
    """The fused `pre`'s weights, from the block's own attributes."""
    at = blk.attn
    return decode.PreWeights(blk.attn_hc.p, blk.attn_norm, at.wq_a, at.wkv, at.wq_b, at.q_norm, at.kv_norm, at.H,
                             at.d, at.rope.inv_freq.to(blk.device), blk.eps)


def post_weights(blk: Block) -> decode.PostWeights:
    """The fused `post`'s weights, from the block's own attributes."""
    at, moe = blk.attn, blk.moe
    return decode.PostWeights(
        at.wo_a, at.wo_b, at.G, at.H, at.d, at.rope.dim, blk.ffn_hc.p, blk.ffn_norm, moe.gate,
        None if moe.hash else moe.bias, moe.tid2eid if moe.hash else None, moe.k, moe.scale,
        (moe.w1, moe.w3, moe.w2), moe.shared, moe.limit, blk.eps)


class FusedPre:
    """A block's `pre` through the fused kernel at one token; `plain` (the block's own) otherwise."""

    def __init__(self, blk: Block):
        self.weights, self.plain = pre_weights(blk), blk.pre

    def __call__(self, X: torch.Tensor, pos: torch.Tensor):
        fused = decode.block_pre(self.weights, X, pos) if X.shape[0] == 1 else None
        return fused if fused is not None else self.plain(X, pos)


class FusedPost:
    """A block's `post` through the fused kernel at one token; `plain` (the block's own) otherwise."""

    def __init__(self, blk: Block):
        self.weights, self.plain = post_weights(blk), blk.post

    def __call__(self, out, cs, X, post, comb, ids) -> torch.Tensor:
        fused = decode.block_post(self.weights, out, cs, X, post, comb, ids) if X.shape[0] == 1 else None
        return fused if fused is not None else self.plain(out, cs, X, post, comb, ids)


def experts_elsewhere(blk: Block) -> bool:
    """Whether the loader left the block's routed experts off its device (in host memory under a GPU layer)."""
    return blk.moe.w1.device != blk.device


def specialize(blocks: Iterable[Block]) -> None:
    """Swap the fused halves and the host-experts op into `blocks` where their devices and placement call for
    them; mark each block `split` or not (v4cli/engine/cuda_graphs.py reads it)."""
    for blk in blocks:
        blk.split = experts_elsewhere(blk)
        if blk.split:
            moe = blk.moe
            moe.routed = functools.partial(offload.host_experts, ws=(moe.w1, moe.w3, moe.w2), limit=moe.limit,
                                           on_host=moe.routed)
        if decode.block_pre_op.serves(blk.device.type):
            blk.pre = FusedPre(blk)
        # a split block's FFN half must stay its parts: the fused post would read the experts where they are not
        if not blk.split and decode.block_post_op.serves(blk.device.type):
            blk.post = FusedPost(blk)
