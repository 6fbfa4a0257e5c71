"""The memory planner behind `v4 plan`, `v4 quantize --fit` and the pre-load check of `chat`/`ask`.

Decode is memory-bandwidth bound (facts §8): every token reads the dense weights (attention, shared expert, router,
compressors, indexer, head), 6 of the 256 routed experts of each layer, one embedding row and the KV entries
attention touches. The planner places each tensor on the GPU, in RAM or on disk (mmap'd, paged in on use), picks
the KV format and context, and bounds the decode speed by bytes read per token / the bandwidth of where they live.
Nothing here loads weights: an inventory comes from a GGUF header or, for a recipe, from config.json alone.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

from gguf import GGMLQuantizationType

from quant import names as N
from quant.config import ModelArgs
from quant.errors import BadInput, DoesNotFit
from v4cli.placement import COMPONENTS, GPU_RESERVE, PlacementPlan
from v4cli.units import parse_ctx  # noqa: F401  (planner callers import it from here)

OS_RESERVE = 8 * 10**9  # the OS, the runner and the page cache's working set beside the model (RAM)
DISK_BW_ASSUMED = 3e9  # bytes/s, a PCIe 3/4 NVMe reading ~8 MB expert slices; say so when used
VRAM_BW_ASSUMED = 900e9  # bytes/s, a 24 GB consumer card (RTX 3090/4090 class) when no GPU is present to measure
RAM_BW_ASSUMED = 90e9  # bytes/s, a dual-channel DDR5-5600 desktop (facts §8), when not measured
KV_FORMATS = ("fp8", "bf16")  # smallest first: the recipe and context searches size the KV as fp8
BF16_MAX_SLOWDOWN = 0.05  # auto KV: exact bf16 only while it costs at most this much decode time over fp8

OTHER = "other"  # role of a GGUF tensor the name table does not know
GPU, RAM, DISK = "gpu", "ram", "disk"
TIERS = (GPU, RAM, DISK)
_TIER = {"cuda:0": GPU, "cpu": RAM, "mmap": DISK}  # placement.py's device names

# ---------------------------------------------------------------------------------------------- contexts


def format_ctx(n: int) -> str:
    """1,048,576 → '1M'; 393,216 → '384K'; anything else with thousands separators."""
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n >= 1 << 10 and n % (1 << 10) == 0:
        return f"{n >> 10}K"
    return f"{n:,}"


def round_ctx_down(n: int) -> int:
    """A context a person would type, ≤ n: 8 steps per power of two above 8K (300,123 → 288K), else 1K steps."""
    if n < 8192:
        return max(1024, n // 1024 * 1024) if n >= 1024 else n
    step = 1 << (n.bit_length() - 1 - 3)
    return n // step * step


# ---------------------------------------------------------------------------------------------- the machine


@dataclass(frozen=True)
class Machine:
    """Memory sizes (bytes) and bandwidths (bytes/s). `source` says, per field, given / detected / measured /
    assumed, so the table can say which numbers are guesses."""

    ram: int
    vram: int = 0
    ram_bw: float = RAM_BW_ASSUMED
    vram_bw: float = VRAM_BW_ASSUMED
    disk_bw: float = DISK_BW_ASSUMED
    disk_free: int | None = None
    source: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def gpu_capacity(self) -> int:
        return max(0, self.vram - GPU_RESERVE) if self.vram else 0

    @property
    def ram_capacity(self) -> int:
        return max(0, self.ram - OS_RESERVE)

    def bandwidth(self, tier: str) -> float:
        return {GPU: self.vram_bw, RAM: self.ram_bw, DISK: self.disk_bw}[tier]


def measure_ram_bw(seconds: float = 0.5, nbytes: int = 256 << 20) -> float:
    """STREAM-style copy bandwidth (bytes read + written per second) of a tensor far larger than any cache."""
    import torch

    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: page faults are not bandwidth
    reps, start = 0, time.perf_counter()
    while True:
        dst.copy_(src)
        reps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2 * nbytes * reps / elapsed


def _gpu_memory() -> int:
    """Total memory of CUDA device 0, or 0 without one."""
    import torch

    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 0


def measure_vram_bw() -> float:
    """Copy bandwidth (bytes read + written per second) of CUDA device 0 over a 512 MB tensor."""
    import torch

    n = (512 << 20) // 4
    src = torch.ones(n, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    reps, start = 20, time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    torch.cuda.synchronize()
    bw = 2 * 4 * n * reps / (time.perf_counter() - start)
    del src, dst
    torch.cuda.empty_cache()
    return bw


def _free_disk(path: Path) -> int:
    """Free bytes on the file system that holds `path` (or its nearest existing parent)."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def detect_machine(ram: int | None = None, vram: int | None = None, ram_bw: float | None = None,
                   vram_bw: float | None = None, disk_bw: float | None = None, disk_free: int | None = None,
                   store: Path | None = None, measure: bool = True) -> Machine:
    """This machine; any value given wins over detection. `measure=False` skips the bandwidth tests (~0.5 s)
    and assumes typical bandwidths instead (for callers that only need to know what fits)."""
    import psutil

    source: dict[str, str] = {}

    def pick(name, given, detect, how="detected"):
        source[name] = "given" if given is not None else how
        return given if given is not None else detect()

    ram_v = pick("ram", ram, lambda: psutil.virtual_memory().total)
    vram_v = pick("vram", vram, _gpu_memory)
    have_gpu = measure and vram_bw is None and vram_v > 0 and _gpu_memory() > 0
    vram_bw_v = pick("vram_bw", vram_bw, measure_vram_bw if have_gpu else lambda: VRAM_BW_ASSUMED,
                     "measured" if have_gpu else "assumed")
    ram_bw_v = pick("ram_bw", ram_bw, measure_ram_bw if measure else lambda: RAM_BW_ASSUMED,
                    "measured" if measure else "assumed")
    disk_bw_v = pick("disk_bw", disk_bw, lambda: DISK_BW_ASSUMED, "assumed")
    if store is None:
        from v4cli.store import default_root

        store = default_root()
    disk_v = pick("disk_free", disk_free, lambda: _free_disk(store))
    return Machine(ram_v, vram_v, ram_bw_v, vram_bw_v, disk_bw_v, disk_v, source)


