"""`v4 cache ls`, `v4 cache clear`: show and empty the on-disk prefix cache."""

from __future__ import annotations

import time

import typer

from v4cli import ui
from v4cli.engine.prefix_cache import DEFAULT_CACHE_SIZE, cache_root, clear, list_models, parse_cache_size
from v4cli.store import format_bytes

cache_app = typer.Typer(help="Show or empty the prefix cache (saved engine states of earlier prompts).",
                        no_args_is_help=True)


def _line(text: str) -> None:
    ui.console.print(text, soft_wrap=True, markup=False, highlight=False)


def _ago(t: float) -> str:
    s = max(0, time.time() - t)
    for unit, secs in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= secs:
            return f"{s / secs:.0f}{unit} ago"
    return "just now"


@cache_app.command("ls")
def ls_cmd(
    cache_size: str = typer.Option(DEFAULT_CACHE_SIZE, "--cache-size",
                                   help="The limit to compare the total with (what chat/ask use)."),
) -> None:
    """List cached states per model: tokens, bytes, bytes per token, last use; total vs the limit."""
    limit = parse_cache_size(cache_size)
    models = list_models()
    total = sum(m.size for m in models)
    if not any(m.entries for m in models):
        _line(f"the prefix cache at {cache_root()} is empty (limit {format_bytes(limit)})")
        return
    for m in models:
        if not m.entries:
            continue
        kv = m.info.get("kv_format", "?")
        _line(f"{m.name}  kv {kv}  {m.info.get('device', '?')}  [{m.fingerprint}]  "
              f"{len(m.entries)} entr{'y' if len(m.entries) == 1 else 'ies'}, {format_bytes(m.size)}")
        rows = [("TOKENS", "SIZE", "BYTES/TOKEN", "LAST USED")]
        rows += [(f"{e.n_tokens:,}", format_bytes(e.size), f"{e.bytes_per_token:,.0f}", _ago(e.last_used))
                 for e in m.entries]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for r in rows:
            _line("  " + "  ".join(c.rjust(w) if i < 3 else c for i, (c, w) in enumerate(zip(r, widths))))
    _line(f"total {format_bytes(total)} of {format_bytes(limit)} limit in {cache_root()}")


@cache_app.command("clear")
def clear_cmd(
    model: str = typer.Option(None, "--model", "-m",
                              help="Only this model: its name, GGUF file or fingerprint from `v4 cache ls`."),
) -> None:
    """Delete cached states (all, or one model's)."""
    n, freed = clear(model=model)
    what = f" of {model}" if model else ""
    _line(f"removed {n} cached state{'s' if n != 1 else ''}{what} ({format_bytes(freed)})")


def register(app: typer.Typer) -> None:
    app.add_typer(cache_app, name="cache")
