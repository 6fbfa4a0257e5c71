"""`v4 bench`: prefill/decode speed of the torch and llama.cpp engines on one GGUF, against the roofline."""

from __future__ import annotations

from pathlib import Path

import typer

from v4cli import bench, ui
from v4cli.errors import BadInput


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise BadInput(f"{flag} takes comma-separated integers, got {text!r}") from None


def _csv(xs) -> str:
    return ",".join(str(x) for x in xs)


def _fmt(x, spec: str = ".2f") -> str:
    return "—" if x is None else format(x, spec)


def bench_cmd(
    model: Path = typer.Argument(..., help="A deepseek4 GGUF file."),
    engines: str = typer.Option(_csv(bench.DEFAULT_ENGINES), "--engines", help="Engines to compare, comma-separated."),
    threads: int = typer.Option(0, "--threads", min=0, help="CPU threads for every engine (0 = all cores)."),
    prefill: str = typer.Option(_csv(bench.DEFAULT_PREFILL), "--prefill", help="Prompt lengths to time prefill at."),
    contexts: str = typer.Option(_csv(bench.DEFAULT_CONTEXTS), "--contexts", help="Contexts to time decoding at."),
    decode_tokens: int = typer.Option(bench.DEFAULT_DECODE_TOKENS, "--decode-tokens", min=1,
                                      help="Tokens decoded per context."),
    repeats: int = typer.Option(bench.DEFAULT_REPEATS, "--repeats", min=1, help="Passes per engine (medians)."),
    kv_format: str = typer.Option("bf16", "--kv-format", help="KV storage: f32, bf16 or fp8."),
    device: str = typer.Option("cpu", "--device", help="torch device for the torch engine."),
    json_out: Path = typer.Option(None, "--json", help="Write all results to this JSON file."),
    plot_out: Path = typer.Option(None, "--plot", help="Decode tok/s vs context as a PNG (needs matplotlib)."),
) -> None:
    """Compare engines on MODEL: prefill and decode tok/s, time to first token, peak RSS, % of roofline."""
    spec = bench.BenchSpec(str(model), tuple(e.strip() for e in engines.split(",") if e.strip()), threads,
                           _ints(prefill, "--prefill"), _ints(contexts, "--contexts"), decode_tokens, repeats,
                           kv_format, device)
    with ui.err.status("benchmarking") as status:
        result = bench.run_bench(spec, progress=lambda msg: status.update(msg))
    render(result)
    if json_out is not None:
        from v4cli.store import atomic_write_json

        atomic_write_json(json_out, result)
        ui.console.print(f"results     {json_out}")
    if plot_out is not None:
        if bench.can_plot():
            bench.plot(result, plot_out)
            ui.console.print(f"plot        {plot_out}")
        else:
            ui.err.print("note: matplotlib is not installed; skipped --plot")


def render(result: dict) -> None:
    """The result dict as Rich tables."""
    from rich.table import Table

    from v4cli.store import format_bytes

    engines = list(result["engines"])
    bw, w = result["bandwidth"], result["weights"]
    read = f", {bw['read_gbs']:.1f} GB/s read" if "read_gbs" in bw else ""  # results saved before it was measured
    triads = [s["triad_gbs"] for s in bw.get("samples", [])]
    spread = f" (median of {len(triads)}: triad {min(triads):.1f}-{max(triads):.1f})" if len(triads) > 1 else ""
    ui.console.print(f"[bold]{result['model']}[/]  threads {result['threads']}  "
                     f"bandwidth {bw['triad_gbs']:.1f} GB/s triad, {bw['copy_gbs']:.1f} GB/s copy{read}{spread}  "
                     f"weights/token {format_bytes(w['bytes_per_token'])} "
                     f"(experts {format_bytes(w['experts_active'])})")
    t = Table(title="prefill")
    t.add_column("tokens", justify="right")
    for e in engines:
        t.add_column(f"{e} tok/s", justify="right")
        t.add_column(f"{e} TTFT s", justify="right")
    t.add_column("ratio", justify="right")
    for row in result["prefill"]:
        cells = [str(row["tokens"])]
        for e in engines:
            cells += [_fmt(row[e]["tps"]), _fmt(row[e]["ttft_s"])]
        t.add_row(*cells, _fmt(row["ratio"]))
    ui.console.print(t)
    t = Table(title="decode (ratio = torch / llama; Flash = extrapolated to 43 layers, 256 experts)")
    t.add_column("context", justify="right")
    t.add_column("bytes/tok", justify="right")
    t.add_column("bound tok/s", justify="right")
    for e in engines:
        t.add_column(f"{e} tok/s", justify="right")
        t.add_column(f"{e} % bound", justify="right")
        t.add_column(f"{e} Flash tok/s", justify="right")
    t.add_column("ratio", justify="right")
    for row in result["decode"]:
        cells = [str(row["context"]), format_bytes(row["bytes_per_token"]), _fmt(row["roofline_tps"])]
        for e in engines:
            cells += [_fmt(row[e]["tps"]), _fmt(row[e]["roofline_pct"], ".0f"), _fmt(row["flash"][e]["tps"])]
        t.add_row(*cells, _fmt(row["ratio"]))
    ui.console.print(t)
    for row in result["decode"]:
        paired = [f"{e} {row[e]['vs_ctx0']:.2f}" for e in engines if row[e].get("vs_ctx0")]
        if paired:
            ui.console.print(f"decode at {row['context']} ÷ decode at 0, measured back to back: {', '.join(paired)}")
    for e, info in result["engines"].items():
        gpu = f", GPU peak {format_bytes(info['gpu_peak_bytes'])}" if info.get("gpu_peak_bytes") else ""
        ui.console.print(f"{e:6s} peak RSS {format_bytes(info['peak_rss_bytes'])}, load {info['load_s']:.2f} s{gpu}")


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_cmd)
