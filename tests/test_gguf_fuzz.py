"""Fuzz the GGUF reader: truncations and byte corruptions of small valid files either parse or raise GGUFError
(UnsupportedModel for a damaged architecture name) — never another exception, a hang or a large allocation.
Valid files (and corrupted ones both readers accept) must parse exactly as gguf-py's GGUFReader parses them.
"""

from __future__ import annotations

import copy
import math
import random
import signal
import struct
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as VT

from quant import keys as K
from quant.config import FLASH_CONFIG, ModelArgs
from quant.errors import GGUFError, UnsupportedModel
from v4cli.gguf_file import GGUFFile, deepseek4_tensor_shapes

CASE_SECONDS = 2.0  # a parse of these files takes milliseconds; anything near this is a hang
CASE_PEAK_BYTES = 8 << 20  # tracemalloc peak per case: the files are < 100 KB, so 8 MB means an unbounded alloc


def _finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_generic(path: Path) -> None:
    """Every KV value type, nested arrays, a custom alignment and tensors of several ggml types."""
    rng = np.random.default_rng(1)
    w = gguf.GGUFWriter(str(path), "fuzz")
    w.add_custom_alignment(64)
    for i, vt in enumerate((VT.UINT8, VT.INT8, VT.UINT16, VT.INT16, VT.UINT32, VT.INT32, VT.UINT64, VT.INT64)):
        w.add_key_value(f"fuzz.int.{vt.name.lower()}", i + 1, vt)
    w.add_key_value("fuzz.f32", 0.5, VT.FLOAT32)
    w.add_key_value("fuzz.f64", -2.25, VT.FLOAT64)
    w.add_key_value("fuzz.bool", True, VT.BOOL)
    w.add_key_value("fuzz.str", "héllo wörld", VT.STRING)
    w.add_array("fuzz.arr.int", [3, 1, 4, 1, 5])
    w.add_array("fuzz.arr.float", [0.25, -1.5])
    w.add_array("fuzz.arr.str", ["a", "", "ccc", "日本"])
    w.add_key_value("fuzz.arr.u8", [7, 8, 9], VT.ARRAY, sub_type=VT.UINT8)
    w.add_key_value("fuzz.arr.bool", [True, False, True], VT.ARRAY, sub_type=VT.BOOL)
    w.add_array("fuzz.arr.nested", [[1, 2], [3], [4, 5, 6]])
    w.add_tensor("t.f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("t.f16", rng.standard_normal((2, 2, 8)).astype(np.float16))
    w.add_tensor("t.i32", np.arange(7, dtype=np.int32))
    w.add_tensor("t.q8_0", rng.integers(0, 255, (2, 2 * 34), dtype=np.uint8), raw_dtype=Q.Q8_0)
    w.add_tensor("t.mxfp4", rng.integers(0, 255, (3, 17), dtype=np.uint8), raw_dtype=Q.MXFP4)
    w.add_tensor("t.q4_k", rng.integers(0, 255, (1, 144), dtype=np.uint8), raw_dtype=Q.Q4_K)
    w.add_tensor("t.bf16", rng.integers(0, 255, (4, 2 * 8), dtype=np.uint8), raw_dtype=Q.BF16)
    _finish(w)


TINY_DS4 = {
    "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "head_dim": 32, "qk_rope_head_dim": 8,
    "q_lora_rank": 32, "o_groups": 2, "o_lora_rank": 32, "moe_intermediate_size": 32, "n_routed_experts": 2,
    "num_experts_per_tok": 1, "num_hash_layers": 1, "sliding_window": 8, "index_n_heads": 2, "index_head_dim": 32,
    "index_topk": 4, "vocab_size": 16, "compress_ratios": [0, 4, 8, 0],
}


def write_deepseek4(path: Path) -> ModelArgs:
    """A complete (tiny) deepseek4 file, MTP block included, so validate_deepseek4() is fuzzed too."""
    cfg = copy.deepcopy(FLASH_CONFIG)
    cfg.update(TINY_DS4)
    args = ModelArgs.from_config(cfg)
    w = gguf.GGUFWriter(str(path), K.ARCH)
    for key, value, vtype in args.gguf_kv(with_mtp=True):
        w.add_key_value(key, value, vtype)
    for name, shape in deepseek4_tensor_shapes(args, mtp=True).items():
        if len(shape) == 1:
            w.add_tensor(name, np.ones(shape, np.float32))
        elif name.endswith("tid2eid.weight"):
            w.add_tensor(name, np.zeros(shape, np.int32))
        else:
            w.add_tensor(name, np.zeros(shape, np.float16))
    _finish(w)
    return args


class _Timeout(BaseException):
    pass


def _alarm(*_):
    raise _Timeout


def _read(path: Path) -> GGUFFile | None:
    """Parse and exercise a file; None when it is rejected with one of our errors."""
    try:
        f = GGUFFile(path)
    except (GGUFError, UnsupportedModel):
        return None
    try:
        for name, t in f.tensors.items():
            assert f.raw(name).numel() == t.nbytes
        if f.architecture == K.ARCH:
            f.validate_deepseek4()
    except (GGUFError, UnsupportedModel):
        pass
    return f


def _run_case(path: Path, data: bytes) -> GGUFFile | None:
    # a fresh file per case: rewriting one in place makes ext4 flush it on every close (auto_da_alloc)
    path.write_bytes(data)
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
    try:
        return _read(path)
    except _Timeout:
        pytest.fail(f"parse took more than {CASE_SECONDS}s (hang) on a {len(data)}-byte input")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        path.unlink()  # an open mapping stays valid after the unlink


_INTERESTING_U64 = (0, 1, 2, 3, 4, 9, 63, 64, 255, 2**31, 2**32 - 1, 2**32, 2**40, 2**60, 2**63, 2**64 - 1)
_INTERESTING_U32 = (0, 1, 2, 4, 5, 8, 9, 12, 13, 39, 42, 255, 2**16, 2**31, 2**32 - 1)


def _mutate(base: bytes, header_end: int, rng: random.Random) -> bytes:
    """One deterministic corruption, biased towards the header (tensor bytes are opaque to the reader)."""
    b = bytearray(base)
    hot = header_end if rng.random() < 0.9 else len(b)
    kind = rng.randrange(6)
    if kind == 0:  # truncate
        return bytes(b[: rng.randrange(len(b))])
    if kind == 1:  # flip a few bits
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(hot)] ^= 1 << rng.randrange(8)
    elif kind == 2:  # an interesting u64 at any byte position
        pos = rng.randrange(max(1, hot - 8))
        b[pos : pos + 8] = struct.pack("<Q", rng.choice(_INTERESTING_U64))
    elif kind == 3:  # an interesting u32 (types, ranks, versions)
        pos = rng.randrange(max(1, hot - 4))
        b[pos : pos + 4] = struct.pack("<I", rng.choice(_INTERESTING_U32))
    elif kind == 4:  # random bytes
        pos = rng.randrange(hot)
        b[pos : pos + rng.randint(1, 16)] = rng.randbytes(rng.randint(1, 16))
    else:  # delete or duplicate a span: every later field shifts
        pos, n = rng.randrange(hot), rng.randint(1, 24)
        b[pos : pos + n] = b"" if rng.random() < 0.5 else b[pos : pos + n] * 2
    return bytes(b)


