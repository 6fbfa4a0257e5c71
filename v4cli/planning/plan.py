"""The plan behind `v4 plan`, `v4 info --plan`, the pre-load check of chat/ask and the loader's placement.

A plan is a placement (v4cli.planning.placement) of one model, context and KV format on one machine, with what it
means for memory and decode speed: bytes read per token (v4cli.planning.traffic) over the bandwidth of the tier they
live on. `plan_model` also picks the context and KV format, `plan_source` the recipe. Nothing here loads weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property

from quant.config import ModelArgs
from quant.errors import BadInput, DoesNotFit
from v4cli.model import kvsize
from v4cli.planning.machine import DISK, GPU, RAM, TIERS, Machine, detect_machine
from v4cli.planning.placement import Placement, place
from v4cli.planning.tensors import COMPONENTS, Inventory, Tensor
from v4cli.planning.traffic import kv_read
from v4cli.units import parse_ctx, parse_size

KV_SEARCH = ("fp8", "bf16")  # formats `auto` chooses from, smallest first: searches size the KV as fp8
BF16_MAX_SLOWDOWN = 0.05  # auto KV: exact bf16 only while it costs at most this much decode time over fp8

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


# ---------------------------------------------------------------------------------------------- plans

KV = "kv"  # the KV cache's key in `Plan.where`


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
    """A `Placement` of one model, context and KV format on one machine, with what it means for memory and decode
    speed."""

    inventory: Inventory
    machine: Machine
    placement: Placement
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
        out = {name: w.tier for name, w in self.placement.tensors.items()}
        out[KV] = self.placement.kv_tier
        return out

    @cached_property
    def _by_tier(self) -> dict[str, tuple[int, int]]:
        acc = {t: [0, 0] for t in TIERS}
        for w in self.inventory.tensors:
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
            self.where[t.name] == DISK and not t.pageable(self.args) for t in self.inventory.tensors)

    def rows(self) -> list[Row]:
        """The table: weights grouped by placement component and tier, then the KV cache and the reserves."""
        groups: dict[tuple[str, str], list[Tensor]] = {}
        for t in self.inventory.tensors:
            groups.setdefault((t.component, self.where[t.name]), []).append(t)
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
            rows.append(Row("CUDA + compute buffers (reserve)", min(self.machine.reserve(GPU), self.machine.vram),
                            GPU, 0, 0))
        rows.append(Row("OS + runtime (reserve)", self.machine.reserve(RAM), RAM, 0, 0))
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
    if kv_format not in kvsize.KV_FORMATS:
        raise BadInput(f"unknown KV format {kv_format!r}", hint=f"choose one of: {', '.join(kvsize.KV_FORMATS)}")
    # the bound is the slowest token the context allows: the last, decoded after ctx - 1 others
    return Plan(inv, machine, place(inv, machine, ctx, kv_format), kv_read(inv.args, kv_format, max(ctx - 1, 0)))


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
    if kv_format != "auto" and kv_format not in kvsize.KV_FORMATS:
        raise BadInput(f"unknown KV format {kv_format!r}",
                       hint=f"choose auto or one of: {', '.join(kvsize.KV_FORMATS)}")
    formats = KV_SEARCH if kv_format == "auto" else (kv_format,)
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
    dense = sum(t.nbytes for t in p.inventory.tensors if not t.pageable(p.args))
    return dense + p.kv_bytes + p.machine.reserve(RAM) + p.machine.reserve(GPU)


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

    if inv.config is None:
        return None  # a GGUF that does not say what it was converted from: no other recipe to plan
    for name in FIT_ORDER:
        alt = Inventory.from_recipe(inv.config, name, inv.source)
        if alt.nbytes >= inv.nbytes:
            continue
        p = plan_at(alt, machine, ctx, KV_SEARCH[0])
        if _in_memory(p) if in_memory else p.runs:
            return name
    return None


def _does_not_fit(inv: Inventory, machine: Machine, ctx: int, kv_format: str, run_max: int) -> DoesNotFit:
    p = plan_at(inv, machine, ctx, kv_format)
    dense = sum(t.nbytes for t in inv.tensors if not t.pageable(inv.args))
    have = machine.ram + machine.vram
    fixes = []
    if kv_format != KV_SEARCH[0] and plan_at(inv, machine, ctx, KV_SEARCH[0]).runs:
        fixes.append(f"--kv {KV_SEARCH[0]}")
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
        f"({_gb(machine.reserve(RAM) + machine.reserve(GPU))}) need {_gb(_resident_need(p))} of {_gb(have)}",
        hint="would fit: " + " or ".join(fixes),
    )


def _notes(p: Plan, mem_max: int) -> list[str]:
    """Plain sentences under the table: paging from disk and its cost, assumed bandwidths, the fix."""
    m, out = p.machine, list(p.placement.notes)
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
    chosen = next((inv for inv in candidates if _in_memory(plan_at(inv, machine, want, KV_SEARCH[0]))),
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
        machine = detect_machine(ram=parse_size(ram) if isinstance(ram, str) else ram,
                                 vram=parse_size(vram) if isinstance(vram, str) else vram, measure=False)
    return plan_model(inv, machine, parse_ctx(ctx) if ctx is not None else None, kv_format)


def plan_for(model: str, machine: Machine, ctx: int | None = None, kv_format: str = "auto") -> Plan:
    """`v4 plan MODEL`: a GGUF file → its placement; a checkpoint or registry name → the recipe that fits, then its
    placement. `flash` needs no download: the registry knows its config (quant.config.FLASH_CONFIG)."""
    from v4cli.store import CheckpointTarget, HubTarget, find_model

    found = find_model(model)
    if isinstance(found, HubTarget):
        if found.spec.config is None:
            raise found.not_pulled  # its config is needed to plan it
        return plan_source(found.spec.config, machine, ctx, kv_format, source=found.spec.name)
    if isinstance(found, CheckpointTarget):
        source = found.spec.name if found.spec else str(found.path)
        return plan_source(found.config(), machine, ctx, kv_format, source=source)
    return plan_model(Inventory.from_gguf(found.path), machine, ctx, kv_format)
