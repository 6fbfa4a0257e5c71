"""Our own validating GGUF reader (little-endian v2/v3), built for files we did not write.

Layout (ggml/include/gguf.h, gguf-py): magic `GGUF`, u32 version, u64 tensor count, u64 KV count; KV pairs
(string key, u32 type, value; arrays are u32 item type + u64 count + items, nested arrays allowed); tensor infos
(string name, u32 n_dims, u64 dims in ggml order, u32 ggml type, u64 offset relative to the data section); the
data section starts at the next multiple of `general.alignment` (default 32) after the infos.

Every count and length is checked against the bytes left in the file before anything is allocated or looped
over, so a corrupted header fails with a GGUFError naming the file, the byte offset and the key or tensor.
Tensor bytes are never copied: `raw()` is a uint8 view of a read-only mmap.
"""

from __future__ import annotations

import itertools
import json
import math
import mmap
import os
import struct
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from quant import keys as K
from quant.ggml import TYPES as GGML_TYPES
from quant import names as N
from quant.config import FLASH_CONFIG, GGUF_REQUIRED_KEYS, ModelArgs
from quant.errors import GGUFError, UnsupportedModel
from v4cli.registry import find_gguf, parse_split_name, split_path

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME_BYTES = 63  # GGML_MAX_NAME is 64 including the NUL
MAX_STRING_BYTES = 1 << 30  # llama.cpp's GGUF_MAX_STRING_LENGTH
MAX_ARRAY_DEPTH = 8  # nesting deeper than this is corruption, not data
_HEADER_BYTES = 24  # magic + version + two u64 counts
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, a 1-byte key, type, a 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, 1-byte name, n_dims, one dim, type, offset
_INT64_MAX = (1 << 63) - 1

_HINT_DAMAGED = "the file is damaged or incomplete: download or convert it again"

# little-endian numpy dtypes of the scalar value types
_SCALAR_DTYPES: dict[GGUFValueType, np.dtype] = {
    GGUFValueType.UINT8: np.dtype("<u1"),
    GGUFValueType.INT8: np.dtype("<i1"),
    GGUFValueType.UINT16: np.dtype("<u2"),
    GGUFValueType.INT16: np.dtype("<i2"),
    GGUFValueType.UINT32: np.dtype("<u4"),
    GGUFValueType.INT32: np.dtype("<i4"),
    GGUFValueType.FLOAT32: np.dtype("<f4"),
    GGUFValueType.BOOL: np.dtype("<u1"),
    GGUFValueType.UINT64: np.dtype("<u8"),
    GGUFValueType.INT64: np.dtype("<i8"),
    GGUFValueType.FLOAT64: np.dtype("<f8"),
}
_INT_TYPES = frozenset(
    t for t in _SCALAR_DTYPES if t not in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64, GGUFValueType.BOOL)
)
_FLOAT_TYPES = frozenset((GGUFValueType.FLOAT32, GGUFValueType.FLOAT64))


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file. `shape` is in torch order (ggml dims reversed); `offset` is absolute in its file."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


