"""Routed experts that live in host memory under a layer that runs on the GPU (hybrid placement).

Full Flash does not fit a workstation GPU: the placement (v4cli/planning/placement.py) puts the dense layers and as
many layers' routed experts as fit on the GPU and leaves the other experts in host RAM, where the CPU kernels read
them in place from the GGUF's mmap. Such a layer's experts run one of two ways per call:

- HOST, the tokens go to the experts: x, the expert ids and their weights (a few KB) are copied to the host, the
  CPU's expert kernels read just the selected experts, and the sum comes back. Decode, MTP verification and short
  chunks: moving weights instead would cost hundreds of MB over PCIe for KBs of arithmetic.
- STREAM, the experts go to the tokens: in a long prefill chunk nearly every expert has tokens, and its T·k expert
  products are arithmetic the GPU does many times faster than the CPU. The active experts' bytes are streamed to
  the GPU in batches through two pinned host buffers and two device buffers (`stream_experts`), so that the host's
  copy of batch b+1 into pinned memory, the PCIe transfer of batch b and the GPU's products of batch b−1 overlap.

`host_experts` is a layer's routed-experts op then (v4cli/engine/specialize.py swaps it in after loading).
`choose` picks by a cost model: HOST costs T·k expert products at the CPU's rate, STREAM the active experts'
bytes at the link's rate (the rates below; benchmarks/expert_stream_bench.py measures both on a machine).
`V4_EXPERTS=host|stream` forces one way (benchmarks, debugging).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence

import torch

from kernels.linear import QWeight, grouped_experts
from quant.errors import BadInput

HOST, STREAM = "host", "stream"
# Rates of the cost model. The CPU's grouped expert products (int8 GEMM, kernels/cpu) ran at 165-169 GFLOP/s per
# thread for 512-2048-token chunks on a Zen 4 core with AVX-512 VNNI (benchmarks/expert_stream_bench.py; 58 at 64
# tokens, where each expert has few rows); an AVX2 core does about half. Pinned host-to-device copies reach
# ~20 GB/s on PCIe 4 x16 (assumed: no GPU was at hand to measure it). For Flash at 4.5 bits on 16 threads this
# streams from ~1,500-token chunks up.
HOST_FLOPS_PER_THREAD = 150e9
LINK_BYTES_PER_S = 20e9
# Bytes per staging buffer (two on the GPU, two pinned on the host; the plan's GPU reserve holds them): ~18 Flash
# experts at 4.5 bits, enough that each copy is long and each batch's products fill the GPU.
STAGE_BYTES = 256 * 2**20
# Each run of experts starts at a multiple of this in a slot, as tensors do in the file (GGUF aligns them to 32):
# Triton specializes kernels on 16-byte aligned pointers, and the views should get the resident weights' kernels.
ALIGN = 256


def _one(w: QWeight) -> int:
    """Bytes of one expert of a stacked [E, ...] tensor."""
    return w.raw.numel() // w.shape[0]


def expert_bytes(ws: Sequence[QWeight]) -> int:
    """Bytes of one expert across the stacked [E, ...] tensors `ws` (gate, up, down)."""
    return sum(_one(w) for w in ws)


def _slot_bytes(ws: Sequence[QWeight]) -> int:
    """What one expert may take of a slot: its bytes, and the alignment of a run per tensor (runs ≤ experts)."""
    return expert_bytes(ws) + len(ws) * ALIGN


def choose(pairs: int, ws: Sequence[QWeight]) -> str:
    """HOST or STREAM for `pairs` (token, expert) products over experts `ws` = (w1, w3, w2) in host memory."""
    forced = os.environ.get("V4_EXPERTS", "").strip().lower()
    if forced:
        if forced not in (HOST, STREAM):
            raise BadInput(f"V4_EXPERTS={forced!r} is neither {HOST!r} nor {STREAM!r}",
                           hint="unset it to let the engine choose per call")
        return forced
    E, I, D = ws[0].shape
    host_s = pairs * 2 * 3 * I * D / (HOST_FLOPS_PER_THREAD * torch.get_num_threads())
    link_s = min(E, pairs) * expert_bytes(ws) / LINK_BYTES_PER_S  # at most every expert is active
    return STREAM if host_s > link_s else HOST


def batches(counts: Sequence[int], per_expert: int, capacity: int) -> list[list[tuple[int, int]]]:
    """The active experts (count > 0) as runs [a, b) of consecutive ids, packed in order into batches of at most
    `capacity` bytes (each run is one copy per tensor; consecutive experts are adjacent in the file)."""
    per_batch = max(1, capacity // per_expert)
    out: list[list[tuple[int, int]]] = []
    held = per_batch
    for e, c in enumerate(counts):
        if not c:
            continue
        if held == per_batch:
            out.append([])
            held = 0
        runs = out[-1]
        if runs and runs[-1][1] == e:
            runs[-1] = (runs[-1][0], e + 1)
        else:
            runs.append((e, e + 1))
        held += 1
    return out


class Staging:
    """Two slots on `device` that batches of experts are copied into, kept for the process (one per device).

    On CUDA each slot also has a pinned host buffer (a pageable source would be copied through the driver's own
    small staging buffer, at a fraction of the link's rate), and the device copies run on their own stream,
    ordered by events: a slot's pinned buffer is refilled only after its previous upload finished, its device
    buffer is overwritten only after the products that read it. Elsewhere (CPU: the tests) the batch is copied
    straight into the slot, the same layout and views."""

    def __init__(self, device: torch.device, capacity: int):
        self.device, self.capacity = device, capacity
        self.cuda = device.type == "cuda"
        self.slots = [torch.empty(capacity, dtype=torch.uint8, device=device) for _ in range(2)]
        if self.cuda:
            self.pinned = [torch.empty(capacity, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            self.copy_stream = torch.cuda.Stream(device)
            self.uploaded = [torch.cuda.Event() for _ in range(2)]  # the slot's upload finished
            self.read = [torch.cuda.Event() for _ in range(2)]  # the products reading the slot were enqueued

    def put(self, slot: int, ws: Sequence[QWeight], runs: list[tuple[int, int]]) -> dict[int, tuple[QWeight, ...]]:
        """Copy experts `runs` of `ws` into `slot` (tensor by tensor, run by run); their views there by expert."""
        if self.cuda:
            self.uploaded[slot].synchronize()  # the pinned buffer's last upload is done: free to refill
        buf = self.pinned[slot] if self.cuda else self.slots[slot]
        at: dict[int, list[int]] = {}
        off = 0
        for w in ws:
            per = _one(w)
            src = w.raw.view(w.shape[0], per)
            for a, b in runs:
                off = -(-off // ALIGN) * ALIGN
                buf[off: off + (b - a) * per].view(b - a, per).copy_(src[a:b])
                for e in range(a, b):
                    at.setdefault(e, []).append(off + (e - a) * per)
                off += (b - a) * per
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(self.read[slot])  # the products of the batch before are enqueued
                self.slots[slot][:off].copy_(buf[:off], non_blocking=True)
                self.uploaded[slot].record(self.copy_stream)
        dev = self.slots[slot]
        return {e: tuple(QWeight(dev[o: o + _one(w)], w.qtype, tuple(w.shape[1:]))
                         for o, w in zip(offs, ws)) for e, offs in at.items()}

    def take(self, slot: int) -> None:
        """Order the compute stream after the slot's upload."""
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.uploaded[slot])

    def release(self, slot: int) -> None:
        """Mark the slot's readers as enqueued: its next upload waits for them on the GPU, not on the host."""
        if self.cuda:
            self.read[slot].record(torch.cuda.current_stream(self.device))


