"""Lines of code per folder: v4cli/ and each of its subpackages, quant/, kernels/, tests/, benchmarks/.

For each folder: files, total lines, and code lines (non-blank, not a comment: `#` lines in Python, `//` and
`/* ... */` lines in the C++ kernels; docstrings count as code). Python and C++ sources are counted; data files
are not. Reads the working tree (tracked and untracked files git does not ignore) or, with --rev, a git revision
through `git ls-tree` / `git cat-file` without checking anything out. --base REV prints before and after.

    python benchmarks/code_stats.py                      # the working tree
    python benchmarks/code_stats.py --rev HEAD           # a revision
    python benchmarks/code_stats.py --base 606b5f2       # that revision → the working tree (or --rev)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parent.parent
TOPS = ("v4cli", "quant", "kernels", "tests", "benchmarks")
SPLIT = "v4cli"  # the folder whose subpackages get a row each
PY = (".py",)
CPP = (".cpp", ".cc", ".c", ".h", ".hpp")


@dataclass
class Count:
    files: int = 0
    lines: int = 0
    code: int = 0

    def add(self, other: Count) -> None:
        self.files += other.files
        self.lines += other.lines
        self.code += other.code


def count_text(text: str, suffix: str) -> Count:
    """Total and code lines of one source file."""
    lines = text.splitlines()
    code = 0
    in_block = False  # inside a C /* ... */ comment
    for raw in lines:
        s = raw.strip()
        if suffix in PY:
            code += bool(s) and not s.startswith("#")
            continue
        if in_block:
            if "*/" in s:
                in_block = False
                code += bool(s.split("*/", 1)[1].strip())
            continue
        if s.startswith("/*"):
            rest = s[2:]
            if "*/" in rest:
                code += bool(rest.split("*/", 1)[1].strip())
            else:
                in_block = True
            continue
        code += bool(s) and not s.startswith("//")
    return Count(1, len(lines), code)


def _git(*args: str, data: bytes | None = None) -> bytes:
    return subprocess.run(["git", "-C", str(ROOT), *args], input=data, capture_output=True, check=True).stdout


def _wanted(path: str) -> bool:
    p = PurePosixPath(path)
    return bool(p.parts) and p.parts[0] in TOPS and p.suffix in PY + CPP


def worktree_files() -> dict[str, bytes]:
    """path → content of every source file in the working tree that git tracks or does not ignore."""
    names = _git("ls-files", "-z", "--cached", "--others", "--exclude-standard").decode().split("\0")
    out = {}
    for name in sorted({n for n in names if n and _wanted(n)}):
        path = ROOT / name
        if path.is_file():  # a tracked file deleted in the working tree is gone
            out[name] = path.read_bytes()
    return out


def revision_files(rev: str) -> dict[str, bytes]:
    """path → content of every source file at `rev`, read from git's objects (one `cat-file --batch`)."""
    names = [n for n in _git("ls-tree", "-r", "-z", "--name-only", rev, "--", *TOPS).decode().split("\0")
             if n and _wanted(n)]
    if not names:
        return {}
    blob = _git("cat-file", "--batch", data="".join(f"{rev}:{n}\n" for n in names).encode())
    out, pos = {}, 0
    for name in names:
        header_end = blob.index(b"\n", pos)
        size = int(blob[pos:header_end].split()[2])
        out[name] = blob[header_end + 1: header_end + 1 + size]
        pos = header_end + 1 + size + 1  # content, then one newline
    return out


def folder_of(path: str) -> str:
    """The row a file counts in: `v4cli/<sub>/` for a subpackage, `v4cli/*.py` for its top-level modules,
    else the top folder."""
    parts = PurePosixPath(path).parts
    if parts[0] == SPLIT:
        return f"{SPLIT}/{parts[1]}/" if len(parts) > 2 else f"{SPLIT}/*.py"
    return f"{parts[0]}/"


def stats(files: dict[str, bytes]) -> dict[str, Count]:
    """Row → count, with a `v4cli/` row summing its subpackages and a `total` row."""
    rows: dict[str, Count] = {}
    for path, content in files.items():
        c = count_text(content.decode("utf-8", errors="replace"), PurePosixPath(path).suffix)
        rows.setdefault(folder_of(path), Count()).add(c)
        if path.startswith(SPLIT + "/"):
            rows.setdefault(f"{SPLIT}/", Count()).add(c)
        rows.setdefault("total", Count()).add(c)
    return rows


def order(rows: set[str]) -> list[str]:
    def key(r: str) -> tuple:
        if r == "total":
            return (len(TOPS) + 1, "")
        top = r.split("/")[0]
        return (TOPS.index(top), r != f"{top}/", r != f"{SPLIT}/*.py", r)

    return sorted(rows, key=key)


def _label(r: str) -> str:
    """Rows inside v4cli/ are indented under its sum."""
    return "  " + r if r.startswith(SPLIT + "/") and r != f"{SPLIT}/" else r


def table(rows: dict[str, Count], title: str) -> str:
    out = [title, f"{'folder':<22}{'files':>7}{'lines':>9}{'code':>9}"]
    for r in order(set(rows)):
        c = rows[r]
        out.append(f"{_label(r):<22}{c.files:>7}{c.lines:>9}{c.code:>9}")
    return "\n".join(out)


def compare(before: dict[str, Count], after: dict[str, Count], b_name: str, a_name: str) -> str:
    def cell(c: Count | None) -> str:
        return f"{c.files:>6}{c.lines:>8}{c.code:>8}" if c else f"{'—':>6}{'—':>8}{'—':>8}"

    width = 22
    out = [f"{'':<{width}}{b_name[:22]:>22} │{a_name[:22]:>22} │ {'change':>16}",
           f"{'folder':<{width}}{'files':>6}{'lines':>8}{'code':>8} │{'files':>6}{'lines':>8}{'code':>8} │"
           f"{'lines':>8}{'code':>8}"]
    for r in order(set(before) | set(after)):
        b, a = before.get(r), after.get(r)
        dl = (a.lines if a else 0) - (b.lines if b else 0)
        dc = (a.code if a else 0) - (b.code if b else 0)
        out.append(f"{_label(r):<{width}}{cell(b)} │{cell(a)} │{dl:>+8}{dc:>+8}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", help="count this git revision instead of the working tree")
    ap.add_argument("--base", help="also count this revision and print before → after")
    args = ap.parse_args(argv)
    try:
        after = revision_files(args.rev) if args.rev else worktree_files()
        before = revision_files(args.base) if args.base else None
    except subprocess.CalledProcessError as e:
        print(f"error: git {' '.join(e.cmd[3:])}: {e.stderr.decode().strip()}", file=sys.stderr)
        return 2
    a_name = args.rev or "working tree"
    if before is None:
        print(table(stats(after), f"lines of code, {a_name}"))
    else:
        print(compare(stats(before), stats(after), args.base, a_name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