# ---------------------------------------------------------------------------------------------- inventories


@dataclass(frozen=True)
class Weight:
    """One tensor as the planner sees it: bytes, and how many of them one decoded token reads."""

    name: str
    role: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    nbytes: int
    layer: int | None  # None for model-level tensors
    read: int  # bytes read per decoded token


@dataclass(frozen=True)
class Inventory:
    """A model's tensors for planning: from a GGUF header (`from_gguf`) or a recipe applied to a config."""

    args: ModelArgs
    weights: tuple[Weight, ...]
    label: str
    recipe: str | None = None  # the recipe it was made with: the GGUF's own metadata, never guessed from a name
    path: Path | None = None
    source: str | None = None  # what `v4 quantize` takes to remake it (a store name or checkpoint folder)

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.weights)

    @classmethod
    def from_tensors(cls, args: ModelArgs, tensors: Iterable[tuple[str, GGMLQuantizationType, tuple[int, ...], int]],
                     label: str, recipe: str | None = None, path: Path | None = None,
                     source: str | None = None) -> Inventory:
        """From (GGUF name, type, shape, bytes); read-per-token follows from each tensor's role."""
        out = []
        for name, qtype, shape, nbytes in tensors:
            try:
                role = N.role_of_gguf(name)
            except KeyError:
                role = OTHER  # a tensor this runner does not know: counted as read in full, never paged
            layer = int(name.split(".")[1]) if name.startswith("blk.") else None
            out.append(Weight(name, role, qtype, tuple(shape), nbytes, layer,
                              _read_per_token(args, role, layer, nbytes)))
        return cls(args, tuple(out), label, recipe, path, source)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> Inventory:
        """The tensors of a `deepseek4` GGUF file or split set (headers only; nothing is read from the data)."""
        from v4cli.gguf_file import open_gguf

        with open_gguf(path) as gf:
            return cls.from_gguf_file(gf)

    @classmethod
    def from_gguf_file(cls, gf) -> Inventory:
        """From an open `GGUFModel`, so a loader that has parsed the header already need not parse it twice."""
        from quant import keys as K

        recipe = gf.metadata.get(K.Provenance.RECIPE)
        source = gf.metadata.get(K.Provenance.SOURCE_REPO)
        return cls.from_tensors(gf.args, [(t.name, t.qtype, t.shape, t.nbytes) for t in gf.tensors.values()],
                                str(gf.path),
                                recipe=recipe if isinstance(recipe, str) else None, path=gf.path,
                                source=source if isinstance(source, str) else None)

    @classmethod
    def from_recipe(cls, cfg: dict, recipe: str, source: str | None = None) -> Inventory:
        """The exact tensors `v4 quantize SOURCE --recipe RECIPE` would write for this config.json."""
        args = ModelArgs.from_config(cfg)
        label = f"{source} quantized with {recipe}" if source else f"recipe {recipe}"
        return cls.from_tensors(args, _recipe_tensors(cfg, recipe), label, recipe=recipe, source=source)


