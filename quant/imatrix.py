"""llama.cpp's importance-matrix files, read and written: its GGUF imatrix format and (read only) the legacy `.dat`.

Facts from the vendored llama.cpp (tools/imatrix/imatrix.cpp save_imatrix / save_imatrix_legacy / load_imatrix,
common/imatrix-loader.cpp, tools/quantize/quantize.cpp load_imatrix, ggml/src/gguf.cpp):

GGUF format (what `llama-imatrix` writes by default):
  * metadata, in this order: `general.type` = "imatrix" (string), `imatrix.datasets` (array of strings: the
    datasets of merged --in-file inputs, then this run's -f file), `imatrix.chunk_count` (u32: the number of
    chunks seen, max count / chunk_size), `imatrix.chunk_size` (u32: the -c context, n_ctx / n_parallel). No
    `general.architecture`, no `general.alignment` (default 32).
  * per weight, in sorted name order: `<weight>.in_sum2` F32 with ggml ne = [n_in, n_mat] — the raw sum of x²
    over every activation row multiplied into each matrix — then `<weight>.counts` F32 with ne = [1, n_mat], the
    number of rows summed into each. n_mat is the expert count for MUL_MAT_ID weights (3-D `*_exps`) and 1 for
    dense ones. ggml writes a tensor's rank without trailing 1-dims, so for n_mat = 1 both tensors are 1-D
    (in_sum2 [n_in], counts [1]).
  * the loader matches the pair by suffix, needs both and both F32, takes only their element counts
    (n_in = elements(in_sum2) / elements(counts)), and rounds the counts with lround. llama-quantize refuses a
    GGUF imatrix that lacks any of the three imatrix metadata keys.
  * importance as llama-quantize derives it: per matrix j, sums[j] / counts[j] in f32; a matrix with count 0 (an
    expert no calibration token was routed to) gets importance 1.0 for every column.

Legacy `.dat` (llama-imatrix --output-format dat; still read when the file is not GGUF), little-endian:
  i32 n_entries (≥ 1); per entry: i32 name length, name bytes, i32 ncall, i32 nval (≥ 1), nval f32 values;
  then optionally i32 chunk_count and i32 dataset length + dataset bytes. Values are (raw sum / count) · ncall
  per matrix (a matrix with count 0 is stored as 1 · ncall), there is one ncall for the whole entry and no
  matrix count. llama-quantize's importance is values / ncall (values as-is when ncall ≤ 0). llama-imatrix,
  merging one (--in-file), rebuilds raw form as values · chunk_size and ncall · chunk_size with its own
  chunk size.

Our in-memory form keeps the raw GGUF form in float64. A legacy entry becomes one matrix row (the file does not
say how its values split into experts) with sums = values and counts = [ncall] (ncall 0 → 1), which gives
exactly llama-quantize's importance; `importance(name, n_in)` reshapes such a row to the weight's matrices.
"""

from __future__ import annotations

import mmap
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from quant.errors import BadInput

TYPE = "imatrix"
KEY_TYPE = "general.type"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUFFIX_SUMS = ".in_sum2"
SUFFIX_COUNTS = ".counts"

_U32_MAX = (1 << 32) - 1
# f32 holds every integer up to 2^24 exactly; llama.cpp casts its int64 counts to float all the same
_HINT_REMAKE = "make the imatrix again with `v4 imatrix` or llama-imatrix"
_HINT_GGUF = "pass an imatrix made by `v4 imatrix` or llama-imatrix (GGUF or legacy .dat), not a model file"


