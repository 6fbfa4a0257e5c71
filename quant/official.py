"""Reading official DeepSeek-V4 checkpoints: lazy sharded safetensors and the exact dequantization (facts §3)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from quant.errors import CheckpointError
from v4cli.safepath import UnsafePath, inside, safe_relpath

# safetensors dtype strings as the official files use them
FP8, E8M0, I8, BF16, F32, I64 = "F8_E4M3", "F8_E8M0", "I8", "BF16", "F32", "I64"
_DTYPE_BYTES = {FP8: 1, E8M0: 1, I8: 1, BF16: 2, F32: 4, I64: 8, "F16": 2, "I32": 4, "U8": 1}


@dataclass(frozen=True)
class SourceTensor:
    name: str
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    file: str

    @property
    def nbytes(self) -> int:
        n = _DTYPE_BYTES.get(self.dtype, 1)
        for d in self.shape:
            n *= d
        return n


class Checkpoint:
    """A sharded official checkpoint, opened lazily: headers now, tensor bytes (mmap) only when asked."""

    def __init__(self, root: Path):
        self.root = Path(root)
        idx = self.root / "model.safetensors.index.json"
        if idx.exists():
            try:
                weight_map: dict[str, str] = json.loads(idx.read_text(encoding="utf-8"))["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError(f"weight_map is a JSON {type(weight_map).__name__}, not an object")
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{idx}: not a valid safetensors index ({e})",
                                      hint="re-download it with v4 pull") from None
            # the index is data from outside: a shard name must not lead out of the checkpoint folder
            try:
                shards = {f if isinstance(f, str) else safe_relpath(f, "shard name") for f in weight_map.values()}
                files = sorted(str(inside(self.root, f, "shard name").relative_to(self.root)) for f in shards)
            except UnsafePath as e:
                raise CheckpointError(f"{idx}: {e}", hint="the index is damaged or hostile: re-download it "
                                      "with v4 pull") from None
        else:
            files = sorted(p.name for p in self.root.glob("*.safetensors"))
            weight_map = {}
            if not files:
                raise CheckpointError(f"{self.root}: no safetensors files", hint="is this a model folder? v4 pull flash")
        missing = [f for f in files if not (self.root / f).exists()]
        if missing:
            raise CheckpointError(
                f"{self.root}: missing shard {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""),
                hint="resume the download with v4 pull",
            )
        self.tensors: dict[str, SourceTensor] = {}
        self._handles: dict[str, object] = {}
        for f in files:
            try:
                h = safe_open(str(self.root / f), framework="pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{self.root / f}: unreadable safetensors file ({e})", hint="re-download it with v4 pull")
            self._handles[f] = h
            for name in h.keys():
                sl = h.get_slice(name)
                self.tensors[name] = SourceTensor(name, sl.get_dtype(), tuple(sl.get_shape()), f)
        for name, f in weight_map.items():
            if name not in self.tensors:
                raise CheckpointError(f"{self.root / f}: tensor {name} listed in the index is missing")

    def get(self, name: str) -> torch.Tensor:
        """The stored tensor (mmap-backed; copy before mutating)."""
        try:
            st = self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.root}: tensor {name} is missing from the checkpoint") from None
        return self._handles[st.file].get_tensor(name)

    def expect(self, name: str, dtypes: tuple[str, ...], shape: tuple[int, ...] | None) -> SourceTensor:
        """Check presence, dtype and shape; one error naming the file and tensor otherwise."""
        st = self.tensors.get(name)
        if st is None:
            raise CheckpointError(f"{self.root}: tensor {name} is missing from the checkpoint")
        if st.dtype not in dtypes:
            raise CheckpointError(f"{self.root / st.file}: tensor {name} has dtype {st.dtype}, expected {'/'.join(dtypes)}")
        if shape is not None and st.shape != tuple(shape):
            raise CheckpointError(f"{self.root / st.file}: tensor {name} has shape {list(st.shape)}, expected {list(shape)}")
        return st


def e8m0_to_f32(s: torch.Tensor) -> torch.Tensor:
    """E8M0 byte b → 2^(b−127); 0xFF → NaN."""
    b = s.view(torch.uint8).to(torch.int32)
    out = torch.exp2((b - 127).float())
    return torch.where(b == 255, torch.tensor(float("nan")), out)


def dequant_fp8(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """W[i,j] = e4m3(q[i,j]) · s[i//128, j//128], exact in f32."""
    s = e8m0_to_f32(scale)
    s = s.repeat_interleave(block, 0)[: q.shape[0]].repeat_interleave(block, 1)[:, : q.shape[1]]
    return q.view(torch.float8_e4m3fn).float() * s


FP4_VALUES = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, -0.0, -.5, -1, -1.5, -2, -3, -4, -6], dtype=torch.float32)


def dequant_fp4(packed: torch.Tensor, scale: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Official FP4 expert: int8 [out, in/2], low nibble = element 2k; W[o,j] = value · s[o, j//32]."""
    p = packed.view(torch.uint8)
    codes = torch.stack((p & 0x0F, p >> 4), dim=-1).reshape(p.shape[0], p.shape[1] * 2)
    return FP4_VALUES[codes.long()] * e8m0_to_f32(scale).repeat_interleave(block, 1)


def dequantized(ckpt: Checkpoint, name: str) -> torch.Tensor:
    """The exact float value of a `.weight` (FP8/FP4 with its `.scale`, or BF16/F32 as is) as f32."""
    t = ckpt.get(name)
    scale_name = name.removesuffix(".weight") + ".scale"
    if scale_name in ckpt.tensors and name.endswith(".weight"):
        s = ckpt.get(scale_name)
        if t.dtype == torch.float8_e4m3fn:
            return dequant_fp8(t, s)
        if t.dtype == torch.int8:
            return dequant_fp4(t, s)
        raise CheckpointError(f"{ckpt.root}: tensor {name} has a .scale but dtype {t.dtype}")
    if t.dtype in (torch.int64, torch.int32):
        return t
    return t.float()


def rows(ckpt: Checkpoint, name: str, r0: int, r1: int) -> torch.Tensor:
    """Rows r0:r1 of a stored tensor, read lazily (only those bytes leave the mmap)."""
    st = ckpt.tensors[name]
    return ckpt._handles[st.file].get_slice(name)[r0:r1]


def dequantized_rows(ckpt: Checkpoint, name: str, r0: int, r1: int, fp8_block: int = 128) -> torch.Tensor:
    """f32 rows r0:r1 of a `.weight` (r0 a multiple of the FP8 block for FP8 weights)."""
    q = rows(ckpt, name, r0, r1)
    scale_name = name.removesuffix(".weight") + ".scale"
    if q.dtype == torch.float8_e4m3fn:
        s = rows(ckpt, scale_name, r0 // fp8_block, -(-r1 // fp8_block))
        return dequant_fp8(q, s, fp8_block)
    if q.dtype == torch.int8 and scale_name in ckpt.tensors:
        return dequant_fp4(q, rows(ckpt, scale_name, r0, r1))
    if q.dtype in (torch.int64, torch.int32):
        return q
    return q.float()
