"""Split a GGUF into llama.cpp's split set, byte for byte what its `gguf-split --split` writes.

Layout (tools/gguf-split/gguf-split.cpp, ggml/src/gguf.cpp): parts `PREFIX-00001-of-0000N.gguf`, each a complete
GGUF v3 with the tensors in the source's order. The first part carries every source key, then `split.no` (u16,
0-based), `split.tensors.count` (i32, tensors of the whole set), `split.count` (u16), in that order; later parts
carry only those three. Tensor offsets and data are padded to 32 bytes (`general.alignment` of the first part if
the source sets one). A new part starts after `max_tensors` tensors, or before a tensor that would take the part's
tensor bytes (each padded to 32) over `max_bytes`. Parts are written as `.partial` files and renamed, all of them,
only when every one is complete.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFValueType

from quant import keys as K
from quant.convert import _fsync_dir, disk_full_is_an_error
from quant.errors import BadInput, DiskSpaceError
from v4cli.gguf_file import _SCALAR_DTYPES, DEFAULT_ALIGNMENT, GGUFModel, TensorInfo, open_gguf
from v4cli.partials import partial_path
from v4cli.registry import split_path

DEFAULT_MAX_TENSORS = 128  # gguf-split's --split-max-tensors default
GGUF_VERSION = 3
_SPLIT_KEYS = (K.Split.NO, K.Split.COUNT, K.Split.TENSORS_COUNT)


def split_gguf(src: str | os.PathLike, out_prefix: str | os.PathLike, max_tensors: int | None = None,
               max_bytes: int | None = None) -> list[Path]:
    """Write `src` (a GGUF, or a split set to re-split) as the parts `out_prefix-0000K-of-0000N.gguf`; → their paths.

    At most `max_tensors` tensors (default 128) or `max_bytes` of tensor data per part, not both.
    """
    if max_tensors is not None and max_bytes is not None:
        raise BadInput("split by tensor count or by size, not both")
    if (max_tensors is not None and max_tensors < 1) or (max_bytes is not None and max_bytes < 1):
        raise BadInput("the limit per part must be positive")
    with open_gguf(src) as gf:
        groups = _plan(list(gf.tensors.values()), max_tensors or DEFAULT_MAX_TENSORS, max_bytes)
        paths = [split_path(out_prefix, i, len(groups)) for i in range(len(groups))]
        need = gf.size + (64 << 10) * len(groups)
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(paths[0].parent).free
        if free < need:
            raise DiskSpaceError(f"{paths[0].parent}: {need / 1e9:.2f} GB needed for the parts, "
                                 f"{free / 1e9:.2f} GB free", hint="free space or split to another disk")
        partials = [partial_path(p) for p in paths]
        try:
            with disk_full_is_an_error(paths[0]):
                for i, (tensors, tmp) in enumerate(zip(groups, partials)):
                    _write_part(gf, tmp, i, len(groups), tensors)
                for tmp, path in zip(partials, paths):
                    tmp.replace(path)
        finally:
            for tmp in partials:
                tmp.unlink(missing_ok=True)
    _fsync_dir(paths[0].parent)
    return paths


def _plan(tensors: list[TensorInfo], max_tensors: int, max_bytes: int | None) -> list[list[TensorInfo]]:
    groups: list[list[TensorInfo]] = [[]]
    size = 0
    for i, t in enumerate(tensors):
        padded = _pad(t.nbytes, DEFAULT_ALIGNMENT)
        new = size + padded > max_bytes if max_bytes is not None else i > 0 and i % max_tensors == 0
        if new:
            if not groups[-1]:
                raise BadInput(f"tensor {t.name} alone is {padded:,} bytes, over the {max_bytes:,}-byte limit per part",
                               hint="raise the limit per part")
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += padded
    return groups


def _write_part(gf: GGUFModel, path: Path, no: int, count: int, tensors: list[TensorInfo]) -> None:
    kv: list[tuple[str, Any, tuple[GGUFValueType, ...]]] = []
    if no == 0:
        kv += [(k, v, gf.types[k]) for k, v in gf.metadata.items() if k not in _SPLIT_KEYS]
    kv += [(K.Split.NO, no, (GGUFValueType.UINT16,)),
           (K.Split.TENSORS_COUNT, len(gf.tensors), (GGUFValueType.INT32,)),
           (K.Split.COUNT, count, (GGUFValueType.UINT16,))]
    align = gf.metadata.get(K.General.ALIGNMENT, DEFAULT_ALIGNMENT) if no == 0 else DEFAULT_ALIGNMENT
    head = [b"GGUF", struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(kv))]
    head += [_string(k) + struct.pack("<I", chain[0]) + _value(v, chain) for k, v, chain in kv]
    offset = 0
    for t in tensors:
        dims = _ggml_dims(t.shape)
        head.append(_string(t.name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, t.qtype, offset))
        offset += _pad(t.nbytes, align)
    header = b"".join(head)
    with open(path, "wb") as f:
        f.write(header + bytes(_pad(len(header), align) - len(header)))
        for t in tensors:
            f.write(memoryview(gf.raw(t.name).numpy()))
            f.write(bytes(_pad(t.nbytes, align) - t.nbytes))
        f.flush()
        os.fsync(f.fileno())


def _ggml_dims(shape: tuple[int, ...]) -> list[int]:
    """ggml order, trailing 1s dropped (ggml_n_dims, which gguf's writer uses), at least one dim."""
    dims = list(reversed(shape))
    while len(dims) > 1 and dims[-1] == 1:
        dims.pop()
    return dims


def _pad(n: int, align: int) -> int:
    return -(-n // align) * align


def _string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _value(value: Any, chain: tuple[GGUFValueType, ...]) -> bytes:
    """One value as GGUF stores it after its type tag; `chain` is the reader's type chain, e.g. (ARRAY, F32)."""
    vtype = chain[0]
    if vtype == GGUFValueType.STRING:
        return _string(value)
    if vtype == GGUFValueType.ARRAY:
        itype = chain[1]
        head = struct.pack("<IQ", itype, len(value))
        if itype in _SCALAR_DTYPES:
            return head + np.asarray(value, dtype=_SCALAR_DTYPES[itype]).tobytes()
        return head + b"".join(_value(v, chain[1:]) for v in value)
    return np.asarray(value, dtype=_SCALAR_DTYPES[vtype]).tobytes()

