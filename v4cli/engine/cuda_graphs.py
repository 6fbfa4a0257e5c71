"""CUDA graphs for decode: the parts of a one-token step whose shapes never change are replayed, not relaunched.

A decode step is hundreds of small kernels; launched from Python each costs ~10-20 µs of CPU time, more than
the GPU needs for its work, so an eager step runs at a few % of the memory-bandwidth bound. Each block's `pre`
(mHC collapse, norm, attention projections) and `post` (output projection, mHC expand, the whole FFN half) and
the output head are pure functions of their tensors with fixed shapes at T = 1, so each is captured once and
replayed. Attention over the cache, whose key count grows every token, stays eager between them, and so do
routed experts left in host memory (hybrid placement): there (a block v4cli/engine/specialize.py marked `split`)
`mix` and `finish` are graphed on either side of the experts' round trip through the host, and `post`, which calls
them, is not. `enable` runs after loading, so it graphs whatever specialize swapped in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from v4cli.model.deepseek4 import MTP, DeepseekV4


class Graphed:
    """`fn` replayed from a CUDA graph per argument signature at one token (its first argument has one row), else
    called as is.

    Each replay copies the arguments into the graph's static inputs and returns copies of its static outputs, so
    callers may keep results across replays. Non-tensor arguments are part of the signature."""

    def __init__(self, fn: Callable, pool):
        self.fn, self.pool = fn, pool
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list, Any]] = {}

    def __call__(self, *args):
        if args[0].shape[0] != 1 or torch.cuda.is_current_stream_capturing():
            return self.fn(*args)
        key = tuple((a.shape, a.dtype, a.device) if isinstance(a, torch.Tensor) else a for a in args)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(args)
        graph, inputs, out = entry
        for dst, src in zip(inputs, args):
            if isinstance(dst, torch.Tensor):
                dst.copy_(src)
        graph.replay()
        return tuple(o.clone() for o in out) if isinstance(out, tuple) else out.clone()

    def _capture(self, args):
        inputs = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # lazy initialization (cuBLAS handles, Triton compiles) may not be captured
            self.fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.fn(*inputs)
        return graph, inputs, out


def enable(model: DeepseekV4, mtp: MTP | None = None) -> None:
    """Replay every block's `pre` / `post` and the output head from CUDA graphs at one token (decode).

    One memory pool serves all the graphs: they run one after another on one stream, and each replay's outputs are
    copied out before the next replay."""
    pool = torch.cuda.graph_pool_handle()
    blocks = list(model.blocks) + ([mtp.block] if mtp is not None else [])
    for blk in blocks:
        # a split block's post is the model's mix → experts → finish; graphing it too would capture the host round
        # trip, and mix / finish again while warming it up
        for part in ("pre", "mix", "finish") if blk.split else ("pre", "post"):
            setattr(blk, part, Graphed(getattr(blk, part), pool))
    model.head_logits = Graphed(model.head_logits, pool)
