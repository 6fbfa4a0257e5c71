"""Which quantize recipe fits a RAM budget: the file, the KV cache at the wanted context, and the OS."""

from __future__ import annotations

from dataclasses import dataclass

from quant.config import ModelArgs
from quant.convert import plan
from quant.recipes import FIT_ORDER, get_recipe, parse_size
from v4cli.errors import DoesNotFit

OS_RESERVE = 8 * 10**9  # what the OS, the page cache's working set and the runner itself need beside the model


@dataclass(frozen=True)
class FitChoice:
    recipe: str
    budget: int
    file_bytes: int
    kv_bytes: int
    ctx: int
    sizes: dict[str, int]

    def explain(self) -> str:
        left = self.budget - self.file_bytes - self.kv_bytes - OS_RESERVE
        return (f"--fit {self.budget / 1e9:.0f} GB: recipe {self.recipe} ({self.file_bytes / 1e9:.1f} GB) + fp8 KV "
                f"at {self.ctx:,} tokens ({self.kv_bytes / 1e9:.2f} GB) + {OS_RESERVE / 1e9:.0f} GB for the OS "
                f"leaves {left / 1e9:.1f} GB")


def choose_recipe(cfg: dict, budget: str | int, ctx: int) -> FitChoice:
    """The best-quality recipe (FIT_ORDER) whose file + KV(ctx, fp8) + OS reserve ≤ budget."""
    from v4cli.kvsize import kv_bytes

    total = parse_size(budget) if isinstance(budget, str) else budget
    args = ModelArgs.from_config(cfg)
    kv = kv_bytes(args, "fp8", ctx)
    sizes = {name: sum(t.nbytes for t in plan(cfg, get_recipe(name))) for name in FIT_ORDER}
    for name in FIT_ORDER:
        if sizes[name] + kv + OS_RESERVE <= total:
            return FitChoice(name, total, sizes[name], kv, ctx, sizes)
    smallest = FIT_ORDER[-1]
    need = sizes[smallest] + kv + OS_RESERVE
    raise DoesNotFit(
        f"no recipe fits {total / 1e9:.0f} GB: the smallest ({smallest}, {sizes[smallest] / 1e9:.1f} GB) + KV "
        f"({kv / 1e9:.2f} GB at {ctx:,} tokens) + OS needs {need / 1e9:.1f} GB",
        hint="use a smaller --ctx, or run with experts paged from disk (v4 plan)",
    )
