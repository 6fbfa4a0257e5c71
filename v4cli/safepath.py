"""The one rule for names that come from outside: Hub listings, checkpoint index files, cache file names.

Such a name is a relative POSIX path of plain segments. Anything else (`..`, an absolute or drive path, a
backslash, an empty or `.` segment, a NUL or other control character) is refused before it touches the disk,
and the destination is checked again after symlinks are resolved, so a name can never write, read or delete
outside its root. huggingface_hub applies the same rule to its own downloads; our resumable path must too.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from quant.errors import BadInput

_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HEX = re.compile(r"[0-9a-f]+")


class UnsafePath(BadInput):
    """A name from outside would leave its root (or is not a plain relative path)."""


def safe_relpath(name: object, what: str = "file name") -> str:
    """`name` as a checked relative POSIX path, or UnsafePath naming `what` it was (e.g. "Hub file name")."""
    if not isinstance(name, str) or not name:
        raise UnsafePath(f"{what} {name!r} is not a non-empty string")
    why = None
    if _CONTROL.search(name):
        why = "holds a control character"
    elif "\\" in name:
        why = "holds a backslash"
    elif name.startswith("/") or _DRIVE.match(name):
        why = "is an absolute path"
    elif any(seg in ("", ".", "..") for seg in name.split("/")):
        why = "has an empty, '.' or '..' segment"
    if why:
        raise UnsafePath(f"{what} {name!r} {why}; refusing it", hint="the source is corrupt or hostile: check the URL")
    return str(PurePosixPath(name))


def inside(root: str | Path, name: object, what: str = "file name") -> Path:
    """`root / name` after `safe_relpath`, refused if its resolved real path (symlinks followed) leaves `root`."""
    rel = safe_relpath(name, what)
    root = Path(root)
    dest = root / rel
    real_root = root.resolve()
    if not dest.resolve().is_relative_to(real_root):
        raise UnsafePath(f"{what} {name!r} resolves outside {root}; refusing it",
                         hint="a symlink inside the folder points out of it: remove it")
    return dest


def hex_digest(value: object, length: int | None = None, what: str = "digest") -> str:
    """A lowercase hex digest (of `length` characters when given), or UnsafePath: digests name files too."""
    if isinstance(value, str):
        low = value.lower()
        if _HEX.fullmatch(low) and (length is None or len(low) == length):
            return low
    want = f"{length} hex characters" if length else "hex characters"
    raise UnsafePath(f"{what} {value!r} is not {want}", hint="the source is corrupt or hostile: check the URL")
