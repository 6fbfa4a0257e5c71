"""The placement plan: which GGUF tensor lives where (`cuda:0`, `cpu`, `mmap`) and in which form.

Policy (decode is memory-bandwidth bound; facts §8):
- GPU, in this order while the budget (minus an activation reserve) lasts: the model root (head, output norm,
  mHC head), then whole layers' dense sets (attention, norms, mHC, router, compressors, indexer, shared expert)
  from layer 0 up — a contiguous prefix, so an engine offloads layers, not scattered tensors — then the KV cache
  (only when every layer's attention is on the GPU), then the MTP block's dense set, then whole layers' routed
  experts from layer 0 up (within the dense prefix).
- The token embedding never goes to the GPU: only its rows are gathered, on the CPU.
- CPU RAM, in this order while its budget lasts: a CPU-side KV cache, dense layers that missed the GPU, the
  embedding, the other routed experts layer by layer (read from the mmap: `cpu` means resident in the page
  cache).
  What does not fit stays `mmap`: left on disk, paged in on use — the plan says decode will page from disk.
- Form: `stored` (the file's ggml type) everywhere, or `bf16` for quantized tensors on the GPU when asked.
Deterministic: the same inventory and budgets give the same plan.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from quant import names as N
from quant.config import FLASH_CONFIG, ModelArgs
from v4cli.model import kvsize
from quant.errors import BadInput, DoesNotFit
from v4cli.gguf_file import deepseek4_tensor_shapes

GPU, CPU, MMAP = "cuda:0", "cpu", "mmap"
DEVICES = (GPU, CPU, MMAP)
STORED, BF16 = "stored", "bf16"
GPU_RESERVE = 2 * 2**30  # CUDA context, prefill activations and dequant workspace
CPU_RESERVE = 4 * 2**30  # OS, Python/torch, activations

# components in display order; each GGUF role maps to one
COMPONENTS = (
    "head", "attention", "compressor", "indexer", "norms", "mhc", "router", "shared_experts", "routed_experts",
    "embedding", "mtp", "mtp_experts", "other", "kv_cache",
)
_ROLE_COMPONENT = {
    N.EMBED: "embedding", N.HEAD: "head", N.NORM: "norms", N.HC: "mhc", N.SINK: "attention", N.ATTN: "attention",
    N.COMPRESSOR: "compressor", N.INDEXER: "indexer", N.ROUTER: "router", N.BIAS: "router", N.TID2EID: "router",
    N.SHEXP: "shared_experts", N.EXPS: "routed_experts", N.MTP_PROJ: "mtp",
}
_PLAIN_TYPES = frozenset((GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
                          GGMLQuantizationType.I32, GGMLQuantizationType.I8, GGMLQuantizationType.I16,
                          GGMLQuantizationType.I64, GGMLQuantizationType.F64))


@dataclass(frozen=True)
class Item:
    """One inventory entry: a GGUF tensor as stored (torch-order shape)."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class Placement:
    """Where one tensor lives, in which form, and the bytes it takes there."""

    name: str
    component: str
    layer: int | None
    device: str
    form: str
    nbytes: int


@dataclass(frozen=True)
class PlanRow:
    component: str
    nbytes: int
    where: str
    form: str
    n_tensors: int