_STAGING: dict[torch.device, Staging] = {}


def staging(device: torch.device, per_expert: int) -> Staging:
    """The device's staging slots, (re)made large enough for one expert."""
    st = _STAGING.get(device)
    if st is None or st.capacity < per_expert:
        if st is not None and st.cuda:
            torch.cuda.synchronize(device)  # the old slots may still be read or written
        st = _STAGING[device] = Staging(device, max(STAGE_BYTES, per_expert))
    return st


def stream_experts(counts: Sequence[int], ws: Sequence[QWeight], device: torch.device
                   ) -> Iterator[tuple[int, tuple[QWeight, ...]]]:
    """(expert, its weights on `device`) for each expert with a nonzero count, in id order, staged batch by batch.

    The caller enqueues an expert's products before asking for the next; batch b+1 is being copied while it does
    so for batch b. Views into a slot are valid until the caller asks for the expert after the next batch."""
    need = _slot_bytes(ws)
    st = staging(torch.device(device), need)
    plan = batches(counts, need, st.capacity)
    views = st.put(0, ws, plan[0]) if plan else {}
    for b, runs in enumerate(plan):
        ahead = st.put((b + 1) % 2, ws, plan[b + 1]) if b + 1 < len(plan) else {}
        st.take(b % 2)
        for a, z in runs:
            for e in range(a, z):
                yield e, views[e]
        st.release(b % 2)
        views = ahead


def host_experts(x: torch.Tensor, idx: torch.Tensor, wts: torch.Tensor, ws: Sequence[QWeight], limit: float,
                 on_host: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Routed experts `ws` = (w1, w3, w2) in host memory for tokens x [T, D] on another device (expert ids idx and
    weights wts [T, k]) → [T, D] on x's device. HOST: the tokens go to `on_host` (the experts' own op, run where
    they live) and the sum comes back; STREAM: the experts are staged to x's device as the grouped products reach
    them."""
    home = ws[0].device
    if choose(idx.numel(), ws) == HOST:
        return on_host(x.to(home), idx.to(home), wts.to(home)).to(x.device)
    return grouped_experts(x, idx, wts, *ws, limit, lambda counts: stream_experts(counts, ws, x.device))