def _header_end(path: Path) -> int:
    with GGUFFile(path) as f:
        return f.data_offset


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, tuple[Path, bytes, int]]:
    d = tmp_path_factory.mktemp("fuzz")
    out = {}
    for name, writer in (("generic", write_generic), ("deepseek4", write_deepseek4)):
        p = d / f"{name}.gguf"
        writer(p)
        out[name] = (p, p.read_bytes(), _header_end(p))
    return out


def _fuzz(bases, tmp_path, n_cases: int, seed: int) -> tuple[int, int]:
    """Run `n_cases` corruptions (2 of 3 on the generic file); return (parsed, rejected) counts."""
    ok = bad = 0
    for i in range(n_cases):
        rng = random.Random(seed * 1_000_003 + i)
        name = "deepseek4" if i % 3 == 2 else "generic"
        _, base, header_end = bases[name]
        data = _mutate(base, header_end, rng)
        # tracemalloc slows the big file's case 6x: trace every generic case and every 4th deepseek4 one
        trace = name == "generic" or i % 12 == 2
        if trace:
            tracemalloc.start()
        f = _run_case(tmp_path / f"case{i}.gguf", data)
        if trace:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            assert peak < CASE_PEAK_BYTES, f"case {seed}/{i} ({name}) allocated {peak} bytes"
        if f is None:
            bad += 1
            continue
        ok += 1
        if name == "generic" or ok % 4 == 0:
            _compare_with_gguf_py(f, tmp_path / f"case{i}.gguf")
        f.close()
    return ok, bad


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b and type(a) is type(b)


