"""The validating GGUF reader on hand-made headers (every check, with its message), the deepseek4 validation on
tiny files, zero-copy tensor views, and `v4 info` through the real app."""

from __future__ import annotations

import copy
import dataclasses
import struct
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as VT
from typer.testing import CliRunner

from quant import keys as K
from quant import names as N
from quant.config import FLASH_CONFIG, ModelArgs
from v4cli.model import kvsize
from v4cli.cli import app, main
from quant.errors import GGUFError, UnsupportedModel
from v4cli.gguf_file import GGUFFile, deepseek4_tensor_shapes
from v4cli.store import format_bytes

# ---------------------------------------------------------------------------------------------- raw headers


def _s(text: str | bytes) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def _kv(key: str, vtype: VT, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def _tinfo(name: str, dims: list[int], qtype: int, offset: int) -> bytes:
    return _s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack(
        "<IQ", qtype, offset)


def raw_gguf(kvs: list[bytes] = (), infos: list[bytes] = (), data: bytes = b"", *, version: int = 3,
             n_kv: int | None = None, n_tensors: int | None = None, alignment: int = 32) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(infos)
    body += b"\0" * (-len(body) % alignment)
    return body + data


F32_4x2 = _tinfo("w", [2, 4], Q.F32, 0)  # ggml dims [2, 4] = torch (4, 2), 32 bytes


def _open(tmp_path: Path, data: bytes) -> GGUFFile:
    p = tmp_path / "x.gguf"
    p.write_bytes(data)
    return GGUFFile(p)


def _fails(tmp_path: Path, data: bytes, *fragments: str) -> str:
    with pytest.raises(GGUFError) as e:
        _open(tmp_path, data)
    msg = str(e.value)
    assert str(tmp_path / "x.gguf") in msg
    for frag in fragments:
        assert frag in msg, msg
    return msg


def test_minimal_file_parses(tmp_path):
    data = raw_gguf([_kv("a.u32", VT.UINT32, struct.pack("<I", 7))], [F32_4x2], bytes(range(32)))
    with _open(tmp_path, data) as f:
        assert f.version == 3 and f.metadata == {"a.u32": 7} and f.types == {"a.u32": (VT.UINT32,)}
        t = f.tensors["w"]
        assert (t.qtype, t.shape, t.nbytes, t.offset) == (Q.F32, (4, 2), 32, f.data_offset)
        assert f.raw("w").tolist() == list(range(32))


@pytest.mark.parametrize(
    "data,fragments",
    [
        (b"GGML" + bytes(40), ("not a GGUF file",)),
        (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), ("big-endian", "little-endian")),
        (b"GGUF" + struct.pack("<IQQ", 1, 0, 0), ("v1 is obsolete",)),
        (b"GGUF" + struct.pack("<IQQ", 7, 0, 0), ("unsupported GGUF version 7",)),
        (b"GGUF\x03\0", ("too small",)),
    ],
)
def test_header_is_checked(tmp_path, data, fragments):
    _fails(tmp_path, data, *fragments)


def test_version_2_is_read(tmp_path):
    with _open(tmp_path, raw_gguf([], [F32_4x2], bytes(32), version=2)) as f:
        assert f.version == 2 and f.tensors["w"].nbytes == 32


def test_huge_counts_fail_before_allocating(tmp_path):
    cases = [
        raw_gguf([], [], n_kv=2**60),
        raw_gguf([], [], n_tensors=2**60),
        raw_gguf([_s("k") + struct.pack("<I", VT.STRING) + struct.pack("<Q", 2**62)]),
        raw_gguf([_kv("k", VT.ARRAY, struct.pack("<IQ", VT.UINT64, 2**60))]),
        raw_gguf([_kv("k", VT.ARRAY, struct.pack("<IQ", VT.STRING, 2**40))]),
        raw_gguf([_kv("k", VT.ARRAY, struct.pack("<IQ", VT.ARRAY, 2**40))]),
        raw_gguf([], [_tinfo("w", [2**40, 2**40], Q.F32, 0)]),
    ]
    for data in cases:
        tracemalloc.start()
        with pytest.raises(GGUFError):
            _open(tmp_path, data)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < 1 << 20, peak


