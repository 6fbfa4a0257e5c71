"""`v4 pull`, `v4 ls`, `v4 rm`: fill, show and prune the model store."""

from __future__ import annotations

import typer

from v4cli import ui
from v4cli.hub import PullProgress, pull
from v4cli.store import Store, StoreEntry, format_bytes


def _line(text: str) -> None:
    # soft_wrap: paths and repo ids stay on one line whatever the terminal width (and tests can match lines)
    ui.console.print(text, soft_wrap=True, markup=False, highlight=False)


def pull_cmd(
    name: str = typer.Argument(..., help="flash, flash-base, flash-0731, pro, hf:OWNER/REPO[:PATTERN]"),
    token: str = typer.Option(None, "--token", help="Hugging Face token for gated repos (default: HF_TOKEN or login)."),
    offline: bool = typer.Option(
        False, "--offline", help="Download nothing; verify what is stored (also HF_HUB_OFFLINE=1)."
    ),
    verify: bool = typer.Option(
        False, "--verify", help="Re-hash files already present instead of trusting earlier checks."
    ),
    no_verify: bool = typer.Option(
        False, "--no-verify",
        help="Accept files the endpoint gives no hash for, checked by size only (recorded as unverified).",
    ),
    workers: int = typer.Option(4, "--workers", min=1, max=16, help="Files downloaded in parallel."),
) -> None:
    """Download a model into the store (resumable, verified)."""
    with ui.byte_progress() as progress:
        task = progress.add_task(f"{name}: listing files", total=None)

        def show(p: PullProgress) -> None:
            progress.update(
                task, completed=p.bytes_done, total=p.bytes_total,
                description=f"{name} {p.files_done}/{p.files_total} files",
            )

        result = pull(name, token=token, offline=True if offline else None, verify=verify,
                      no_verify=no_verify, max_workers=workers, on_progress=show)
    what = f"{result.files} files, {format_bytes(result.total_bytes)} from {result.repo_id}@{result.revision[:7]}"
    if result.offline:
        _line(f"{result.name} {'checked' if result.unverified else 'verified'} offline: {what}")
    elif result.up_to_date:
        _line(f"{result.name} is up to date: {what}")
    else:
        _line(f"pulled {result.name}: {what} ({format_bytes(result.downloaded_bytes)} downloaded)")
    if result.unverified:
        _line(f"unverified: {result.unverified} of {result.files} files had no hash and were checked by size only")
    _line(f"stored in {result.path}")


def _source(e: StoreEntry) -> str:
    if e.kind in ("gguf", "demo", "unfinished"):
        return str(e.path)
    return f"{e.repo_id}@{e.revision[:7]}" if e.repo_id and e.revision else "-"


def ls_cmd() -> None:
    """List stored models and GGUF files."""
    store = Store()
    entries = store.list()
    if not entries:
        _line(f"the store at {store.root} is empty (v4 pull flash adds a model)")
        return
    rows = [("NAME", "SIZE", "STATUS", "SOURCE")]
    for e in entries:
        status = e.kind if e.kind in ("gguf", "demo", "unfinished") else ("partial" if not e.complete else
                                                  "complete, unverified" if e.unverified else "complete")
        rows.append((e.name, format_bytes(e.size), status, _source(e)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        _line("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])


def rm_cmd(
    name: str = typer.Argument(..., help="A name from `v4 ls`."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Delete a stored model or GGUF file."""
    store = Store()
    entry = store.entry(name)
    if not yes:
        typer.confirm(f"remove {entry.name} ({format_bytes(entry.size)}, {entry.path})?", abort=True)
    gone = store.remove(name)
    _line(f"removed {gone.name} ({format_bytes(gone.size)})")


def register(app: typer.Typer) -> None:
    app.command("pull")(pull_cmd)
    app.command("ls")(ls_cmd)
    app.command("rm")(rm_cmd)
