"""The prefix cache on disk: engine states keyed by the model and the exact token prefix that produced them.

Layout under `<V4_HOME>/prefix-cache/`:

    .lock                                    one writer / evicter at a time, across every model
    <fingerprint[:16]>/model.json            which model, KV format and device the folder is for (for `v4 cache ls`)
    <fingerprint[:16]>/<n:010d>-<h>.v4pc     one entry: the state after the n tokens whose hash is h

There is no separate index: each file name carries (length, prefix hash), so a lookup is one listdir plus one
pass of incremental hashing over the prompt, nothing can fall out of sync with the entries, and the rename that
publishes an entry is the only commit. Last use is the file's mtime (set on save, touched on hit); the size bound
covers the whole folder, all models together, and evicts the least recently used entries first.

Entry file: a fixed header (magic, version, fingerprint, kv format, n_tokens, payload length, sha256 over
header + tokens + payload), the tokens as little-endian u32, then `ModelCache.to_bytes()`, which is already in
the run's KV format. A corrupt, truncated or foreign entry is reported through `warnings` (PrefixCacheWarning)
and deleted, never loaded; so is one whose checksum holds but whose state the model's cache refuses to restore
(another state layout, garbage, wrong keys, shapes, dtypes or position): `lookup` restores through the caller's
`restore`, which checks everything before the live cache is touched, and the run falls back to a shorter entry
or prefills from scratch.
Names read from disk are used only when they are exactly what this module writes (ASCII digits, lowercase hex).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

import numpy as np

from quant import keys as K
from quant.errors import BadInput, NotFoundError, V4Warning
from v4cli.engine.options import RUN
from v4cli.store import _fsync_dir, atomic_open, atomic_write_json, default_root
from v4cli.units import parse_size

# 20 GB holds ~5 full 1M-token Flash states at fp8 KV (~3.6 GB each): the final state plus the last few
# boundaries, enough to re-ask after editing a late file. A fixed size (not a share of free disk) keeps eviction
# predictable from run to run; a save that would leave less than FREE_DISK_MARGIN free is skipped instead.
DEFAULT_CACHE_SIZE = "20G"
FREE_DISK_MARGIN = 1 << 30

MAGIC = b"V4PC"
VERSION = 1
SUFFIX = ".v4pc"
MODEL_JSON = "model.json"
# magic, version, reserved, fingerprint (hex, padded), kv format (padded), n_tokens, payload bytes, sha256
_HEADER = struct.Struct("<4sHH64s8sQQ32s")
# [0-9], not \d: \d also matches other scripts' digits, which int() would accept
_NAME = re.compile(r"([0-9]{10})-([0-9a-f]{32})" + re.escape(SUFFIX))
_FOLDER = re.compile(r"[0-9a-f]{16}")
_FINGERPRINT = re.compile(r"[0-9a-f]{16,64}")
_WRITE_CHUNK = 16 << 20
_SAMPLES = 64  # tensors whose first bytes go into the fingerprint
_SAMPLE_BYTES = 4096
T = TypeVar("T")


class PrefixCacheWarning(V4Warning):
    """An entry was skipped (corrupt, truncated, foreign) or a state was not saved (size, disk, lock)."""


def cache_root(root: Path | None = None) -> Path:
    """The prefix-cache folder: `root` if given, else `<V4_HOME>/prefix-cache`."""
    return Path(root) if root is not None else default_root() / "prefix-cache"


def parse_cache_size(text: str | int) -> int:
    """`--cache-size`: a size like `20G` (see units.parse_size); `0` or `off` disables the cache."""
    if isinstance(text, str) and text.strip().lower() in ("off", "none", "no"):
        return 0
    return parse_size(text)


def model_fingerprint(gguf, kv_format: str, device: str = RUN.device) -> str:
    """Identity of (model file, KV format, device) as 64 hex digits, computed without reading the weights.

    Hashes the GGUF header bytes as written (every metadata key and value, every tensor's name, type, shape and
    offset; of every part of a split set), the total size, and the first 4 KiB of up to 64 tensors spread over the
    file or set: a re-quantization or a different checkpoint with the same layout changes those bytes. A full-file
    hash would read 150+ GB at every start. The device is included because a state computed by other kernels would
    not continue like this run; the state layout because a state of another layout cannot be restored at all.
    """
    from v4cli.model.cache import STATE_LAYOUT  # here: listing and writing entries need no torch

    h = hashlib.sha256(b"v4 prefix cache\0")
    h.update(f"{gguf.size}\0{kv_format}\0{device}\0state layout {STATE_LAYOUT}\0".encode())
    # a split set: every part's header, samples spread over all parts (one file hashes as it always did)
    tensors = [(i, t) for i, part in enumerate(gguf.parts)
               for t in sorted(part.tensors.values(), key=lambda t: t.offset)]
    step = max(1, len(tensors) // _SAMPLES)
    samples = tensors[::step][:_SAMPLES]
    for i, part in enumerate(gguf.parts):
        with open(part.path, "rb") as f:
            h.update(f.read(part.data_offset))
            for t in (t for j, t in samples if j == i):
                f.seek(t.offset)
                h.update(f.read(min(t.nbytes, _SAMPLE_BYTES)))
    return h.hexdigest()


def _token_bytes(tokens: Sequence[int]) -> bytes:
    arr = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= 1 << 32):
        raise BadInput("token ids must be in [0, 2**32) to be cached")
    return arr.astype("<u4").tobytes()


def _prefix_key(token_bytes: bytes) -> str:
    return hashlib.blake2b(token_bytes, digest_size=16).hexdigest()


def prefix_keys(token_bytes: bytes, lengths: Sequence[int]) -> dict[int, str]:
    """`_prefix_key` of the first n tokens for every n in `lengths`, in one pass over the bytes (not O(n²))."""
    h = hashlib.blake2b(digest_size=16)
    out: dict[int, str] = {}
    done = 0
    for n in sorted(set(lengths)):
        h.update(memoryview(token_bytes)[4 * done: 4 * n])
        done = n
        out[n] = h.copy().hexdigest()
    return out


@dataclass(frozen=True)
class CacheEntry:
    """One saved state: its file, token count, size on disk and last use (unix seconds)."""

    path: Path
    n_tokens: int
    key: str
    size: int
    last_used: float

    @property
    def bytes_per_token(self) -> float:
        return self.size / max(self.n_tokens, 1)


@dataclass(frozen=True)
class CacheModel:
    """One model's folder: what model.json says about it and its entries (newest first)."""

    fingerprint: str
    path: Path
    info: dict
    entries: list[CacheEntry]

    @property
    def name(self) -> str:
        return self.info.get("name") or self.info.get("file") or self.fingerprint

    @property
    def size(self) -> int:
        return sum(e.size for e in self.entries)