def test_deeply_nested_arrays_are_rejected(tmp_path):
    nested = struct.pack("<IQ", VT.ARRAY, 1) * 20 + struct.pack("<IQ", VT.UINT8, 0)
    _fails(tmp_path, raw_gguf([_kv("k", VT.ARRAY, nested)]), "nests arrays deeper than 8")


@pytest.mark.parametrize(
    "kvs,fragments",
    [
        ([_kv("k", 99, b"")], ("'k'", "unknown value type 99")),
        ([_kv("", VT.UINT8, b"\1")], ("metadata key #0 is empty",)),
        ([_kv("k", VT.UINT8, b"\1"), _kv("k", VT.UINT8, b"\2")], ("duplicate metadata key 'k'",)),
        ([_kv("k", VT.BOOL, b"\2")], ("bool stored as 2",)),
        ([_kv("k", VT.ARRAY, struct.pack("<IQ", VT.BOOL, 2) + b"\1\5")], ("not 0 or 1",)),
        ([_kv("k\xff", VT.UINT8, b"\1")], ()),
        ([_s(b"bad\xff") + struct.pack("<I", VT.UINT8) + b"\1"], ("not valid UTF-8",)),
        ([_kv("k", VT.STRING, _s(b"\xc3"))], ("value of 'k'", "not valid UTF-8")),
        ([_kv(K.General.ALIGNMENT, VT.UINT32, struct.pack("<I", 48))], ("48 is not a power of two",)),
        ([_kv(K.General.ALIGNMENT, VT.UINT64, struct.pack("<Q", 64))], ("must be a u32",)),
    ],
)
def test_metadata_is_checked(tmp_path, kvs, fragments):
    data = raw_gguf(kvs)
    if not fragments:  # a valid non-ASCII key
        with _open(tmp_path, data) as f:
            assert list(f.metadata) == ["k\xff"]
        return
    _fails(tmp_path, data, *fragments)


@pytest.mark.parametrize(
    "infos,data,fragments",
    [
        ([_tinfo("w", [2, 4], 99, 0)], bytes(32), ("'w'", "unknown ggml type id 99")),
        ([_tinfo("w", [2, 4], 4, 0)], bytes(32), ("unknown ggml type id 4",)),  # Q4_2: removed from ggml
        ([_tinfo("w", [2, 0], Q.F32, 0)], bytes(32), ("invalid shape [2, 0]",)),
        ([_tinfo("w", [1, 1, 1, 1, 1], Q.F32, 0)], bytes(32), ("5 dimensions",)),
        ([_tinfo("w", [33, 1], Q.Q8_0, 0)], bytes(64), ("rows of 33", "block size 32")),
        ([_tinfo("w", [2, 4], Q.F32, 32)], bytes(32), ("past the end of the file", "truncated")),
        ([_tinfo("w", [2, 4], Q.F32, 8)], bytes(64), ("offset 8 is not a multiple of the alignment 32",)),
        ([F32_4x2, F32_4x2], bytes(32), ("duplicate tensor name 'w'",)),
        ([F32_4x2, _tinfo("v", [16], Q.F32, 0)], bytes(64), ("overlap",)),
        ([_tinfo("", [2], Q.F32, 0)], bytes(32), ("name of 0 bytes",)),
        ([_tinfo("n" * 64, [2], Q.F32, 0)], bytes(32), ("name of 64 bytes",)),
    ],
)
def test_tensor_infos_are_checked(tmp_path, infos, data, fragments):
    _fails(tmp_path, raw_gguf([], infos, data), *fragments)


def test_alignment_key_moves_the_data_section(tmp_path):
    kvs = [_kv(K.General.ALIGNMENT, VT.UINT32, struct.pack("<I", 256))]
    with _open(tmp_path, raw_gguf(kvs, [F32_4x2], bytes(32), alignment=256)) as f:
        assert f.alignment == 256 and f.data_offset == 256 and f.tensors["w"].offset == 256


def test_missing_and_unreadable_paths(tmp_path):
    with pytest.raises(GGUFError, match="no such file"):
        GGUFFile(tmp_path / "nope.gguf")
    with pytest.raises(GGUFError, match="is a folder"):
        GGUFFile(tmp_path)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(GGUFError, match="too small"):
        GGUFFile(tmp_path / "empty.gguf")


