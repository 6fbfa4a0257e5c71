"""llama.cpp's split GGUF sets (`NAME-00001-of-00003.gguf` …): written by quant.split, read as one model everywhere."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from gguf import GGUFValueType
from typer.testing import CliRunner

from quant import keys as K
from quant.split import split_gguf
from v4cli.cli import app, main
from v4cli.engine import Engine
from v4cli.engine.prefix_cache import model_fingerprint
from quant.errors import BadInput, GGUFError
from v4cli.gguf_file import GGUFFile, SplitGGUF, open_gguf
from v4cli.testing.tiny import random_token_ids

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny ops on a shared 2-core box

SPLIT_KEYS = [K.Split.NO, K.Split.TENSORS_COUNT, K.Split.COUNT]  # gguf-split's order: count is set last


def _split3(src, out_prefix):
    with GGUFFile(src) as gf:
        n = len(gf.tensors)
    return split_gguf(src, out_prefix, max_tensors=-(-n // 3))


@pytest.fixture(scope="module")
def whole(tiny_gguf):
    return tiny_gguf("lossless")


@pytest.fixture(scope="module")
def parts(whole, tmp_path_factory):
    return _split3(whole, tmp_path_factory.mktemp("split") / "tiny")


def _link_set(parts, folder, names=None):
    """Hard links of `parts` in `folder` (under `names`): a set to break without copying 150 MB."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for p, name in zip(parts, names or [p.name for p in parts]):
        os.link(p, folder / name)
        out.append(folder / name)
    return out


# ---------------------------------------------------------------------------------------------- the layout


