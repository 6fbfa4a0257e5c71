"""GGUF files made by llama.cpp's own tools run in our engine: its converter's output, and that file re-quantized
by `llama_model_quantize` to every ftype (with an importance matrix where llama.cpp insists on one). Each file's
logits (reference kernels, f32 KV) equal transformers' on that file's own weights as gguf-py dequantizes them,
and the fast kernels stay within a stated KL bound of the reference.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from quant.ggml import SUPPORTED, QType
from v4cli.gguf_file import GGUFFile
from v4cli.testing.tiny import make_tiny_checkpoint, random_token_ids

pytestmark = [pytest.mark.slow, pytest.mark.llama]
pytest.importorskip("llama_cpp")

from v4cli.testing.wild import (  # noqa: E402
    COMMUNITY_LAYOUTS,
    FTYPES,
    llama_convert,
    llama_quantize,
    quantize_layout,
    random_imatrix,
)

REL_TOL = 1e-4  # max |ours - transformers| / max |transformers| over all logits
# Fast kernels quantize activations to int8 per 32 (as llama.cpp's CPU path does). On the Q8_0 + MXFP4 file that
# costs ~0.003 nats (tests/test_cpu_kernels.py); low-bit weights do not change the activation rounding, so every
# file must stay under the same bound.
KL_BOUND = 0.01
N_TOKENS = 40


@pytest.fixture(scope="module")
def wild(tmp_path_factory):
    """tiny-128 (llama.cpp's ratios, 16 indexer heads) → llama.cpp's converter; a factory of its re-quantized
    files, made once each."""
    d = tmp_path_factory.mktemp("wild")
    ckpt = make_tiny_checkpoint(d / "ckpt", preset="tiny-128")
    conv = llama_convert(ckpt, d / "converted.gguf")
    imatrix = random_imatrix(conv)
    made = {"converter": conv}

    def get(ftype: str):
        if ftype in made:
            return made[ftype]
        if ftype in COMMUNITY_LAYOUTS:
            made[ftype] = quantize_layout(conv, d / f"{ftype}.gguf", ftype, n_layers=5)
        else:
            made[ftype] = llama_quantize(conv, d / f"{ftype}.gguf", ftype,
                                         imatrix=imatrix if FTYPES[ftype][1] else None)
        return made[ftype]

    cfg = json.loads((ckpt / "config.json").read_text())
    return get, cfg, d


def _kl(ref: torch.Tensor, cand: torch.Tensor) -> float:
    p, q = torch.log_softmax(ref.double(), -1), torch.log_softmax(cand.double(), -1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


@pytest.mark.parametrize("ftype", ["converter", *FTYPES, *COMMUNITY_LAYOUTS])
def test_llama_cpp_file_equals_transformers_on_its_weights(wild, ftype, monkeypatch):
    from typer.testing import CliRunner

    from v4cli.cli import app
    from v4cli.engine import Engine
    from v4cli.testing.golden import golden_logits, load_reference_model_from_gguf

    get, cfg, d = wild
    path = get(ftype)
    ids = random_token_ids(N_TOKENS, seed=1)
    (d / "ids.json").write_text(json.dumps(ids))
    out = d / f"{ftype}.npy"
    monkeypatch.setenv("V4_KERNELS", "reference")
    r = CliRunner().invoke(app, ["eval", str(path), "--tokens", str(d / "ids.json"), "--kv-format", "f32",
                                 "--dump-logits", str(out), "--threads", "1"])
    assert r.exit_code == 0, r.output
    ours = np.load(out)
    gold = golden_logits(None, ids, model=load_reference_model_from_gguf(path, cfg)).numpy()
    err = np.abs(ours - gold).max() / np.abs(gold).max()
    assert err <= REL_TOL, f"{ftype}: relative error {err:.2e}"

    monkeypatch.delenv("V4_KERNELS")  # read when the engine loads
    eng = Engine.load(path, kv_format="f32")
    ref = torch.from_numpy(ours)
    fast = eng.logits(ids, chunk=8)  # 8-row chunks: the int8 GEMM / tiled prefill and the row kernels
    assert _kl(ref, fast) <= KL_BOUND, f"{ftype}: fast kernels KL {_kl(ref, fast):.4f}"


def test_files_cover_every_type(wild):
    # the ftypes above write every type of the one type table, so the test above met each of them
    get, _, _ = wild
    seen: set[QType] = set()
    for ftype in ["converter", *FTYPES]:
        with GGUFFile(get(ftype)) as gf:
            seen |= {t.qtype for t in gf.tensors.values()}
    assert seen == set(SUPPORTED)


def test_converter_file_tokenizes_like_the_official_tokenizer(wild):
    # llama.cpp's converter keeps no tokenizer.json: ours is built from its tokenizer.ggml.* keys (pre "joyai-llm")
    from v4cli.testing.corpus import mixed_corpus
    from v4cli.engine.detok import tokenizer_from_metadata
    from v4cli.prompt.encoding import load_tokenizer

    get, _, _ = wild
    with GGUFFile(get("converter")) as gf:
        assert "tokenizer.huggingface.json" not in gf.metadata
        assert gf.metadata["tokenizer.ggml.pre"] == "joyai-llm"
        tok = tokenizer_from_metadata(gf.metadata)
    official = load_tokenizer()
    text = mixed_corpus()
    assert len(text.encode()) >= 1 << 20
    ids = tok.encode(text, add_special_tokens=False).ids
    assert ids == official.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("ftype", [f for f, (_, imatrix) in FTYPES.items() if imatrix] + ["ds4-q2-q4"])
def test_imatrix_types_match_llama_cpp(wild, ftype, monkeypatch):
    # the types llama.cpp writes only with an importance matrix: our engine and llama.cpp agree on files carrying
    # them (llama.cpp rounds activations to 8 bits for these types, so the yardstick is the fast kernels' KL bound)
    from typer.testing import CliRunner

    from v4cli.cli import app

    get, _, d = wild
    path = get(ftype)
    ids = random_token_ids(N_TOKENS, seed=1)
    (d / "ids.json").write_text(json.dumps(ids))
    logits = {}
    for engine in ("torch", "llama"):
        monkeypatch.setenv("V4_KERNELS", "reference")
        out = d / f"{ftype}-{engine}.npy"
        r = CliRunner().invoke(app, ["eval", str(path), "--tokens", str(d / "ids.json"), "--kv-format", "f32",
                                     "--engine", engine, "--dump-logits", str(out), "--threads", "2"])
        assert r.exit_code == 0, r.output
        logits[engine] = torch.from_numpy(np.load(out))
    kl = _kl(logits["torch"], logits["llama"])
    assert kl <= KL_BOUND, f"{ftype}: KL(ours ‖ llama.cpp) {kl:.4f}"
