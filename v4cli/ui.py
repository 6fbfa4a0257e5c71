"""Terminal rendering shared by commands (Rich). Library code never imports this."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

console = Console(stderr=False)
err = Console(stderr=True)


def _progress(columns: tuple, transient: bool) -> Progress:
    """A progress bar on stderr (stdout stays clean for pipes), shown only on a terminal."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), *columns, TimeRemainingColumn(),
                    console=err, transient=transient, disable=not sys.stderr.isatty())


def byte_progress(transient: bool = False) -> Progress:
    """Bytes, speed and ETA: downloads, conversions."""
    return _progress((DownloadColumn(), TransferSpeedColumn()), transient)


def count_progress(transient: bool = False) -> Progress:
    """Done/total steps and ETA, for work counted in steps (chunks, tensors)."""
    return _progress((MofNCompleteColumn(),), transient)