def test_raw_is_a_zero_copy_view_that_outlives_close(tmp_path):
    data = raw_gguf([], [F32_4x2, _tinfo("v", [8], Q.I32, 32)], bytes(range(64)))
    f = _open(tmp_path, data)
    a, a2, b = f.raw("w"), f.raw("w"), f.raw("v")
    assert a.dtype == torch.uint8 and a.shape == (32,)
    # two views of one mapping: the same address, and addresses as far apart as the offsets
    assert a.data_ptr() == a2.data_ptr()
    assert b.data_ptr() - a.data_ptr() == f.tensors["v"].offset - f.tensors["w"].offset
    assert b.view(torch.int32).tolist() == np.frombuffer(bytes(range(32, 64)), "<i4").tolist()
    f.close()
    assert a.sum().item() == sum(range(32))  # the view keeps the mapping alive
    with pytest.raises(GGUFError, match="closed"):
        f.raw("w")
    with pytest.raises(GGUFError, match="no tensor named 'x'"):
        _open(tmp_path, data).raw("x")


def _mapped_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of `path` (/proc/self/smaps)."""
    total, ours = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's header line
            ours = line.endswith(str(path))
        elif ours and line.startswith("Rss:"):
            total += int(head[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_prefault_maps_every_page(tmp_path, monkeypatch):
    from v4cli import gguf_file

    monkeypatch.setattr(gguf_file, "PREFAULT_SLICE", 3 << 20)  # several slices, the last one short
    size = 32 << 20
    data = raw_gguf([], [_tinfo("w", [size // 4], Q.F32, 0)], bytes(size))
    f = _open(tmp_path, data)
    path = f.path.resolve()
    assert _mapped_kib(path) < size // 1024 // 2  # parsing the header touched its first pages only
    assert not f.prefault(max_fraction_of_ram=1e-9)  # a file "larger than RAM" is left alone
    assert f.prefault()
    assert _mapped_kib(path) >= size // 1024
    assert f.raw("w").sum().item() == 0
    f.close()
    assert not f.prefault()  # closed: nothing to map


# ---------------------------------------------------------------------------------------------- deepseek4

TINY = {
    "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "head_dim": 32, "qk_rope_head_dim": 8,
    "q_lora_rank": 32, "o_groups": 2, "o_lora_rank": 32, "moe_intermediate_size": 32, "n_routed_experts": 4,
    "num_experts_per_tok": 2, "num_hash_layers": 1, "sliding_window": 8, "index_n_heads": 2, "index_head_dim": 32,
    "index_topk": 4, "vocab_size": 96, "compress_ratios": [0, 4, 16, 4, 0],
}


def tiny_args() -> ModelArgs:
    cfg = copy.deepcopy(FLASH_CONFIG)
    cfg.update(TINY)
    return ModelArgs.from_config(cfg)


def write_ds4(path: Path, args: ModelArgs, *, kv=None, tensors=None, provenance: dict | None = None) -> Path:
    """A tiny deepseek4 GGUF: F32 1-D, I32 tid2eid, Q8_0 attention, MXFP4 experts, F16 the rest.
    `kv(list)` / `tensors(dict)` may edit the (key, value, type) list and the name → (qtype, array) dict."""
    rng = np.random.default_rng(0)
    kvs = list(args.gguf_kv(with_mtp=True))
    if provenance:
        kvs += [(k, v, VT.STRING) for k, v in provenance.items()]
    ts = {}
    for name, shape in deepseek4_tensor_shapes(args, mtp=True).items():
        role = N.role_of_gguf(name)
        if len(shape) == 1:
            ts[name] = (Q.F32, rng.standard_normal(shape).astype(np.float32))
        elif role == N.TID2EID:
            ts[name] = (Q.I32, rng.integers(0, args.n_routed_experts, shape).astype(np.int32))
        elif role == N.ATTN:
            ts[name] = (Q.Q8_0, rng.integers(0, 255, (*shape[:-1], shape[-1] // 32 * 34), dtype=np.uint8))
        elif role == N.EXPS:
            ts[name] = (Q.MXFP4, rng.integers(0, 255, (*shape[:-1], shape[-1] // 32 * 17), dtype=np.uint8))
        else:
            ts[name] = (Q.F16, rng.standard_normal(shape).astype(np.float16))
    if kv:
        kvs = kv(kvs)
    if tensors:
        tensors(ts)
    w = gguf.GGUFWriter(str(path), K.ARCH)
    for key, value, vtype in kvs:
        w.add_key_value(key, value, vtype)
    for name, (qtype, arr) in ts.items():
        w.add_tensor(name, arr, raw_dtype=None if qtype in (Q.F32, Q.F16, Q.I32) else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def ds4(tmp_path_factory) -> Path:
    return write_ds4(tmp_path_factory.mktemp("ds4") / "tiny.gguf", tiny_args(),
                     provenance={K.Provenance.SOURCE_REPO: "test/tiny", K.Provenance.RECIPE: "mixed"})


def test_deepseek4_file_validates(ds4):
    with GGUFFile(ds4) as f:
        args = f.validate_deepseek4()
        f32 = float(np.float32(1e-6))  # eps travel as f32 keys
        assert args == dataclasses.replace(tiny_args(), hc_eps=f32, rms_norm_eps=f32)
        assert f.tensors[N.experts(1, "w2")].shape == (4, 64, 32) and f.tensors[N.experts(1, "w2")].qtype == Q.MXFP4
        assert f.tensors[N.blk(0, "attn.wo_a.weight")].shape == (64, 64)
        hist = f.type_histogram()
        assert list(hist) == [Q.F32, Q.F16, Q.Q8_0, Q.I32, Q.MXFP4]
        assert sum(c for c, _ in hist.values()) == len(f.tensors)
        assert sum(b for _, b in hist.values()) == sum(t.nbytes for t in f.tensors.values())


def test_flash_shapes_match_the_official_table():
    shapes = deepseek4_tensor_shapes(ModelArgs.from_config(FLASH_CONFIG))
    # 6 root; per layer 24 (9 attention, 6 mHC, 2 norms/router, bias or tid2eid, 3 + 3 experts); CSA +10, HCA +4
    assert len(shapes) == 6 + 43 * 24 + 21 * 10 + 20 * 4
    assert shapes[N.blk(2, "attn.compressor.wkv.weight")] == (1024, 4096)  # CSA: overlapped, 2·512
    assert shapes[N.blk(3, "attn.compressor.ape")] == (128, 512)  # HCA ratio 128
    assert shapes[N.blk(2, "attn.indexer.compressor.ape")] == (4, 256)
    assert shapes[N.blk(0, "attn.wo_a.weight")] == (8192, 4096) and shapes[N.blk(0, "attn.wq_b.weight")] == (32768, 1024)
    assert shapes[N.blk(0, "ffn.gate.tid2eid")] == (129280, 6) and N.blk(3, "ffn.gate.tid2eid") not in shapes
    assert shapes[N.experts(5, "w1")] == (256, 2048, 4096) and shapes[N.experts(5, "w2")] == (256, 4096, 2048)
    assert shapes[N.root("hc_head_fn")] == (4, 16384) and shapes[N.blk(7, "hc_ffn_fn")] == (24, 16384)
    mtp = deepseek4_tensor_shapes(ModelArgs.from_config(FLASH_CONFIG), trunk=False, mtp=True)
    assert mtp[f"blk.43.{N.MTP_EH_PROJ}"] == (4096, 8192) and not any(k.startswith("blk.0.") for k in mtp)


def _drop(name):
    return lambda ts: ts.pop(name)


@pytest.mark.parametrize(
    "kv,tensors,fragments",
    [
        (None, _drop(N.blk(1, "attn.indexer.wq_b.weight")), ("missing tensor blk.1.indexer.attn_q_b.weight",)),
        (None, lambda ts: ts.update({"blk.0.extra.weight": (Q.F32, np.zeros(4, np.float32))}),
         ("unexpected tensor blk.0.extra.weight",)),
        (None, lambda ts: ts.update({N.blk(2, "attn.compressor.ape"): (Q.F32, np.zeros((16, 64), np.float32))}),
         ("blk.2.attn_compressor_ape.weight has shape [16, 64], expected [16, 32]",)),
        (None, lambda ts: ts.update({N.blk(0, "attn_norm.weight"): (Q.F16, np.zeros(64, np.float16))}),
         ("1-D tensor blk.0.attn_norm.weight is F16, must be F32",)),
        (None, lambda ts: ts.update({N.blk(0, "ffn.gate.tid2eid"): (Q.F32, np.zeros((96, 2), np.float32))}),
         ("blk.0.ffn_gate_tid2eid.weight is F32, must be I32",)),
        (None, lambda ts: ts.update({N.blk(0, "attn.wq_a.weight"): (
            Q.Q8_1, np.zeros((*ts[N.blk(0, "attn.wq_a.weight")][1].shape[:-1],
                              ts[N.blk(0, "attn.wq_a.weight")][1].shape[-1] // 34 * 40), np.uint8))}),
         ("blk.0.attn_q_a.weight is Q8_1, a ggml type v4 does not run",)),
        (lambda kvs: [x for x in kvs if x[0] != K.Model.HC_COUNT], None, ("missing key deepseek4.hyper_connection.count",)),
        (lambda kvs: [(k, v, VT.UINT64 if k == K.Model.CONTEXT_LENGTH else t) for k, v, t in kvs], None,
         ("deepseek4.context_length must be uint32, is uint64",)),
        (lambda kvs: [(k, [0, 2] if k == K.Model.COMPRESS_RATIOS else v, t) for k, v, t in kvs], None,
         ("has 2 entries, need ≥ 5", "invalid ratios [2]")),
        (lambda kvs: [(k, 0 if k == K.Model.HEAD_COUNT else v, t) for k, v, t in kvs], None,
         ("deepseek4.attention.head_count = 0 must be positive",)),
        (lambda kvs: [(k, 1 if k == K.Model.EXPERT_GATING_FUNC else v, t) for k, v, t in kvs], None,
         ("expert_gating_func = 1",)),
        # the verbatim tokenizer.json: checked at open, not first met inside the prompt encoder
        (lambda kvs: kvs + [(K.Tokenizer.HF_JSON, '{"model": {"vocab": ', VT.STRING)], None,
         ("tokenizer.huggingface.json is not valid JSON",)),
        (lambda kvs: kvs + [(K.Tokenizer.HF_JSON, 7, VT.UINT32)], None,
         ("tokenizer.huggingface.json must be string, is uint32",)),
        (lambda kvs: kvs + [(K.Tokenizer.HF_JSON, ["{}"], VT.ARRAY)], None,
         ("tokenizer.huggingface.json must be string, is array of string",)),
        (lambda kvs: kvs + [(K.Tokenizer.HF_JSON, '"a tokenizer"', VT.STRING)], None,
         ("tokenizer.huggingface.json holds a JSON str, not an object",)),
    ],
)
def test_deepseek4_validation_names_the_problem(tmp_path, kv, tensors, fragments):
    path = write_ds4(tmp_path / "bad.gguf", tiny_args(), kv=kv, tensors=tensors)
    with GGUFFile(path) as f, pytest.raises(GGUFError) as e:  # the container itself is fine
        f.validate_deepseek4()
    for frag in fragments:
        assert frag in str(e.value), str(e.value)
    assert str(path) in str(e.value) and e.value.hint


@pytest.mark.parametrize("value,vtype", [("{not json", VT.STRING), (7, VT.UINT32)])
def test_bad_tokenizer_json_is_one_line_through_the_cli(tmp_path, capsys, value, vtype):
    path = write_ds4(tmp_path / "bad.gguf", tiny_args(), kv=lambda kvs: kvs + [(K.Tokenizer.HF_JSON, value, vtype)])
    with pytest.raises(SystemExit) as e:
        main(["info", str(path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {path}: invalid deepseek4 metadata: tokenizer.huggingface.json "), err


def test_other_architectures_are_unsupported(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    w.add_tensor("t", np.zeros(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with GGUFFile(tmp_path / "llama.gguf") as f:
        assert f.architecture == "llama"
        with pytest.raises(UnsupportedModel, match="architecture is 'llama', not 'deepseek4'"):
            _ = f.args


# ---------------------------------------------------------------------------------------------- v4 info


def _info(*argv: str) -> list[str]:
    result = CliRunner().invoke(app, ["info", *argv])
    assert result.exit_code == 0, (result.output, result.exception)
    return [line.rstrip() for line in result.output.splitlines()]


def test_info_on_a_gguf(ds4):
    lines = _info(str(ds4))
    size = ds4.stat().st_size
    with GGUFFile(ds4) as f:
        n_tensors, n_keys = len(f.tensors), len(f.metadata)
        hist = f.type_histogram()
    assert lines[:6] == [
        f"file        {ds4}",
        f"size        {format_bytes(size)} ({size:,} bytes)",
        f"format      GGUF v3, {n_tensors} tensors, {n_keys} keys",
        "arch        deepseek4",
        "source      test/tiny",
        "recipe      mixed",
    ]
    assert lines[6].split() == ["type", "tensors", "bytes"]
    assert [ln.split()[:2] for ln in lines[7:12]] == [[q.name, str(c)] for q, (c, _) in hist.items()]
    assert hist[Q.I32] == (1, 96 * 2 * 4) and "I32          1      768 B" in lines
    assert "layers      4 (+1 MTP), hidden 64, 4 heads × 32" in lines
    assert "experts     4 routed (2 used) + 1 shared, 32 wide, first 1 layers hash-routed" in lines
    assert "attention   1 window-only, 2 CSA (ratio 4), 1 HCA (ratio 16), window 8" in lines
    assert "context     1,048,576 tokens, vocab 96" in lines
    assert "check       ok: every tensor present with the shape the config implies" in lines
    i = lines.index("KV cache       bf16        fp8")
    assert lines[i + 1:i + 5] == [
        "4K        284.42 KB  134.52 KB",
        "32K         2.23 MB    1.04 MB",
        "128K        8.92 MB    4.14 MB",
        "1M         71.31 MB   33.10 MB",
    ]
    assert kvsize.kv_bytes(tiny_args(), "bf16", 4096) == 284_416  # what the first row shows


def _plan_rows(lines: list[str]) -> dict[str, list[str]]:
    """The plan table's rows (component → size, where, read/token, ms/token) as `v4 plan` draws them."""
    rows = [[c.strip() for c in ln.split("│")[1:-1]] for ln in lines if ln.startswith("│")]
    return {r[0]: r[1:] for r in rows}


