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


def byte_progress(transient: bool = False) -> Progress:
    """A bytes/speed/ETA progress bar on stderr (stdout stays clean for pipes)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=transient,
        disable=not sys.stderr.isatty(),
    )



def count_progress(transient: bool = False) -> Progress:
    """A done/total progress bar with ETA on stderr, for work counted in steps (chunks, tensors)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=transient,
        disable=not sys.stderr.isatty(),
    )
