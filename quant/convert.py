"""Official DeepSeek-V4 safetensors → llama.cpp-compatible `deepseek4` GGUF, streamed.

Memory stays bounded by one chunk of rows (or one expert), whatever the model size: tensors are read lazily from
the shards' mmaps, converted a slice at a time, and written straight to the output. The output is written to a
`.partial` file in the same folder and renamed only after a complete write and fsync.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType, GGUFWriter
from gguf import size_label as gguf_size_label

from quant import keys as K
from quant import names as N
from quant.config import ModelArgs, read_config
from quant.formats import IMATRIX_TYPES, mxfp4_from_official, quantize
from quant.ggml import tensor_bytes, type_info
from quant.inventory import FP8_BLOCK, Entry, official_inventory
from quant.official import FP8, I8, Checkpoint, dequantized_rows, rows
from quant.recipes import Recipe, choose_type, file_type
from quant.tokenizer import tokenizer_kv
from v4cli import __version__
from quant.errors import BadInput, CheckpointError, DiskSpaceError
from v4cli.partials import partial_path

if TYPE_CHECKING:
    from quant.imatrix import Imatrix

CHUNK_ELEMS = 1 << 22  # ~16 MB of f32 per slice: bounds peak memory, large enough to keep numpy efficient
PLAIN, EXPERTS, TID2EID, CONCAT = "plain", "experts", "tid2eid", "concat"


@dataclass(frozen=True)
class TensorPlan:
    """One GGUF tensor: its name, type and shape (torch order), and where its bytes come from."""

    gguf: str
    qtype: QT
    shape: tuple[int, ...]
    role: str
    kind: str
    sources: tuple[str, ...]  # official names (the weights; scales are found by name)
    source_dtype: str
    source_bytes: int

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.qtype, self.shape)


def plan(cfg: dict, recipe: Recipe, inventory: list[Entry] | None = None, *, mtp: bool = False) -> list[TensorPlan]:
    """The per-tensor conversion plan for a config (and its official inventory), in GGUF file order.

    `mtp`: plan llama.cpp's separate draft file instead — the trunk's embed/norm/head, the draft's own hc_head at
    the root, and MTP block 0 as `blk.{n_layers}` with eh_proj = [e_proj | h_proj] (llama.cpp runs one block).
    """
    inv = {e.name: e for e in (inventory if inventory is not None else official_inventory(cfg, with_mtp=mtp))}
    args = ModelArgs.from_config(cfg)
    n = args.num_hidden_layers
    out: list[TensorPlan] = []

    def scale_bytes(name: str) -> int:
        s = inv.get(name.removesuffix(".weight") + ".scale")
        return s.nbytes if s else 0

    def plain(official: str, m: N.Mapped):
        e = inv[official]
        if m.role == N.TID2EID:
            out.append(TensorPlan(m.gguf, QT.I32, e.shape, m.role, TID2EID, (official,), e.dtype, e.nbytes))
            return
        qt = choose_type(recipe, m.gguf, m.role, e.dtype, e.shape, n)
        out.append(TensorPlan(m.gguf, qt, e.shape, m.role, PLAIN, (official,), e.dtype, e.nbytes + scale_bytes(official)))

    def experts(layer: int):
        for w in ("w1", "w2", "w3"):
            srcs = tuple(N.official_expert(layer, e, w, n_layers=n) for e in range(args.n_routed_experts))
            first = inv[srcs[0]]
            shape = (args.n_routed_experts, first.shape[0], first.shape[1] * 2)  # FP4: two values per byte
            name = N.experts(layer, w)
            qt = choose_type(recipe, name, N.EXPS, first.dtype, shape, n)
            src_bytes = sum(inv[s].nbytes + scale_bytes(s) for s in srcs)
            out.append(TensorPlan(name, qt, shape, N.EXPS, EXPERTS, srcs, first.dtype, src_bytes))

    if not mtp:
        for official in N.ROOT:
            plain(official, N.to_gguf(official))
        for layer in range(n):
            for suffix in N.LAYER:
                official = N.official_layer(layer, suffix)
                if official in inv:
                    plain(official, N.to_gguf(official))
            experts(layer)
        return out

    for official in N.MTP_SHARED_ROOT:
        plain(official, N.to_gguf(official))
    for suffix in (*N.MTP_ROOT_HC, *N.LAYER, *N.MTP_ONLY):
        official = N.official_mtp(0, suffix)
        if official in inv:
            plain(official, N.mtp_to_gguf(official, n))
    experts(n)
    e, h = (inv[N.official_mtp(0, s)] for s in N.MTP_EH_SOURCES)
    shape, name = (e.shape[0], e.shape[1] + h.shape[1]), N.mtp_eh_proj(n)
    qt = choose_type(recipe, name, N.MTP_PROJ, e.dtype, shape, n)
    out.append(TensorPlan(name, qt, shape, N.MTP_PROJ, CONCAT, (e.name, h.name), e.dtype,
                          e.nbytes + h.nbytes + scale_bytes(e.name) + scale_bytes(h.name)))
    return out


def validate(ckpt: Checkpoint, cfg: dict, *, mtp: bool = False) -> list[Entry]:
    """Every tensor the config implies exists with its official dtype and shape; errors name file and tensor.

    `mtp`: the tensors of the draft file instead (the MTP block plus the shared embed/norm/head)."""
    inv = official_inventory(cfg, with_mtp=mtp)
    if mtp:
        inv = [e for e in inv if N.in_mtp_file(e.name)]
        probe = N.official_mtp(0, "attn_norm.weight")  # absent from the config's inventory or from the shards
        if probe not in {e.name for e in inv} or probe not in ckpt.tensors:
            raise CheckpointError(f"{ckpt.root}: the checkpoint has no MTP block (mtp.0.*) to convert",
                                  hint="convert without --mtp")
    for e in inv:
        ckpt.expect(e.name, (e.dtype,), e.shape)
    return inv


def _row_chunks(n_rows: int, row_len: int, align: int) -> Iterator[tuple[int, int]]:
    step = max(align, (CHUNK_ELEMS // max(row_len, 1)) // align * align)
    for r0 in range(0, n_rows, step):
        yield r0, min(n_rows, r0 + step)


@dataclass(frozen=True)
class Importance:
    """One tensor's importance matrix: `values` (n_mat, cols), matrix m covering rows m·rows_per_mat onward (an
    expert's rows, a group of the grouped output projection, or all rows)."""

    values: np.ndarray
    rows_per_mat: int

    def expert(self, e: int) -> Importance:
        return Importance(self.values[e:e + 1], self.rows_per_mat)