_RECIPE_CACHE: dict[tuple[ModelArgs, str], tuple] = {}


def _recipe_tensors(cfg: dict, recipe: str) -> tuple:
    """(GGUF name, type, shape, bytes) of a recipe's output, memoized: planning Flash's 69k source tensors ~1 s."""
    from quant.convert import plan
    from quant.recipes import get_recipe

    key = (ModelArgs.from_config(cfg), recipe)  # the sizes follow from the args alone
    if key not in _RECIPE_CACHE:
        _RECIPE_CACHE[key] = tuple((t.gguf, t.qtype, t.shape, t.nbytes) for t in plan(cfg, get_recipe(recipe)))
    return _RECIPE_CACHE[key]


def _read_per_token(args: ModelArgs, role: str, layer: int | None, nbytes: int) -> int:
    """Bytes of one tensor that a decoded token reads."""
    if layer is not None and layer >= args.num_hidden_layers:
        return 0  # the MTP draft block: only speculative decoding runs it
    if role == N.EXPS:
        return nbytes * args.num_experts_per_tok // args.n_routed_experts
    if role in (N.EMBED, N.TID2EID):
        return nbytes // args.vocab_size  # one row per token
    return nbytes


# ---------------------------------------------------------------------------------------------- KV cache


def kv_read_per_token(args: ModelArgs, fmt: str, ctx: int) -> int:
    """Bytes of KV one decoded token reads at context `ctx`: every layer's window and compressor state, every HCA
    entry, every CSA indexer key, and only the indexer's top-k CSA entries (most of the cache is not read)."""
    from v4cli.model.kvsize import compressor_state_bytes, entry_bytes, index_key_bytes

    entry, key = entry_bytes(args, fmt), index_key_bytes(args, fmt)
    total = compressor_state_bytes(args)
    for layer in range(args.num_hidden_layers):
        total += min(ctx, args.sliding_window) * entry
        ratio = args.layer_ratio(layer)
        if args.is_csa(layer):
            total += ctx // ratio * key + min(args.index_topk, ctx // ratio) * entry
        elif ratio:
            total += ctx // ratio * entry
    return total


# ---------------------------------------------------------------------------------------------- plans

KV = "kv"  # the KV cache's key in `Plan.where`


def _pageable(w: Weight, args: ModelArgs) -> bool:
    """Whether a tensor may stay on disk and be paged in on use: only what a token reads a small part of."""
    return w.role in (N.EXPS, N.EMBED, N.TID2EID) or (w.layer is not None and w.layer >= args.num_hidden_layers)


@dataclass(frozen=True)
class Row:
    """One line of the plan table."""

    component: str
    nbytes: int
    where: str
    read: int  # bytes per decoded token
    seconds: float  # read / bandwidth of `where`


