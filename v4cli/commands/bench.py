"""`v4 bench`: prefill/decode speed of the torch and llama.cpp engines on one GGUF, against the roofline."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from v4cli import bench, ui
from v4cli.commands.options import DEVICE, KV, MODEL_POSITIONAL, model_option, pick_model
from quant.errors import BadInput, V4Error


def _ints(text: str | None, flag: str, default: tuple[int, ...]) -> tuple[int, ...]:
    if text is None:
        return default
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise BadInput(f"{flag} takes comma-separated integers, got {text!r}") from None


def _fmt(x, spec: str = ".2f") -> str:
    return "—" if x is None else format(x, spec)


def _csv(xs) -> str:
    return ",".join(str(x) for x in xs)


def _preset_help() -> str:
    q, f = bench.PRESETS["quick"], bench.PRESETS["full"]
    return (f"Sizes: --quick: prefill {_csv(q.prefill)}, contexts {_csv(q.contexts)}, {q.repeats} repeats (the tiny "
            f"demo model in about a minute); --full: prefill {_csv(f.prefill)}, contexts {_csv(f.contexts)}, "
            f"{f.repeats} repeats. --prefill, --contexts, --decode-tokens and --repeats override either.")


def bench_cmd(
    model_opt: str | None = model_option("A deepseek4 GGUF file."),
    model: str | None = MODEL_POSITIONAL,
    engines: str = typer.Option(None, "--engines", show_default=False, help="Engines to compare, comma-separated "
                                "(default: torch and llama, those that can run here)."),
    full: bool = typer.Option(False, "--full/--quick", help=_preset_help()),
    threads: int = typer.Option(0, "--threads", min=0, help="CPU threads for every engine (0 = all cores)."),
    prefill: str = typer.Option(None, "--prefill", show_default=False, help="Prompt lengths to time prefill at."),
    contexts: str = typer.Option(None, "--contexts", show_default=False, help="Contexts to time decoding at."),
    decode_tokens: int = typer.Option(None, "--decode-tokens", min=1, show_default=False,
                                      help="Tokens decoded per context."),
    repeats: int = typer.Option(None, "--repeats", min=1, show_default=False, help="Passes per engine."),
    kv_format: str = KV,
    device: str = DEVICE,
    json_out: Path = typer.Option(None, "--json", help="Write all results to this JSON file."),
    plot_out: Path = typer.Option(None, "--plot", help="Prefill and decode charts as a PNG (needs matplotlib: "
                                  "pip install 'v4[plot]')."),
) -> None:
    """Compare engines on MODEL: prefill and decode tok/s, time to first token, peak RSS, % of roofline."""
    from v4cli.store import find_gguf_model

    model = find_gguf_model(pick_model(model_opt, model, required="v4 bench -m MODEL.gguf"))
    if plot_out is not None:
        bench.require_matplotlib()
    preset = bench.PRESETS["full" if full else "quick"]
    requested = tuple(e.strip() for e in engines.split(",") if e.strip()) if engines is not None else None
    chosen, notes = bench.choose_engines(model, requested, device)
    for note in notes:
        ui.err.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
    if not chosen:
        raise BadInput("no engine to benchmark", hint="pass --engines torch")
    spec = bench.BenchSpec(str(model), chosen, threads, _ints(prefill, "--prefill", preset.prefill),
                           _ints(contexts, "--contexts", preset.contexts), decode_tokens or preset.decode_tokens,
                           repeats or preset.repeats, kv_format, device)
    with _Display() as show:
        result = bench.run_bench(spec, progress=show)
    render(result)
    ui.console.print(f"wall time   {result['elapsed_s']:.0f} s")
    if json_out is not None:
        from v4cli.store import atomic_write_json

        atomic_write_json(json_out, result)
        ui.console.print(f"results     {json_out}")
    if plot_out is not None:
        bench.plot(result, plot_out)
        ui.console.print(f"plot        {plot_out}")
    if result["failures"]:  # the results above are kept; the exit code still says the run was incomplete
        first = result["failures"][0]
        raise V4Error(first["message"] + " (the table shows the passes that finished)", hint=first["hint"])


class _Eta(ProgressColumn):
    """Seconds left, counted down between events (a long step would otherwise freeze it)."""

    def render(self, task) -> Text:
        end = task.fields.get("end")
        if end is None:
            return Text("ETA …", style="progress.remaining")
        left = max(end - time.monotonic(), 0)
        return Text(f"ETA {int(left) // 60}:{int(left) % 60:02d}", style="progress.remaining")


class _Display:
    """Progress on stderr: a live line on a terminal; otherwise one plain line per step (logs, pipes)."""

    def __enter__(self):
        self.live = sys.stderr.isatty()
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TimeElapsedColumn(), _Eta(),
                                 console=ui.err, transient=True, disable=not self.live)
        self.progress.__enter__()
        self.task = self.progress.add_task("benchmark", total=1.0, end=None)
        return self

    def __call__(self, event: bench.BenchProgress) -> None:
        label = f"repeat {event.repeat}/{event.repeats} · {event.engine or 'memory'} · {event.step}"
        if self.live:
            total = event.elapsed_s + (event.eta_s or 0.0)
            self.progress.update(self.task, description=label, completed=event.elapsed_s, total=total or 1.0,
                                 end=time.monotonic() + event.eta_s if event.eta_s is not None else None)
        else:
            ui.err.print(f"bench: {event}", markup=False, highlight=False, soft_wrap=True)

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)


def _print_table(table) -> None:
    """A table on stdout; into a pipe or file at its full width (80 columns would cut the numbers to "420.…")."""
    from rich.console import Console
    from rich.measure import Measurement

    out = ui.console
    if not out.is_terminal:  # Console.print never goes wider than its console: a wider one, same stream
        need = Measurement.get(out, out.options.update_width(1000), table).maximum
        out = Console(width=max(need, out.width), file=out.file, no_color=out.no_color)
    out.print(table)


def render(result: dict) -> None:
    """The result dict as Rich tables, with the notes that say how to read them."""
    from rich.table import Table

    from v4cli.store import format_bytes

    engines = [e for e in result["spec"]["engines"] if e in result["engines"]]  # JSON may have sorted the keys
    bw, w = result["bandwidth"], result["weights"]
    bounds = [s["bound_gbs"] for s in bw.get("samples", [])]
    spread = f", best of {len(bounds)}: {min(bounds):.1f}-{max(bounds):.1f}" if len(bounds) > 1 else ""
    ui.console.print(f"[bold]{result['model']}[/]  threads {result['threads']}  "
                     f"bandwidth bound {bw['bound_gbs']:.1f} GB/s (read {bw['read_gbs']:.1f}, "
                     f"copy {bw['copy_gbs']:.1f}, triad {bw['triad_gbs']:.1f}{spread})  "
                     f"weights/token {format_bytes(w['bytes_per_token'])} "
                     f"(experts {format_bytes(w['experts_active'])})", soft_wrap=True)
    t = Table(title="prefill (median of the passes)")
    t.add_column("tokens", justify="right")
    for e in engines:
        t.add_column(f"{e} tok/s", justify="right")
        t.add_column(f"{e} TTFT s", justify="right")
    if len(engines) > 1:
        t.add_column("torch ÷ llama", justify="right")
    for row in result["prefill"]:
        cells = [str(row["tokens"])]
        for e in engines:
            cells += [_fmt(row[e]["tps"]), _fmt(row[e]["ttft_s"])]
        t.add_row(*cells, *([_fmt(row["ratio"])] if len(engines) > 1 else []))
    _print_table(t)
    t = Table(title="decode (1 ÷ median per-token time; ÷ ctx 0 = this row ÷ the context-0 row)")
    t.add_column("context", justify="right")
    t.add_column("bytes/tok", justify="right")
    t.add_column("bound tok/s", justify="right")
    flash = result["flash_estimate"]
    for e in engines:
        t.add_column(f"{e} tok/s", justify="right")
        t.add_column("÷ ctx 0", justify="right")
        t.add_column("% bound", justify="right")
        if flash["shown"]:
            t.add_column("Flash est.*", justify="right")
    if len(engines) > 1:
        t.add_column("torch ÷ llama", justify="right")
    noisy = []
    for row in result["decode"]:
        cells = [str(row["context"]), format_bytes(row["bytes_per_token"]), _fmt(row["roofline_tps"])]
        for e in engines:
            mark = ""
            if row[e]["spread_pct"] > bench.NOISY_SPREAD_PCT:
                mark = "~"
                noisy.append(f"{e} at {row['context']} ({row[e]['spread_pct']:.0f} %)")
            cells += [mark + _fmt(row[e]["tps"]), _fmt(row[e]["vs_ctx0"]), _fmt(row[e]["roofline_pct"], ".0f")]
            if flash["shown"]:
                cells.append(_fmt(row["flash"][e]["tps"]))
        t.add_row(*cells, *([_fmt(row["ratio"])] if len(engines) > 1 else []))
    _print_table(t)
    say = lambda line: ui.console.print(line, highlight=False, soft_wrap=True)  # noqa: E731 - notes: one line each
    n = flash["layers"]
    ours, theirs = format_bytes(flash["layer_bytes_measured"]), format_bytes(flash["layer_bytes_flash"])
    if flash["shown"]:
        say(f"* Flash est. is an estimate, not a measurement: full Flash's decode tok/s ({n} layers, {theirs} of layer "
            f"weights per token) if each of its layers took this file's measured time per byte ({ours} of layers, "
            f"{flash['scale']:.1f}× less)")
    else:
        differ = ", ".join(flash["why_not"].split("; ")[:2])
        say(f"no Flash estimate: it scales this file's time per layer to Flash's {n} layers, which needs Flash-shaped "
            f"layers ({differ}, …)")
    if noisy:
        say(f"~ noisy: per-token times vary by more than {bench.NOISY_SPREAD_PCT:.0f} % (interquartile range) for "
            f"{', '.join(noisy)}: something else is using the CPU; rerun on an idle machine, or with --threads 1 "
            f"(with every core in use, one busy core stalls them all)")
    for e in engines:
        info = result["engines"][e]
        gpu = f", GPU peak {format_bytes(info['gpu_peak_bytes'])}" if info.get("gpu_peak_bytes") else ""
        passes = info.get("passes", result["spec"]["repeats"])
        ui.console.print(f"{e:6s} peak RSS {format_bytes(info['peak_rss_bytes'])}, load {info['load_s']:.2f} s, "
                         f"{passes} pass{'es' if passes != 1 else ''}{gpu}")


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_cmd)
