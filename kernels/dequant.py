"""Reference torch dequantizers for the ggml block formats (vectorized, any device).

Each kernel maps a (N, type_size) uint8 block array to (N, block_size) float32 and follows gguf-py's numpy
reference operation for operation, so results match it bit for bit. Fast fused kernels are checked against these.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np
import torch
from gguf import quants as gq

from quant.ggml import TYPES, QType, row_bytes, tensor_bytes, type_info
from quant.errors import BadInput, UnsupportedModel

QK_K = 256


def _grid(cls: type) -> torch.Tensor:
    """gguf-py's lattice of a grid type as f32 [entries, 4 or 8] (gguf-py unpacks it from its packed table)."""
    cls.init_grid()
    return torch.from_numpy(np.array(cls.grid, dtype=np.float32).reshape(cls.grid_shape))


def _values(name: str) -> torch.Tensor:
    """gguf-py's value table of quant class `name`: its `kvalues` as f32, else its lattice (`_grid`)."""
    cls = getattr(gq, name)
    return torch.tensor(cls.kvalues, dtype=torch.float32) if hasattr(cls, "kvalues") else _grid(cls)


def _build_tables() -> dict[str, torch.Tensor]:
    """Each value table the type table names (keyed by its gguf-py class), and the I-quants' sign patterns."""
    out = {info.values: _values(info.values) for info in TYPES.values() if info.values}
    out["ksigns"] = torch.from_numpy(np.frombuffer(gq.IQ2_XXS.ksigns, dtype=np.uint8).copy()).long()
    return out


_TABLES_CPU = _build_tables()
_tables_by_device: dict[torch.device, dict[str, torch.Tensor]] = {torch.device("cpu"): _TABLES_CPU}


def tables(device: torch.device) -> dict[str, torch.Tensor]:
    """The value tables (I-quant lattices, sign patterns, IQ4_NL and MXFP4 values) on `device`, copied there once."""
    t = _tables_by_device.get(device)
    if t is None:
        t = {k: v.to(device) for k, v in _TABLES_CPU.items()}
        _tables_by_device[device] = t
    return t


