"""Terminal rendering shared by commands (Rich). Library code never imports this."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

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

from quant.errors import V4Error

console = Console(stderr=False)
err = Console(stderr=True)


def error_line(e: V4Error) -> str:
    """The one line an error becomes, at the error boundary and inside the chat loop alike."""
    return f"error: {e}" + (f" ({e.hint})" if e.hint else "")


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


@contextmanager
def working(message: str):
    """`message` on stderr while a slow one-time step runs (a spinner on a terminal, the plain line otherwise),
    then how long it took."""
    t0 = time.perf_counter()
    if err.is_terminal:
        with err.status(message):
            yield
    else:
        err.print(f"{message} ...", markup=False, highlight=False)
        yield
    err.print(f"{message}: done in {time.perf_counter() - t0:.1f} s", markup=False, highlight=False)