@dataclass(frozen=True)
class Plan:
    """A `PlacementPlan` (v4cli.placement) for one model, context and KV format on one machine, with what it means
    for memory and decode speed."""

    inventory: Inventory
    machine: Machine
    placement: PlacementPlan
    kv_read: int
    max_ctx: int = 0  # the largest context this model and KV format run at on this machine
    max_ctx_in_memory: int | None = None  # the largest with no weights paged from disk (None: not even 1 token)
    ctx_chosen: bool = False  # True when the planner chose the context (none was asked for)
    notes: tuple[str, ...] = ()

    @property
    def args(self) -> ModelArgs:
        return self.inventory.args

    @property
    def ctx(self) -> int:
        return self.placement.ctx

    @property
    def kv_format(self) -> str:
        return self.placement.kv_format

    @property
    def kv_bytes(self) -> int:
        return self.placement.kv_nbytes

    @cached_property
    def where(self) -> dict[str, str]:
        """Tensor name (and KV) → GPU / RAM / DISK."""
        out = {name: _TIER[p.device] for name, p in self.placement.tensors.items()}
        out[KV] = _TIER[self.placement.kv_device]
        return out

    @cached_property
    def _by_tier(self) -> dict[str, tuple[int, int]]:
        acc = {t: [0, 0] for t in TIERS}
        for w in self.inventory.weights:
            a = acc[self.where[w.name]]
            a[0] += w.nbytes
            a[1] += w.read
        acc[self.where[KV]][0] += self.kv_bytes
        acc[self.where[KV]][1] += self.kv_read
        return {t: (b, r) for t, (b, r) in acc.items()}

    def used(self, tier: str) -> int:
        """Bytes of weights and KV placed on `tier`."""
        return self._by_tier[tier][0]

    def read(self, tier: str) -> int:
        """Bytes a decoded token reads from `tier`."""
        return self._by_tier[tier][1]

    @property
    def seconds_per_token(self) -> float:
        return sum(self.read(t) / self.machine.bandwidth(t) for t in TIERS if self.read(t))

    @property
    def tokens_per_second(self) -> float:
        """The decode-speed bound: memory traffic only; real runs reach a fraction of it (facts §8)."""
        return 1.0 / self.seconds_per_token

    @property
    def paged(self) -> int:
        """Bytes of weights left on disk, paged in through the mmap as tokens need them."""
        return self.used(DISK)

    @cached_property
    def runs(self) -> bool:
        """The KV cache has a home, and everything a token reads in full is in memory; only experts may page."""
        return self.placement.fits and self.where[KV] != DISK and not any(
            self.where[w.name] == DISK and not _pageable(w, self.args) for w in self.inventory.weights)

    def rows(self) -> list[Row]:
        """The table: weights grouped by placement component and tier, then the KV cache and the reserves."""
        groups: dict[tuple[str, str], list[Weight]] = {}
        for w in self.inventory.weights:
            comp = self.placement.tensors[w.name].component
            groups.setdefault((comp, self.where[w.name]), []).append(w)
        rows = []
        for (comp, tier), ws in sorted(groups.items(), key=lambda kv: (COMPONENTS.index(kv[0][0]),
                                                                       TIERS.index(kv[0][1]))):
            label = _LABELS.get(comp, comp)
            if comp == "routed_experts":
                label += f", layers {_ranges(sorted({w.layer for w in ws}))}"
            read = sum(w.read for w in ws)
            rows.append(Row(label, sum(w.nbytes for w in ws), tier, read, read / self.machine.bandwidth(tier)))
        kv_tier = self.where[KV]
        rows.append(Row(f"KV cache ({self.kv_format}, {format_ctx(self.ctx)} tokens)", self.kv_bytes, kv_tier,
                        self.kv_read, self.kv_read / self.machine.bandwidth(kv_tier)))
        if self.machine.vram:
            rows.append(Row("CUDA + compute buffers (reserve)", min(GPU_RESERVE, self.machine.vram), GPU, 0, 0))
        rows.append(Row("OS + runtime (reserve)", OS_RESERVE, RAM, 0, 0))
        return rows


_LABELS = {"head": "output head", "attention": "attention", "compressor": "compressors", "indexer": "indexer",
           "norms": "norms", "mhc": "mHC mixing", "router": "routers", "shared_experts": "shared experts",
           "routed_experts": "routed experts", "embedding": "embedding", "mtp": "MTP block (unused)",
           "mtp_experts": "MTP experts (unused)"}


def _ranges(xs: Sequence[int]) -> str:
    """[0,1,2,5,7,8] → '0–2, 5, 7–8'."""
    out, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}–{xs[j]}")
        i = j + 1
    return ", ".join(out)


# ---------------------------------------------------------------------------------------------- planning


def plan_at(inv: Inventory, machine: Machine, ctx: int, kv_format: str) -> Plan:
    """The placement of `inv` with a `kv_format` cache of `ctx` tokens (no search, no checks)."""
    if kv_format not in KV_FORMATS:
        raise BadInput(f"unknown KV format {kv_format!r}", hint=f"choose one of: {', '.join(KV_FORMATS)}")
    placement = PlacementPlan.build(
        [(w.name, w.qtype, w.shape, w.nbytes) for w in inv.weights], inv.args, ctx=ctx, kv_format=kv_format,
        gpu_mem=machine.vram, cpu_mem=machine.ram, cpu_reserve=OS_RESERVE)
    return Plan(inv, machine, placement, kv_read_per_token(inv.args, kv_format, ctx))