@dataclass
class Imatrix:
    """An importance matrix in llama.cpp's raw GGUF form.

    `sums[name]` is (n_mat, n_in) float64: per matrix of weight `name` (a GGUF tensor name such as
    "blk.3.ffn_gate_exps.weight"; n_mat = n_expert for 3-D expert weights, 1 for dense ones) the sum of x² of
    every input column over the activation rows multiplied into it. `counts[name]` is (n_mat,) float64: how many
    rows were summed into each matrix. As in llama.cpp's file, a weight that ggml multiplies as several matrices
    under one count keeps them side by side in one row: DeepSeek-V4's `attn_output_a` (a 2-D file tensor viewed as
    o_groups matrices) is (1, o_groups · n_in); pass `n_in` to `importance` to split it. `chunk_size` is the context each chunk was evaluated with (0 for a legacy
    .dat, which does not record it), `chunk_count` the number of chunks seen.
    """

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, source: str = "imatrix") -> None:
        """BadInput unless every entry is a finite, non-negative (n_mat, n_in) sum with n_mat integral counts ≥ 0
        and all-zero sums where the count is 0; the metadata must fit llama.cpp's u32 fields."""
        if set(self.sums) != set(self.counts):
            odd = sorted(set(self.sums) ^ set(self.counts))[0]
            raise BadInput(f"{source}: {odd!r} has sums without counts or counts without sums", hint=_HINT_REMAKE)
        for what, v in (("chunk_count", self.chunk_count), ("chunk_size", self.chunk_size)):
            if not isinstance(v, (int, np.integer)) or not 0 <= v <= _U32_MAX:
                raise BadInput(f"{source}: {what} = {v!r} is not an unsigned 32-bit count", hint=_HINT_REMAKE)
        if not all(isinstance(d, str) for d in self.datasets):
            raise BadInput(f"{source}: datasets must be strings", hint=_HINT_REMAKE)
        for name in self.sums:
            s, c = self.sums[name], self.counts[name]
            if not isinstance(name, str) or not name:
                raise BadInput(f"{source}: an entry has an empty or non-string name {name!r}", hint=_HINT_REMAKE)
            if not isinstance(s, np.ndarray) or s.ndim != 2 or s.shape[0] < 1 or s.shape[1] < 1:
                raise BadInput(f"{source}: {name}: sums must be a 2-D (n_mat, n_in) array, got "
                               f"{getattr(s, 'shape', type(s).__name__)}", hint=_HINT_REMAKE)
            if not isinstance(c, np.ndarray) or c.shape != (s.shape[0],):
                raise BadInput(f"{source}: {name}: {s.shape[0]} matrices of sums but counts of shape "
                               f"{getattr(c, 'shape', type(c).__name__)}", hint=_HINT_REMAKE)
            if not np.isfinite(s).all():
                raise BadInput(f"{source}: {name}: sums hold NaN or infinity", hint=_HINT_REMAKE)
            if (s < 0).any():
                raise BadInput(f"{source}: {name}: negative sums of squares", hint=_HINT_REMAKE)
            if not np.isfinite(c).all() or (c < 0).any() or (c != np.round(c)).any():
                raise BadInput(f"{source}: {name}: counts must be whole numbers ≥ 0, got "
                               f"{c[~np.isfinite(c) | (c < 0) | (c != np.round(c))][:3].tolist()}", hint=_HINT_REMAKE)
            unused = c == 0
            if (s[unused] != 0).any():
                j = int(np.flatnonzero(unused & (s != 0).any(axis=1))[0])
                raise BadInput(f"{source}: {name}: matrix {j} has a count of 0 but non-zero sums", hint=_HINT_REMAKE)

    # ---- what llama-quantize makes of it ----
    def importance(self, name: str, n_in: int | None = None) -> np.ndarray | None:
        """(n_mat, n_in) f32 importance of weight `name` as llama-quantize derives it: sums / count per matrix,
        in f32 (the file's precision), and 1.0 everywhere for a matrix whose count is 0. None if `name` has no
        entry. `n_in` (the weight's row length) reshapes an entry that does not say how its values split into
        matrices (a legacy .dat entry of an expert weight, `attn_output_a`'s o_groups side by side) to
        (-1, n_in); BadInput if it does not divide."""
        if name not in self.sums:
            return None
        s = self.sums[name].astype(np.float32)
        c = self.counts[name].astype(np.float32)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            imp = np.where(c > 0, s / np.where(c > 0, c, np.float32(1)), np.float32(1)).astype(np.float32)
        if n_in is not None and imp.shape[1] != n_in:
            if imp.size % n_in:
                raise BadInput(f"imatrix entry {name!r} has {imp.size} values, not a multiple of the weight's row "
                               f"length {n_in}", hint="the imatrix was made for another model")
            imp = imp.reshape(-1, n_in)
        return imp

    # ---- combining ----
    def merge(self, other: Imatrix) -> Imatrix:
        """Sums and counts added, as `llama-imatrix --in-file a --in-file b` combines files: an entry in one only is
        kept; a single-count entry meeting an n-count one has its count broadcast to the n matrices; a legacy side
        (chunk_size 0) is first scaled by the other's chunk size (llama-imatrix rebuilds raw sums of a .dat with
        its own chunk size). Datasets are concatenated; chunk_count is recomputed as llama-imatrix does (the
        largest count // chunk_size). BadInput when an entry's total sizes differ."""
        a, b = self, other
        if a.chunk_size == 0 and b.chunk_size > 0:
            a = a._scaled(b.chunk_size)
        elif b.chunk_size == 0 and a.chunk_size > 0:
            b = b._scaled(a.chunk_size)
        sums: dict[str, np.ndarray] = {}
        counts: dict[str, np.ndarray] = {}
        for name in sorted(set(a.sums) | set(b.sums)):
            if name not in b.sums or name not in a.sums:
                src = a if name in a.sums else b
                sums[name], counts[name] = src.sums[name].copy(), src.counts[name].copy()
                continue
            sa, sb, ca, cb = a.sums[name], b.sums[name], a.counts[name], b.counts[name]
            if sa.size != sb.size:
                raise BadInput(f"cannot merge imatrix entry {name!r}: {sa.size} values vs {sb.size}",
                               hint="merge only imatrices made for the same model")
            rows = max(len(ca), len(cb))
            if sa.size % rows:
                raise BadInput(f"cannot merge imatrix entry {name!r}: {sa.size} values do not split into {rows} "
                               "matrices", hint="merge only imatrices made for the same model")
            if len(ca) != len(cb) and min(len(ca), len(cb)) != 1:
                raise BadInput(f"cannot merge imatrix entry {name!r}: {len(ca)} matrices vs {len(cb)}",
                               hint="merge only imatrices made for the same model")
            sums[name] = sa.reshape(rows, -1) + sb.reshape(rows, -1)
            counts[name] = np.broadcast_to(ca, (rows,)) + np.broadcast_to(cb, (rows,))
        chunk_size = a.chunk_size or b.chunk_size
        top = max((float(c.max()) for c in counts.values()), default=0.0)
        chunk_count = int(top // chunk_size) if chunk_size else a.chunk_count + b.chunk_count
        return Imatrix(sums, counts, [*a.datasets, *b.datasets], min(chunk_count, _U32_MAX), chunk_size)

    def _scaled(self, k: int) -> Imatrix:
        return Imatrix({n: s * k for n, s in self.sums.items()}, {n: c * k for n, c in self.counts.items()},
                       list(self.datasets), self.chunk_count, 0)

    # ---- writing ----
    def save(self, path: Path) -> None:
        """Write llama.cpp's GGUF imatrix format (see the module doc) atomically: a temp file in the same folder,
        fsync'd, renamed over `path`."""
        self.validate()
        if not self.sums:
            raise BadInput("refusing to write an empty imatrix (llama.cpp rejects a file without entries)",
                           hint="collect activations over some text first")
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            w = _Writer(tmp, arch=TYPE)
            try:
                # GGUFWriter always starts with general.architecture; llama-imatrix's files have none
                w.kv_data[0].pop("general.architecture", None)
                w.add_string(KEY_TYPE, TYPE)
                w.add_key_value(KEY_DATASETS, list(self.datasets), gguf.GGUFValueType.ARRAY,
                                sub_type=gguf.GGUFValueType.STRING)
                w.add_uint32(KEY_CHUNK_COUNT, int(self.chunk_count))
                w.add_uint32(KEY_CHUNK_SIZE, int(self.chunk_size))
                for name in sorted(self.sums):
                    if len(name.encode()) + len(SUFFIX_SUMS) > 63:  # GGML_MAX_NAME is 64 bytes including the NUL
                        raise BadInput(f"imatrix entry name {name!r} is too long for a GGUF tensor name",
                                       hint="GGUF weight names are at most 55 bytes")
                    s = np.ascontiguousarray(self.sums[name], dtype=np.float32)
                    c = np.ascontiguousarray(self.counts[name], dtype=np.float32)[:, None]
                    if s.shape[0] == 1:  # ggml drops trailing 1-dims from the rank it writes
                        s, c = s.reshape(-1), c.reshape(-1)
                    w.add_tensor(name + SUFFIX_SUMS, s)
                    w.add_tensor(name + SUFFIX_COUNTS, c)
                w.write_header_to_file()
                w.write_kv_data_to_file()
                w.write_tensors_to_file()
            finally:
                w.close()
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        try:
            dfd = os.open(path.parent, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


class _Writer(gguf.GGUFWriter):
    """gguf-py's writer, but able to write an empty string array: llama-imatrix writes `imatrix.datasets` with no
    items when it had no -f file, llama-quantize needs the key present, and gguf-py refuses empty arrays."""

    def _pack_val(self, val, vtype, add_vtype, sub_type=None):
        if vtype == gguf.GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
            return (self._pack("I", vtype) if add_vtype else b"") + self._pack("I", sub_type) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


# ---- reading ------------------------------------------------------------------------------------------------------

def load_imatrix(path: Path) -> Imatrix:
    """An imatrix file, GGUF (by its magic) or legacy .dat (anything else), fully validated: BadInput (one line,
    with a hint) for anything llama.cpp would not have written, never a traceback or an allocation beyond the
    file's size."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise BadInput(f"{path}: no such imatrix file", hint="check the path") from None
    except IsADirectoryError:
        raise BadInput(f"{path} is a folder, not an imatrix file") from None
    except OSError as e:
        raise BadInput(f"{path}: cannot read ({e.strerror or e})") from None
    return _load_gguf(path) if magic == b"GGUF" else _load_legacy(path)


def _load_gguf(path: Path) -> Imatrix:
    from gguf import GGMLQuantizationType, GGUFValueType

    from v4cli.gguf_file import GGUFFile  # imported here: it pulls in torch, which writing does not need

    with GGUFFile(path) as gf:  # bounds-checked header parse: GGUFError (a BadInput) for a damaged file
        md, ty = gf.metadata, gf.types
        if "general.architecture" in md or md.get(KEY_TYPE, TYPE) != TYPE:
            kind = md.get(KEY_TYPE) or md.get("general.architecture")
            raise BadInput(f"{path}: a {kind!r} GGUF, not an imatrix", hint=_HINT_GGUF)
        expect = {KEY_DATASETS: (GGUFValueType.ARRAY, GGUFValueType.STRING),
                  KEY_CHUNK_COUNT: (GGUFValueType.UINT32,), KEY_CHUNK_SIZE: (GGUFValueType.UINT32,)}
        for key, chain in expect.items():
            if key not in md:
                raise BadInput(f"{path}: imatrix metadata {key} is missing (llama-quantize refuses such a file)",
                               hint=_HINT_REMAKE)
            if ty[key] != chain and not (key == KEY_DATASETS and ty[key] == (GGUFValueType.ARRAY,) and not md[key]):
                raise BadInput(f"{path}: {key} has type {'/'.join(t.name for t in ty[key])}, expected "
                               f"{'/'.join(t.name for t in chain)}", hint=_HINT_REMAKE)
        pairs: dict[str, list] = {}
        for tname, info in gf.tensors.items():
            for suffix, slot in ((SUFFIX_SUMS, 0), (SUFFIX_COUNTS, 1)):
                if tname.endswith(suffix) and len(tname) > len(suffix):
                    pairs.setdefault(tname[: -len(suffix)], [None, None])[slot] = info
                    break
            else:
                raise BadInput(f"{path}: unexpected tensor {tname!r} (an imatrix holds only *{SUFFIX_SUMS} and "
                               f"*{SUFFIX_COUNTS})", hint=_HINT_GGUF)
        if not pairs:
            raise BadInput(f"{path}: the imatrix has no entries", hint=_HINT_REMAKE)
        sums: dict[str, np.ndarray] = {}
        counts: dict[str, np.ndarray] = {}
        for name, (si, ci) in pairs.items():
            if si is None or ci is None:
                missing = SUFFIX_COUNTS if ci is None else SUFFIX_SUMS
                raise BadInput(f"{path}: {name!r} lacks its {missing} tensor", hint=_HINT_REMAKE)
            for t in (si, ci):
                if t.qtype != GGMLQuantizationType.F32:
                    raise BadInput(f"{path}: {t.name} is {t.qtype.name}, llama.cpp requires F32", hint=_HINT_REMAKE)
            n_mat = ci.n_elements
            if si.n_elements % n_mat:
                raise BadInput(f"{path}: {name!r} has {si.n_elements} sums for {n_mat} counts (not a whole row "
                               "per matrix)", hint=_HINT_REMAKE)
            if len(si.shape) == 2 and si.shape[0] != n_mat:
                raise BadInput(f"{path}: {si.name} has shape {list(si.shape)} but {name}.counts has {n_mat} "
                               "entries", hint=_HINT_REMAKE)
            sums[name] = np.frombuffer(gf.raw(si.name).numpy(), dtype="<f4").reshape(n_mat, -1).astype(np.float64)
            counts[name] = np.frombuffer(gf.raw(ci.name).numpy(), dtype="<f4").astype(np.float64)
        return _checked(path, sums, counts, list(md[KEY_DATASETS]), int(md[KEY_CHUNK_COUNT]),
                        int(md[KEY_CHUNK_SIZE]))


def _checked(path: Path, sums, counts, datasets, chunk_count, chunk_size) -> Imatrix:
    """Build the Imatrix, turning its validation errors into ones that name the file."""
    im = Imatrix.__new__(Imatrix)
    im.sums, im.counts, im.datasets, im.chunk_count, im.chunk_size = sums, counts, datasets, chunk_count, chunk_size
    im.validate(str(path))
    return im


def _load_legacy(path: Path) -> Imatrix:
    hint = "this is neither a GGUF imatrix nor a legacy .dat one: pass the file llama-imatrix or `v4 imatrix` wrote"
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 4:
            raise BadInput(f"{path}: {size} bytes is not an imatrix", hint=hint)
        # mapped, not read: only the values of entries that check out are ever copied
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _parse_legacy(path, data, size, hint)


def _parse_legacy(path: Path, data: mmap.mmap, size: int, hint: str) -> Imatrix:
    pos = 0

    def i32(what: str) -> int:
        nonlocal pos
        if pos + 4 > size:
            raise BadInput(f"{path}: truncated legacy imatrix: {what} at byte {pos} lies past the end ({size} bytes)",
                           hint=hint)
        (v,) = struct.unpack_from("<i", data, pos)
        pos += 4
        return v

    n_entries = i32("the entry count")
    # the smallest entry is 4 + 1 + 4 + 4 + 4 bytes: no header may claim more entries than that many bytes hold
    if n_entries < 1 or n_entries * 17 > size - 4:
        raise BadInput(f"{path}: not an imatrix (legacy header claims {n_entries} entries in {size} bytes)", hint=hint)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for i in range(n_entries):
        n = i32(f"the name length of entry {i}")
        if not 1 <= n <= min(4096, size - pos):
            raise BadInput(f"{path}: legacy imatrix entry {i} has a name length of {n} bytes", hint=hint)
        try:
            name = bytes(data[pos : pos + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise BadInput(f"{path}: legacy imatrix entry {i} has a name that is not UTF-8", hint=hint) from None
        pos += n
        if name in sums:
            raise BadInput(f"{path}: duplicate imatrix entry {name!r}", hint=_HINT_REMAKE)
        ncall = i32(f"the call count of {name!r}")
        nval = i32(f"the value count of {name!r}")
        if ncall < 0:
            raise BadInput(f"{path}: {name!r} has a negative call count {ncall}", hint=_HINT_REMAKE)
        if nval < 1 or nval * 4 > size - pos:
            raise BadInput(f"{path}: {name!r} claims {nval} values but {size - pos} bytes are left", hint=hint)
        vals = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float64)
        pos += 4 * nval
        # raw form: sums / counts = values / ncall, llama-quantize's legacy importance (values as-is when ncall is 0)
        sums[name] = vals.reshape(1, nval)
        counts[name] = np.array([float(max(ncall, 1))])
    chunk_count, datasets = 0, []
    if pos < size:  # the optional trailer: chunk count, then the dataset name
        chunk_count = i32("the chunk count")
        if chunk_count < 0:
            raise BadInput(f"{path}: negative chunk count {chunk_count}", hint=_HINT_REMAKE)
        if pos < size:
            n = i32("the dataset name length")
            if n < 0 or n > size - pos:
                raise BadInput(f"{path}: dataset name of {n} bytes but {size - pos} are left", hint=hint)
            if n:
                datasets.append(bytes(data[pos : pos + n]).decode("utf-8", errors="replace"))
            pos += n
        if pos != size:
            raise BadInput(f"{path}: {size - pos} unexpected bytes after the legacy imatrix trailer", hint=hint)
    return _checked(path, sums, counts, datasets, chunk_count, 0)
