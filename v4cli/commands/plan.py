"""`v4 plan`: what fits this machine (recipe, placement, KV format, context) and how fast it can decode."""

from __future__ import annotations

import typer
from rich.table import Table

from dataclasses import replace

from v4cli import ui
from v4cli.commands.options import CTX, MODEL_POSITIONAL, RAM, VRAM, kv_option, model_option, pick_model
from v4cli.units import parse_size

DEFAULT_MODEL = "flash"  # planned without a download: its layout is known from config alone
KV_AUTO = kv_option("auto", "auto, fp8 or bf16")  # `v4 info --plan` takes the same

_WHERE = {"gpu": "GPU", "ram": "RAM", "disk": "disk"}
_BW = {"gpu": "vram_bw", "ram": "ram_bw", "disk": "disk_bw"}  # Machine.source keys


def _line(text: str) -> None:
    # soft_wrap: one logical line stays one line whatever the terminal width (and tests can match lines)
    ui.console.print(text, soft_wrap=True, markup=False, highlight=False)


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def _size(n: float) -> str:
    """Table cells: GB with one decimal, MB or KB below that, so small components do not read as 0.0 GB."""
    if n >= 1e9:
        return _gb(n)
    return f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} KB"


def _rate(bw: float) -> str:
    return f"{bw / 1e9:.1f} GB/s" if bw < 10e9 else f"{bw / 1e9:.0f} GB/s"


def _bw(text: str | None, flag: str) -> float | None:
    """'90' or '90GB/s' (GB/s) → bytes/s."""
    from quant.errors import BadInput

    if text is None:
        return None
    t = text.strip().upper().removesuffix("/S").removesuffix("GB").strip()
    try:
        value = float(t)
    except ValueError:
        raise BadInput(f"{flag} {text!r}: expected GB/s, e.g. {flag} 90") from None
    if value <= 0:
        raise BadInput(f"{flag} must be positive")
    return value * 1e9


def plan(
    model_opt: str | None = model_option(f"{DEFAULT_MODEL}, a pulled name, a checkpoint folder or a .gguf file "
                                     f"(default: {DEFAULT_MODEL})."),
    model: str | None = MODEL_POSITIONAL,
    ram: int | None = RAM,
    vram: int | None = VRAM,
    ctx: int | None = CTX,
    kv: str = KV_AUTO,
    ram_bw: str | None = typer.Option(None, "--ram-bw", metavar="GB/S", help="RAM bandwidth in GB/s (default: measured here, "
                                      "assumed for a described machine)."),
    vram_bw: str | None = typer.Option(None, "--vram-bw", metavar="GB/S", help="GPU bandwidth in GB/s (default: measured here, "
                                       "assumed for a described machine)."),
    disk_bw: str | None = typer.Option(None, "--disk-bw", metavar="GB/S", help="Disk read bandwidth in GB/s (default: 3, assumed)."),
    disk: int | None = typer.Option(None, "--disk", parser=parse_size, metavar="SIZE",
                                    help="Free disk for the store (default: this machine's; not checked for a "
                                         "described machine)."),
) -> None:
    """Plan a model on this machine, or on one described by --ram/--vram: recipe, placement, KV, context, speed."""
    show_plan(pick_model(model_opt, model) or DEFAULT_MODEL, ram, vram, ctx, kv, _bw(ram_bw, "--ram-bw"),
              _bw(vram_bw, "--vram-bw"), _bw(disk_bw, "--disk-bw"), disk)


def show_plan(model: str, ram, vram, ctx, kv, ram_bw=None, vram_bw=None, disk_bw=None, disk=None) -> None:
    """The plan of `model` on this or a described machine, as `v4 plan` and `v4 info --plan` both print it."""
    from v4cli.planning.plan import plan_for

    machine, assumed = describe_machine(ram, vram, ram_bw, vram_bw, disk_bw, disk)
    render(plan_for(model, machine, ctx, kv))
    if assumed:
        _line(assumed)