@dataclass(frozen=True)
class _Job:
    """Rows r0.. of a tensor (f32) to be quantized to `qt`: the unit of work the encoder pool runs."""

    x: np.ndarray
    qt: QT
    imp: Importance | None = None
    r0: int = 0

    def run(self) -> np.ndarray:
        if self.imp is None:
            return quantize(self.x, self.qt).reshape(-1)
        parts, r, per = [], 0, self.imp.rows_per_mat
        while r < self.x.shape[0]:  # one quantize call per matrix the slice covers
            m = (self.r0 + r) // per
            n = min(self.x.shape[0] - r, (m + 1) * per - (self.r0 + r))
            parts.append(quantize(self.x[r:r + n], self.qt, self.imp.values[m]).reshape(-1))
            r += n
        return np.concatenate(parts) if len(parts) > 1 else parts[0]


def _job(x: torch.Tensor, qt: QT, imp: Importance | None = None, r0: int = 0) -> _Job:
    return _Job(x.numpy(), qt, imp, r0)


def _run_job(job: _Job) -> np.ndarray:
    return job.run()


class Encoder:
    """Runs quantize jobs on `workers` processes (the searches are numpy code that holds the GIL between its many
    small array operations, so threads would not scale), results in order, with at most `2·workers` slices in
    flight so memory stays bounded. One worker runs everything in this process."""

    def __init__(self, workers: int):
        self.workers = max(1, workers)
        self.pool = None
        if self.workers > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            # fork where it exists: the children start with everything imported; elsewhere spawn (a fresh import)
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            self.pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context(method))

    def __enter__(self) -> Encoder:
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=exc[0] is None, cancel_futures=True)

    def map(self, pieces: Iterator[tuple[np.ndarray | _Job, int]]) -> Iterator[tuple[np.ndarray, int]]:
        """(bytes or job, consumed) → (bytes, consumed), in order."""
        from collections import deque

        pending: deque = deque()
        for item, consumed in pieces:
            if isinstance(item, _Job):
                item = item.run() if self.pool is None else self.pool.submit(_run_job, item)
            pending.append((item, consumed))
            while len(pending) > 2 * self.workers or (pending and not hasattr(pending[0][0], "result")):
                data, c = pending.popleft()
                yield (data.result() if hasattr(data, "result") else data), c
        while pending:
            data, c = pending.popleft()
            yield (data.result() if hasattr(data, "result") else data), c


