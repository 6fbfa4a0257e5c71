"""The machine a plan is for: memory per tier, the reserves beside the model, and the bandwidth of each tier.

One tier vocabulary everywhere: `gpu` (cuda:0's memory), `ram` (resident in host memory; weights are read in place
from the mmap's page cache) and `disk` (left in the file, paged in on use). The loader maps gpu → the torch device
and the other two → host memory.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

GPU, RAM, DISK = "gpu", "ram", "disk"
TIERS = (GPU, RAM, DISK)

# The reserves, declared once: what must stay free beside the model's weights and KV cache.
OS_RESERVE = 8 * 10**9  # RAM: the OS, Python/torch, prefill activations and the page cache's working set
GPU_RESERVE = 2 * 2**30  # GPU: the CUDA context, prefill activations and dequantization workspace

DISK_BW_ASSUMED = 3e9  # bytes/s, a PCIe 3/4 NVMe reading ~8 MB expert slices; say so when used
VRAM_BW_ASSUMED = 900e9  # bytes/s, a 24 GB consumer card (RTX 3090/4090 class) when no GPU is present to measure
RAM_BW_ASSUMED = 90e9  # bytes/s, a dual-channel DDR5-5600 desktop (facts §8), when not measured
BANDWIDTH_BYTES = 1 << 28  # per array of the bandwidth meter: 256 MiB, far beyond any L3 cache


@dataclass(frozen=True)
class Machine:
    """Memory sizes (bytes) and bandwidths (bytes/s). `source` says, per field, given / detected / measured /
    assumed, so a plan can say which numbers are guesses."""

    ram: int
    vram: int = 0
    ram_bw: float = RAM_BW_ASSUMED
    vram_bw: float = VRAM_BW_ASSUMED
    disk_bw: float = DISK_BW_ASSUMED
    disk_free: int | None = None
    source: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def gpu_capacity(self) -> int:
        """GPU bytes a plan may fill: the memory less GPU_RESERVE (0 without a GPU)."""
        return max(0, self.vram - GPU_RESERVE) if self.vram else 0

    @property
    def ram_capacity(self) -> int:
        """RAM bytes a plan may fill: the memory less OS_RESERVE."""
        return max(0, self.ram - OS_RESERVE)

    def reserve(self, tier: str) -> int:
        """The bytes held back on `tier` (none on disk; none on a machine without a GPU)."""
        return {GPU: GPU_RESERVE if self.vram else 0, RAM: OS_RESERVE, DISK: 0}[tier]

    def bandwidth(self, tier: str) -> float:
        """Bytes/s a decoded token streams from `tier`."""
        return {GPU: self.vram_bw, RAM: self.ram_bw, DISK: self.disk_bw}[tier]


def measure_bandwidth(device: str, nbytes: int = BANDWIDTH_BYTES, repeats: int = 5,
                      threads: int | None = None) -> dict:
    """Streaming bandwidth of `device`'s memory in GB/s: the best of `repeats` passes of a read-only reduction
    (Σ b, how decode streams weights), a copy (a = b, read + write) and STREAM's triad (a = b + s·c, 2 reads + 1
    write), each counted in the bytes it moves.

    `bound_gbs`, the fastest of the three, is the bound decode is measured against: a bound below what the machine
    streams (the triad alone) put decode above 100 % of it. All cores unless `threads` says otherwise.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    try:
        n = max(nbytes // 4, 1)
        rates = _stream_rates(torch.device(device), n, repeats)
    finally:
        torch.set_num_threads(before)
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # the arrays' cached blocks would count as used when the loader asks what is free
    return {"array_bytes": n * 4, "repeats": repeats, **rates, "bound_gbs": max(rates.values())}


def _stream_rates(dev, n: int, repeats: int) -> dict[str, float]:
    """GB/s of the best of `repeats` read / copy / triad passes over float32 arrays of n elements on `dev`."""
    import torch

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    b, c = torch.ones(n, dtype=torch.float32, device=dev), torch.ones(n, dtype=torch.float32, device=dev)
    a = torch.empty_like(b)
    a.copy_(b)  # first touch: page faults are not bandwidth
    read_s, copy_s, triad_s = [], [], []

    def timed(fn, into: list[float]) -> None:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        into.append(time.perf_counter() - t0)

    for _ in range(repeats):  # the best repeat: other work on the machine only ever slows a pass down
        timed(b.sum, read_s)
        timed(lambda: a.copy_(b), copy_s)
        timed(lambda: torch.add(b, c, alpha=3.0, out=a), triad_s)
    return {"read_gbs": n * 4 / min(read_s) / 1e9, "copy_gbs": 2 * n * 4 / min(copy_s) / 1e9,
            "triad_gbs": 3 * n * 4 / min(triad_s) / 1e9}


def gpu_free_memory() -> int:
    """Free bytes on cuda:0, or 0 without a CUDA GPU."""
    import torch

    if not torch.cuda.is_available():
        return 0
    free, _total = torch.cuda.mem_get_info(0)
    return int(free)


def _free_disk(path: Path) -> int:
    """Free bytes on the file system that holds `path` (or its nearest existing parent)."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def detect_machine(ram: int | None = None, vram: int | None = None, ram_bw: float | None = None,
                   vram_bw: float | None = None, disk_bw: float | None = None, disk_free: int | None = None,
                   store: Path | None = None, measure: bool = True) -> Machine:
    """This machine; any value given wins over detection. `measure=False` skips the bandwidth meter (~1 s) and
    assumes typical bandwidths instead (for callers that only need to know what fits)."""
    import psutil

    source: dict[str, str] = {}

    def pick(name, given, detect, how="detected"):
        source[name] = "given" if given is not None else how
        return given if given is not None else detect()

    ram_v = pick("ram", ram, lambda: psutil.virtual_memory().total)
    # VRAM is what is free on cuda:0, not its total: another program's share is not ours, and the loader places
    # the weights into exactly this number, so `v4 plan` and the loaded model cannot disagree
    vram_v = pick("vram", vram, gpu_free_memory)
    gpu_here = measure and vram_bw is None and vram_v > 0 and gpu_free_memory() > 0
    vram_bw_v = pick("vram_bw", vram_bw,
                     (lambda: measure_bandwidth("cuda")["bound_gbs"] * 1e9) if gpu_here else lambda: VRAM_BW_ASSUMED,
                     "measured" if gpu_here else "assumed")
    ram_bw_v = pick("ram_bw", ram_bw,
                    (lambda: measure_bandwidth("cpu")["bound_gbs"] * 1e9) if measure else lambda: RAM_BW_ASSUMED,
                    "measured" if measure else "assumed")
    disk_bw_v = pick("disk_bw", disk_bw, lambda: DISK_BW_ASSUMED, "assumed")
    if store is None:
        from v4cli.store import default_root

        store = default_root()
    disk_v = pick("disk_free", disk_free, lambda: _free_disk(store))
    return Machine(ram_v, vram_v, ram_bw_v, vram_bw_v, disk_bw_v, disk_v, source)
