"""Which tier each tensor of an inventory lives on (gpu / ram / disk), and in which form.

Policy (decode is memory-bandwidth bound; facts §8):
- GPU, in this order while its capacity (memory less GPU_RESERVE) lasts: the model root (head, output norm,
  mHC head), then whole layers' dense sets (attention, norms, mHC, router, compressors, indexer, shared expert)
  from layer 0 up — a contiguous prefix, so an engine offloads layers, not scattered tensors — then the KV cache
  (only when every layer's attention is on the GPU), then the MTP block's dense set, then whole layers' routed
  experts from layer 0 up (within the dense prefix).
- The token embedding never goes to the GPU: only its rows are gathered, on the CPU.
- RAM, in this order while its capacity (memory less OS_RESERVE) lasts: a host-side KV cache, dense layers that
  missed the GPU, the embedding, the other routed experts layer by layer (read in place from the mmap: `ram` means
  resident in the page cache). What does not fit stays on `disk`: left in the file, paged in on use.
- Form: `stored` (the file's ggml type) everywhere, or `bf16` for quantized tensors on the GPU when asked.
Deterministic: the same inventory and machine give the same placement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gguf import GGMLQuantizationType

from v4cli.model import kvsize
from v4cli.planning.machine import DISK, GPU, RAM, TIERS, Machine
from v4cli.planning.tensors import EXPERT_COMPONENTS, OTHER, Inventory, Tensor

STORED, BF16 = "stored", "bf16"
_PLAIN_TYPES = frozenset((GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
                          GGMLQuantizationType.I32, GGMLQuantizationType.I8, GGMLQuantizationType.I16,
                          GGMLQuantizationType.I64, GGMLQuantizationType.F64))


@dataclass(frozen=True)
class Where:
    """The tier one tensor lives on, its form there and the bytes it takes."""

    tier: str
    form: str
    nbytes: int


@dataclass(frozen=True)
class Placement:
    """Every tensor's tier and the KV cache's, for one context and KV format. Made by `place`."""

    tensors: dict[str, Where]
    kv_tier: str
    kv_format: str
    ctx: int
    kv_nbytes: int
    notes: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()  # why it cannot run (the KV cache fits nowhere)

    @property
    def fits(self) -> bool:
        return not self.problems

    def tier(self, name: str) -> str:
        """The tier of tensor `name`."""
        return self.tensors[name].tier

    def totals(self) -> dict[str, int]:
        """Bytes per tier, KV cache included."""
        out = {t: 0 for t in TIERS}
        for w in self.tensors.values():
            out[w.tier] += w.nbytes
        out[self.kv_tier] += self.kv_nbytes
        return out


def place(inv: Inventory, machine: Machine, ctx: int, kv_format: str, dequant_gpu: bool = False) -> Placement:
    """Place `inv` with a `kv_format` cache of `ctx` tokens on `machine` (the policy in the module docstring)."""
    args = inv.args
    gpu_budget, ram_budget = machine.gpu_capacity, machine.ram_capacity
    kv_nbytes = kvsize.kv_bytes(args, kv_format, ctx)

    def gpu_bytes(t: Tensor) -> int:
        return math.prod(t.shape) * 2 if dequant_gpu and t.qtype not in _PLAIN_TYPES else t.nbytes

    def gpu_form(t: Tensor) -> str:
        return BF16 if dequant_gpu and t.qtype not in _PLAIN_TYPES else STORED

    n_main = args.num_hidden_layers
    root_dense = [t for t in inv.tensors if t.layer is None and t.component not in ("embedding", OTHER)]
    layer_dense: dict[int, list[Tensor]] = {}
    layer_experts: dict[int, list[Tensor]] = {}
    for t in inv.tensors:
        if t.layer is None or t.component == OTHER:
            continue
        (layer_experts if t.component in EXPERT_COMPONENTS else layer_dense).setdefault(t.layer, []).append(t)
    main_layers = sorted(L for L in layer_dense if L < n_main)
    mtp_layers = sorted(L for L in layer_dense if L >= n_main)

    where: dict[str, Where] = {}
    gpu_left = gpu_budget

    def try_gpu(unit: list[Tensor]) -> bool:
        nonlocal gpu_left
        need = sum(gpu_bytes(t) for t in unit)
        if not unit or need > gpu_left:
            return False
        gpu_left -= need
        for t in unit:
            where[t.name] = Where(GPU, gpu_form(t), gpu_bytes(t))
        return True

    try_gpu(root_dense)
    gpu_layers = 0
    for L in main_layers:
        if not try_gpu(layer_dense[L]):
            break
        gpu_layers += 1
    kv_tier = RAM
    if gpu_budget > 0 and gpu_layers == len(main_layers) and kv_nbytes <= gpu_left:
        kv_tier, gpu_left = GPU, gpu_left - kv_nbytes
    for L in mtp_layers:
        if not try_gpu(layer_dense[L]):
            break
    # then whole layers' routed experts, from layer 0 up, while the budget lasts (only layers whose dense set
    # is there): a GPU-resident layer's experts are read at VRAM speed in decode and need no streaming in
    # prefill; the engine runs the others from host memory (kernels/offload.py)
    for L in sorted(L for L in layer_experts if L < gpu_layers):
        if not try_gpu(layer_experts[L]):
            break

    problems = []
    ram_left = ram_budget
    if kv_tier == RAM:
        if kv_nbytes > ram_left:
            problems.append(f"the {kv_format} KV cache for {ctx:,} tokens ({kv_nbytes:,} B) fits neither GPU "
                            "memory nor RAM")
        ram_left -= kv_nbytes

    def to_ram(unit: list[Tensor]) -> bool:
        nonlocal ram_left
        need = sum(t.nbytes for t in unit)
        fits = need <= ram_left
        if fits:
            ram_left -= need
        for t in unit:
            where[t.name] = Where(RAM if fits else DISK, STORED, t.nbytes)
        return fits

    # dense tensors that missed the GPU, then the embedding, then experts (contiguous by layer), then leftovers
    to_ram([t for t in root_dense if t.name not in where])
    for L in main_layers + mtp_layers:
        to_ram([t for t in layer_dense[L] if t.name not in where])
    to_ram([t for t in inv.tensors if t.component == "embedding"])
    paging = False
    for L in sorted(L for L in layer_experts if layer_experts[L][0].name not in where):
        if paging or not to_ram(layer_experts[L]):
            for t in layer_experts[L]:
                where[t.name] = Where(DISK, STORED, t.nbytes)
            paging = True  # contiguous: once a layer's experts page, every later layer's do too
    to_ram([t for t in inv.tensors if t.name not in where])

    notes = []
    if gpu_budget > 0 and gpu_layers < len(main_layers):
        notes.append(f"only {gpu_layers} of {len(main_layers)} layers' dense weights fit the GPU")
    return Placement({t.name: where[t.name] for t in inv.tensors}, kv_tier, kv_format, ctx, kv_nbytes,
                     tuple(notes), tuple(problems))