def _shifts(values: Sequence[int], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return _shift_table(tuple(values), shape, device)


@functools.lru_cache(maxsize=64)
def _shift_table(values: tuple[int, ...], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    # Cached so repeated calls on an accelerator do not copy the same tiny constant to it every time.
    return torch.tensor(values, dtype=torch.uint8, device=device).reshape(shape)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(N, 2) little-endian f16 bytes → (N, 1) float32."""
    return b.contiguous().view(torch.float16).float()


def _u32(b: torch.Tensor) -> torch.Tensor:
    """(..., 4k) bytes → (..., k) int64 holding little-endian uint32 words (int64 keeps shifts unsigned)."""
    w = b.reshape(*b.shape[:-1], b.shape[-1] // 4, 4).long()
    return w[..., 0] | (w[..., 1] << 8) | (w[..., 2] << 16) | (w[..., 3] << 24)


# ---------------------------------------------------------------------------------------------------------------
# Block kernels: (N, type_size) uint8 → (N, block_size) float32


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    return b[:, 2:].view(torch.int8).float() * d


def _nibbles32(qs: torch.Tensor) -> torch.Tensor:
    """(N, 16) bytes → (N, 32) values 0..15: byte j holds element j (low nibble) and element j+16 (high nibble)."""
    n = qs.shape[0]
    return ((qs.reshape(n, 1, 16) >> _shifts([0, 4], (1, 2, 1), qs.device)) & 0xF).reshape(n, 32)


def _high_bits32(qh: torch.Tensor) -> torch.Tensor:
    """(N, 4) bytes of a little-endian u32 → (N, 32) bits 0/1, element i from bit i."""
    return ((_u32(qh).reshape(-1, 1) >> torch.arange(32, device=qh.device)) & 1).to(torch.uint8)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, 0:2])
    return d * (_nibbles32(b[:, 2:]).to(torch.int8) - 8).float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    return d * _nibbles32(b[:, 4:]).float() + m


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, 0:2])
    q = _nibbles32(b[:, 6:]) | (_high_bits32(b[:, 2:6]) << 4)
    return d * (q.to(torch.int8) - 16).float()


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    q = _nibbles32(b[:, 8:]) | (_high_bits32(b[:, 4:8]) << 4)
    return d * q.float() + m


def _iq4_nl(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, 0:2])
    return d * tables(b.device)["IQ4_NL"][_nibbles32(b[:, 2:]).long()]


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0xF).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    q = (qs.reshape(n, 2, 1, 32) >> _shifts([0, 2, 4, 6], (1, 1, 4, 1), b.device)) & 3  # (N, 2, 4, 32)
    q = q.reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs, scales = b[:, :32], b[:, 32:96], b[:, 96:108]
    d = _f16(b[:, 108:110])
    lo = (scales[:, :8].reshape(n, 1, 8) >> _shifts([0, 4], (1, 2, 1), b.device)).reshape(n, 16)
    hi = (scales[:, 8:].reshape(n, 1, 4) >> _shifts([0, 2, 4, 6], (1, 4, 1), b.device)).reshape(n, 16)
    sc = ((lo & 0xF) | ((hi & 3) << 4)).to(torch.int8) - 32
    dl = (d * sc.float()).reshape(n, 16, 1)
    ql = (qs.reshape(n, 2, 1, 32) >> _shifts([0, 2, 4, 6], (1, 1, 4, 1), b.device)).reshape(n, 16, 16) & 3
    qh = (hmask.reshape(n, 1, 1, 32) >> _shifts(range(8), (1, 1, 8, 1), b.device)).reshape(n, 16, 16) & 1
    # The high bit set means "no offset": value = low2 - 4 * (1 - hbit).
    q = ql.to(torch.int8) - ((qh ^ 1) << 2).to(torch.int8)
    return (dl * q.float()).reshape(n, QK_K)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 packed bytes → eight 6-bit scales and eight 6-bit mins (Q4_K / Q5_K)."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    dl = (d * sc.float()).reshape(n, 8, 1)
    ml = (dmin * mn.float()).reshape(n, 8, 1)
    q = (b[:, 16:].reshape(n, 4, 1, 32) >> _shifts([0, 4], (1, 1, 2, 1), b.device)) & 0xF
    return (dl * q.reshape(n, 8, 32).float() - ml).reshape(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    dl = (d * sc.float()).reshape(n, 8, 1)
    ml = (dmin * mn.float()).reshape(n, 8, 1)
    ql = (b[:, 48:].reshape(n, 4, 1, 32) >> _shifts([0, 4], (1, 1, 2, 1), b.device)) & 0xF
    qh = (b[:, 16:48].reshape(n, 1, 1, 32) >> _shifts(range(8), (1, 1, 8, 1), b.device)) & 1
    q = ql.reshape(n, 8, 32) | (qh.reshape(n, 8, 32) << 4)
    return (dl * q.float() - ml).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh = b[:, :128], b[:, 128:192]
    scales = b[:, 192:208].view(torch.int8).float()
    d = (_f16(b[:, 208:210]) * scales).reshape(n, 16, 1)
    lo = (ql.reshape(n, 2, 1, 64) >> _shifts([0, 4], (1, 1, 2, 1), b.device)) & 0xF  # (N, 2, 2, 64)
    hi = (qh.reshape(n, 2, 1, 32) >> _shifts([0, 2, 4, 6], (1, 1, 4, 1), b.device)) & 3  # (N, 2, 4, 32)
    q = (lo.reshape(n, 8, 32) | (hi.reshape(n, 8, 32) << 4)).to(torch.int8) - 32
    return (d * q.reshape(n, 16, 16).float()).reshape(n, QK_K)


def _e8m0_half(e: torch.Tensor) -> torch.Tensor:
    """ggml_e8m0_to_fp32_half: 2^(e-128) built from bits (e < 2 gives the subnormals)."""
    e = e.to(torch.int32)
    bits = torch.where(e < 2, torch.full_like(e, 0x00200000) << e, (e - 1) << 23)
    return bits.view(torch.float32)


def _mxfp4(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d = _e8m0_half(b[:, 0:1])
    q = (b[:, 1:].reshape(n, 1, 16) >> _shifts([0, 4], (1, 2, 1), b.device)) & 0xF
    return d * tables(b.device)["MXFP4"][q.reshape(n, 32).long()]


def _signs(words: torch.Tensor, tables: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N, 8) sign/scale words → (N, 8, 4, 8) ±1: four 7-bit ksigns indices per word, 8 sign bits each."""
    n = words.shape[0]
    shifts = torch.tensor([0, 7, 14, 21], dtype=torch.int64, device=words.device)
    idx = (words.reshape(n, 8, 1) >> shifts) & 0x7F
    bits = tables["ksigns"][idx].reshape(n, 8, 4, 1) >> torch.arange(8, device=words.device)
    return torch.where((bits & 1) == 0, 1.0, -1.0).to(torch.float32)


def _iq2_xxs(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    t = tables(b.device)
    d = _f16(b[:, 0:2])
    qs = b[:, 2:].reshape(n, 8, 8)  # per 32 elements: 4 grid-index bytes, then one u32 of signs + scale
    aux = _u32(qs[:, :, 4:]).reshape(n, 8)
    db = (d * (0.5 + (aux >> 28).float()) * 0.25).reshape(n, 8, 1, 1)
    grid = t["IQ2_XXS"][qs[:, :, :4].long()]  # (N, 8, 4, 8)
    return (db * grid * _signs(aux, t)).reshape(n, QK_K)


def _iq3_xxs(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    t = tables(b.device)
    d = _f16(b[:, 0:2])
    aux = _u32(b[:, 66:98])  # (N, 8)
    db = (d * (0.5 + (aux >> 28).float()) * 0.5).reshape(n, 8, 1, 1)
    grid = t["IQ3_XXS"][b[:, 2:66].long()].reshape(n, 8, 4, 8)
    return (db * grid * _signs(aux, t)).reshape(n, QK_K)


def _bit_signs(signs: torch.Tensor) -> torch.Tensor:
    """(N, S) sign bytes → (N, S, 8) ±1 f32, bit k of byte s for element 8s+k."""
    bits = signs.reshape(*signs.shape, 1) >> torch.arange(8, device=signs.device, dtype=torch.uint8)
    return torch.where((bits & 1) == 0, 1.0, -1.0).to(torch.float32)


def _nibble_scales(s: torch.Tensor) -> torch.Tensor:
    """(N, S) bytes → (N, 2S) 4-bit values, low nibble first."""
    n = s.shape[0]
    return ((s.reshape(n, -1, 1) >> _shifts([0, 4], (1, 1, 2), s.device)) & 0xF).reshape(n, -1)


def _iq2_xs(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    t = tables(b.device)
    d = _f16(b[:, 0:2])
    qs = b[:, 2:66].reshape(n, 32, 2).long()
    qs = qs[..., 0] | (qs[..., 1] << 8)  # (N, 32) u16: 9-bit grid index, 7-bit ksigns index
    db = (d * (0.5 + _nibble_scales(b[:, 66:74]).float()) * 0.25).reshape(n, 16, 1, 1)
    signs = t["ksigns"][qs >> 9].reshape(n, 32, 1) >> torch.arange(8, device=b.device)
    signs = torch.where((signs & 1) == 0, 1.0, -1.0).to(torch.float32).reshape(n, 16, 2, 8)
    grid = t["IQ2_XS"][qs & 511].reshape(n, 16, 2, 8)
    return (db * grid * signs).reshape(n, QK_K)


def _iq2_s(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    t = tables(b.device)
    d = _f16(b[:, 0:2])
    qs, signs, qh, scales = b[:, 2:34], b[:, 34:66], b[:, 66:74], b[:, 74:82]
    db = (d * (0.5 + _nibble_scales(scales).float()) * 0.25).reshape(n, 16, 1, 1)
    hi = (qh.reshape(n, 8, 1) >> _shifts([0, 2, 4, 6], (1, 1, 4), b.device)) & 3  # (N, 8, 4)
    idx = qs.long() | (hi.reshape(n, 32).long() << 8)
    grid = t["IQ2_S"][idx].reshape(n, 16, 2, 8)
    return (db * grid * _bit_signs(signs).reshape(n, 16, 2, 8)).reshape(n, QK_K)


def _iq3_s(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    t = tables(b.device)
    d = _f16(b[:, 0:2])
    qs, qh, signs, scales = b[:, 2:66], b[:, 66:74], b[:, 74:106], b[:, 106:110]
    db = (d * (1 + 2 * _nibble_scales(scales)).float()).reshape(n, 8, 1, 1)
    hi = (qh.reshape(n, 8, 1) >> torch.arange(8, device=b.device, dtype=torch.uint8)) & 1  # (N, 8, 8)
    idx = qs.long() | (hi.reshape(n, 64).long() << 8)
    grid = t["IQ3_S"][idx].reshape(n, 8, 4, 8)
    return (db * grid * _bit_signs(signs).reshape(n, 8, 4, 8)).reshape(n, QK_K)


def _iq1_s(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    t = tables(b.device)
    d = _f16(b[:, 0:2])
    qs = b[:, 2:34]
    qh = b[:, 34:50].reshape(n, 8, 2).long()
    qh = qh[..., 0] | (qh[..., 1] << 8)  # (N, 8) u16 per 32 elements
    dl = (d * (2 * ((qh >> 12) & 7) + 1).float()).reshape(n, 8, 1, 1)
    delta = torch.where((qh & 0x8000) == 0, 0.125, -0.125).to(torch.float32).reshape(n, 8, 1, 1)
    hi = (qh.reshape(n, 8, 1) >> torch.tensor([0, 3, 6, 9], device=b.device)) & 7
    idx = qs.long() | (hi.reshape(n, 32) << 8)
    grid = t["IQ1_S"][idx].reshape(n, 8, 4, 8)
    return (dl * (grid + delta)).reshape(n, QK_K)


def _iq1_m(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    t = tables(b.device)
    qs, qh = b[:, 0:32], b[:, 32:48]
    sc = b[:, 48:56].reshape(n, 4, 2).long()
    sc = sc[..., 0] | (sc[..., 1] << 8)  # (N, 4) u16; their top nibbles hold the f16 super-scale
    dbits = ((sc[:, 0] >> 12) | ((sc[:, 1] >> 8) & 0xF0) | ((sc[:, 2] >> 4) & 0xF00) | (sc[:, 3] & 0xF000))
    d = dbits.to(torch.int16).view(torch.float16).float().reshape(n, 1)
    s3 = (sc.reshape(n, 4, 1) >> torch.tensor([0, 3, 6, 9], device=b.device)) & 7  # (N, 16) per 16 elements
    dl = (d * (2 * s3.reshape(n, 16) + 1).float()).reshape(n, 8, 2, 1, 1)
    h = (qh.reshape(n, 16, 1) >> _shifts([0, 4], (1, 1, 2), b.device)).reshape(n, 32)  # one nibble per 8 elements
    idx = qs.long() | ((h & 7).long() << 8)
    delta = torch.where((h & 8) == 0, 0.125, -0.125).to(torch.float32).reshape(n, 8, 2, 2, 1)
    grid = t["IQ1_S"][idx].reshape(n, 8, 2, 2, 8)
    return (dl * (grid + delta)).reshape(n, QK_K)


def _iq4_xs(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d = _f16(b[:, 0:2])
    sh = (b[:, 2].long() | (b[:, 3].long() << 8)).reshape(n, 1)
    hi = (sh >> torch.arange(0, 16, 2, device=b.device)) & 3  # (N, 8)
    lo = (b[:, 4:8].reshape(n, 4, 1) >> _shifts([0, 4], (1, 1, 2), b.device)).reshape(n, 8) & 0xF
    sc = (lo.long() | (hi << 4)) - 32
    dl = (d * sc.float()).reshape(n, 8, 1)
    q = (b[:, 8:].reshape(n, 8, 1, 16) >> _shifts([0, 4], (1, 1, 2, 1), b.device)).reshape(n, 8, 32) & 0xF
    return (dl * tables(b.device)["IQ4_NL"][q.long()]).reshape(n, QK_K)


def _f16_blocks(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).float()


def _bf16_blocks(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.bfloat16).float()


def _f32_blocks(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float32).clone()


_KERNELS: dict[QType, Callable[[torch.Tensor], torch.Tensor]] = {
    QType.F32: _f32_blocks,
    QType.F16: _f16_blocks,
    QType.BF16: _bf16_blocks,
    QType.Q8_0: _q8_0,
    QType.Q4_K: _q4_k,
    QType.Q5_K: _q5_k,
    QType.Q6_K: _q6_k,
    QType.Q3_K: _q3_k,
    QType.Q2_K: _q2_k,
    QType.MXFP4: _mxfp4,
    QType.IQ2_XXS: _iq2_xxs,
    QType.IQ3_XXS: _iq3_xxs,
    QType.IQ4_XS: _iq4_xs,
    QType.Q4_0: _q4_0,
    QType.Q4_1: _q4_1,
    QType.Q5_0: _q5_0,
    QType.Q5_1: _q5_1,
    QType.IQ4_NL: _iq4_nl,
    QType.IQ2_XS: _iq2_xs,
    QType.IQ2_S: _iq2_s,
    QType.IQ3_S: _iq3_s,
    QType.IQ1_S: _iq1_s,
    QType.IQ1_M: _iq1_m,
}

# every type of the one table with a dequantizer, in its order: all but I32 (an integer table, read as itself)
DEQUANTIZABLE: tuple[QType, ...] = tuple(t for t in TYPES if t in _KERNELS)


def _kernel(qtype: QType) -> Callable[[torch.Tensor], torch.Tensor]:
    info = type_info(qtype)
    k = _KERNELS.get(info.qtype)
    if k is None:
        raise UnsupportedModel(f"no dequantizer for {info.name}")
    return k


def dequantize(raw: torch.Tensor, qtype: QType, shape: Sequence[int]) -> torch.Tensor:
    """ggml bytes (uint8, any leading shape) → float32 tensor of `shape` (torch order; last dim is the row)."""
    kernel = _kernel(qtype)
    info = type_info(qtype)
    shape = tuple(int(s) for s in shape)
    if raw.dtype != torch.uint8:
        raise BadInput(f"quantized data must be uint8 bytes, got {raw.dtype}")
    want = tensor_bytes(qtype, shape)
    if raw.numel() != want:
        raise BadInput(f"{info.name} tensor of shape {shape} needs {want} bytes, got {raw.numel()}")
    blocks = raw.reshape(-1, info.type_size)
    return kernel(blocks).reshape(shape)


def dequantize_rows(raw: torch.Tensor, qtype: QType, row_len: int, rows: torch.Tensor) -> torch.Tensor:
    """Dequantize only the rows `rows` (int64 indices into the flattened rows of `raw`) → (len(rows), row_len)."""
    rb = row_bytes(qtype, row_len)
    if raw.numel() % rb != 0:
        raise BadInput(f"{raw.numel()} bytes is not a whole number of {type_info(qtype).name} rows of {row_len}")
    table = raw.reshape(-1, rb)
    rows = rows.to(device=raw.device, dtype=torch.long).reshape(-1)
    # Checked on CPU only: on an accelerator the check would cost a host sync per call (index_select still asserts).
    if raw.device.type == "cpu" and rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= table.shape[0]):
        raise BadInput(f"row index out of range for a tensor of {table.shape[0]} rows")
    return dequantize(table.index_select(0, rows), qtype, (rows.numel(), row_len))


def dequantized_numel(qtype: QType, nbytes: int) -> int:
    """Elements stored in `nbytes` of a type (for callers that know only the byte length)."""
    info = type_info(qtype)
    if nbytes % info.type_size:
        raise BadInput(f"{nbytes} bytes is not a whole number of {info.name} blocks")
    return nbytes // info.type_size * info.block_size


__all__ = ["DEQUANTIZABLE", "dequantize", "dequantize_rows", "dequantized_numel"]
