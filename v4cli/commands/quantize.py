"""`v4 quantize`: official checkpoint → deepseek4 GGUF."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from v4cli import ui
from v4cli.commands.options import ctx_option
from quant.errors import BadInput
from v4cli.units import parse_size


def _source(src: str) -> tuple[dict, Path | None, str | None]:
    """(config dict, checkpoint folder or None when only the config is known, store name)."""
    from v4cli.store import CheckpointTarget, HubTarget, find_model

    found = find_model(src)
    if isinstance(found, HubTarget):
        if found.spec.config is None:
            raise found.not_pulled
        return found.spec.config, None, found.spec.name  # sizes are known from the official layout
    if isinstance(found, CheckpointTarget):
        return found.config(), found.path, found.spec.name if found.spec else None
    raise BadInput(f"{src} is a GGUF file; quantize takes an official checkpoint folder",
                   hint="pass the folder with config.json and *.safetensors")


def quantize(
    src: str = typer.Argument(..., help="Checkpoint folder, or a pulled model name (flash)."),
    output: Path | None = typer.Option(None, "-o", "--output", help="Output .gguf (default: in the model store)."),
    recipe: str | None = typer.Option(None, "--recipe", "-r", help="lossless, q8, q4k, q3k, q2k-q3k, q2k, f32, or an "
                                      "I-quant mix (needs --imatrix): iq3-108, iq2-100, iq2-90, iq2-80."),
    imatrix: Path | None = typer.Option(None, "--imatrix", help="Importance matrix guiding the low-bit quantizers: "
                                        "from `v4 imatrix`, or llama.cpp's (GGUF or legacy .dat)."),
    fit: int | None = typer.Option(None, "--fit", parser=parse_size, metavar="SIZE",
                                   help="Choose the best recipe whose file fits this RAM (e.g. 128G)."),
    ctx: int = ctx_option("1M", "Context the --fit budget must leave room for (fp8 KV), like 1M or 384K."),
    tensor_type: list[str] = typer.Option([], "--tensor-type", help="Override: PATTERN=TYPE on GGUF names; repeatable."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan's types and exact size; write nothing."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="With --dry-run: also list every tensor."),
    threads: int = typer.Option(None, "--threads", min=1, help="Quantizing processes (default: one per CPU core)."),
    mtp: bool = typer.Option(False, "--mtp", help="Also write the MTP draft block as llama.cpp's separate "
                             "draft file, mtp-<output name> beside the output (for v4 eval --mtp)."),
) -> None:
    """Convert an official DeepSeek-V4 checkpoint to a llama.cpp-compatible GGUF."""
    from quant.convert import convert, plan
    from quant.inventory import official_inventory
    from quant.official import Checkpoint
    from quant.recipes import get_recipe
    from v4cli.store import format_bytes, gguf_path

    cfg, path, store_name = _source(src)
    im = None
    if imatrix is not None:
        from quant.imatrix import load_imatrix

        im = load_imatrix(imatrix)
    if fit:
        from v4cli.planning.fit import choose_recipe
        from v4cli.units import parse_ctx

        choice = choose_recipe(cfg, fit, parse_ctx(ctx), imatrix=im is not None)
        ui.err.print(choice.explain(), soft_wrap=True)
        if dry_run:
            _print_candidates(choice)
        recipe = recipe or choice.recipe
    r = get_recipe(recipe or "q8", tensor_type)
    if dry_run:
        if r.needs_imatrix and im is None:
            ui.err.print(f"note: recipe {r.name} needs --imatrix to be written (sizes below are exact either way)")
        ck = Checkpoint(path) if path is not None and any(path.glob("*.safetensors")) else None  # headers only
        for draft in (False, True) if mtp else (False,):
            inv = None if ck is None else [e for e in official_inventory(cfg, with_mtp=draft) if e.name in ck.tensors]
            _print_plan(plan(cfg, r, inv, mtp=draft), r, verbose)
        return
    if path is None:
        raise BadInput(f"{src} is not downloaded yet", hint=f"v4 pull {src}")
    # the store by default (so `v4 ls` lists it), named after the pulled model or the checkpoint folder
    output = (output.expanduser() if output else gguf_path(store_name or path.name, r.name)).absolute()
    _clear_dead_partials(output.parent)
    with ui.byte_progress() as bar:
        task = bar.add_task("quantize", total=None)

        def on_progress(p):
            bar.update(task, completed=p.done_bytes, total=p.total_bytes, description=p.tensor[:40])

        guide = {"imatrix": im, "imatrix_file": None if imatrix is None else imatrix.name, "workers": threads}
        results = [convert(path, output, r, source_repo=store_name, progress=on_progress, **guide)]
        if mtp:
            bar.update(task, completed=0, total=None)
            results.append(convert(path, output.with_name("mtp-" + output.name), r, source_repo=store_name,
                                   progress=on_progress, mtp=True, **guide))
    for res in results:
        mb_s = res.in_bytes / 1e6 / max(res.seconds, 1e-9)
        ui.console.print(f"wrote {res.path} ({format_bytes(res.out_bytes)}, {res.tensors} tensors, recipe {r.name}) "
                         f"in {res.seconds:.1f} s ({mb_s:.0f} MB/s of input)", soft_wrap=True, markup=False,
                         highlight=False)


def _clear_dead_partials(folder: Path) -> None:
    """Delete what killed quantize runs on this machine left in `folder`; say what was freed and what was kept."""
    from v4cli.partials import find_partials, remove_stale
    from v4cli.store import format_bytes

    gone = remove_stale(folder)
    if gone:
        ui.err.print(f"note: removed {len(gone)} unfinished output{'s' if len(gone) > 1 else ''} of quantize runs "
                     f"that died, freeing {format_bytes(sum(p.size for p in gone))} in {folder}",
                     soft_wrap=True, markup=False, highlight=False)
    for p in find_partials(folder):
        if p.host is None:  # an older v4 wrote it; its PID may belong to another machine sharing the folder
            ui.err.print(f"note: {p.path} ({format_bytes(p.size)}) is an unfinished output of an older v4: "
                         "delete it if no quantize is writing it", soft_wrap=True, markup=False, highlight=False)


def _print_candidates(choice) -> None:
    """--fit's candidates, best first, with their exact sizes."""
    from quant.recipes import RECIPES

    t = Table("recipe", "size", "needs --imatrix", "", title="--fit candidates, best first")
    for name, size in choice.sizes.items():
        mark = "chosen" if name == choice.recipe else ("fits with --imatrix" if name == choice.with_imatrix else "")
        t.add_row(name, f"{size / 1e9:.2f} GB", "yes" if RECIPES[name].needs_imatrix else "", mark)
    ui.console.print(t)


def _print_plan(tensors, recipe, verbose: bool) -> None:
    """Bytes per type and the exact total; with `verbose` first every tensor (1,346 rows for Flash)."""
    from collections import defaultdict

    by_type: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for t in tensors:
        by_type[t.qtype.name][0] += 1
        by_type[t.qtype.name][1] += t.nbytes
    if verbose:
        tt = Table("tensor", "type", "shape", "bytes", "source")
        for t in tensors:
            tt.add_row(t.gguf, t.qtype.name, "×".join(map(str, t.shape)), f"{t.nbytes:,}", t.source_dtype)
        ui.console.print(tt)
    table = Table("type", "tensors", "bytes", title=f"recipe {recipe.name}: {recipe.summary}")
    for name, (n, b) in sorted(by_type.items(), key=lambda kv: -kv[1][1]):
        table.add_row(name, str(n), f"{b:,}")
    total = sum(t.nbytes for t in tensors)
    table.add_row("total", str(len(tensors)), f"{total:,}")
    ui.console.print(table)
    ui.console.print(f"output size: {total:,} bytes of tensor data ({total / 1e9:.2f} GB, {total / 2**30:.2f} GiB) "
                     "+ header")


def register(app: typer.Typer) -> None:
    app.command()(quantize)
