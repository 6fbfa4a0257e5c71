"""The ggml tensor types this project reads or writes, as data.

Block sizes and bytes per block come from gguf-py's one table (`GGML_QUANT_SIZES`); nothing is retyped here.
Shapes are in torch order: the last dimension is ggml's ne0, the row that blocks run along.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from quant.errors import BadInput, UnsupportedModel

QType = GGMLQuantizationType


@dataclass(frozen=True)
class TypeInfo:
    """One ggml type: `block_size` elements are stored in `type_size` bytes.

    `imatrix_only`: llama.cpp's quantizer writes this type only with an importance matrix (without one the
    result is too poor, so it refuses). `note` says where the type is met. `dtype`: a plain type's element type
    (a torch / numpy dtype name), viewed in place rather than decoded. `values`: the gguf-py quant class whose value
    table (a lattice `grid`, or `kvalues`) the blocks index; every decoder takes its copy of that table from there.
    """

    qtype: QType
    block_size: int
    type_size: int
    imatrix_only: bool = False
    note: str = ""
    dtype: str | None = None
    values: str | None = None

    @property
    def name(self) -> str:
        return self.qtype.name

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    @property
    def is_float(self) -> bool:
        """A plain floating-point type (F32, F16, BF16)."""
        return self.dtype is not None and self.dtype.startswith(("float", "bfloat"))


def _row(qtype: QType, note: str, imatrix_only: bool = False, *, dtype: str | None = None,
         values: str | None = None) -> tuple[QType, TypeInfo]:
    return qtype, TypeInfo(qtype, *GGML_QUANT_SIZES[qtype], imatrix_only=imatrix_only, note=note, dtype=dtype,
                           values=values)


# The one table of ggml types this project reads: every type llama.cpp writes into a `deepseek4` file (its converter,
# its quantizer's ftypes and their per-tensor fallbacks, community recipes). Sizes come from gguf-py's table;
# each type's reference dequantizer is in kernels/dequant.py, its fast kernels (where there are any) in kernels/;
# the lists of types each of those serves are derived from this table (and, for compiled kernels, what they report).
TYPES: dict[QType, TypeInfo] = dict([
    _row(QType.F32, "norms, mHC, sinks, biases, APE", dtype="float32"),
    _row(QType.F16, "community embeddings, routers, compressors", dtype="float16"),
    _row(QType.BF16, "converter output for BF16 sources", dtype="bfloat16"),
    _row(QType.I32, "hash routing table (tid2eid)", dtype="int32"),
    _row(QType.Q8_0, "converter output for FP8 sources; attention and shared experts in community quants"),
    _row(QType.Q4_0, "llama.cpp fallback for rows not a multiple of 256"),
    _row(QType.Q4_1, "legacy ftype"),
    _row(QType.Q5_0, "llama.cpp fallback for rows not a multiple of 256"),
    _row(QType.Q5_1, "legacy ftype"),
    _row(QType.Q2_K, "low-bit routed experts"),
    _row(QType.Q3_K, "low-bit routed experts"),
    _row(QType.Q4_K, "late layers' experts, attention in AProjQ4 mixes"),
    _row(QType.Q5_K, "K-quant mixes"),
    _row(QType.Q6_K, "K-quant mixes, output head"),
    _row(QType.IQ1_S, "lowest-bit routed experts", imatrix_only=True, values="IQ1_S"),
    _row(QType.IQ1_M, "lowest-bit routed experts", imatrix_only=True, values="IQ1_S"),
    _row(QType.IQ2_XXS, "2-bit routed experts (ds4 q2, AD-IQ2_XXS)", imatrix_only=True, values="IQ2_XXS"),
    _row(QType.IQ2_XS, "2-bit routed experts", imatrix_only=True, values="IQ2_XS"),
    _row(QType.IQ2_S, "2-bit routed experts", imatrix_only=True, values="IQ2_S"),
    _row(QType.IQ3_XXS, "3-bit routed experts (AD-IQ3_XXS, UD-IQ3_XXS)", imatrix_only=True,
         values="IQ3_XXS"),
    _row(QType.IQ3_S, "3-bit routed experts", values="IQ3_S"),
    _row(QType.IQ4_NL, "llama.cpp fallback for IQ4_XS rows not a multiple of 256", values="IQ4_NL"),
    _row(QType.IQ4_XS, "4-bit mixes", values="IQ4_NL"),
    _row(QType.MXFP4, "routed experts: the official FP4, repacked exactly", values="MXFP4"),
])
SUPPORTED: tuple[QType, ...] = tuple(TYPES)


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
