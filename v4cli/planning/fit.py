"""Which quantize recipe fits a memory budget: `v4 quantize --fit`, decided by the same plans as `v4 plan`."""

from __future__ import annotations

from dataclasses import dataclass

from quant.recipes import FIT_ORDER, RECIPES
from quant.errors import DoesNotFit
from v4cli.planning.machine import GPU, RAM, Machine
from v4cli.planning.plan import KV_SEARCH, format_ctx, plan_at, round_ctx_down
from v4cli.planning.tensors import Inventory
from v4cli.units import parse_size


@dataclass(frozen=True)
class FitChoice:
    """The recipe `--fit` chose, with the sizes that decided it."""

    recipe: str
    budget: int
    file_bytes: int
    kv_bytes: int
    ctx: int
    sizes: dict[str, int]
    vram: int = 0
    with_imatrix: str | None = None  # a better recipe that fits but needs an importance matrix (none was given)

    def explain(self) -> str:
        """One line: the recipe, its file and KV sizes, the reserve and what is left."""
        machine = Machine(ram=self.budget, vram=self.vram)
        reserve = machine.reserve(RAM)
        left = self.budget + self.vram - self.file_bytes - self.kv_bytes - reserve - machine.reserve(GPU)
        gpu = f" + {self.vram / 1e9:.0f} GB GPU" if self.vram else ""
        return (f"--fit {self.budget / 1e9:.0f} GB{gpu}: recipe {self.recipe} ({self.file_bytes / 1e9:.1f} GB) + fp8 "
                f"KV at {self.ctx:,} tokens ({self.kv_bytes / 1e9:.2f} GB) + {reserve / 1e9:.0f} GB for the OS "
                f"leaves {left / 1e9:.1f} GB" + self._imatrix_note())

    def _imatrix_note(self) -> str:
        if not self.with_imatrix:
            return ""
        return (f"; with an importance matrix, {self.with_imatrix} ({self.sizes[self.with_imatrix] / 1e9:.1f} GB, "
                f"better) fits: `v4 imatrix MODEL.gguf -o imatrix.gguf`, then add --imatrix imatrix.gguf")


def choose_recipe(cfg: dict, budget: str | int, ctx: int, vram: str | int = 0, imatrix: bool = False) -> FitChoice:
    """The best-quality recipe (FIT_ORDER) whose file and fp8 KV at `ctx` fit RAM (`budget`) + GPU (`vram`)
    with nothing paged from disk, after the OS (and GPU) reserves; without `imatrix`, only recipes that need
    none (the choice then names the better one an importance matrix would allow). DoesNotFit names a context
    that would fit."""
    total = parse_size(budget) if isinstance(budget, str) else budget
    gpu = parse_size(vram) if isinstance(vram, str) else vram
    machine = Machine(ram=total, vram=gpu)
    fmt = KV_SEARCH[0]
    invs = {name: Inventory.from_recipe(cfg, name) for name in FIT_ORDER}
    sizes = {name: inv.nbytes for name, inv in invs.items()}
    last = None
    missed = None  # the first recipe that fits but needs the imatrix we do not have
    for name, inv in invs.items():
        last = plan_at(inv, machine, ctx, fmt)
        if last.runs and not last.paged:
            if RECIPES[name].needs_imatrix and not imatrix:
                missed = missed or name
                continue
            return FitChoice(name, total, sizes[name], last.kv_bytes, ctx, sizes, gpu, missed)
    smallest = FIT_ORDER[-1] if imatrix else [n for n in FIT_ORDER if not RECIPES[n].needs_imatrix][-1]
    need = sizes[smallest] + last.kv_bytes + machine.reserve(RAM) + machine.reserve(GPU)
    hint = "run with experts paged from disk (v4 plan shows the cost)"
    lo, hi = 0, ctx  # the largest context at which the smallest recipe still fits in memory
    while hi - lo > 1:
        mid = (lo + hi) // 2
        p = plan_at(invs[smallest], machine, mid, fmt)
        lo, hi = (mid, hi) if p.runs and not p.paged else (lo, mid)
    if lo >= 1024:
        hint = f"--ctx {format_ctx(round_ctx_down(lo))} fits {smallest}; or " + hint
    raise DoesNotFit(
        f"no recipe fits {total / 1e9:.0f} GB: the smallest ({smallest}, {sizes[smallest] / 1e9:.1f} GB) + KV "
        f"({last.kv_bytes / 1e9:.2f} GB at {ctx:,} tokens) + OS needs {need / 1e9:.1f} GB",
        hint=hint,
    )