@dataclass
class PlacementPlan:
    """A deterministic placement of every tensor and of the KV cache. Build it with `PlacementPlan.build`."""

    tensors: dict[str, Placement]
    kv_device: str
    kv_format: str
    ctx: int
    kv_nbytes: int
    gpu_budget: int  # usable bytes after the reserve (0: no GPU)
    cpu_budget: int
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        inventory: Iterable,
        args: ModelArgs,
        *,
        ctx: int,
        kv_format: str,
        gpu_mem: int | None = None,
        cpu_mem: int | None = None,
        gpu_reserve: int = GPU_RESERVE,
        cpu_reserve: int = CPU_RESERVE,
        dequant_gpu: bool = False,
    ) -> PlacementPlan:
        """Plan `inventory` (a GGUFFile's `.tensors.values()`, TensorInfos, or (name, qtype, shape, nbytes) tuples).

        `gpu_mem` / `cpu_mem` in bytes; None detects them (torch.cuda free memory, psutil total RAM).
        """
        items = [_item(x) for x in inventory]
        gpu_total = detect_gpu_mem() if gpu_mem is None else gpu_mem
        cpu_total = detect_cpu_mem() if cpu_mem is None else cpu_mem
        gpu_budget = max(0, gpu_total - gpu_reserve) if gpu_total > 0 else 0
        cpu_budget = max(0, cpu_total - cpu_reserve)
        kv_nbytes = kvsize.kv_bytes(args, kv_format, ctx)

        comp = {it.name: _component(it.name, args) for it in items}
        layer = {it.name: _layer_of(it.name) for it in items}

        def gpu_bytes(it: Item) -> int:
            if dequant_gpu and it.qtype not in _PLAIN_TYPES:
                return math.prod(it.shape) * 2
            return it.nbytes

        def gpu_form(it: Item) -> str:
            return BF16 if dequant_gpu and it.qtype not in _PLAIN_TYPES else STORED

        n_main = args.num_hidden_layers
        expert_comps = ("routed_experts", "mtp_experts")
        root_dense = [it for it in items if layer[it.name] is None and comp[it.name] not in ("embedding", "other")]
        layer_dense: dict[int, list[Item]] = {}
        layer_experts: dict[int, list[Item]] = {}
        for it in items:
            L = layer[it.name]
            if L is None or comp[it.name] == "other":
                continue
            (layer_experts if comp[it.name] in expert_comps else layer_dense).setdefault(L, []).append(it)
        main_layers = sorted(L for L in layer_dense if L < n_main)
        mtp_layers = sorted(L for L in layer_dense if L >= n_main)

        where: dict[str, tuple[str, str, int]] = {}
        gpu_left = gpu_budget

        def try_gpu(unit: list[Item]) -> bool:
            nonlocal gpu_left
            need = sum(gpu_bytes(it) for it in unit)
            if not unit or need > gpu_left:
                return False
            gpu_left -= need
            for it in unit:
                where[it.name] = (GPU, gpu_form(it), gpu_bytes(it))
            return True

        try_gpu(root_dense)
        gpu_layers = 0
        for L in main_layers:
            if not try_gpu(layer_dense[L]):
                break
            gpu_layers += 1
        all_attention_on_gpu = gpu_budget > 0 and gpu_layers == len(main_layers)
        kv_device = CPU
        if all_attention_on_gpu and kv_nbytes <= gpu_left:
            kv_device, gpu_left = GPU, gpu_left - kv_nbytes
        for L in mtp_layers:
            if not try_gpu(layer_dense[L]):
                break
        # then whole layers' routed experts, from layer 0 up, while the budget lasts (only layers whose dense set
        # is there): a GPU-resident layer's experts are read at VRAM speed in decode and need no streaming in
        # prefill; the engine runs the others from host memory (kernels/offload.py)
        for L in sorted(L for L in layer_experts if L < gpu_layers):
            if not try_gpu(layer_experts[L]):
                break

        notes, problems = [], []
        cpu_left = cpu_budget
        if kv_device == CPU:
            if kv_nbytes > cpu_left:
                problems.append(
                    f"the {kv_format} KV cache for {ctx:,} tokens ({kv_nbytes:,} B) fits neither GPU nor CPU memory"
                )
            cpu_left -= kv_nbytes

        def to_cpu(unit: list[Item]) -> bool:
            nonlocal cpu_left
            need = sum(it.nbytes for it in unit)
            fits = need <= cpu_left
            if fits:
                cpu_left -= need
            for it in unit:
                where[it.name] = (CPU if fits else MMAP, STORED, it.nbytes)
            return fits

        # dense tensors that missed the GPU, then the embedding, then experts (contiguous by layer), then leftovers
        to_cpu([it for it in root_dense if it.name not in where])
        for L in main_layers + mtp_layers:
            to_cpu([it for it in layer_dense[L] if it.name not in where])
        to_cpu([it for it in items if comp[it.name] == "embedding"])
        paged: list[int] = []
        for L in sorted(L for L in layer_experts if layer_experts[L][0].name not in where):
            if paged or not to_cpu(layer_experts[L]):
                for it in layer_experts[L]:
                    where[it.name] = (MMAP, STORED, it.nbytes)
                paged.append(L)
        to_cpu([it for it in items if it.name not in where])

        tensors = {
            it.name: Placement(it.name, comp[it.name], layer[it.name], *where[it.name]) for it in items
        }
        mmap_bytes = sum(p.nbytes for p in tensors.values() if p.device == MMAP)
        if paged:
            first, last = paged[0], paged[-1]
            notes.append(
                f"routed experts of layers {first}–{last} do not fit the CPU memory budget: "
                "decode will page them from disk (expect a slow first pass and disk-bound decode)"
            )
        if mmap_bytes and not paged:
            notes.append("some weights do not fit the CPU memory budget: decode will page them from disk")
        if gpu_budget == 0:
            notes.append("no GPU: everything runs on the CPU")
        elif gpu_layers < len(main_layers):
            notes.append(f"only {gpu_layers} of {len(main_layers)} layers' dense weights fit the GPU budget")
        return cls(tensors, kv_device, kv_format, ctx, kv_nbytes, gpu_budget, cpu_budget, notes, problems)

    @classmethod
    def for_gguf(cls, gguf_file, **kw) -> PlacementPlan:
        """Plan a GGUFFile (its tensors and ModelArgs)."""
        return cls.build(gguf_file.tensors.values(), gguf_file.args, **kw)

    def where(self, name: str) -> Placement:
        return self.tensors[name]

    def summary(self) -> list[PlanRow]:
        """Rows (component, bytes, where, form, tensor count) in component then device order; KV cache last."""
        acc: dict[tuple[str, str, str], list[int]] = {}
        for p in self.tensors.values():
            a = acc.setdefault((p.component, p.device, p.form), [0, 0])
            a[0] += p.nbytes
            a[1] += 1
        rows = [PlanRow(c, b, d, f, n) for (c, d, f), (b, n) in acc.items()]
        rows.append(PlanRow("kv_cache", self.kv_nbytes, self.kv_device, self.kv_format, 0))
        rows.sort(key=lambda r: (COMPONENTS.index(r.component), DEVICES.index(r.where), r.form))
        return rows

    def totals(self) -> dict[str, int]:
        """Bytes per device (`cuda:0`, `cpu`, `mmap`), KV cache included."""
        out = {d: 0 for d in DEVICES}
        for p in self.tensors.values():
            out[p.device] += p.nbytes
        out[self.kv_device] += self.kv_nbytes
        return out

    @property
    def fits(self) -> bool:
        return not self.problems

    def check(self) -> None:
        """Raise DoesNotFit when the plan cannot run (the KV cache fits nowhere)."""
        if self.problems:
            raise DoesNotFit(self.problems[0], hint="use a shorter --ctx or the fp8 KV cache format")


