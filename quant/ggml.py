"""The ggml tensor types this project reads or writes, as data.

Block sizes and bytes per block come from gguf-py's one table (`GGML_QUANT_SIZES`); nothing is retyped here.
Shapes are in torch order: the last dimension is ggml's ne0, the row that blocks run along.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from v4cli.errors import BadInput, UnsupportedModel

QType = GGMLQuantizationType

# The types the converter writes or the engine reads (DeepSeek-V4 official checkpoint and community quants).
SUPPORTED: tuple[QType, ...] = (
    QType.F32,
    QType.F16,
    QType.BF16,
    QType.I32,
    QType.Q8_0,
    QType.Q4_K,
    QType.Q5_K,
    QType.Q6_K,
    QType.Q3_K,
    QType.Q2_K,
    QType.MXFP4,
    QType.IQ2_XXS,
    QType.IQ3_XXS,
    QType.IQ4_XS,
)


@dataclass(frozen=True)
class TypeInfo:
    """One ggml type: `block_size` elements are stored in `type_size` bytes."""

    qtype: QType
    block_size: int
    type_size: int

    @property
    def name(self) -> str:
        return self.qtype.name

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size


TYPES: dict[QType, TypeInfo] = {t: TypeInfo(t, *GGML_QUANT_SIZES[t]) for t in SUPPORTED}


def type_info(qtype: QType | int | str) -> TypeInfo:
    """Look up a supported type by enum, ggml id or name (`"Q4_K"`); raise UnsupportedModel otherwise."""
    try:
        if isinstance(qtype, str):
            qtype = QType[qtype.upper()]
        else:
            qtype = QType(int(qtype))
    except (KeyError, ValueError) as e:
        raise UnsupportedModel(f"unknown ggml tensor type {qtype!r}") from e
    info = TYPES.get(qtype)
    if info is None:
        names = ", ".join(t.name for t in SUPPORTED)
        raise UnsupportedModel(f"ggml tensor type {qtype.name} is not supported (supported: {names})")
    return info


def row_bytes(qtype: QType | int | str, n: int) -> int:
    """Bytes of one row of `n` elements; BadInput when `n` is not a whole number of blocks."""
    info = type_info(qtype)
    if n < 0 or n % info.block_size != 0:
        raise BadInput(
            f"row length {n} is not a multiple of the {info.name} block size {info.block_size}",
            hint="pick a type with a smaller block (Q8_0 uses 32, F16/BF16 use 1) for this tensor",
        )
    return n // info.block_size * info.type_size


def tensor_bytes(qtype: QType | int | str, shape: Sequence[int]) -> int:
    """Bytes of a tensor of `shape` (torch order, last dim is the row); a 0-d shape is one element."""
    shape = tuple(int(s) for s in shape)
    if not shape:
        shape = (1,)
    return math.prod(shape[:-1]) * row_bytes(qtype, shape[-1])


def byte_shape(qtype: QType | int | str, shape: Sequence[int]) -> tuple[int, ...]:
    """Shape of the uint8 array that stores a tensor of `shape`: rows kept, last dim in bytes."""
    shape = tuple(int(s) for s in shape) or (1,)
    return (*shape[:-1], row_bytes(qtype, shape[-1]))