def test_parts_follow_llama_cpp_layout(whole, parts):
    assert [p.name for p in parts] == [f"tiny-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    with GGUFFile(whole) as src:
        files = [GGUFFile(p) for p in parts]
        # the first part: every source key, then the split keys; later parts: only the split keys
        assert list(files[0].metadata) == [*src.metadata, *SPLIT_KEYS]
        for i, f in enumerate(files):
            if i:
                assert list(f.metadata) == SPLIT_KEYS
            assert [f.metadata[k] for k in SPLIT_KEYS] == [i, len(src.tensors), 3]
            assert [f.types[k] for k in SPLIT_KEYS] == [(GGUFValueType.UINT16,), (GGUFValueType.INT32,),
                                                        (GGUFValueType.UINT16,)]
            assert f.version == 3 and all(t.offset % 32 == 0 for t in f.tensors.values())
        # the source's tensors in the source's order, 52 + 52 + 50
        assert [len(f.tensors) for f in files] == [52, 52, 50]
        assert [n for f in files for n in f.tensors] == list(src.tensors)
        for f in files:
            f.close()


def test_split_by_size(whole, tmp_path):
    limit = 70_000_000
    paths = split_gguf(whole, tmp_path / "sz", max_bytes=limit)
    assert len(paths) == 3
    with GGUFFile(whole) as src:
        for p in paths:
            with GGUFFile(p) as f:
                assert sum(-(-t.nbytes // 32) * 32 for t in f.tensors.values()) <= limit
        with open_gguf(paths[0]) as s:
            assert list(s.tensors) == list(src.tensors)
    with pytest.raises(BadInput, match="token_embd.weight alone is .* over the 50,000,000-byte limit"):
        split_gguf(whole, tmp_path / "small", max_bytes=50_000_000)
    with pytest.raises(BadInput, match="not both"):
        split_gguf(whole, tmp_path / "both", max_tensors=10, max_bytes=limit)
    one = split_gguf(whole, tmp_path / "one", max_tensors=1000)  # a one-part set is a plain file to read
    assert [p.name for p in one] == ["one-00001-of-00001.gguf"]
    with open_gguf(one[0]) as f:
        assert type(f) is GGUFFile
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in [*paths, *one])  # no partials left


def test_parts_match_llama_cpp_gguf_split_byte_for_byte(whole, tmp_path):
    """Against llama.cpp's own tool when one is at hand ($LLAMA_GGUF_SPLIT or llama-gguf-split on PATH)."""
    import subprocess

    tool = os.environ.get("LLAMA_GGUF_SPLIT") or shutil.which("llama-gguf-split")
    if not tool:
        pytest.skip("no llama.cpp gguf-split binary (set LLAMA_GGUF_SPLIT)")
    for args, kw in ((["--split-max-tensors", "52"], {"max_tensors": 52}),
                     (["--split-max-size", "70M"], {"max_bytes": 70_000_000})):
        for d in ("ref", "ours"):
            shutil.rmtree(tmp_path / d, ignore_errors=True)
        (tmp_path / "ref").mkdir()
        subprocess.run([tool, "--split", *args, str(whole), str(tmp_path / "ref" / "m")], check=True,
                       capture_output=True)
        ours = split_gguf(whole, tmp_path / "ours" / "m", **kw)
        assert [p.name for p in ours] == sorted(p.name for p in (tmp_path / "ref").iterdir())
        for p in ours:
            assert p.read_bytes() == (tmp_path / "ref" / p.name).read_bytes(), p.name


# ---------------------------------------------------------------------------------------------- the reader


def test_split_set_reads_as_the_whole_file(whole, parts):
    with GGUFFile(whole) as src:
        for entry in (parts[0], parts[2], parts[0].parent):  # the first part, a later one, the folder
            with open_gguf(entry) as s:
                assert isinstance(s, SplitGGUF) and s.path == parts[0]
                assert [p.path for p in s.parts] == parts
                assert {k: v for k, v in s.metadata.items() if k not in SPLIT_KEYS} == src.metadata
                assert s.types[K.Model.COMPRESS_RATIOS] == src.types[K.Model.COMPRESS_RATIOS]
                assert list(s.tensors) == list(src.tensors)
                for name, t in src.tensors.items():
                    u = s.tensors[name]
                    assert (u.qtype, u.shape, u.nbytes) == (t.qtype, t.shape, t.nbytes)
                    assert torch.equal(s.raw(name), src.raw(name)), name
                assert s.size == sum(p.stat().st_size for p in parts)
                assert s.args == src.args and s.validate_deepseek4() == src.args
                assert s.type_histogram() == src.type_histogram() and s.architecture == "deepseek4"
                assert s.prefault()
        with open_gguf(whole) as f:  # an unsplit file opens as it always did
            assert type(f) is GGUFFile and f.parts == (f,) and f.metadata == src.metadata


def test_fingerprint_covers_every_part(whole, parts, tmp_path):
    with open_gguf(whole) as w, open_gguf(parts[0]) as s:
        fp = model_fingerprint(s, "f32")
        assert fp == model_fingerprint(s, "f32") and fp != model_fingerprint(w, "f32")
    # the same first two parts, other weight bytes in the last one
    linked = _link_set(parts[:2], tmp_path)
    last = tmp_path / parts[2].name
    shutil.copy(parts[2], last)
    with GGUFFile(last) as g:
        offsets = [t.offset for t in g.tensors.values()]
    with open(last, "r+b") as f:
        for off in offsets:
            f.seek(off)
            b = f.read(1)
            f.seek(off)
            f.write(bytes([b[0] ^ 1]))
    with open_gguf(linked[0]) as s2:
        assert model_fingerprint(s2, "f32") != fp


# ---------------------------------------------------------------------------------------------- broken sets


def test_missing_part_names_the_file(parts, tmp_path):
    got = _link_set(parts[:2], tmp_path)
    for entry in (got[0], got[1], tmp_path):
        with pytest.raises(GGUFError, match="tiny-00003-of-00003.gguf: part 3 of 3 .* is missing") as e:
            open_gguf(entry)
        assert "download tiny-00003-of-00003.gguf again" in e.value.hint
    later = _link_set(parts[1:], tmp_path / "no-first")
    with pytest.raises(GGUFError, match="tiny-00001-of-00003.gguf: part 1 of 3 .* is missing"):
        open_gguf(later[0])


def test_parts_of_another_set_are_refused(whole, parts, tmp_path):
    # the same model split at other tensor boundaries (60 + 60 + 34)
    other = split_gguf(whole, tmp_path / "other" / "tiny", max_tensors=60)
    dup = _link_set([parts[0], other[1], parts[2]], tmp_path / "dup")
    with pytest.raises(GGUFError, match=r"tiny-00003-of-00003.gguf: tensor '.*' is also in tiny-00002") as e:
        open_gguf(dup[0])
    assert "same set" in e.value.hint
    short = _link_set([*parts[:2], other[2]], tmp_path / "short")
    with pytest.raises(GGUFError, match=r"tiny-00001-of-00003.gguf: the 3 parts hold 138 tensors, "
                                        r"split.tensors.count says 154"):
        open_gguf(short[0])
    # a part of a 4-part set named as the third of three
    four = split_gguf(whole, tmp_path / "four" / "tiny", max_tensors=40)
    wrong = _link_set([*parts[:2], four[2]], tmp_path / "wrong", [p.name for p in parts])
    with pytest.raises(GGUFError, match="tiny-00003-of-00003.gguf: should be part 3 of 3 .* says part 3 of 4"):
        open_gguf(wrong[0])
    # parts swapped by name
    swapped = _link_set([parts[0], parts[2], parts[1]], tmp_path / "swapped", [p.name for p in parts])
    with pytest.raises(GGUFError, match="tiny-00002-of-00003.gguf: part 3 of 3 of a split set must be named like "
                                        "tiny-00003-of-00003.gguf"):
        open_gguf(swapped[1])
    with pytest.raises(GGUFError, match="tiny-00002-of-00003.gguf: should be part 2 of 3 .* says part 3 of 3"):
        open_gguf(swapped[0])
    # a renamed first part: the others cannot be found
    renamed = _link_set([parts[0]], tmp_path / "renamed", ["model.gguf"])
    with pytest.raises(GGUFError, match="must be named like model-00001-of-00003.gguf"):
        open_gguf(renamed[0])


def test_folder_with_two_models_is_refused(whole, parts, tmp_path):
    _link_set([*parts, whole], tmp_path)
    with pytest.raises(BadInput, match=r"holds 2 GGUF models: tiny-\*-of-00003.gguf, tiny-lossless.gguf"):
        open_gguf(tmp_path)


# ---------------------------------------------------------------------------------------------- the engine, the CLI


def test_engine_logits_equal_the_whole_file(whole, parts, tmp_path):
    ids = random_token_ids(24, seed=3)
    want = Engine.load(whole, kv_format="f32").logits(ids, chunk=16)
    for entry in (parts[0], parts[0].parent):
        eng = Engine.load(entry, kv_format="f32")
        assert isinstance(eng.source, SplitGGUF)
        assert torch.equal(eng.logits(ids, chunk=16), want)
    # `v4 eval` on the folder
    (tmp_path / "ids.txt").write_text(" ".join(map(str, ids)))
    main(["eval", str(parts[0].parent), "--tokens", str(tmp_path / "ids.txt"), "--chunk", "16", "--kv-format",
          "f32", "--dump-logits", str(tmp_path / "logits.npy")])
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "logits.npy")), want)


