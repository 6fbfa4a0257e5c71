"""The MTP draft block: llama.cpp's separate draft file from the converter, and the engine's draft head against
llama.cpp's own MTP graph (`graph_mtp`, the only executable reference: transformers has no MTP)."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kernels.linear import QWeight
from quant import names as N
from quant.convert import convert
from quant.official import Checkpoint, dequantized_rows
from quant.recipes import get_recipe
from v4cli.cli import app
from v4cli.engine import Engine
from v4cli.engine.loader import load_mtp
from quant.errors import CheckpointError, GGUFError
from v4cli.gguf_file import GGUFFile, deepseek4_tensor_shapes
from v4cli.testing.tiny import make_tiny_checkpoint, random_token_ids

pytestmark = pytest.mark.usefixtures("one_thread")

# llama.cpp 0.3.36 divides by zero building an MTP context when head_dim == index_head_dim (its forced indexer
# rotation then sizes itself from a KV cache with no layers), so this checkpoint widens the heads to 128.
OVERRIDES = {"head_dim": 128}
REL_TOL = 1e-4  # measured 8.4e-7: both run the exact f32 path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("mtp")
    ckpt = make_tiny_checkpoint(d / "ckpt", preset="tiny-128", **OVERRIDES)
    trunk = convert(ckpt, d / "model.gguf", get_recipe("f32")).path
    draft = convert(ckpt, d / "mtp-model.gguf", get_recipe("f32"), mtp=True).path
    return ckpt, trunk, draft


@pytest.fixture(scope="module")
def engine(files):
    _, trunk, draft = files
    return Engine.load(trunk, kv_format="f32", mtp=draft)


def test_draft_file_layout(files):
    """llama.cpp's layout: no trunk blocks, block n_layers holds the draft, the draft's hc_head at the root."""
    ckpt, _, draft = files
    gf = GGUFFile(draft)
    args = gf.validate_deepseek4()
    n = args.num_hidden_layers
    assert args.num_nextn_predict_layers == 1
    assert set(gf.tensors) == set(deepseek4_tensor_shapes(args, trunk=False, mtp=True))
    assert not any(name.startswith("blk.0.") for name in gf.tensors)
    ck = Checkpoint(ckpt)
    hc = gf.raw(N.root("hc_head_fn")).view(torch.float32).view(gf.tensors[N.root("hc_head_fn")].shape)
    assert torch.equal(hc, ck.get(N.official_mtp(0, "hc_head_fn")).float())  # the draft's own, not the trunk's
    # eh_proj = [e_proj | h_proj] along the input dim, exactly (f32 recipe: no rounding)
    info = gf.tensors[N.mtp_eh_proj(n)]
    eh = QWeight(gf.raw(N.mtp_eh_proj(n)), info.qtype, info.shape).dense()
    D = args.hidden_size
    for i, src in enumerate(N.MTP_EH_SOURCES):
        assert torch.equal(eh[:, i * D:(i + 1) * D], dequantized_rows(ck, N.official_mtp(0, src), 0, D).float())


def test_checkpoint_without_mtp_is_refused(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ck", preset="tiny", num_nextn_predict_layers=0)
    with pytest.raises(CheckpointError, match="no MTP block"):
        convert(ckpt, tmp_path / "mtp.gguf", get_recipe("f32"), mtp=True)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob("*.partial"))


def test_draft_for_another_model_is_refused(files, tiny_gguf):
    _, _, draft = files
    other = Engine.load(tiny_gguf("f32", "tiny-128"))  # head_dim 64
    with pytest.raises(GGUFError, match="another model.*head_dim"):
        load_mtp(other.model, draft)
    with pytest.raises(GGUFError, match="not an MTP draft file"):
        load_mtp(other.model, files[1])


def _draft_logits(engine, ids, chunk):
    out = [(a, b) for a, b in engine.iter_draft_logits(ids, chunk)]
    return torch.cat([a for a, _ in out]), torch.cat([b for _, b in out])


def test_draft_is_chunk_invariant(engine):
    ids = random_token_ids(45, seed=3)  # window 16: the draft's ring wraps twice
    trunk, whole = _draft_logits(engine, ids, 45)
    for chunk in (1, 7):
        t, d = _draft_logits(engine, ids, chunk)
        assert (d - whole).abs().max() / whole.abs().max() < 1e-5
        assert (t - trunk).abs().max() / trunk.abs().max() < 1e-5


class _LlamaMTP:
    """llama.cpp's MTP path through its C API: the trunk's unnormed final streams (`embeddings_nextn`, a C++
    staging API, called by its mangled name) feed a draft context built with `ctx_type = MTP`."""

    def __init__(self, trunk_path, draft_path):
        from v4cli.engine.llama import _import_llama, _Log

        _, self.lib = _import_llama()
        _Log.install(self.lib)
        self.lib.llama_backend_init()
        so = self.lib._lib
        try:
            self.set_nextn = so["_Z26llama_set_embeddings_nextnP13llama_contextbb"]
            self.get_nextn = so["_Z26llama_get_embeddings_nextnP13llama_context"]
        except AttributeError:
            pytest.skip("this llama.cpp build has no embeddings_nextn staging API")
        self.set_nextn.argtypes, self.set_nextn.restype = [ctypes.c_void_p, ctypes.c_bool, ctypes.c_bool], None
        self.get_nextn.argtypes, self.get_nextn.restype = [ctypes.c_void_p], ctypes.POINTER(ctypes.c_float)
        self.handles = []
        self.trunk = self._context(trunk_path, mtp=False)
        self.draft_path = draft_path

    def _context(self, path, mtp):
        lib = self.lib
        mp = lib.llama_model_default_params()
        mp.use_extra_bufts, mp.load_mtp = False, mtp
        model = lib.llama_model_load_from_file(str(path).encode(), mp)
        assert model, path
        cp = lib.llama_context_default_params()
        # 512: with a 256-token batch 0.3.36's unmasked nextn rows come back wrong (its output-buffer layout)
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = 512, 512, 512, 1
        cp.n_threads = cp.n_threads_batch = 1
        cp.type_k = cp.type_v = 0  # F32
        cp.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.swa_full = False
        cp.ctx_type = lib.LLAMA_CONTEXT_TYPE_MTP if mtp else 0
        ctx = lib.llama_init_from_model(model, cp)
        assert ctx
        self.handles.append((model, ctx))
        return ctx

    def _batch(self, ids, outputs):
        b = self.lib.llama_batch_init(len(ids), 0, 1)
        b.n_tokens = len(ids)
        for i, tok in enumerate(ids):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, i, 1, outputs[i]
            b.seq_id[i][0] = 0
        return b

    def draft_logits(self, ids, width, n_vocab):
        lib, T = self.lib, len(ids)
        self.set_nextn(self.trunk, True, False)
        # only the last row outputs logits: with every row out, 0.3.36 lays the unmasked streams over the logits
        b = self._batch(ids, [i == T - 1 for i in range(T)])
        assert lib.llama_decode(self.trunk, b) == 0
        h = np.ctypeslib.as_array(self.get_nextn(self.trunk), shape=(T, width)).copy()
        lib.llama_batch_free(b)
        prev = np.zeros_like(h)
        prev[1:] = h[:-1]  # the draft at p reads the trunk's streams at p − 1 (zeros at 0)
        self.draft = self._context(self.draft_path, mtp=True)
        b = self._batch(ids, [True] * T)
        b.embd = prev.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        assert lib.llama_decode(self.draft, b) == 0
        b.embd = None  # ours: llama_batch_free must not free it
        lib.llama_batch_free(b)
        return torch.from_numpy(np.ctypeslib.as_array(lib.llama_get_logits(self.draft), shape=(T, n_vocab)).copy())

    def close(self):
        for model, ctx in self.handles:
            self.lib.llama_free(ctx)
            self.lib.llama_model_free(model)


@pytest.mark.llama
def test_draft_matches_llama_cpp(files, engine):
    pytest.importorskip("llama_cpp")
    _, trunk, draft = files
    ids = random_token_ids(40, seed=5)
    oracle = _LlamaMTP(trunk, draft)
    try:
        a = engine.args
        want = oracle.draft_logits(ids, a.hc_mult * a.hidden_size, a.vocab_size)
    finally:
        oracle.close()
    _, got = _draft_logits(engine, ids, 13)
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < REL_TOL, err


def test_cli_quantize_and_eval_with_mtp(files, tmp_path):
    ckpt, trunk, _ = files
    out = tmp_path / "m.gguf"
    r = CliRunner().invoke(app, ["quantize", str(ckpt), "-o", str(out), "--recipe", "q8", "--mtp"])
    assert r.exit_code == 0, r.output
    assert out.exists() and (tmp_path / "mtp-m.gguf").exists()
    toks = tmp_path / "ids.txt"
    toks.write_text(" ".join(map(str, random_token_ids(24, seed=2))))
    r = CliRunner().invoke(app, ["eval", str(out), "--tokens", str(toks), "--mtp", str(tmp_path / "mtp-m.gguf"),
                                 "--chunk", "8"])
    assert r.exit_code == 0, r.output
    assert "mtp draft" in r.output and "(23 drafts)" in r.output
    r = CliRunner().invoke(app, ["eval", str(trunk), "--tokens", str(toks), "--mtp", str(trunk)])
    assert isinstance(r.exception, GGUFError) and "not an MTP draft file" in str(r.exception)