class _Cursor:
    """Bounds-checked little-endian reads over the mapped file."""

    def __init__(self, buf: mmap.mmap, size: int, path: Path):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def error(self, what: str, at: int | None = None) -> GGUFError:
        return GGUFError(f"{self.path}: {what} (at byte {self.pos if at is None else at})", hint=_HINT_DAMAGED)

    @property
    def remaining(self) -> int:
        return self.size - self.pos

    def take(self, n: int, what: str) -> int:
        """Reserve `n` bytes for `what`; return their start."""
        if n > self.remaining:
            raise self.error(f"file ends inside {what}: need {n} bytes, {self.remaining} left")
        start = self.pos
        self.pos += n
        return start

    def u32(self, what: str) -> int:
        return struct.unpack_from("<I", self.buf, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack_from("<Q", self.buf, self.take(8, what))[0]

    def string(self, what: str) -> str:
        at = self.pos
        n = self.u64(f"the length of {what}")
        if n > MAX_STRING_BYTES or n > self.remaining:
            raise self.error(f"{what} claims {n} bytes but only {self.remaining} are left", at)
        start = self.take(n, what)
        try:
            return bytes(self.buf[start : start + n]).decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.error(f"{what} is not valid UTF-8 ({e.reason} at byte {e.start})", at) from None

    def value_type(self, what: str) -> GGUFValueType:
        at = self.pos
        raw = self.u32(f"the type of {what}")
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self.error(f"{what} has unknown value type {raw}", at) from None

    def value(self, vtype: GGUFValueType, what: str, depth: int = 0) -> tuple[Any, tuple[GGUFValueType, ...]]:
        """Read one value of `vtype`; return it and its type chain, e.g. (ARRAY, FLOAT32)."""
        if vtype == GGUFValueType.STRING:
            return self.string(what), (vtype,)
        if vtype == GGUFValueType.ARRAY:
            return self._array(what, depth)
        dt = _SCALAR_DTYPES[vtype]
        at = self.take(dt.itemsize, what)
        v = np.frombuffer(self.buf, dtype=dt, count=1, offset=at)[0].item()
        if vtype == GGUFValueType.BOOL:
            if v > 1:
                raise self.error(f"{what} is a bool stored as {v} (must be 0 or 1)", at)
            v = bool(v)
        return v, (vtype,)

    def _array(self, what: str, depth: int) -> tuple[list, tuple[GGUFValueType, ...]]:
        at = self.pos
        if depth >= MAX_ARRAY_DEPTH:
            raise self.error(f"{what} nests arrays deeper than {MAX_ARRAY_DEPTH} levels", at)
        itype = self.value_type(f"the items of {what}")
        count = self.u64(f"the length of {what}")
        # the smallest an item can be: a scalar's size, an empty string (8), an empty array (12)
        min_item = {GGUFValueType.STRING: 8, GGUFValueType.ARRAY: 12}.get(itype) or _SCALAR_DTYPES[itype].itemsize
        if count > self.remaining // min_item:
            raise self.error(f"{what} claims {count} items but only {self.remaining} bytes are left", at)
        if itype in _SCALAR_DTYPES:
            dt = _SCALAR_DTYPES[itype]
            start = self.take(count * dt.itemsize, what)
            items = np.frombuffer(self.buf, dtype=dt, count=count, offset=start).tolist()
            if itype == GGUFValueType.BOOL:
                if any(b > 1 for b in items):
                    raise self.error(f"{what} holds a bool that is not 0 or 1", start)
                items = [bool(b) for b in items]
            return items, (GGUFValueType.ARRAY, itype)
        items, chain = [], (GGUFValueType.ARRAY, itype)
        for i in range(count):
            v, sub = self.value(itype, f"{what}[{i}]", depth + 1)
            items.append(v)
            if i == 0:
                chain = (GGUFValueType.ARRAY, *sub)
        return items, chain


# `prefault` maps a file only up to this share of RAM
PREFAULT_MAX_RAM_FRACTION = 0.8
PREFAULT_SLICE = 256 << 20  # bytes per madvise call (a multiple of the page size)
_MADV_POPULATE_READ = 22  # Linux 5.14; Python's mmap module has no name for it before 3.13


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


class GGUFModel(ABC):
    """A GGUF model as the engine reads it: one file (`GGUFFile`) or llama.cpp's split set (`SplitGGUF`).

    `.path` the file or the set's first part; `.parts` its open files in order; `.metadata`/`.types` (a set's
    first part carries them); `.tensors` name → TensorInfo (offsets are within the tensor's own part);
    `.raw(name)` a zero-copy view; `.size` bytes of all parts. Open one with `open_gguf`; a context manager.
    """

    path: Path
    size: int
    version: int
    metadata: dict[str, Any]
    types: dict[str, tuple[GGUFValueType, ...]]
    tensors: dict[str, TensorInfo]

    @property
    @abstractmethod
    def parts(self) -> tuple[GGUFFile, ...]: ...

    @abstractmethod
    def raw(self, name: str) -> torch.Tensor: ...

    @abstractmethod
    def prefault(self, max_fraction_of_ram: float = PREFAULT_MAX_RAM_FRACTION) -> bool: ...

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def architecture(self) -> str | None:
        a = self.metadata.get(K.General.ARCHITECTURE)
        return a if isinstance(a, str) else None

    @cached_property
    def args(self) -> ModelArgs:
        """ModelArgs from the metadata; UnsupportedModel for other architectures, GGUFError for bad keys."""
        self._require_deepseek4()
        self._check_keys()
        return ModelArgs.from_gguf(self.metadata)

    def type_histogram(self) -> dict[GGMLQuantizationType, tuple[int, int]]:
        """ggml type → (tensor count, bytes), in ggml type id order."""
        hist: dict[GGMLQuantizationType, list[int]] = {}
        for t in self.tensors.values():
            h = hist.setdefault(t.qtype, [0, 0])
            h[0] += 1
            h[1] += t.nbytes
        return {q: (c, b) for q, (c, b) in sorted(hist.items())}

    # ---- deepseek4 validation ----
    def _require_deepseek4(self) -> None:
        if self.architecture != K.ARCH:
            raise UnsupportedModel(
                f"{self.path}: architecture is {self.architecture!r}, not {K.ARCH!r}",
                hint="v4 runs DeepSeek-V4 GGUFs only: convert one with v4 quantize",
            )

    def _check_keys(self) -> None:
        problems = []
        for key in GGUF_REQUIRED_KEYS:
            if key not in self.metadata:
                problems.append(f"missing key {key}")
        for key, want in _KEY_TYPES.items():
            if key not in self.metadata:
                continue
            got = self.types[key]
            if want[0] == GGUFValueType.ARRAY:
                item_ok = _INT_TYPES if key == K.Model.COMPRESS_RATIOS else (_INT_TYPES | _FLOAT_TYPES)
                if key in (K.Model.SWIGLU_CLAMP_EXP, K.Model.SWIGLU_CLAMP_SHEXP) and got[0] in _FLOAT_TYPES:
                    continue  # llama.cpp also accepts one value for all layers
                if got[0] != GGUFValueType.ARRAY or len(got) != 2 or got[1] not in item_ok:
                    problems.append(f"{key} must be an array of numbers, is {_type_name(got)}")
                elif not self.metadata[key]:
                    problems.append(f"{key} is empty")
            elif got != want:
                problems.append(f"{key} must be {_type_name(want)}, is {_type_name(got)}")
        problems += self._check_tokenizer_json()
        if not problems:
            problems += self._check_key_values()
        if problems:
            raise GGUFError(
                f"{self.path}: invalid {K.ARCH} metadata: " + "; ".join(problems[:6])
                + (f"; and {len(problems) - 6} more" if len(problems) > 6 else ""),
                hint="the file was written by an incompatible converter: convert it again with v4 quantize",
            )

    def _check_tokenizer_json(self) -> list[str]:
        """The verbatim tokenizer.json (ours and llama.cpp's converters write it) must be a string holding a JSON
        object, or the file would open and then fail deep inside the first prompt. Empty means absent (the
        tokenizer is then built from `tokenizer.ggml.*`)."""
        key = K.Tokenizer.HF_JSON
        if key not in self.metadata:
            return []
        if self.types[key] != (GGUFValueType.STRING,):
            return [f"{key} must be string, is {_type_name(self.types[key])}"]
        if not self.metadata[key]:
            return []
        try:
            value = json.loads(self.metadata[key])
        except ValueError as e:
            return [f"{key} is not valid JSON ({e})"]
        return [] if isinstance(value, dict) else [f"{key} holds a JSON {type(value).__name__}, not an object"]

    def _check_key_values(self) -> list[str]:
        md, M, problems = self.metadata, K.Model, []
        for key in _POSITIVE_KEYS:
            if key in md and md[key] <= 0:
                problems.append(f"{key} = {md[key]} must be positive")
        n_blocks, n_nextn = md[M.BLOCK_COUNT], md.get(M.NEXTN_PREDICT_LAYERS, 0)
        if n_nextn >= n_blocks:
            problems.append(f"{M.NEXTN_PREDICT_LAYERS} = {n_nextn} leaves no main layers of {n_blocks} blocks")
        ratios = md[M.COMPRESS_RATIOS]
        if len(ratios) < n_blocks:
            problems.append(f"{M.COMPRESS_RATIOS} has {len(ratios)} entries, need ≥ {n_blocks}")
        bad = sorted({r for r in ratios if r < 0 or 0 < r < 4})
        if bad:
            problems.append(f"{M.COMPRESS_RATIOS} holds invalid ratios {bad} (0 = window only, 4 = CSA, >4 = HCA)")
        if md.get(M.EXPERT_USED_COUNT, 0) > md.get(M.EXPERT_COUNT, 0):
            problems.append(f"{M.EXPERT_USED_COUNT} exceeds {M.EXPERT_COUNT}")
        h, d, g = md.get(M.HEAD_COUNT, 1), md.get(M.KEY_LENGTH, 1), md.get(M.OUTPUT_GROUP_COUNT, 1)
        if g > 0 and (h * d) % g:
            problems.append(f"{M.HEAD_COUNT}·{M.KEY_LENGTH} = {h * d} is not divisible by {M.OUTPUT_GROUP_COUNT} {g}")
        if md.get(M.ROPE_DIMS, 0) > d:
            problems.append(f"{M.ROPE_DIMS} exceeds {M.KEY_LENGTH}")
        gating = md.get(M.EXPERT_GATING_FUNC, K.GATING_SQRT_SOFTPLUS)
        if gating != K.GATING_SQRT_SOFTPLUS:
            problems.append(f"{M.EXPERT_GATING_FUNC} = {gating}, DeepSeek-V4 uses {K.GATING_SQRT_SOFTPLUS}")
        return problems

    def validate_deepseek4(self) -> ModelArgs:
        """Check keys and that every tensor the model needs exists with its shape and an allowed type.

        A file with `nextn_predict_layers` must hold the MTP block; a file holding only the MTP block (llama.cpp's
        separate draft file: no `blk.0.*`) is accepted without the trunk. Returns the ModelArgs.
        """
        args = self.args
        mtp = args.num_nextn_predict_layers > 0
        trunk = not (mtp and N.blk(0, "attn_norm.weight") not in self.tensors)
        expected = deepseek4_tensor_shapes(args, trunk=trunk, mtp=mtp)
        problems = []
        for name, shape in expected.items():
            t = self.tensors.get(name)
            if t is None:
                if not name.endswith(_OPTIONAL_MTP_SUFFIX):
                    problems.append(f"missing tensor {name}")
                continue
            if t.shape != shape:
                problems.append(f"tensor {name} has shape {list(t.shape)}, expected {list(shape)}")
            elif len(shape) == 1 and t.qtype != GGMLQuantizationType.F32:
                problems.append(f"1-D tensor {name} is {t.qtype.name}, must be F32")
            elif N.role_of_gguf(name) == N.TID2EID and t.qtype != GGMLQuantizationType.I32:
                problems.append(f"tensor {name} is {t.qtype.name}, must be I32")
            elif t.qtype not in GGML_TYPES:
                problems.append(f"tensor {name} is {t.qtype.name}, a ggml type v4 does not run "
                                f"(it runs {', '.join(q.name for q in GGML_TYPES)})")
        extra = sorted(set(self.tensors) - set(expected))
        problems += [f"unexpected tensor {name}" for name in extra]
        if problems:
            raise GGUFError(
                f"{self.path}: does not match its {K.ARCH} config ({len(problems)} problems): "
                + "; ".join(problems[:6]) + ("; …" if len(problems) > 6 else ""),
                hint="the file is incomplete or from an incompatible converter: convert it again with v4 quantize",
            )
        return args


class GGUFFile(GGUFModel):
    """A parsed, validated GGUF file over a read-only mmap. Use as a context manager or call `close()`.

    `.metadata` key → python value (arrays → lists); `.types` key → type chain; `.tensors` name → TensorInfo
    (file order); `.raw(name)` a zero-copy uint8 view; `.args` the ModelArgs of a `deepseek4` file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self.size = os.fstat(f.fileno()).st_size
                if self.size < _HEADER_BYTES:
                    raise GGUFError(
                        f"{self.path}: {self.size} bytes is too small to be a GGUF file (the header alone is 24)",
                        hint=_HINT_DAMAGED,
                    )
                self._mm: mmap.mmap | None = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise GGUFError(f"{self.path}: no such file",
                            hint="check the path, or list stored models with v4 ls") from None
        except IsADirectoryError:
            raise GGUFError(f"{self.path} is a folder, not a GGUF file") from None
        except PermissionError:
            raise GGUFError(f"{self.path}: permission denied", hint="check the file's permissions") from None
        except OSError as e:
            raise GGUFError(f"{self.path}: cannot map the file ({e.strerror or e})") from None
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    # ---- parsing ----
    def _parse(self) -> None:
        c = _Cursor(self._mm, self.size, self.path)
        if self._mm[:4] != MAGIC:
            raise GGUFError(
                f"{self.path}: not a GGUF file (starts with {bytes(self._mm[:4])!r}, expected b'GGUF')",
                hint="v4 reads GGUF files and checkpoint folders with config.json",
            )
        c.pos = 4
        version = c.u32("the version")
        if version not in SUPPORTED_VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            if version & 0xFFFF == 0 and swapped in (1, *SUPPORTED_VERSIONS):
                raise GGUFError(
                    f"{self.path}: big-endian GGUF (version {swapped} byte-swapped); v4 reads little-endian files only",
                    hint="convert it with gguf-py's gguf_convert_endian.py, or download the little-endian file",
                )
            if version == 1:
                raise GGUFError(f"{self.path}: GGUF v1 is obsolete", hint="convert the model again with a current tool")
            raise GGUFError(f"{self.path}: unsupported GGUF version {version} (v4 reads versions 2 and 3)")
        self.version = version
        n_tensors = c.u64("the tensor count")
        n_kv = c.u64("the metadata count")
        # bound both counts by the bytes that their smallest possible entries would need
        if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > c.remaining:
            raise c.error(f"header claims {n_kv} metadata entries and {n_tensors} tensors, more than the file holds", 8)

        self.metadata: dict[str, Any] = {}
        self.types: dict[str, tuple[GGUFValueType, ...]] = {}
        for i in range(n_kv):
            at = c.pos
            key = c.string(f"metadata key #{i}")
            if not key:
                raise c.error(f"metadata key #{i} is empty", at)
            if key in self.metadata:
                raise c.error(f"duplicate metadata key {key!r}", at)
            vtype = c.value_type(f"key {key!r}")
            self.metadata[key], self.types[key] = c.value(vtype, f"the value of {key!r}")

        self.alignment = DEFAULT_ALIGNMENT
        if K.General.ALIGNMENT in self.metadata:
            a = self.metadata[K.General.ALIGNMENT]
            if self.types[K.General.ALIGNMENT] != (GGUFValueType.UINT32,):
                raise GGUFError(f"{self.path}: {K.General.ALIGNMENT} must be a u32", hint=_HINT_DAMAGED)
            if a <= 0 or a & (a - 1):
                raise GGUFError(f"{self.path}: {K.General.ALIGNMENT} = {a} is not a power of two", hint=_HINT_DAMAGED)
            self.alignment = a

        infos: list[tuple[str, GGMLQuantizationType, tuple[int, ...], int, int]] = []
        seen: set[str] = set()
        for i in range(n_tensors):
            at = c.pos
            name = c.string(f"the name of tensor #{i}")
            if not name or len(name.encode()) > MAX_NAME_BYTES:
                raise c.error(f"tensor #{i} has a name of {len(name.encode())} bytes (must be 1..{MAX_NAME_BYTES})", at)
            if name in seen:
                raise c.error(f"duplicate tensor name {name!r}", at)
            seen.add(name)
            n_dims = c.u32(f"the rank of tensor {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise c.error(f"tensor {name!r} has {n_dims} dimensions (must be 1..{MAX_DIMS})", at)
            dims = [c.u64(f"the shape of tensor {name!r}") for _ in range(n_dims)]
            if any(d < 1 for d in dims) or math.prod(dims) > _INT64_MAX:
                raise c.error(f"tensor {name!r} has an invalid shape {dims} (ggml order)", at)
            raw_type = c.u32(f"the type of tensor {name!r}")
            try:
                qtype = GGMLQuantizationType(raw_type)
                block, type_size = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise c.error(f"tensor {name!r} has unknown ggml type id {raw_type}", at) from None
            if dims[0] % block:
                raise c.error(
                    f"tensor {name!r} ({qtype.name}) rows of {dims[0]} are not a multiple of the block size {block}", at
                )
            nbytes = math.prod(dims) // block * type_size
            rel = c.u64(f"the offset of tensor {name!r}")
            if rel % self.alignment:
                raise c.error(f"tensor {name!r} offset {rel} is not a multiple of the alignment {self.alignment}", at)
            infos.append((name, qtype, tuple(reversed(dims)), rel, nbytes))

        self.data_offset = -(-c.pos // self.alignment) * self.alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, qtype, shape, rel, nbytes in infos:
            start = self.data_offset + rel
            if start + nbytes > self.size:
                raise GGUFError(
                    f"{self.path}: tensor {name!r} data [{start}, {start + nbytes}) lies past the end of the file "
                    f"({self.size} bytes): the file is truncated",
                    hint=_HINT_DAMAGED,
                )
            self.tensors[name] = TensorInfo(name, qtype, shape, start, nbytes)
        spans = sorted(self.tensors.values(), key=lambda t: t.offset)
        for a, b in itertools.pairwise(spans):
            if b.offset < a.offset + a.nbytes:
                raise GGUFError(f"{self.path}: tensors {a.name!r} and {b.name!r} overlap", hint=_HINT_DAMAGED)

    # ---- access ----
    @property
    def parts(self) -> tuple[GGUFFile, ...]:
        return (self,)

    def raw(self, name: str) -> torch.Tensor:
        """The stored bytes of tensor `name` as a 1-D uint8 tensor viewing the mmap (no copy).

        The memory is read-only: clone before writing. The view keeps the mapping alive after `close()`.
        """
        if self._mm is None:
            raise GGUFError(f"{self.path}: file is closed")
        t = self.tensors.get(name)
        if t is None:
            raise GGUFError(f"{self.path}: no tensor named {name!r}")
        if t.nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        # a memoryview slice per tensor pins the mapping (mmap.close() then refuses) for as long as torch holds it
        view = memoryview(self._mm)[t.offset : t.offset + t.nbytes]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            return torch.frombuffer(view, dtype=torch.uint8)

    def prefault(self, max_fraction_of_ram: float = PREFAULT_MAX_RAM_FRACTION) -> bool:
        """Map every page of the file into this process now, as llama.cpp's MAP_POPULATE does; → whether it ran.

        Otherwise each first touch of a weight page costs a page fault (one per 4-64 KB), and a decode step
        first touches whole experts: measured ~20 % off the MoE's bandwidth over the first tokens. Reads the file
        if it is not cached yet. Skipped for a file larger than `max_fraction_of_ram` of RAM, whose pages could
        not all stay resident; a kernel without MADV_POPULATE_READ (< 5.14) gets a read-ahead hint instead.
        """
        if self._mm is None or self.size > max_fraction_of_ram * _ram_bytes():
            return False
        advice = getattr(mmap, "MADV_POPULATE_READ", _MADV_POPULATE_READ)
        # in slices: madvise holds the GIL, and a cold 100 GB file takes a minute, so a spinner must get turns
        for start in range(0, self.size, PREFAULT_SLICE):
            length = min(PREFAULT_SLICE, self.size - start)
            try:
                self._mm.madvise(advice, start, length)
            except (OSError, ValueError, AttributeError):
                try:
                    self._mm.madvise(mmap.MADV_WILLNEED)
                except (OSError, ValueError, AttributeError):
                    return False
                return True
        return True

    def close(self) -> None:
        """Release the mapping. Views from `raw()` that are still alive keep it mapped until they go."""
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                # tensors from raw() still view it: the mapping is freed when the last of them is collected
                pass

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, v{self.version}, {len(self.metadata)} keys, {len(self.tensors)} tensors)"


# ---- split sets -------------------------------------------------------------------------------------------------

_HINT_SAME_SET = "all parts must come from the same set: download the parts of one set again"


class SplitGGUF(GGUFModel):
    """llama.cpp's split set (gguf-split) read as one model: `parts[0]` holds the metadata, every part a slice of
    the tensors and the keys `split.no`, `split.count`, `split.tensors.count`. Made by `open_gguf`."""

    def __init__(self, parts: list[GGUFFile]):
        self._parts = tuple(parts)
        first = parts[0]
        self.path, self.version, self.metadata, self.types = first.path, first.version, first.metadata, first.types
        self.size = sum(p.size for p in parts)
        self.tensors: dict[str, TensorInfo] = {}
        self._home: dict[str, GGUFFile] = {}
        for part in parts:
            for name, info in part.tensors.items():
                if name in self._home:
                    raise GGUFError(f"{part.path}: tensor {name!r} is also in {self._home[name].path.name}",
                                    hint=_HINT_SAME_SET)
                self.tensors[name], self._home[name] = info, part
        want = _split_keys(first)[2]
        if len(self.tensors) != want:
            raise GGUFError(f"{first.path}: the {len(parts)} parts hold {len(self.tensors)} tensors, "
                            f"{K.Split.TENSORS_COUNT} says {want}", hint=_HINT_SAME_SET)

    @property
    def parts(self) -> tuple[GGUFFile, ...]:
        return self._parts

    def raw(self, name: str) -> torch.Tensor:
        """The stored bytes of tensor `name`, a zero-copy view of the mmap of the part that holds it."""
        part = self._home.get(name)
        if part is None:
            raise GGUFError(f"{self.path}: no tensor named {name!r} in its {len(self._parts)} parts")
        return part.raw(name)

    def prefault(self, max_fraction_of_ram: float = PREFAULT_MAX_RAM_FRACTION) -> bool:
        """`GGUFFile.prefault` over every part; skipped when the whole set exceeds the share of RAM."""
        if self.size > max_fraction_of_ram * _ram_bytes():
            return False
        return all([p.prefault(max_fraction_of_ram=math.inf) for p in self._parts])

    def close(self) -> None:
        for p in self._parts:
            p.close()

    def __repr__(self) -> str:
        return (f"SplitGGUF({str(self.path)!r}, {len(self._parts)} parts, v{self.version}, "
                f"{len(self.metadata)} keys, {len(self.tensors)} tensors)")


def _split_keys(gf: GGUFFile) -> tuple[int, int, int] | None:
    """(split.no, split.count, split.tensors.count) of a part, None for a file that is not one."""
    S = K.Split
    if S.COUNT not in gf.metadata:
        return None
    values = []
    for key in (S.NO, S.COUNT, S.TENSORS_COUNT):
        if key not in gf.metadata:
            raise GGUFError(f"{gf.path}: has {S.COUNT} but no {key}", hint=_HINT_DAMAGED)
        if gf.types[key] not in {(t,) for t in _INT_TYPES}:
            raise GGUFError(f"{gf.path}: {key} must be an integer, is {_type_name(gf.types[key])}", hint=_HINT_DAMAGED)
        values.append(gf.metadata[key])
    no, count, n_tensors = values
    if not 0 <= no < count or n_tensors < 0:
        raise GGUFError(f"{gf.path}: {S.NO} = {no}, {S.COUNT} = {count}, {S.TENSORS_COUNT} = {n_tensors} is impossible",
                        hint=_HINT_DAMAGED)
    return no, count, n_tensors


def open_gguf(path: str | os.PathLike) -> GGUFModel:
    """Open a GGUF model: a file as `GGUFFile` (exactly as before), a split set as `SplitGGUF` given any part or
    the folder that holds it (the parts are found by llama.cpp's naming, `NAME-00001-of-00003.gguf`)."""
    path = Path(path)
    if path.is_dir():
        path = find_gguf(path)
    gf = GGUFFile(path)
    try:
        keys = _split_keys(gf)
        if keys is None or keys[1] == 1:
            return gf
        no, count, n_tensors = keys
        named = parse_split_name(path)
        if named is None or named[1:] != (no, count):
            want = split_path(named[0] if named else path.with_suffix(""), no, count).name
            raise GGUFError(f"{path}: part {no + 1} of {count} of a split set must be named like {want}",
                            hint="rename the parts back to their published names, which is how the others are found")
    except BaseException:
        gf.close()
        raise
    parts: list[GGUFFile] = []
    try:
        for i in range(count):
            if i == no:
                part = gf
            else:
                part_path = split_path(named[0], i, count)
                if not part_path.is_file():
                    raise GGUFError(f"{part_path}: part {i + 1} of {count} of {path.name}'s set is missing",
                                    hint=f"download {part_path.name} again (v4 pull with a pattern that matches "
                                         f"every part, e.g. '*{named[0].name}-*-of-{count:05d}.gguf')")
                part = GGUFFile(part_path)
            parts.append(part)
            if part is gf:
                continue
            got = _split_keys(part)
            if got is None or got[:2] != (i, count) or got[2] != n_tensors:
                said = "no split keys" if got is None else (
                    f"part {got[0] + 1} of {got[1]} with {got[2]} tensors in all")
                raise GGUFError(f"{part.path}: should be part {i + 1} of {count} with {n_tensors} tensors in all, "
                                f"its header says {said}", hint=_HINT_SAME_SET)
        return SplitGGUF(parts)
    except BaseException:
        for p in parts if gf in parts else [*parts, gf]:
            p.close()
        raise


def _type_name(chain: Iterable[GGUFValueType]) -> str:
    return " of ".join(t.name.lower() for t in chain)


def _key_types() -> dict[str, tuple[GGUFValueType, ...]]:
    """Expected type of every deepseek4 key, from the one writer table (ModelArgs.gguf_kv)."""
    out = {}
    for key, _value, vtype in ModelArgs.from_config(FLASH_CONFIG).gguf_kv(with_mtp=True):
        out[key] = (vtype,)
    return out


_KEY_TYPES = _key_types()
_M = K.Model
# dimensions that shapes are built from: zero would make tensors empty or divide by zero
_POSITIVE_KEYS = (
    _M.CONTEXT_LENGTH, _M.EMBEDDING_LENGTH, _M.BLOCK_COUNT, _M.HEAD_COUNT, _M.HEAD_COUNT_KV, _M.KEY_LENGTH,
    _M.ROPE_DIMS, _M.Q_LORA_RANK, _M.SLIDING_WINDOW, _M.EXPERT_COUNT, _M.EXPERT_USED_COUNT, _M.EXPERT_FFN_LENGTH,
    _M.EXPERT_SHARED_COUNT, _M.INDEXER_HEAD_COUNT, _M.INDEXER_KEY_LENGTH, _M.INDEXER_TOP_K, _M.OUTPUT_GROUP_COUNT,
    _M.OUTPUT_LORA_RANK, _M.HC_COUNT, _M.HC_SINKHORN_ITERS, _M.VOCAB_SIZE,
)
# llama.cpp marks the MTP block's shared head norm optional
_OPTIONAL_MTP_SUFFIX = "." + N.MTP_ONLY["norm.weight"][0]


def deepseek4_tensor_shapes(args: ModelArgs, *, trunk: bool = True, mtp: bool = False) -> dict[str, tuple[int, ...]]:
    """GGUF name → torch-order shape of every tensor a `deepseek4` file holds, in file order.

    `trunk`: the main layers; `mtp`: the MTP block(s) after them (llama.cpp numbers them blk.{n_layers}…).
    """
    D, V, hc = args.hidden_size, args.vocab_size, args.hc_mult
    H, d, E, F = args.num_attention_heads, args.head_dim, args.n_routed_experts, args.moe_intermediate_size
    mix = (2 + hc) * hc  # pre (hc) + post (hc) + comb (hc·hc)
    out: dict[str, tuple[int, ...]] = {
        N.root("embed.weight"): (V, D),
        N.root("norm.weight"): (D,),
        N.root("head.weight"): (V, D),
        N.root("hc_head_fn"): (hc, hc * D),
        N.root("hc_head_base"): (hc,),
        N.root("hc_head_scale"): (1,),
    }
    n = args.num_hidden_layers
    layers = list(range(n)) if trunk else []
    if mtp:
        layers += range(n, n + args.num_nextn_predict_layers)
    for L in layers:

        def put(suffix: str, shape: tuple[int, ...], L: int = L) -> None:
            out[N.blk(L, suffix)] = shape

        put("attn_norm.weight", (D,))
        put("attn.attn_sink", (H,))
        put("attn.wq_a.weight", (args.q_lora_rank, D))
        put("attn.q_norm.weight", (args.q_lora_rank,))
        put("attn.wq_b.weight", (H * d, args.q_lora_rank))
        put("attn.wkv.weight", (args.num_key_value_heads * d, D))
        put("attn.kv_norm.weight", (d,))
        put("attn.wo_a.weight", (args.o_groups * args.o_lora_rank, H * d // args.o_groups))
        put("attn.wo_b.weight", (D, args.o_groups * args.o_lora_rank))
        for part in ("attn", "ffn"):
            put(f"hc_{part}_fn", (mix, hc * D))
            put(f"hc_{part}_base", (mix,))
            put(f"hc_{part}_scale", (3,))
        ratio = args.layer_ratio(L)
        if ratio:
            coff = 2 if args.is_csa(L) else 1  # CSA windows overlap: projections are twice as wide
            put("attn.compressor.wkv.weight", (coff * d, D))
            put("attn.compressor.wgate.weight", (coff * d, D))
            put("attn.compressor.ape", (ratio, coff * d))
            put("attn.compressor.norm.weight", (d,))
            if args.is_csa(L):
                di = args.index_head_dim
                put("attn.indexer.wq_b.weight", (args.index_n_heads * di, args.q_lora_rank))
                put("attn.indexer.weights_proj.weight", (args.index_n_heads, D))
                put("attn.indexer.compressor.wkv.weight", (2 * di, D))
                put("attn.indexer.compressor.wgate.weight", (2 * di, D))
                put("attn.indexer.compressor.ape", (ratio, 2 * di))
                put("attn.indexer.compressor.norm.weight", (di,))
        put("ffn_norm.weight", (D,))
        put("ffn.gate.weight", (E, D))
        if args.is_hash(L):
            put("ffn.gate.tid2eid", (V, args.num_experts_per_tok))
        else:
            put("ffn.gate.bias", (E,))
        out[N.experts(L, "w1")] = (E, F, D)
        out[N.experts(L, "w3")] = (E, F, D)
        out[N.experts(L, "w2")] = (E, D, F)
        Fs = F * args.n_shared_experts
        put("ffn.shared_experts.w1.weight", (Fs, D))
        put("ffn.shared_experts.w3.weight", (Fs, D))
        put("ffn.shared_experts.w2.weight", (D, Fs))
        if L >= n:
            out[f"blk.{L}.{N.MTP_EH_PROJ}"] = (D, 2 * D)
            for key in ("enorm.weight", "hnorm.weight", "norm.weight"):
                out[f"blk.{L}.{N.MTP_ONLY[key][0]}"] = (D,)
    return out