def _compare_with_gguf_py(f: GGUFFile, path: Path) -> None:
    """Where gguf-py's reader also accepts the file, both must agree on every key and tensor."""
    try:
        r = gguf.GGUFReader(str(path))
    except Exception:  # gguf-py is the oracle only for files it accepts; its rejections carry no contract
        return
    fields = {k: v for k, v in r.fields.items() if not k.startswith("GGUF.")}
    assert list(fields) == list(f.metadata)
    for key, field in fields.items():
        if len(field.types) > 2:  # gguf-py flattens nested arrays
            continue
        want = field.contents()
        if field.types == [VT.BOOL]:
            want = bool(want)
        elif field.types[-1] == VT.BOOL:
            want = [bool(x) for x in want]
        assert _same(f.metadata[key], want), key
    assert [t.name for t in r.tensors] == list(f.tensors)
    for t in r.tensors:
        mine = f.tensors[t.name]
        assert mine.qtype == t.tensor_type
        assert mine.shape == tuple(reversed([int(x) for x in t.shape]))
        assert (mine.offset, mine.nbytes) == (t.data_offset, t.n_bytes)
        assert f.raw(t.name).numpy().tobytes() == np.asarray(t.data).tobytes()


def test_valid_files_parse_exactly_like_gguf_py(bases):
    for name, (path, _, _) in bases.items():
        with GGUFFile(path) as f:
            _compare_with_gguf_py(f, path)
            assert len(f.tensors) > 5 and len(f.metadata) > 10, name


def test_generic_values_round_trip(bases):
    path, _, _ = bases["generic"]
    with GGUFFile(path) as f:
        md = f.metadata
        assert md["fuzz.arr.nested"] == [[1, 2], [3], [4, 5, 6]]
        assert f.types["fuzz.arr.nested"] == (VT.ARRAY, VT.ARRAY, VT.INT32)
        assert md["fuzz.arr.str"] == ["a", "", "ccc", "日本"]
        assert md["fuzz.arr.bool"] == [True, False, True]
        assert md["fuzz.str"] == "héllo wörld" and md["fuzz.bool"] is True
        assert md["fuzz.f64"] == -2.25 and f.types["fuzz.f64"] == (VT.FLOAT64,)
        assert [md[f"fuzz.int.{t}"] for t in ("uint8", "int8", "uint16", "int16", "uint32", "int32")] == [1, 2, 3, 4, 5, 6]
        assert f.alignment == 64 and all(t.offset % 64 == 0 for t in f.tensors.values())
        assert f.tensors["t.q4_k"].shape == (1, 256) and f.tensors["t.q4_k"].nbytes == 144
        assert f.tensors["t.mxfp4"].shape == (3, 32) and f.tensors["t.mxfp4"].nbytes == 51


def test_every_truncation_of_the_header_and_data_fails_cleanly(bases, tmp_path):
    work = tmp_path / "t.gguf"
    for name, (path, base, header_end) in bases.items():
        with GGUFFile(path) as f:
            data_end = max(t.offset + t.nbytes for t in f.tensors.values())
        # every cut in the first 2 KB (counts, keys, arrays), then every 7th byte of the header, sparser in the data
        lengths = [*range(min(2048, header_end)), *range(2048, header_end + 8, 7), *range(header_end, data_end, 499)]
        for n in lengths:
            assert _run_case(work, base[:n]) is None, f"{name}: a {n}-byte prefix of {data_end} parsed"
        # the padding after the last tensor is not needed
        g = _run_case(work, base[:data_end])
        assert g is not None
        g.close()


def test_random_corruptions(bases, tmp_path):
    ok, bad = _fuzz(bases, tmp_path, n_cases=1500, seed=1)
    # both outcomes must occur, or the mutator is not reaching the parser
    assert ok > 100 and bad > 500, (ok, bad)


@pytest.mark.slow
def test_random_corruptions_many(bases, tmp_path):
    ok, bad = _fuzz(bases, tmp_path, n_cases=20000, seed=2)
    assert ok > 1500 and bad > 8000, (ok, bad)