def importance(imatrix: Imatrix | None, tp: TensorPlan) -> Importance | None:
    """The importance for one planned tensor, checked against its shape, or None (no imatrix, a type that takes
    none, or no entry for it: the quantizer then weighs errors by the weights' own magnitudes)."""
    if imatrix is None or tp.qtype not in IMATRIX_TYPES:
        return None
    values = imatrix.importance(tp.gguf, tp.shape[-1])
    if values is None:
        return None
    experts = tp.kind == EXPERTS
    rows = tp.shape[1] if experts else tp.shape[0]
    n_mat = values.shape[0] if values.ndim == 2 else 0
    if values.ndim != 2 or n_mat == 0 or values.shape[1] != tp.shape[-1] or (n_mat != tp.shape[0] if experts else rows % n_mat):
        raise BadInput(f"imatrix entry {tp.gguf} is {'x'.join(map(str, values.shape))}, which does not fit the "
                       f"tensor's shape {'x'.join(map(str, tp.shape))}", hint="the imatrix was made for another model")
    return Importance(np.ascontiguousarray(values, dtype=np.float32), rows if experts else rows // n_mat)


def needs_imatrix(recipe: Recipe, tensors: list[TensorPlan], imatrix: Imatrix | None) -> None:
    """llama.cpp's rule, kept: the lowest-bit types are written only with an importance matrix (unguided, they
    lose too much); checked before any work is done."""
    if imatrix is not None:
        return
    low = sorted({t.qtype.name for t in tensors if type_info(t.qtype).imatrix_only})
    if low:
        raise BadInput(f"recipe {recipe.name} uses {', '.join(low)}, which needs an importance matrix",
                       hint="make one with `v4 imatrix MODEL.gguf -o imatrix.gguf` (any GGUF of this model, or "
                            "llama.cpp's imatrix file for it) and pass --imatrix imatrix.gguf")


def _tensor_bytes(ckpt: Checkpoint, tp: TensorPlan, imp: Importance | None = None
                  ) -> Iterator[tuple[np.ndarray | _Job, int]]:
    """Yield (output bytes, or the job that makes them; source bytes consumed) slices of one planned tensor, in file
    order."""
    if tp.kind == TID2EID:
        t = ckpt.get(tp.sources[0])
        yield t.to(torch.int32).numpy().view(np.uint8).reshape(-1), tp.source_bytes
        return
    if tp.kind == EXPERTS:
        per = tp.source_bytes // len(tp.sources)
        for e, src in enumerate(tp.sources):
            if tp.qtype == QT.MXFP4 and tp.source_dtype == I8:
                scale = src.removesuffix(".weight") + ".scale"
                blocks = mxfp4_from_official(ckpt.get(src).view(torch.uint8).numpy(), ckpt.get(scale).view(torch.uint8).numpy())
                yield blocks.reshape(-1), per
            else:
                out_rows = tp.shape[1]
                imp_e = None if imp is None else imp.expert(e)
                for r0, r1 in _row_chunks(out_rows, tp.shape[2], 1):
                    yield (_job(dequantized_rows(ckpt, src, r0, r1), tp.qtype, imp_e),
                           per * (r1 - r0) // out_rows)
        return
    if tp.kind == CONCAT:  # rows of each source side by side: [e_proj | h_proj]
        for r0, r1 in _row_chunks(tp.shape[0], tp.shape[1], FP8_BLOCK):
            parts = [dequantized_rows(ckpt, s, r0, r1) for s in tp.sources]
            yield _job(torch.cat(parts, dim=1), tp.qtype, imp, r0), tp.source_bytes * (r1 - r0) // tp.shape[0]
        return
    src = tp.sources[0]
    n_rows = tp.shape[0] if len(tp.shape) > 1 else 1
    if len(tp.shape) == 1:
        yield _job(rows(ckpt, src, 0, tp.shape[0]).float(), tp.qtype), tp.source_bytes
        return
    align = FP8_BLOCK if tp.source_dtype == FP8 else 1
    for r0, r1 in _row_chunks(n_rows, tp.shape[-1], align):
        yield _job(dequantized_rows(ckpt, src, r0, r1), tp.qtype, imp, r0), tp.source_bytes * (r1 - r0) // n_rows


def size_label(tensors: list[TensorPlan]) -> str:
    """`general.size_label` as llama.cpp's converter counts it for a MoE file: "{experts}x{size}", where size is
    every weight outside the routed experts plus one expert's share of each 3-D `_exps` tensor (e.g. "256x…B")."""
    shared = expert = expert_sum = n_expert_tensors = 0
    for t in tensors:
        n = math.prod(t.shape)
        if t.kind == EXPERTS:
            expert += n // t.shape[0]
            expert_sum += t.shape[0]
            n_expert_tensors += 1
        else:
            shared += n
    n_experts = expert_sum // n_expert_tensors if n_expert_tensors else 0
    return gguf_size_label(shared + expert, shared, expert, n_experts)


def header_kv(cfg: dict, src: Path, recipe: Recipe, tensors: list[TensorPlan], source_repo: str | None,
              source_revision: str | None, mtp: bool = False, imatrix: Imatrix | None = None,
              imatrix_file: str | None = None) -> list[tuple[str, object, GGUFValueType]]:
    args = ModelArgs.from_config(cfg)
    S, U = GGUFValueType.STRING, GGUFValueType.UINT32
    kv = [(K.General.NAME, cfg.get("_name_or_path") or source_repo or Path(src).name, S),
          (K.General.FILE_TYPE, int(file_type((t.qtype, math.prod(t.shape)) for t in tensors)), U),
          (K.General.SIZE_LABEL, size_label(tensors), S),
          # llama.cpp's converter and quantizer write it whatever the types (ggml's GGML_QNT_VERSION)
          (K.General.QUANT_VERSION, 2, U)]
    kv += args.gguf_kv(with_mtp=mtp)
    kv += tokenizer_kv(src, args.vocab_size, args.bos_token_id, args.eos_token_id)
    kv += [
        (K.Provenance.TOOL, f"v4 {__version__}", S),
        (K.Provenance.RECIPE, recipe.name + "".join(f" {p}={t}" for p, t in recipe.overrides), S),
        (K.Provenance.SOURCE_DTYPES, json.dumps({t.gguf: t.source_dtype for t in tensors}), S),
        (K.Provenance.CONFIG_JSON, json.dumps(cfg), S),
    ]
    if imatrix is not None:  # as llama-quantize records it
        kv += [(K.Quantize.IMATRIX_FILE, imatrix_file or "", S),
               (K.Quantize.IMATRIX_N_ENTRIES, len(imatrix.sums), GGUFValueType.INT32),
               (K.Quantize.IMATRIX_N_CHUNKS, imatrix.chunk_count, GGUFValueType.INT32)]
        if imatrix.datasets:
            kv.append((K.Quantize.IMATRIX_DATASET, imatrix.datasets[0], S))
    if source_repo:
        kv.append((K.Provenance.SOURCE_REPO, source_repo, S))
    if source_revision:
        kv.append((K.Provenance.SOURCE_REVISION, source_revision, S))
    return kv


@dataclass
class Progress:
    """What a conversion reports as it goes; the CLI renders it."""

    tensor: str
    done_bytes: int  # source bytes consumed so far
    total_bytes: int


@dataclass(frozen=True)
class ConvertResult:
    path: Path
    tensors: int
    out_bytes: int
    in_bytes: int
    seconds: float


def convert(src: Path, out: Path, recipe: Recipe, *, source_repo: str | None = None,
            source_revision: str | None = None, progress: Callable[[Progress], None] | None = None,
            mtp: bool = False, imatrix: Imatrix | None = None, imatrix_file: str | None = None,
            workers: int | None = None) -> ConvertResult:
    """Convert an official checkpoint folder to one GGUF file at `out` (atomic).

    `mtp`: write llama.cpp's separate MTP draft file (see `plan`) instead of the model. `imatrix`: the importance
    matrix (from `imatrix_file`) that guides every quantizer that takes one. `workers`: quantizing processes
    (default: one per CPU core)."""
    src, out = Path(src), Path(out)
    cfg = read_config(src / "config.json")  # raises for other architectures before any shard is opened
    ckpt = Checkpoint(src)
    inv = validate(ckpt, cfg, mtp=mtp)
    tensors = plan(cfg, recipe, inv, mtp=mtp)
    needs_imatrix(recipe, tensors, imatrix)
    total_out = sum(t.nbytes for t in tensors)
    total_in = sum(t.source_bytes for t in tensors)
    t0 = time.perf_counter()
    with disk_full_is_an_error(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(out.parent).free
        if free < total_out * 1.01 + (64 << 20):
            raise DiskSpaceError(f"{out.parent}: {total_out / 1e9:.2f} GB needed for the output, "
                                 f"{free / 1e9:.2f} GB free", hint="free space or pass -o on another disk")
        tmp = partial_path(out)
        w = GGUFWriter(tmp, K.ARCH)
        try:
            for key, val, typ in header_kv(cfg, src, recipe, tensors, source_repo, source_revision, mtp, imatrix,
                                           imatrix_file):
                w.add_key_value(key, val, typ)
            for t in tensors:
                # a non-uint8 dtype tells the writer `shape` is in elements, not bytes
                w.add_tensor_info(t.gguf, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            fout = w.fout[0]
            done = 0
            with Encoder(workers or os.cpu_count() or 1) as enc:
                for t in tensors:
                    w.write_padding(fout, fout.tell())
                    written = 0
                    for data, consumed in enc.map(_tensor_bytes(ckpt, t, importance(imatrix, t))):
                        fout.write(memoryview(np.ascontiguousarray(data)))
                        written += data.nbytes
                        done += consumed
                        if progress:
                            progress(Progress(t.gguf, done, total_in))
                    if written != t.nbytes:
                        raise CheckpointError(f"{t.gguf}: wrote {written} bytes, planned {t.nbytes} "
                                              f"(source {t.sources[0]})")
                    w.write_padding(fout, written)
            fout.flush()
            os.fsync(fout.fileno())
            w.close()
            tmp.replace(out)
            _fsync_dir(out.parent)
        except BaseException:
            _discard(w, tmp)
            raise
    return ConvertResult(out, len(tensors), out.stat().st_size, total_in, time.perf_counter() - t0)


# a full disk and a full quota look the same to the user: the output does not fit where it is being written
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


@contextmanager
def disk_full_is_an_error(out: Path) -> Iterator[None]:
    """An out-of-space OSError inside (disk or quota full, wherever it strikes) becomes DiskSpaceError for `out`."""
    try:
        yield
    except OSError as e:
        if e.errno in NO_SPACE:
            why = os.strerror(e.errno)
            raise DiskSpaceError(f"{out.parent} filled up while writing {out.name} ({why}); the unfinished output "
                                 "was removed", hint="free space or pass -o on another disk") from None
        raise


def _discard(w: GGUFWriter, tmp: Path) -> None:
    """Close and delete an unfinished output. Closing flushes, and on a full disk that flush fails too; the file
    is being deleted either way, and the error that stopped the write is the one the caller re-raises."""
    try:
        w.close()
    except OSError:
        pass
    tmp.unlink(missing_ok=True)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