def test_info_plan_cpu_only(ds4):
    lines = _info(str(ds4), "--plan", "--vram", "0", "--ram", "16G", "--ctx", "4096", "--kv", "bf16")
    rows = _plan_rows(lines)
    assert {where for _, where, *_ in rows.values() if where} == {"RAM"}
    assert rows["KV cache (bf16, 4K tokens)"][:2] == ["284 KB", "RAM"]  # the KV table's 4K row, 284.42 KB
    assert "disk: nothing paged from disk" in lines
    assert not any(ln.startswith("GPU:") for ln in lines)


def test_info_plan_gpu_budget_and_bad_size(ds4):
    lines = _info(str(ds4), "--plan", "--vram", "3G", "--ram", "16G", "--ctx", "4096", "--kv", "bf16")
    rows = _plan_rows(lines)
    assert rows["KV cache (bf16, 4K tokens)"][1] == "GPU"
    assert rows["routed experts, layers 0–3"][1] == "GPU"  # room left after the dense set and the KV cache
    assert rows["embedding"][1] == "RAM"  # only its rows are gathered, on the CPU
    assert rows["MTP experts (unused)"][1] == "RAM"
    result = CliRunner().invoke(app, ["info", str(ds4), "--plan", "--vram", "lots"])
    assert result.exit_code != 0 and "cannot read 'lots' as a size" in str(result.exception)


def test_info_on_a_checkpoint_folder(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps(FLASH_CONFIG))
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(bytes(1000))
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(bytes(500))
    lines = _info(str(tmp_path))
    assert lines[:2] == [f"folder      {tmp_path}", "shards      2 safetensors, 1.50 KB"]
    assert "layers      43 (+1 MTP), hidden 4096, 64 heads × 512" in lines
    assert "attention   2 window-only, 21 CSA (ratio 4), 20 HCA (ratio 128), window 128" in lines
    assert "weights     fp8 e4m3, experts fp4" in lines
    assert "1M          7.22 GB    3.68 GB" in lines  # facts §5: 6,880 B/token bf16, ~3.5 KB fp8


def test_info_plan_of_a_non_deepseek4_file_fails_before_output(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    result = CliRunner().invoke(app, ["info", str(tmp_path / "llama.gguf"), "--plan"])
    assert isinstance(result.exception, UnsupportedModel) and result.output == ""