def describe_machine(ram, vram, ram_bw, vram_bw, disk_bw, disk):
    """(Machine, None) for this machine; for one described by --ram or --vram, (Machine, the sentence saying what
    was assumed). A described machine is not this one: this one's measured bandwidths and free disk say nothing about
    it, so bandwidths not given are the stated defaults and free disk is unknown unless --disk gives it."""
    from v4cli.planning.machine import detect_machine

    described = ram is not None or vram is not None
    machine = detect_machine(ram=ram, vram=vram, ram_bw=ram_bw, vram_bw=vram_bw, disk_bw=disk_bw, disk_free=disk,
                             measure=not described)
    if not described:
        return machine, None
    if disk is None:
        machine = replace(machine, disk_free=None, source={**machine.source, "disk_free": "unknown"})
    # the plan's notes already name an assumed GPU or disk bandwidth wherever it matters
    line = "Described machine: " + ", ".join(f"{what} {'as given' if given is not None else 'of this machine'}"
                                             for what, given in (("RAM", ram), ("GPU memory", vram)))
    if ram_bw is None:
        line += f"; RAM bandwidth assumed {_rate(machine.ram_bw)} (pass --ram-bw)"
    if disk is None:
        line += "; free disk not checked (pass --disk)"
    return machine, line + "."


def render(p) -> None:
    """The plan as a table, then plain sentences: memory per tier, context, KV, the decode bound, the notes."""
    from v4cli.planning.machine import GPU, RAM, TIERS
    from v4cli.planning.plan import format_ctx

    m = p.machine
    inv = p.inventory
    title = inv.label if inv.recipe is None or inv.source is None else f"{inv.source}, recipe {inv.recipe}"
    table = Table("component", "size", "where", "read/token", "ms/token",
                  title=f"{title} on {_gb(m.ram)} RAM" + (f" + {_gb(m.vram)} GPU" if m.vram else " (CPU only)")
                  + f", {format_ctx(p.ctx)} context")
    rows = p.rows()
    for r in rows:
        table.add_row(r.component, _size(r.nbytes), _WHERE[r.where], _size(r.read) if r.read else "-",
                      f"{r.seconds * 1e3:.1f}" if r.read else "-")
    table.add_section()
    table.add_row("total, with reserves", _size(sum(r.nbytes for r in rows)), "", _size(sum(r.read for r in rows)),
                  f"{p.seconds_per_token * 1e3:.1f}")
    ui.console.print(table)
    if m.vram:
        _line(f"GPU: {_size(p.used(GPU))} used of {_size(m.gpu_capacity)} ({_size(m.vram)} less "
              f"{_size(m.reserve(GPU))} for CUDA and compute buffers)")
    _line(f"RAM: {_size(p.used(RAM))} used of {_size(m.ram_capacity)} ({_size(m.ram)} less {_size(m.reserve(RAM))} "
          "for the OS and runtime)")
    _line(f"disk: {_size(p.paged)} of weights paged from disk" if p.paged else "disk: nothing paged from disk")
    ctx_line = f"context: {format_ctx(p.ctx)} tokens"
    if p.ctx_chosen:
        ctx_line += " (the largest that runs)" if p.ctx < p.args.max_position_embeddings else " (the model's maximum)"
    mem = (f"all weights stay in memory up to {format_ctx(p.max_ctx_in_memory)}" if p.max_ctx_in_memory
           else "no context keeps all weights in memory")
    _line(f"{ctx_line}; runs up to {format_ctx(p.max_ctx)}; {mem}")
    _line(f"KV cache: {p.kv_format}, {_size(p.kv_bytes)} at {format_ctx(p.ctx)} tokens, {_size(p.kv_read)} read per token")
    parts = ", ".join(f"{_WHERE[t]} {_size(p.read(t))} at {_rate(m.bandwidth(t))} ({m.source.get(_BW[t], 'given')})"
                      for t in TIERS if p.read(t))
    total = sum(p.read(t) for t in TIERS)
    _line(f"decode bound: {p.tokens_per_second:.1f} tokens/s, reading {_size(total)} per token: {parts}")
    _line("  (memory traffic only: published runs reach 25-55% of such bounds)")
    for note in p.notes:
        _line(note)


def register(app: typer.Typer) -> None:
    app.command()(plan)
