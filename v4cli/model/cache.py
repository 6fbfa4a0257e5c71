"""Per-layer inference state for DeepSeek-V4: what must be kept to continue exactly at position n.

Per layer: the sliding window of raw kv (the last `window-1` rows), and for CSA/HCA layers each compressor's
emitted entries, its partial-window buffers (fp32) and, for the overlapped CSA compressors, the previous
window's Ca half. Memory grows with the tokens held, not with the maximum context. The state can be
snapshotted (`state_dict`/`to_bytes`) and restored exactly; it cannot be rewound without recomputation. A
snapshot read back (`load_bytes`) is checked key by key against this cache's layout before anything is changed:
it may come from a file written by another version or by someone else.

KV storage formats (`kv_format`): "f32" (exact, for tests), "bf16", and "fp8": the non-rope dims as FP8 e4m3
with one power-of-two scale per 64 values, the rope dims in BF16, and indexer keys in FP4 (e2m1, one
power-of-two scale per 32) — the roundings DeepSeek's runtime applies.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import torch

from quant.errors import BadInput
from v4cli.model.kvsize import FP4_SCALE_BLOCK as FP4_BLOCK, FP8_SCALE_BLOCK as FP8_BLOCK, KV_FORMATS
_FP4_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_FP4_MIDS = (_FP4_GRID[1:] + _FP4_GRID[:-1]) / 2
# The layout of `state_dict`: key names and each key's dtype and shape. Bump it when either changes: `to_bytes`
# records it and the prefix cache's fingerprint includes it, so a snapshot of another layout is never restored.
STATE_LAYOUT = 1


class BadState(BadInput):
    """A snapshot this cache cannot restore: not a snapshot, another layout or format, or inconsistent values."""


def _blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    """[n, d] → [n, ceil(d/block), block] zero-padded, and the pad width."""
    n, d = x.shape
    pad = (-d) % block
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.view(n, -1, block), pad


def _pow2_exponent(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """Smallest power-of-two exponent e with amax / 2^e ≤ qmax (as int8; all-zero blocks get the minimum)."""
    e = torch.ceil(torch.log2(amax.clamp_min(1e-30) / qmax))
    return e.clamp(-127, 127).to(torch.int8)


class Codec:
    """How one kind of row (main kv or indexer key) is stored. Subclasses per format."""

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def decode(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def row_bytes(self, dim: int) -> int:
        raise NotImplementedError


class PlainCodec(Codec):
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def encode(self, x):
        return {"x": x.to(self.dtype)}

    def decode(self, parts):
        return parts["x"].float()

    def row_bytes(self, dim):
        return dim * torch.empty((), dtype=self.dtype).element_size()


class Fp8KVCodec(Codec):
    """Non-rope dims FP8 e4m3 with per-64 power-of-two scales; the trailing `rope` dims BF16."""

    def __init__(self, rope: int):
        self.rope = rope

    def encode(self, x):
        nope_dim = x.shape[-1] - self.rope
        b, _ = _blocks(x[:, :nope_dim].float(), FP8_BLOCK)
        e = _pow2_exponent(b.abs().amax(-1), 448.0)
        q = (b / torch.exp2(e.float())[..., None]).to(torch.float8_e4m3fn).reshape(x.shape[0], -1)[:, :nope_dim]
        return {"q": q, "e": e, "rope": x[:, nope_dim:].to(torch.bfloat16)}

    def decode(self, parts):
        q = parts["q"]
        b, pad = _blocks(q.float(), FP8_BLOCK)
        nope = (b * torch.exp2(parts["e"].float())[..., None]).reshape(q.shape[0], -1)
        nope = nope[:, : q.shape[1]]
        return torch.cat([nope, parts["rope"].float()], dim=-1)

    def row_bytes(self, dim):
        nope_dim = dim - self.rope
        return nope_dim + math.ceil(nope_dim / FP8_BLOCK) + 2 * self.rope


class Fp4Codec(Codec):
    """FP4 e2m1, two codes per byte, one power-of-two scale per 32 values (indexer keys)."""

    def encode(self, x):
        n, d = x.shape
        b, _ = _blocks(x.float(), FP4_BLOCK)
        e = _pow2_exponent(b.abs().amax(-1), 6.0)
        v = (b / torch.exp2(e.float())[..., None]).reshape(n, -1)
        code = torch.bucketize(v.abs(), _FP4_MIDS.to(v.device)).to(torch.uint8) | ((v < 0).to(torch.uint8) << 3)
        if code.shape[1] % 2:
            code = torch.nn.functional.pad(code, (0, 1))
        return {"p": code[:, 0::2] | (code[:, 1::2] << 4), "e": e, "d": torch.tensor(d)}

    def decode(self, parts):
        p = parts["p"]
        code = torch.stack([p & 15, p >> 4], dim=-1).reshape(p.shape[0], -1).long()
        mag = _FP4_GRID.to(p.device)[code & 7]
        v = torch.where(code >= 8, -mag, mag)
        b = v[:, : parts["e"].shape[1] * FP4_BLOCK].reshape(p.shape[0], -1, FP4_BLOCK)
        return (b * torch.exp2(parts["e"].float())[..., None]).reshape(p.shape[0], -1)[:, : int(parts["d"])]

    def row_bytes(self, dim):
        return math.ceil(dim / 2) + math.ceil(dim / FP4_BLOCK)


def codecs(kv_format: str, rope: int) -> tuple[Codec, Codec]:
    """(main kv codec, indexer key codec) for a storage format."""
    if kv_format == "f32":
        return PlainCodec(torch.float32), PlainCodec(torch.float32)
    if kv_format == "bf16":
        return PlainCodec(torch.bfloat16), PlainCodec(torch.bfloat16)
    if kv_format == "fp8":
        return Fp8KVCodec(rope), Fp4Codec()
    raise BadInput(f"unknown kv format {kv_format!r}", hint=f"use one of {', '.join(KV_FORMATS)}")


class Rows:
    """A growable list of encoded rows (capacity doubles, so appends are amortized O(1) per row)."""

    def __init__(self, codec: Codec, dim: int, device: torch.device | str, reserve: int = 0):
        self.codec, self.dim = codec, dim
        # rows the first buffer holds (the planned context's entries): a store that never regrows never leaves a
        # freed, once-touched buffer behind, so the process holds the rows kept (benchmarks/plan_check.py)
        self.reserve = reserve
        self.device = torch.device(device)  # where an empty store's rows live (the model's device)
        self.parts: dict[str, torch.Tensor] = {}
        self.n = 0  # rows held: parts' rows start .. start + n
        self.start = 0  # rows before it were dropped by keep_last and not yet compacted away

    def append(self, x: torch.Tensor) -> torch.Tensor:
        """Store rows x [m, dim]; returns them as they will read back (the storage rounding applied)."""
        enc = self.codec.encode(x)
        m = x.shape[0]
        if self._capacity() < self.start + self.n + m:  # out of room: the rows held move to a new buffer
            need = self.n + m
            cap = self.reserve if self.reserve >= need else max(16, 2 * need)
            for k, v in enc.items():
                if v.dim():
                    # uninitialized: rows past n are never read, and pages never written stay unallocated, so the
                    # process holds the rows it keeps, not the doubled capacity (benchmarks/plan_check.py)
                    grown = v.new_empty((cap, *v.shape[1:]))
                    if k in self.parts:
                        grown[: self.n] = self.parts[k][self.start: self.start + self.n]
                    self.parts[k] = grown
            self.start = 0
        end = self.start + self.n
        for k, v in enc.items():
            if v.dim() == 0:  # per-store constants (e.g. the unpadded dim)
                self.parts[k] = v
            else:
                self.parts[k][end: end + m] = v
        self.n += m
        return self.codec.decode(enc)

    def get(self) -> torch.Tensor:
        """All rows, decoded to f32 [n, dim]."""
        if self.n == 0:
            return torch.zeros(0, self.dim, device=self._device())
        return self.codec.decode(self._view(0, self.n))

    def stored(self) -> torch.Tensor:
        """All rows as kept when the format is plain (f32 / bf16 [n, dim], no copy); decoded to f32 otherwise."""
        if self.n and isinstance(self.codec, PlainCodec):
            return self.parts["x"][self.start: self.start + self.n]
        return self.get()

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows idx (any shape, values in [0, n)) decoded to f32 [*idx.shape, dim]; only those rows are decoded."""
        flat = idx.reshape(-1)
        parts = {k: (v[flat] if v.dim() else v) for k, v in self._view(0, self.n).items()}
        return self.codec.decode(parts).view(*idx.shape, self.dim)

    def keep_last(self, k: int) -> None:
        """Drop all but the last k rows (the sliding window)."""
        if self.n <= k:
            return
        # Only the start moves; the next append that runs out of room copies just the rows held into a buffer of
        # twice their count. A decode step's window drop is then free instead of a copy of the whole window, and
        # the buffer is rebuilt once every ~k steps.
        self.start += self.n - k
        self.n = k
        if self._capacity() > 4 * k + 64:
            # after a long chunk, a buffer many windows long is not kept around: the rows held are copied out now
            self.parts = {n: (v[self.start: self.start + k].clone() if v.dim() else v) for n, v in self.parts.items()}
            self.start = 0

    def nbytes(self) -> int:
        """Bytes of the rows held (not the spare capacity)."""
        return self.n * self.codec.row_bytes(self.dim)

    def _capacity(self) -> int:
        """Rows the buffers have room for (every part has the same length; 0 before the first append)."""
        return next((v.shape[0] for v in self.parts.values() if v.dim()), 0)

    def _view(self, a, b):
        """Parts of held rows a..b (counted from the first row held)."""
        return {k: (v[self.start + a: self.start + b] if v.dim() else v) for k, v in self.parts.items()}

    def _device(self):
        return next(iter(self.parts.values())).device if self.parts else self.device

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self._view(0, self.n).items()} | {"n": torch.tensor(self.n)}

    def check(self, sd: dict, n: int, where: str) -> None:
        """BadState unless `sd` is what `state()` gives for n rows of this codec and dim."""
        _count(sd, "n", n, where)
        if n == 0 and set(sd) == {"n"}:  # nothing appended yet: no parts
            return
        want = self.codec.encode(torch.zeros(1, self.dim))  # one row: every part's dtype and row shape
        _keys(sd, {"n", *want}, where)
        for k, t in want.items():
            if t.dim():
                _tensor(sd, k, t.dtype, (n, *t.shape[1:]), where)
            else:  # a per-store constant (the unpadded dim): the same value
                _tensor(sd, k, t.dtype, (), where)
                if sd[k].item() != t.item():
                    raise BadState(f"{where}{k} is {sd[k].item()}, expected {t.item()}")

    def load(self, sd: dict[str, torch.Tensor]) -> None:
        self.n, self.start = int(sd["n"]), 0
        # a contiguous copy on this layer's device: appends write into these buffers in place
        self.parts = {k: _own(v, self.device) for k, v in sd.items() if k != "n"}