def test_info_on_a_split_set(parts):
    for entry in (parts[1], parts[0].parent):
        result = CliRunner().invoke(app, ["info", str(entry)])
        assert result.exit_code == 0, (result.output, result.exception)
        lines = [line.rstrip() for line in result.output.splitlines()]
        assert lines[0] == f"file        {parts[0]}"
        assert lines[1] == f"parts       3: {', '.join(p.name for p in parts)}"
        assert lines[2] == f"size        {sum(p.stat().st_size for p in parts) / 1e6:.2f} MB " \
                           f"({sum(p.stat().st_size for p in parts):,} bytes)"
        with GGUFFile(parts[0]) as first:
            assert lines[3] == f"format      GGUF v3, 154 tensors, {len(first.metadata)} keys"
        assert "check       ok: every tensor present with the shape the config implies" in lines


@pytest.mark.llama
@pytest.mark.slow
def test_llama_cpp_loads_the_set_from_any_part(tiny_gguf, tmp_path):
    pytest.importorskip("llama_cpp")
    from v4cli.engine.llama import LlamaEngine

    src = tiny_gguf("f32", "tiny-128")  # the preset llama.cpp loads
    parts = _split3(src, tmp_path / "m")
    ids = random_token_ids(40, seed=5)

    def logits(path):
        eng = LlamaEngine.load(path, kv_format="f32", n_threads=1, n_ctx=64)
        try:
            return eng.path, eng.logits(ids, chunk=40)
        finally:
            eng.close()

    _, want = logits(src)
    for entry in (parts[0], parts[2], tmp_path):
        path, got = logits(entry)
        assert path == parts[0]  # llama.cpp is given the first part and finds the others by name
        assert torch.equal(got, want)