def _item(x) -> Item:
    if isinstance(x, Item):
        return x
    if hasattr(x, "qtype") and hasattr(x, "nbytes"):
        return Item(x.name, GGMLQuantizationType(x.qtype), tuple(x.shape), int(x.nbytes))
    name, qtype, shape, nbytes = x
    return Item(name, GGMLQuantizationType(qtype), tuple(int(s) for s in shape), int(nbytes))


def _layer_of(name: str) -> int | None:
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        return int(parts[1])
    return None


def _component(name: str, args: ModelArgs) -> str:
    try:
        c = _ROLE_COMPONENT[N.role_of_gguf(name)]
    except KeyError:
        return "other"
    layer = _layer_of(name)
    if layer is not None and layer >= args.num_hidden_layers:
        return "mtp_experts" if c == "routed_experts" else "mtp"
    return c


def detect_gpu_mem() -> int:
    """Free bytes on cuda:0, or 0 without a CUDA GPU."""
    import torch

    if not torch.cuda.is_available():
        return 0
    free, _total = torch.cuda.mem_get_info(0)
    return int(free)


def detect_cpu_mem() -> int:
    """Total RAM in bytes."""
    import psutil

    return int(psutil.virtual_memory().total)


# ---- the real Flash inventory, without the 156 GB file ----

# a converter-like recipe: FP8 → Q8_0, FP4 experts → MXFP4, mHC F32; the rest Q8_0
DEFAULT_RECIPE_TYPES: dict[str, GGMLQuantizationType] = {
    "default": GGMLQuantizationType.Q8_0,
    N.EXPS: GGMLQuantizationType.MXFP4,
    N.HC: GGMLQuantizationType.F32,
}


def flash_gguf_inventory(
    recipe_types: dict[str, GGMLQuantizationType] | None = None, *, with_mtp: bool = False
) -> list[Item]:
    """Every tensor of a DeepSeek-V4-Flash GGUF, typed by `recipe_types` (role → ggml type, `"default"` for the
    rest). 1-D tensors are F32, `tid2eid` I32 and the compressors' `ape` F32, as llama.cpp requires/writes them.
    """
    recipe = {**DEFAULT_RECIPE_TYPES, **(recipe_types or {})}
    args = ModelArgs.from_config(FLASH_CONFIG)
    return inventory_for(args, recipe, with_mtp=with_mtp)


def inventory_for(
    args: ModelArgs, recipe: dict[str, GGMLQuantizationType], *, with_mtp: bool = False
) -> list[Item]:
    """The GGUF inventory of `args` under `recipe` (see flash_gguf_inventory)."""
    n_blocks = args.num_hidden_layers + (args.num_nextn_predict_layers if with_mtp else 0)
    ape = {N.blk(L, s) for L in range(n_blocks) for s in ("attn.compressor.ape", "attn.indexer.compressor.ape")}
    out = []
    for name, shape in deepseek4_tensor_shapes(args, mtp=with_mtp).items():
        role = N.role_of_gguf(name)
        if len(shape) == 1 or name in ape:
            qtype = GGMLQuantizationType.F32
        elif role == N.TID2EID:
            qtype = GGMLQuantizationType.I32
        else:
            qtype = recipe.get(role, recipe["default"])
        out.append(Item(name, qtype, shape, _nbytes(name, qtype, shape)))
    return out


def _nbytes(name: str, qtype: GGMLQuantizationType, shape: Sequence[int]) -> int:
    block, type_size = GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        raise BadInput(f"{name}: rows of {shape[-1]} are not a multiple of the {qtype.name} block size {block}")
    return math.prod(shape) // block * type_size