@dataclass
class CompressorState:
    """One compressor's running state: entries emitted, the unfinished window, the previous window's Ca half."""

    entries: Rows
    ratio: int  # tokens per window (the model's Compressor for this state has the same)
    buf_kv: torch.Tensor | None = None  # [< ratio, width] f32 projections of tokens not yet in a window
    buf_score: torch.Tensor | None = None
    prev_kv: torch.Tensor | None = None  # [ratio, dim] Ca half of the last complete window (CSA only)
    prev_score: torch.Tensor | None = None
    count: int = 0  # windows closed so far

    _TENSORS = ("buf_kv", "buf_score", "prev_kv", "prev_score")

    def nbytes(self) -> int:
        extra = sum(t.numel() * t.element_size() for t in (getattr(self, n) for n in self._TENSORS) if t is not None)
        return self.entries.nbytes() + extra

    def state(self) -> dict[str, torch.Tensor]:
        sd = {f"entries.{k}": v for k, v in self.entries.state().items()}
        for n in self._TENSORS:
            t = getattr(self, n)
            if t is not None:
                sd[n] = t.clone()
        sd["count"] = torch.tensor(self.count)
        return sd

    def check(self, sd: dict, pos: int, where: str) -> None:
        """BadState unless `sd` is what `state()` gives after `pos` tokens: one entry per closed window, the
        unfinished window's rows in the buffers, and (overlapped windows) the last closed window's Ca half."""
        m, d = self.ratio, self.entries.dim
        count, rest = divmod(pos, m)
        overlap = m == 4  # as the model's Compressor: CSA (ratio 4) windows overlap, their projections 2d wide
        entries = _sub(sd, "entries.")
        self.entries.check(entries, count, where + "entries.")
        _count(sd, "count", count, where)
        keys = {f"entries.{k}" for k in entries} | {"count"}
        if rest or "buf_kv" in sd:  # absent before the first token; may be empty at a window boundary
            for name in ("buf_kv", "buf_score"):
                _tensor(sd, name, torch.float32, (rest, 2 * d if overlap else d), where)
            keys |= {"buf_kv", "buf_score"}
        if overlap and count:
            for name in ("prev_kv", "prev_score"):
                _tensor(sd, name, torch.float32, (m, d), where)
            keys |= {"prev_kv", "prev_score"}
        _keys(sd, keys, where)

    def load(self, sd: dict[str, torch.Tensor]) -> None:
        self.entries.load({k[len("entries."):]: v for k, v in sd.items() if k.startswith("entries.")})
        for n in self._TENSORS:
            setattr(self, n, _own(sd[n], self.entries.device) if n in sd else None)
        self.count = int(sd["count"])


