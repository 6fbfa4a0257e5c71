"""Precision of `v4 ask`'s secret rules on trees that hold no real credentials, and the content scan's speed.

Usage: python benchmarks/secret_scan_precision.py [repo|stdlib|site ...] [--list 50]
Corpora: `repo` is this repository's tracked files, `stdlib` the Python standard library (without its
site-packages), `site` the installed site-packages. Every flagged file there is a false positive unless it
really holds a key (test keys shipped inside packages do: the list shows them to judge by eye).
Prints per corpus: files scanned, text MB, files flagged by name (and how many of those the content
scan confirms) and by content, the flagged list
(path, rule, line) and the content scan's MB/s (decode and I/O excluded).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sysconfig
import time
from pathlib import Path

from v4cli.ingest import SNIFF_BYTES, decode_text
from v4cli.secrets import scan_text, secret_name

REPO = Path(__file__).resolve().parent.parent


def corpus_files(which: str) -> tuple[Path, list[str]]:
    """(root, file paths relative to it) for one corpus."""
    if which == "repo":
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
        return REPO, [p for p in out.decode().split("\0") if p]
    root = Path(sysconfig.get_paths()["stdlib" if which == "stdlib" else "purelib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        if which == "stdlib":
            dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages")]
        rel = os.path.relpath(dirpath, root)
        files += [f if rel == "." else f"{rel}/{f}" for f in filenames]
    return root, sorted(files)


def read_text(path: Path) -> str | None:
    """The file's text as ingestion decodes it, or None for binaries (sniffed before reading them whole)."""
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
            if b"\0" in head:
                return None
            data = head + f.read()
    except OSError:
        return None
    return decode_text(data)


def run(which: str, n_list: int) -> None:
    root, files = corpus_files(which)
    scanned = n_bytes = 0
    seconds = 0.0
    flagged: list[tuple[str, str, int]] = []
    by_name = by_name_confirmed = by_content = 0
    for rel in files:
        full = root / rel
        if not full.is_file() or full.is_symlink():
            continue
        text = read_text(full)
        if (why := secret_name(rel)) is not None:
            # Ingestion never reads these; here the content says whether the name was right.
            confirmed = text is not None and bool(scan_text(text))
            by_name += 1
            by_name_confirmed += confirmed
            flagged.append((rel, f"name: {why}" + ("; content has a key" if confirmed else ""), 0))
            continue
        if text is None:
            continue
        scanned += 1
        n_bytes += len(text.encode("utf-8", "surrogatepass"))
        t = time.perf_counter()
        found = scan_text(text)
        seconds += time.perf_counter() - t
        by_content += bool(found)
        flagged += [(rel, f.rule, f.line) for f in found]
    mb = n_bytes / 1e6
    print(f"== {which}: {root}")
    print(f"files {len(files)}  text files scanned {scanned}  text {mb:.1f} MB  flagged by name {by_name} "
          f"({by_name_confirmed} hold a key)  by content {by_content}  scan {mb / max(seconds, 1e-9):.1f} MB/s")
    for rel, rule, line in flagged[:n_list]:
        print(f"  {rel}:{line}  {rule}")
    if len(flagged) > n_list:
        print(f"  ... {len(flagged) - n_list} more")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpora", nargs="*", choices=["repo", "stdlib", "site"], default=["repo", "stdlib", "site"])
    ap.add_argument("--list", type=int, default=200, help="flagged entries to print per corpus")
    args = ap.parse_args()
    for which in args.corpora:
        run(which, args.list)


if __name__ == "__main__":
    main()
