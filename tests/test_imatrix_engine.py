"""`v4 imatrix`: our engine's importance matrix against llama.cpp's own (the committed llama-imatrix fixture), resume
after an interruption, and `v4 quantize --imatrix` with files from either tool."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from quant.imatrix import Imatrix, load_imatrix
from v4cli.cli import main
from v4cli.engine.detok import tokenizer_from_metadata
from v4cli.engine.imatrix import calibration_windows, chunk_windows, collect
from v4cli.engine.loader import load_model
from quant.errors import BadInput
from v4cli.gguf_file import open_gguf

DATA = Path(__file__).parent / "data"
FIXTURE = DATA / "llama-imatrix-tiny.gguf"  # llama-imatrix -c 64 on tiny-128 (f32) over imatrix-calib.txt
# products our engine does outside `linear` (the router's scores, the mHC mixers): no recipe quantizes those
# tensors (they stay F32/BF16), so their entries would never be read
NOT_RECORDED = ("ffn_gate_inp.weight", "hc_attn_fn.weight", "hc_ffn_fn.weight")


def _run(path: Path, text: str, chunk: int, stop_after: int | None = None, im: Imatrix | None = None) -> Imatrix:
    net, gf = load_model(path)
    windows = calibration_windows(text, tokenizer_from_metadata(gf.metadata), gf.metadata, gf.args.bos_token_id,
                                  chunk)
    im = im or Imatrix({}, {}, ["imatrix-calib.txt"], 0, chunk)
    for rec in collect(net, net.tensors, windows, im):
        if stop_after is not None and rec.done == stop_after:
            break
    return im


@pytest.fixture(scope="module")
def tiny128(tiny_gguf):
    return tiny_gguf("f32", preset="tiny-128")


@pytest.fixture(scope="module")
def ours(tiny128):
    return _run(tiny128, (DATA / "imatrix-calib.txt").read_text(), 64)


def test_matches_llama_imatrix(ours):
    ref = load_imatrix(FIXTURE)
    assert ours.chunk_count == ref.chunk_count == 12 and ours.chunk_size == ref.chunk_size == 64
    missing = set(ref.sums) - set(ours.sums)
    assert missing and all(name.endswith(NOT_RECORDED) for name in missing)
    assert set(ours.sums) <= set(ref.sums)
    for name in ours.sums:
        a, b = ours.sums[name], ref.sums[name]
        assert a.shape == b.shape, name  # the grouped output projection: one entry, the groups side by side
        # random weights put a routing decision on a knife edge now and then: a token may go to another expert
        moved = np.abs(ours.counts[name] - ref.counts[name]).sum()
        assert moved <= 2, (name, ours.counts[name], ref.counts[name])
        same = ours.counts[name] == ref.counts[name]
        if same.any():
            err = np.abs(a[same] - b[same]).max() / np.abs(b[same]).max()
            assert err < 2e-3, (name, err)  # f32 sums in another order; llama.cpp's matmuls round differently


def test_resume_equals_one_run(tiny128, ours, tmp_path):
    text = (DATA / "imatrix-calib.txt").read_text()
    part = _run(tiny128, text, 64, stop_after=5)
    assert part.chunk_count == 5
    part.save(tmp_path / "partial.gguf")
    done = _run(tiny128, text, 64, im=load_imatrix(tmp_path / "partial.gguf"))
    assert done.chunk_count == 12
    for name in ours.sums:
        np.testing.assert_array_equal(done.counts[name], ours.counts[name])
        np.testing.assert_allclose(done.sums[name], ours.sums[name], rtol=1e-6)


def test_chunk_windows_follow_llama_imatrix():
    assert chunk_windows(list(range(10, 110)), 32, None) == [list(range(10 + 32 * i, 42 + 32 * i)) for i in range(3)]
    w = chunk_windows(list(range(10, 110)), 32, 0)  # BOS in front, then every window starts with BOS
    assert len(w) == 3 and all(x[0] == 0 and len(x) == 32 for x in w) and w[1][1:] == list(range(42, 73))
    with pytest.raises(BadInput, match="less than one chunk"):
        chunk_windows([1, 2, 3], 32, None)
    with pytest.raises(BadInput, match="too small"):
        chunk_windows(list(range(100)), 4, None)


def test_cli_writes_and_resumes(tiny128, tmp_path, monkeypatch, capsys):
    import v4cli.engine.imatrix as eng

    text = tmp_path / "calib.txt"
    text.write_text((DATA / "imatrix-calib.txt").read_text())
    out = tmp_path / "tiny.imatrix.gguf"
    real = eng.collect

    def interrupted(*args, **kw):  # a Ctrl-C after the third chunk, with a save after every chunk
        for rec in real(*args, **{**kw, "save_every_s": 0.0}):
            yield rec
            if rec.done == 3:
                raise KeyboardInterrupt

    monkeypatch.setattr(eng, "collect", interrupted)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        main(["imatrix", str(tiny128), "--text", str(text), "-c", "64", "-o", str(out)])
    assert not out.exists() and (tmp_path / f".{out.name}.partial").exists()
    monkeypatch.setattr(eng, "collect", real)
    capsys.readouterr()
    main(["imatrix", str(tiny128), "--text", str(text), "-c", "64", "-o", str(out)])
    captured = capsys.readouterr()
    assert "resuming at chunk 4 of 12" in captured.err
    assert not (tmp_path / f".{out.name}.partial").exists() and not (tmp_path / f".{out.name}.partial.json").exists()
    im = load_imatrix(out)
    assert im.chunk_count == 12 and im.datasets == [str(text)]
    # a different text does not resume someone else's partial run
    other = tmp_path / "other.txt"
    other.write_text(text.read_text() + " more")
    main(["imatrix", str(tiny128), "--text", str(other), "-c", "64", "-o", str(tmp_path / "b.gguf")])
    assert "resuming" not in capsys.readouterr().err


def test_default_calibration_text_is_packaged():
    from v4cli.commands.imatrix import calibration_text

    text, names = calibration_text([])
    assert names == ["calibration.txt"] and len(text) > 100_000
    for probe in ("def ", "fn ", "SELECT", "的", "<think>", "｜DSML｜"):  # code, Chinese, chat and tool formats
        assert probe in text


def test_quantize_takes_either_tools_imatrix(tiny_dir, tmp_path, ours):
    """A llama.cpp-written imatrix (the fixture) and ours both guide `v4 quantize`; the recipe that needs one
    refuses without it."""
    from v4cli.testing.tiny import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tiny_dir / "ckpt-tiny-128", preset="tiny-128")
    with pytest.raises(SystemExit) as e:
        main(["quantize", str(ckpt), "-r", "iq2-80", "-o", str(tmp_path / "x.gguf")])
    assert e.value.code == 2 and not (tmp_path / "x.gguf").exists()
    ours.save(tmp_path / "ours.gguf")
    files = {}
    for label, im in (("llama", FIXTURE), ("ours", tmp_path / "ours.gguf")):
        files[label] = tmp_path / f"{label}.gguf"
        main(["quantize", str(ckpt), "-r", "iq2-80", "--imatrix", str(im), "-o", str(files[label])])
        with open_gguf(files[label]) as gf:
            assert gf.metadata["quantize.imatrix.file"] == im.name
            assert gf.metadata["quantize.imatrix.chunks_count"] == 12
            assert gf.tensors["blk.0.ffn_gate_exps.weight"].qtype.name == "IQ2_XXS"
            assert gf.tensors["blk.4.ffn_down_exps.weight"].qtype.name == "IQ3_XXS"  # the late layer
    with open_gguf(files["llama"]) as a, open_gguf(files["ours"]) as b:
        assert {n: t.qtype for n, t in a.tensors.items()} == {n: t.qtype for n, t in b.tensors.items()}


@pytest.mark.slow
@pytest.mark.llama
@pytest.mark.parametrize("recipe", ["iq2-80", "iq2-90", "iq2-100", "iq3-108"])
def test_llama_cpp_runs_our_iquant_files(tiny_dir, tmp_path, recipe, monkeypatch):
    """Our I-quant bytes mean the same to llama.cpp as to us: both engines agree on our files within the bound the
    interop tests hold llama.cpp's own files to (it rounds activations to 8 bits for these types)."""
    import json

    import torch

    from v4cli.testing.tiny import make_tiny_checkpoint, random_token_ids

    ckpt = make_tiny_checkpoint(tiny_dir / "ckpt-tiny-128", preset="tiny-128")
    path = tmp_path / f"{recipe}.gguf"
    main(["quantize", str(ckpt), "-r", recipe, "--imatrix", str(FIXTURE), "-o", str(path)])
    with open_gguf(path) as gf:
        types = {t.qtype.name for t in gf.tensors.values()}
    assert types & {"IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S"}
    (tmp_path / "ids.json").write_text(json.dumps(random_token_ids(40, seed=1)))
    logits = {}
    monkeypatch.setenv("V4_KERNELS", "reference")
    for engine in ("torch", "llama"):
        out = tmp_path / f"{engine}.npy"
        main(["eval", str(path), "--tokens", str(tmp_path / "ids.json"), "--kv-format", "f32", "--engine", engine,
              "--dump-logits", str(out), "--threads", "2"])
        logits[engine] = torch.from_numpy(np.load(out)).double()
    p, q = torch.log_softmax(logits["torch"], -1), torch.log_softmax(logits["llama"], -1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    assert kl <= 0.01, f"{recipe} ({sorted(types)}): KL(ours ‖ llama.cpp) {kl:.4f}"