@dataclass
class LayerCache:
    """One layer's state: the raw-kv window plus (CSA/HCA) the attention compressor and (CSA) the indexer's."""

    window: Rows
    window_len: int  # rows kept: sliding_window - 1
    compressor: CompressorState | None = None
    indexer: CompressorState | None = None

    def parts(self) -> dict[str, object]:
        return {k: v for k, v in (("compressor", self.compressor), ("indexer", self.indexer)) if v is not None}


@dataclass
class ModelCache:
    """The whole model's state at position `pos`. Made by `DeepseekV4.make_cache()`."""

    layers: list[LayerCache]
    kv_format: str
    pos: int = 0
    meta: dict = field(default_factory=dict)

    def nbytes(self) -> int:
        """Bytes of state actually held: windows, compressed entries, compressor buffers."""
        total = 0
        for lc in self.layers:
            total += lc.window.nbytes()
            total += sum(p.nbytes() for p in lc.parts().values())
        return total

    def entry_bytes(self) -> int:
        """Bytes of compressed entries only: the part that grows with the tokens held."""
        return sum(p.entries.nbytes() for lc in self.layers for p in lc.parts().values())

    def bytes_per_token(self) -> float:
        """Measured growth: compressed-entry bytes held per token seen."""
        return self.entry_bytes() / max(self.pos, 1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor and counter needed to continue exactly; restore with `load_state_dict`."""
        sd: dict[str, torch.Tensor] = {"pos": torch.tensor(self.pos)}
        for i, lc in enumerate(self.layers):
            sd.update({f"{i}.window.{k}": v for k, v in lc.window.state().items()})
            for name, part in lc.parts().items():
                sd.update({f"{i}.{name}.{k}": v for k, v in part.state().items()})
        return sd

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Restore a snapshot taken by `state_dict` from a cache made for the same model and format."""
        self.pos = int(sd["pos"])
        for i, lc in enumerate(self.layers):
            lc.window.load(_sub(sd, f"{i}.window."))
            for name, part in lc.parts().items():
                part.load(_sub(sd, f"{i}.{name}."))

    def check_state(self, sd: dict, pos: int) -> None:
        """BadState unless `sd` is exactly what `state_dict` gives for this model and format after `pos` tokens:
        the same keys, dtypes and shapes, and counters that agree with `pos` (restoring it cannot fail or drift)."""
        _count(sd, "pos", pos, "")
        covered = {"pos"}
        for i, lc in enumerate(self.layers):
            prefix = f"{i}.window."
            lc.window.check(_sub(sd, prefix), min(pos, lc.window_len), f"layer {i} window: ")
            covered |= {k for k in sd if k.startswith(prefix)}
            for name, part in lc.parts().items():
                prefix = f"{i}.{name}."
                part.check(_sub(sd, prefix), pos, f"layer {i} {name}: ")
                covered |= {k for k in sd if k.startswith(prefix)}
        if stray := sorted(map(str, set(sd) - covered)):
            raise BadState(f"unexpected keys {stray[:3]}: a state of another model")

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save({"layout": STATE_LAYOUT, "kv_format": self.kv_format, "state": self.state_dict()}, buf)
        return buf.getvalue()

    def load_bytes(self, data: bytes, n_tokens: int | None = None) -> None:
        """Restore `to_bytes` output (the state after `n_tokens` tokens, when given); BadState, with this cache
        unchanged, if it is anything else."""
        try:
            obj = torch.load(io.BytesIO(data), weights_only=True)
        except Exception as e:  # untrusted bytes: zip, pickle and storage errors all mean "not a snapshot"
            raise BadState(f"not a saved state ({type(e).__name__})") from None
        if not isinstance(obj, dict) or obj.get("layout") != STATE_LAYOUT:
            layout = obj.get("layout") if isinstance(obj, dict) else None
            raise BadState(f"state layout {layout}, this v4 uses {STATE_LAYOUT}")
        if obj.get("kv_format") != self.kv_format:
            raise BadState(f"snapshot is kv format {obj.get('kv_format')}, this cache is {self.kv_format}")
        sd = obj.get("state")
        if not isinstance(sd, dict):
            raise BadState("the snapshot holds no state")
        pos = n_tokens if n_tokens is not None else _scalar(sd, "pos", "")
        self.check_state(sd, pos)
        self.load_state_dict(sd)


def _sub(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if isinstance(k, str) and k.startswith(prefix)}


def _own(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A contiguous copy of a loaded tensor on `device` (a snapshot's strides and devices are its own)."""
    return t.to(device, memory_format=torch.contiguous_format, copy=True)


def _tensor(sd: dict, key: str, dtype: torch.dtype, shape: tuple[int, ...], where: str) -> None:
    v = sd.get(key)
    if not isinstance(v, torch.Tensor):
        raise BadState(f"{where}{key} is {'missing' if v is None else type(v).__name__}, expected a tensor")
    if v.dtype != dtype or tuple(v.shape) != tuple(shape):
        raise BadState(f"{where}{key} is {v.dtype} {list(v.shape)}, expected {dtype} {list(shape)}")


def _scalar(sd: dict, key: str, where: str) -> int:
    _tensor(sd, key, torch.int64, (), where)
    return int(sd[key])


def _count(sd: dict, key: str, value: int, where: str) -> None:
    if (got := _scalar(sd, key, where)) != value:
        raise BadState(f"{where}{key} is {got}, expected {value}")


def _keys(sd: dict, want: set[str], where: str) -> None:
    if set(sd) != want:
        extra, missing = sorted(map(str, set(sd) - want)), sorted(want - set(sd))
        raise BadState(f"{where}" + "; ".join(f"{k} {v[:3]}" for k, v in (("unexpected", extra),
                                                                         ("missing", missing)) if v))