def _scan(folder: Path) -> list[CacheEntry]:
    """The published entries of one model folder (temp files and strangers are not entries)."""
    out = []
    try:
        items = list(os.scandir(folder))
    except FileNotFoundError:
        return out
    for d in items:
        m = _NAME.fullmatch(d.name)
        if not m:
            continue
        try:
            # a symlink or a FIFO is no entry of ours: reading it could leave the folder or block
            if not d.is_file(follow_symlinks=False):
                continue
            st = d.stat()
        except FileNotFoundError:  # evicted by another process since the listdir
            continue
        out.append(CacheEntry(Path(d.path), int(m.group(1)), m.group(2), st.st_size, st.st_mtime_ns / 1e9))
    return out


def _read_info(folder: Path) -> dict:
    try:
        info = json.loads((folder / MODEL_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _model_dirs(top: Path) -> list[Path]:
    """The model folders under `top`: real directories named as PrefixCache names them (never a symlink, whose
    entries `clear` and eviction would otherwise delete wherever it points)."""
    try:
        items = list(os.scandir(top))
    except FileNotFoundError:
        return []
    return sorted(Path(d.path) for d in items if _FOLDER.fullmatch(d.name) and d.is_dir(follow_symlinks=False))


def list_models(root: Path | None = None) -> list[CacheModel]:
    """Every model folder under the prefix cache, with its entries (newest first), by name."""
    out = []
    for d in _model_dirs(cache_root(root)):
        entries = sorted(_scan(d), key=lambda e: (-e.last_used, e.path.name))
        out.append(CacheModel(d.name, d, _read_info(d), entries))
    return sorted(out, key=lambda m: (m.name, m.fingerprint))


def _lock(top: Path, timeout: float):
    from filelock import FileLock

    top.mkdir(parents=True, exist_ok=True)
    return FileLock(top / ".lock", timeout=timeout)


def _remove_orphans(folder: Path) -> None:
    # called with the lock held: every writer holds it while writing, so any temp file left is from a killed one
    for p in folder.glob(".*.tmp"):
        p.unlink(missing_ok=True)


def clear(root: Path | None = None, model: str | None = None, timeout: float = 30.0) -> tuple[int, int]:
    """Delete every entry (or only those of models whose fingerprint, name or file matches `model`).

    Returns (entries removed, bytes freed); NotFoundError if `model` matches no cached model."""
    top = cache_root(root)
    models = list_models(top)
    if model is not None:
        models = [m for m in models if _matches(m, model)]
        if not models:
            raise NotFoundError(f"no prefix-cache entries for {model!r}", hint="v4 cache ls shows the cached models")
    removed = freed = 0
    if not models:
        return 0, 0
    with _lock(top, timeout):
        for m in models:
            for e in _scan(m.path):
                e.path.unlink(missing_ok=True)
                removed, freed = removed + 1, freed + e.size
            _remove_orphans(m.path)
            shutil.rmtree(m.path)
    return removed, freed


def _matches(m: CacheModel, text: str) -> bool:
    if text.lower() == m.fingerprint or (len(text) >= 4 and m.fingerprint.startswith(text.lower())):
        return True
    file = m.info.get("file") or ""
    return text in (m.info.get("name"), file, Path(file).name, Path(file).stem)


class PrefixCache:
    """Disk store of engine states for one (model, KV format, device): implements Session's PrefixStore.

    `root` is the prefix-cache folder shared by all models (the size bound `max_bytes` is over all of it); this
    model's entries live in `root/<fingerprint[:16]>`. `max_bytes=0` disables saving.
    """

    def __init__(self, root: Path, fingerprint: str, max_bytes: int, *, kv_format: str = "",
                 info: dict | None = None, lock_timeout: float = 30.0):
        if not _FINGERPRINT.fullmatch(fingerprint):
            raise BadInput(f"prefix-cache fingerprint {fingerprint!r} must be 16 to 64 lowercase hex digits")
        self.top = Path(root)
        self.fingerprint, self.kv_format, self.max_bytes = fingerprint, kv_format, max_bytes
        self.folder = self.top / fingerprint[:16]
        self.info = {"fingerprint": fingerprint, "kv_format": kv_format, **(info or {})}
        self.lock_timeout = lock_timeout
        self._clock = 0  # last mtime we set, so entries saved within one clock tick still order correctly

    @classmethod
    def for_engine(cls, engine, max_bytes: int | None = None, root: Path | None = None) -> PrefixCache:
        """The cache for a loaded Engine (its GGUF file, KV format and device); default size DEFAULT_CACHE_SIZE."""
        gguf = engine.source
        if gguf is None:
            raise BadInput("the prefix cache needs a model loaded from a GGUF file")
        fp = model_fingerprint(gguf, engine.kv_format, engine.device.type)
        info = {"name": gguf.metadata.get(K.General.NAME) or Path(gguf.path).stem, "file": str(gguf.path),
                "device": engine.device.type}
        size = parse_cache_size(DEFAULT_CACHE_SIZE) if max_bytes is None else max_bytes
        return cls(cache_root(root), fp, size, kv_format=engine.kv_format, info=info)

    # --- reading ------------------------------------------------------------------------------------------------

    def entries(self) -> list[CacheEntry]:
        """This model's entries, newest first."""
        return sorted(_scan(self.folder), key=lambda e: (-e.last_used, e.path.name))

    def lookup(self, tokens: Sequence[int], longer_than: int = 0,
               restore: Callable[[bytes, int], T] | None = None) -> tuple[int, bytes | T] | None:
        """The longest saved prefix of `tokens` longer than `longer_than` tokens: (its length, the state bytes).

        With `restore(state bytes, n tokens)`, the second item is what it returns, and an entry it refuses with
        BadState is warned about, deleted and passed over for the next longest, as a corrupt file is."""
        cands = [e for e in _scan(self.folder) if longer_than < e.n_tokens <= len(tokens)]
        if not cands:
            return None
        if restore is not None:
            from v4cli.model.cache import BadState  # here: listing and writing entries need no torch
        tb = _token_bytes(tokens)
        keys = prefix_keys(tb, [e.n_tokens for e in cands])
        for e in sorted(cands, key=lambda e: -e.n_tokens):
            if keys[e.n_tokens] != e.key:
                continue
            got = self._read(e)
            # a token mismatch under an equal hash is a collision: a sound entry for another prompt, left alone
            if got is None or got[0] != tb[: 4 * e.n_tokens]:
                continue
            state: bytes | T = got[1]
            if restore is not None:
                try:
                    state = restore(got[1], e.n_tokens)
                except BadState as err:
                    self._reject(e.path, f"state not restorable: {err}")
                    continue
            self._touch(e.path)
            return e.n_tokens, state
        return None

    def _header(self, n: int, payload_len: int, digest: bytes = b"\0" * 32) -> bytes:
        return _HEADER.pack(MAGIC, VERSION, 0, self.fingerprint.encode(), self.kv_format.encode(), n, payload_len,
                            digest)

    def _read(self, e: CacheEntry) -> tuple[bytes, bytes] | None:
        """(token bytes, payload) of a sound entry; a bad one is warned about, deleted, and gives None."""
        try:
            with open(e.path, "rb") as f:
                problem, got = self._read_checked(f, e)
        except FileNotFoundError:  # evicted by another process meanwhile
            return None
        if problem is None:
            return got
        self._reject(e.path, problem)
        return None

    def _reject(self, path: Path, problem: str) -> None:
        """One warning line for a bad entry, which is deleted (a read-only cache keeps it: the run goes on)."""
        try:
            self._delete(path)
            done = "deleted"
        except OSError as e:
            done = f"could not delete it: {e.strerror or e}"
        warnings.warn(f"prefix cache: ignoring {path.name} ({problem}); {done}", PrefixCacheWarning, stacklevel=4)

    def _read_checked(self, f: BinaryIO, e: CacheEntry) -> tuple[str | None, tuple[bytes, bytes] | None]:
        head = f.read(_HEADER.size)
        if len(head) < _HEADER.size:
            return "truncated header", None
        magic, version, _, fp, kv, n, payload_len, digest = _HEADER.unpack(head)
        if magic != MAGIC:
            return "not a prefix-cache entry", None
        if version != VERSION:
            return f"format version {version}, this v4 writes {VERSION}", None
        if fp.rstrip(b"\0").decode(errors="replace") != self.fingerprint:
            return "saved for another model or KV format", None
        if kv.rstrip(b"\0").decode(errors="replace") != self.kv_format:
            return f"KV format {kv.rstrip(bytes(1)).decode(errors='replace')}, not {self.kv_format}", None
        if n != e.n_tokens:
            return f"holds {n} tokens, its name says {e.n_tokens}", None
        if e.size != _HEADER.size + 4 * n + payload_len:
            return f"{e.size} bytes, expected {_HEADER.size + 4 * n + payload_len}: truncated", None
        h = hashlib.sha256(self._header(n, payload_len))
        toks = f.read(4 * n)
        payload = f.read(payload_len)
        h.update(toks)
        h.update(payload)
        if len(toks) != 4 * n or len(payload) != payload_len:
            return "truncated while reading", None
        if h.digest() != digest:
            return "checksum mismatch", None
        return None, (toks, payload)

    # --- writing ------------------------------------------------------------------------------------------------

    def save(self, tokens: Sequence[int], state: bytes) -> None:
        """Keep `state` as the state after exactly `tokens`; skipped (with a warning) if it cannot fit."""
        n = len(tokens)
        if n == 0 or self.max_bytes <= 0:
            return
        tb = _token_bytes(tokens)
        path = self.folder / f"{n:010d}-{_prefix_key(tb)}{SUFFIX}"
        size = _HEADER.size + len(tb) + len(state)
        if size > self.max_bytes:
            warnings.warn(f"prefix cache: a {size:,}-byte state exceeds the cache size {self.max_bytes:,}; "
                          "not saved (raise --cache-size)", PrefixCacheWarning, stacklevel=2)
            return
        h = hashlib.sha256(self._header(n, len(state)))
        h.update(tb)
        h.update(state)
        from filelock import Timeout

        try:
            with _lock(self.top, self.lock_timeout):
                self.folder.mkdir(parents=True, exist_ok=True)
                _remove_orphans(self.folder)
                if path.exists():  # the same prefix again: keep the entry, just mark it used
                    self._touch(path)
                    return
                self._evict(size)
                free = shutil.disk_usage(self.folder).free
                if free < size + FREE_DISK_MARGIN:
                    warnings.warn(f"prefix cache: only {free:,} bytes free on disk; a {size:,}-byte state was not "
                                  "saved", PrefixCacheWarning, stacklevel=2)
                    return
                if not (self.folder / MODEL_JSON).exists():
                    atomic_write_json(self.folder / MODEL_JSON, self.info)
                with atomic_open(path) as f:
                    _write_all(f, (self._header(n, len(state), h.digest()), tb, state))
                self._touch(path)
        except Timeout:
            warnings.warn("prefix cache: another v4 process holds the cache lock; state not saved",
                          PrefixCacheWarning, stacklevel=2)
        except OSError as e:
            # a cache that cannot be written must not end the conversation: report it and go on
            warnings.warn(f"prefix cache: could not save a state ({e})", PrefixCacheWarning, stacklevel=2)

    def discard(self, tokens: Sequence[int]) -> None:
        """Delete the entry for exactly `tokens`, if there is one (a superseded automatic checkpoint)."""
        tb = _token_bytes(tokens)
        path = self.folder / f"{len(tokens):010d}-{_prefix_key(tb)}{SUFFIX}"
        try:
            with open(path, "rb") as f:
                f.seek(_HEADER.size)
                same = f.read(len(tb)) == tb
        except FileNotFoundError:
            return
        if same:
            self._delete(path)

    def _evict(self, need: int) -> None:
        """Delete least recently used entries (all models) until `need` more bytes fit in max_bytes."""
        everything = [e for d in _model_dirs(self.top) for e in _scan(d)]
        total = sum(e.size for e in everything)
        for e in sorted(everything, key=lambda e: (e.last_used, e.path.name)):
            if total + need <= self.max_bytes:
                break
            e.path.unlink(missing_ok=True)
            total -= e.size

    def _touch(self, path: Path) -> None:
        t = max(time.time_ns(), self._clock + 1)
        self._clock = t
        try:
            os.utime(path, ns=(t, t))
        except FileNotFoundError:
            pass

    def _delete(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        _fsync_dir(path.parent)


def _write_all(f: BinaryIO, parts: Sequence[bytes]) -> None:
    """Write `parts` in bounded chunks (one place that writes entry bytes; tests slow it down to kill mid-write)."""
    for part in parts:
        view = memoryview(part)
        for i in range(0, len(view), _WRITE_CHUNK):
            f.write(view[i: i + _WRITE_CHUNK])