def _largest_ctx(inv: Inventory, machine: Machine, kv_format: str, ok) -> int:
    """The largest context ≤ the model's maximum whose plan satisfies `ok` (monotone in ctx), in whole 1K steps
    (a context people type, and half the placements to try); below 1K to the token. 0 if none."""
    top = inv.args.max_position_embeddings

    def search(lo: int, hi: int, step: int) -> int:  # invariant: ok(lo·step) or lo == 0; not ok(hi·step)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if ok(plan_at(inv, machine, mid * step, kv_format)) else (lo, mid)
        return lo * step

    if ok(plan_at(inv, machine, top, kv_format)):
        return top
    if not ok(plan_at(inv, machine, 0, kv_format)):
        return 0
    best = search(0, -(-top // 1024), 1024)
    return best or search(0, min(top, 1024), 1)


def _in_memory(p: Plan) -> bool:
    return p.runs and not p.paged


def plan_model(inv: Inventory, machine: Machine, ctx: int | None = None, kv_format: str = "auto") -> Plan:
    """Placement, KV format and context for `inv` on `machine`. Raises DoesNotFit (with the fix) if it cannot run.

    `ctx=None` takes the model's maximum context, or the largest that runs. `kv_format="auto"` keeps the KV in
    bf16 (exact, no rounding) when that moves nothing to a slower tier and slows decode by at most
    BF16_MAX_SLOWDOWN, else fp8 (DeepSeek's own runtime format, half the bytes).
    """
    args = inv.args
    if ctx is not None and ctx > args.max_position_embeddings:
        raise BadInput(f"--ctx {format_ctx(ctx)} is beyond the model's maximum of {format_ctx(args.max_position_embeddings)}",
                       hint=f"--ctx {format_ctx(args.max_position_embeddings)}")
    formats = KV_FORMATS if kv_format == "auto" else (kv_format,)
    smallest = formats[0]
    run_max = _largest_ctx(inv, machine, smallest, lambda p: p.runs)
    chosen = ctx is None
    want = args.max_position_embeddings if ctx is None else ctx
    if run_max == 0 or (ctx is not None and run_max < ctx):
        raise _does_not_fit(inv, machine, want, smallest, run_max)
    ctx = min(want, run_max)
    p = plan_at(inv, machine, ctx, smallest)
    for fmt in formats[1:]:  # a larger, exact format only if it costs no weight a faster tier
        q = plan_at(inv, machine, ctx, fmt)
        if q.runs and q.where == p.where and q.seconds_per_token <= (1 + BF16_MAX_SLOWDOWN) * p.seconds_per_token:
            p = q
    mem_max = _largest_ctx(inv, machine, p.kv_format, _in_memory)
    notes = _notes(p, mem_max)
    return replace(p, max_ctx=_largest_ctx(inv, machine, p.kv_format, lambda q: q.runs) if p.kv_format != smallest
                   else run_max, max_ctx_in_memory=mem_max or None, ctx_chosen=chosen, notes=tuple(notes))


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def _resident_need(p: Plan) -> int:
    """RAM + GPU bytes that must stay in memory: every tensor a token reads in full, the KV cache, the reserves."""
    dense = sum(w.nbytes for w in p.inventory.weights if not _pageable(w, p.args))
    return dense + p.kv_bytes + OS_RESERVE + (GPU_RESERVE if p.machine.vram else 0)


def _machine_words(m: Machine) -> str:
    return f"{_gb(m.ram)} RAM" + (f" + {_gb(m.vram)} GPU" if m.vram else "")


def _quantize_cmd(inv: Inventory, recipe: str) -> str:
    from quant.recipes import RECIPES

    cmd = f"v4 quantize {inv.source or '<checkpoint>'} --recipe {recipe}"
    if RECIPES[recipe].needs_imatrix:
        cmd += " --imatrix IMATRIX.gguf (from `v4 imatrix MODEL.gguf`, or llama.cpp's imatrix for the model)"
    return cmd


def _smaller_recipe(inv: Inventory, machine: Machine, ctx: int, in_memory: bool) -> str | None:
    """The best recipe smaller than `inv` that runs (or, with `in_memory`, needs no paging) at `ctx` with fp8 KV."""
    from quant.recipes import FIT_ORDER

    cfg = {**inv.args.to_dict(), "model_type": "deepseek_v4", "compress_ratios": list(inv.args.compress_ratios)}
    for name in FIT_ORDER:
        alt = Inventory.from_recipe(cfg, name, inv.source)
        if alt.nbytes >= inv.nbytes:
            continue
        p = plan_at(alt, machine, ctx, KV_FORMATS[0])
        if _in_memory(p) if in_memory else p.runs:
            return name
    return None


def _does_not_fit(inv: Inventory, machine: Machine, ctx: int, kv_format: str, run_max: int) -> DoesNotFit:
    p = plan_at(inv, machine, ctx, kv_format)
    dense = sum(w.nbytes for w in inv.weights if not _pageable(w, inv.args))
    have = machine.ram + machine.vram
    fixes = []
    if kv_format != KV_FORMATS[0] and plan_at(inv, machine, ctx, KV_FORMATS[0]).runs:
        fixes.append(f"--kv {KV_FORMATS[0]}")
    if run_max >= 1024:
        fixes.append(f"--ctx {format_ctx(round_ctx_down(run_max))}")
    if inv.source is not None or inv.path is not None:
        smaller = _smaller_recipe(inv, machine, ctx, in_memory=False)
        if smaller:
            fixes.append(_quantize_cmd(inv, smaller))
    if not fixes:
        fixes.append(f"a machine with at least {_gb(_resident_need(plan_at(inv, machine, min(ctx, 1024), kv_format)))} "
                     "of RAM + GPU memory")
    return DoesNotFit(
        f"{inv.label} at {format_ctx(ctx)} tokens does not fit {_machine_words(machine)}: the tensors every token "
        f"reads ({_gb(dense)}), the {kv_format} KV cache ({_gb(p.kv_bytes)}) and the reserves "
        f"({_gb(OS_RESERVE + (GPU_RESERVE if machine.vram else 0))}) need {_gb(_resident_need(p))} of {_gb(have)}",
        hint="would fit: " + " or ".join(fixes),
    )


def _notes(p: Plan, mem_max: int) -> list[str]:
    """Plain sentences under the table: paging from disk and its cost, assumed bandwidths, the fix."""
    m, out = p.machine, []
    if p.paged:
        disk_read = p.read(DISK)
        share = disk_read / m.disk_bw / p.seconds_per_token
        out.append(
            f"Experts page from disk: {_gb(p.paged)} of weights stay on disk (mmap) and are read as tokens route to "
            f"them, ≈{_gb(disk_read)} per token at {_gb(m.disk_bw)}/s = {1e3 * disk_read / m.disk_bw:.0f} ms of the "
            f"{1e3 * p.seconds_per_token:.0f} ms per token ({share:.0%} of decode time).")
        fixes = []
        if mem_max >= 1024:
            fixes.append(f"--ctx {format_ctx(round_ctx_down(mem_max))}")
        if p.inventory.source is not None or p.inventory.path is not None:
            smaller = _smaller_recipe(p.inventory, m, p.ctx, in_memory=True)
            if smaller:
                fixes.append(_quantize_cmd(p.inventory, smaller))
        if fixes:
            out.append("Fits in memory with " + " or ".join(fixes) + ".")
        else:
            out.append(f"Nothing smaller fits in memory: holding every expert needs "
                       f"{_gb(m.ram + p.paged)} of RAM at this context.")
    if p.read(DISK) and m.source.get("disk_bw") == "assumed":
        out.append(f"Disk bandwidth assumed {_gb(m.disk_bw)}/s; measure yours and pass --disk-bw.")
    if p.read(GPU) and m.source.get("vram_bw") == "assumed":
        out.append(f"GPU bandwidth assumed {_gb(m.vram_bw)}/s; measure yours and pass --vram-bw.")
    return out


# ---------------------------------------------------------------------------------------------- entry points


def plan_source(cfg: dict, machine: Machine, ctx: int | None = None, kv_format: str = "auto",
                source: str | None = None) -> Plan:
    """For an official checkpoint: the best recipe (FIT_ORDER) that runs from memory at `ctx`, then its plan.

    If no recipe fits in memory, the smallest one with experts paged from disk; DoesNotFit if even that cannot run.
    """
    from quant.recipes import FIT_ORDER

    args = ModelArgs.from_config(cfg)
    want = args.max_position_embeddings if ctx is None else ctx
    candidates = [Inventory.from_recipe(cfg, name, source) for name in FIT_ORDER]
    chosen = next((inv for inv in candidates if _in_memory(plan_at(inv, machine, want, KV_FORMATS[0]))),
                  candidates[-1])
    p = plan_model(chosen, machine, ctx, kv_format)
    better = candidates[: candidates.index(chosen)]
    why = f"Recipe {chosen.recipe} ({_gb(chosen.nbytes)}) is "
    why += "the best that runs from memory" if not p.paged else "the smallest, and even it pages experts from disk"
    if better:
        why += "; " + ", ".join(f"{inv.recipe} ({_gb(inv.nbytes)})" for inv in better)
        why += " would page experts from disk" if not p.paged else " would page more"
    notes = [why + f". Make it with: {_quantize_cmd(chosen, chosen.recipe)}"]
    if machine.disk_free is not None and machine.disk_free < chosen.nbytes:
        notes.append(f"The GGUF needs {_gb(chosen.nbytes)} of disk in the store; only {_gb(machine.disk_free)} is free.")
    return replace(p, notes=(*notes, *p.notes))


def check_fits(model, ram: int | str | None = None, vram: int | str | None = None, ctx: int | str | None = None,
               kv_format: str = "auto", machine: Machine | None = None) -> Plan:
    """The pre-load check `chat`/`ask` run: `model` is a GGUF path, an open GGUFModel or an Inventory.

    `ram`/`vram` in bytes or like "128G". Returns the plan (placement, KV format, context: the largest that runs
    when `ctx` is None) or raises DoesNotFit naming the fix. Sizes not given are detected; bandwidths are assumed.
    """
    from v4cli.gguf_file import GGUFModel

    if isinstance(model, Inventory):
        inv = model
    elif isinstance(model, GGUFModel):
        inv = Inventory.from_gguf_file(model)
    else:
        inv = Inventory.from_gguf(model)
    if machine is None:
        from v4cli.units import parse_size

        machine = detect_machine(ram=parse_size(ram) if isinstance(ram, str) else ram,
                                 vram=parse_size(vram) if isinstance(vram, str) else vram, measure=False)
    return plan_model(inv, machine, parse_ctx(ctx) if ctx is not None else None, kv_format)


def plan_for(model: str, machine: Machine, ctx: int | None = None, kv_format: str = "auto") -> Plan:
    """`v4 plan MODEL`: a GGUF file → its placement; a checkpoint or registry name → the recipe that fits, then its
    placement. `flash` needs no download: its layout is known from config alone (quant.config.FLASH_CONFIG)."""
    from quant.config import FLASH_CONFIG
    from quant.errors import NotFoundError
    from v4cli.registry import HubSpec, resolve_name
    from v4cli.store import Store

    store = Store()
    if model.endswith(".gguf") and not Path(model).expanduser().exists():
        stored = store.gguf_dir / model  # `v4 ls` shows store GGUFs by file name
        if stored.is_file():
            model = str(stored)
    spec = resolve_name(model)
    if isinstance(spec, HubSpec):
        if store.read_manifest(spec.name) is None:
            if spec.name in ("flash", "flash-base"):
                return plan_source(FLASH_CONFIG, machine, ctx, kv_format, source=spec.name)
            raise NotFoundError(f"{model} has not been pulled; its config is needed to plan it",
                                hint=f"v4 pull {model}")
        path = store.resolve(model)
        if path.is_dir():
            return plan_source(_read_config(path), machine, ctx, kv_format, source=spec.name)
        return plan_model(Inventory.from_gguf(path), machine, ctx, kv_format)
    if spec.kind == "checkpoint":
        return plan_source(_read_config(spec.path), machine, ctx, kv_format, source=str(spec.path))
    return plan_model(Inventory.from_gguf(spec.path), machine, ctx, kv_format)


def _read_config(folder: Path) -> dict:
    """config.json of a checkpoint folder, validated as a DeepSeek-V4 config (CheckpointError / UnsupportedModel)."""
    from quant.config import read_config

    return read_config(Path(folder) / "config.json")
