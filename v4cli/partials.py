"""Unfinished outputs (`v4 quantize`, `v4 split`): how they are named, and which ones a dead writer left behind.

An output is written as `.NAME.PID@HOST.partial` beside NAME and renamed when complete. A killed writer leaves that
file (for Flash, ~150 GB) hidden from `ls`. A partial is *stale* only when its HOST is this machine and no process
PID is alive here: a PID means nothing on another machine that shares the folder (NFS), so those are never touched.
Files named by older versions (`.NAME.PID.partial`, no host) are reported but never removed for the same reason.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

SUFFIX = ".partial"
_NAMED = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)(?:@(?P<host>[A-Za-z0-9-]+))?\.partial$")


def this_host() -> str:
    """The host name as it appears in partial names (no dots, so a name parses back unambiguously)."""
    return re.sub(r"[^A-Za-z0-9-]+", "-", socket.gethostname()).strip("-") or "localhost"


def partial_path(out: Path) -> Path:
    """Where `out` is written until complete: same folder (so the rename is atomic), never a `.gguf` name."""
    out = Path(out)
    return out.with_name(f".{out.name}.{os.getpid()}@{this_host()}{SUFFIX}")


@dataclass(frozen=True)
class Partial:
    """One unfinished output found on disk."""

    path: Path
    target: str  # the file name it would have been renamed to
    pid: int
    host: str | None  # None: named by an older version, machine unknown
    size: int

    @property
    def stale(self) -> bool:
        """Its writer is gone for certain: written on this machine by a process that no longer exists."""
        return self.host == this_host() and not pid_alive(self.pid)


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists on this machine (one owned by another user counts as alive)."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:  # a PID larger than the OS allows: no such process
        return False
    return True


def find_partials(folder: Path) -> list[Partial]:
    """Every unfinished output in `folder` (not its subfolders), sorted by name; [] if the folder is missing."""
    out = []
    try:
        entries = sorted(Path(folder).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    for p in entries:
        m = _NAMED.match(p.name)
        if m is None or not p.is_file() or p.is_symlink():
            continue
        try:
            size = p.stat().st_size
        except FileNotFoundError:  # finished or removed by its writer meanwhile
            continue
        out.append(Partial(p, m["name"], int(m["pid"]), m["host"], size))
    return out


def remove_stale(folder: Path) -> list[Partial]:
    """Delete the stale partials in `folder` (see `Partial.stale`); → those removed. Live writers' files stay."""
    gone = []
    for p in find_partials(folder):
        if p.stale:
            try:
                p.path.unlink(missing_ok=True)
            except PermissionError:  # another user's, in a shared folder: not ours to delete; `v4 ls` still shows it
                continue
            gone.append(p)
    return gone
