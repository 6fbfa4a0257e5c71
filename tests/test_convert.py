"""`v4 quantize`: official layout in, llama.cpp-compatible deepseek4 GGUF out — exact, validated, atomic."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, LlamaFileType
from gguf.quants import dequantize

from quant import keys as K
from quant import names as N
from quant.config import FLASH_CONFIG, ModelArgs
from quant.convert import convert, partial_path, plan, size_label
from quant.inventory import official_inventory
from quant.official import Checkpoint, dequantized
from quant.recipes import RECIPES, file_type, get_recipe
from v4cli.cli import main
from v4cli.errors import BadInput, CheckpointError, DiskSpaceError, UnsupportedModel
from v4cli.prompt.template import chat_template
from v4cli.testing.tiny import write_checkpoint


def test_flash_inventory_is_the_official_one():
    inv = official_inventory(FLASH_CONFIG)
    assert len(inv) == 69_187
    assert sum(e.nbytes for e in inv) == 159_609_485_896


def test_flash_recipe_sizes():
    sizes = {r: sum(t.nbytes for t in plan(FLASH_CONFIG, get_recipe(r))) for r in RECIPES}
    assert 155e9 < sizes["q8"] < 157e9  # llama.cpp's converter output is ≈156 GB
    assert sizes["q2k"] <= 100e9  # leaves room for 1M-token KV and the OS in 128 GB
    assert sizes["q2k"] < sizes["q2k-q3k"] < sizes["q3k"] < sizes["q8"] < sizes["lossless"] < sizes["q4k"]


def _reader_tensors(path):
    r = GGUFReader(path)
    return r, {t.name: t for t in r.tensors}


def _official_value(ck: Checkpoint, gguf_name: str, cfg: dict) -> torch.Tensor:
    """The exact official value behind one GGUF tensor (experts stacked, tid2eid as stored)."""
    args = ModelArgs.from_config(cfg)
    layer = int(gguf_name.split(".")[1]) if gguf_name.startswith("blk.") else None
    for w, g in N.EXPERTS.items():
        if layer is not None and gguf_name == N.experts(layer, w):
            return torch.stack([dequantized(ck, N.official_expert(layer, e, w)) for e in range(args.n_routed_experts)])
    official = next(o for o in ck.tensors if not o.endswith(".scale") and N.parse_expert(o) is None
                    and not o.startswith("mtp.") and N.to_gguf(o).gguf == gguf_name)
    return dequantized(ck, official)


def test_lossless_dequantizes_to_exactly_the_official_weights(tiny_ckpt, tiny_gguf):
    path = tiny_gguf("lossless")
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    ck = Checkpoint(tiny_ckpt)
    _, tensors = _reader_tensors(path)
    expected_names = {t.gguf for t in plan(cfg, get_recipe("lossless"))}
    assert set(tensors) == expected_names
    for name, t in tensors.items():
        want = _official_value(ck, name, cfg)
        got = dequantize(t.data, t.tensor_type) if t.tensor_type not in (QT.I32,) else np.asarray(t.data)
        got = np.asarray(got).reshape(tuple(reversed([int(d) for d in t.shape])))
        assert np.array_equal(got.astype(np.float64), want.double().numpy()), name
        if "_exps" in name:
            assert t.tensor_type == QT.MXFP4


def test_header_has_every_deepseek4_key_and_tokenizer(tiny_ckpt, tiny_gguf):
    r, _ = _reader_tensors(tiny_gguf("lossless"))
    fields = r.fields
    args = ModelArgs.from_config(json.loads((tiny_ckpt / "config.json").read_text()))
    for key, value, _typ in args.gguf_kv():
        assert key in fields, key
    assert fields[K.General.ARCHITECTURE].contents() == "deepseek4"
    assert fields[K.Model.COMPRESS_RATIOS].contents() == list(args.compress_ratios)
    assert fields[K.Model.BLOCK_COUNT].contents() == args.num_hidden_layers
    tokens = fields[K.Tokenizer.TOKENS].contents()
    assert len(tokens) == args.vocab_size
    assert tokens[128803] == "<｜User｜>" and tokens[1] == "<｜end▁of▁sentence｜>"
    assert fields[K.Tokenizer.PRE].contents() == "deepseek-v3"
    assert len(fields[K.Tokenizer.MERGES].contents()) > 100_000
    hf = json.loads(fields[K.Tokenizer.HF_JSON].contents())
    assert hf["model"]["type"] == "BPE"
    assert fields[K.Provenance.RECIPE].contents() == "lossless"
    # the keys llama.cpp's converter writes beyond the model's: GGUF tools read and show them
    assert fields[K.Tokenizer.CHAT_TEMPLATE].contents() == chat_template()
    assert fields[K.Tokenizer.PAD_ID].contents() == 1
    # named after the type most weights are in: the tiny model's 129K-row embedding (BF16) outweighs its few small
    # experts; Flash's lossless file is MXFP4_MOE (test_file_type_and_size_label_as_llama_cpp_names_them)
    assert fields[K.General.FILE_TYPE].contents() == LlamaFileType.MOSTLY_BF16
    assert fields[K.General.QUANT_VERSION].contents() == 2
    assert fields[K.General.SIZE_LABEL].contents() == "8x70M"  # 8 experts; the embed and head are 66M of the 70M
    dtypes = json.loads(fields[K.Provenance.SOURCE_DTYPES].contents())
    assert dtypes["blk.0.attn_q_a.weight"] == "F8_E4M3" and dtypes["blk.0.ffn_gate_exps.weight"] == "I8"


def test_file_type_and_size_label_as_llama_cpp_names_them():
    def ftype(recipe, overrides=()):
        return file_type((t.qtype, math.prod(t.shape)) for t in plan(FLASH_CONFIG, get_recipe(recipe, overrides)))

    F = LlamaFileType
    # llama.cpp's converter names its Q8_0/BF16 + MXFP4-experts file MXFP4_MOE (38); ours of that layout too
    assert ftype("lossless") == ftype("q8") == F.MOSTLY_MXFP4_MOE
    assert ftype("f32") == F.ALL_F32
    assert ftype("q2k") == ftype("q2k-q3k") == F.MOSTLY_Q2_K  # gate/up hold two thirds of the expert weights
    assert ftype("q3k") == F.MOSTLY_Q3_K_M and ftype("q4k") == F.MOSTLY_Q4_K_M  # llama-quantize's aliases
    assert ftype("q2k", ["*_exps.weight=IQ2_XXS"]) == F.MOSTLY_IQ2_XXS
    assert file_type([(QT.I32, 10**9), (QT.BF16, 5)]) == F.MOSTLY_BF16  # the routing table is not a weight type
    with pytest.raises(BadInput):
        file_type([])
    # 256 experts x (everything outside the routed experts + one expert per layer): 7.3B + 43 * 3 * 2048 * 4096
    assert size_label(plan(FLASH_CONFIG, get_recipe("q8"))) == "256x8.4B"


def test_q2k_recipe_types(tiny_gguf):
    _, tensors = _reader_tensors(tiny_gguf("q2k"))
    assert tensors["blk.1.ffn_down_exps.weight"].tensor_type == QT.Q2_K
    assert tensors["blk.1.attn_q_b.weight"].tensor_type == QT.Q8_0
    assert tensors["blk.1.hc_attn_fn.weight"].tensor_type == QT.F32
    assert tensors["blk.0.ffn_gate_tid2eid.weight"].tensor_type == QT.I32


def test_tensor_type_override_and_bad_override():
    r = get_recipe("q2k", ["blk.*.ffn_down_exps.weight=Q3_K"])
    types = {t.gguf: t.qtype for t in plan(FLASH_CONFIG, r)}
    assert types["blk.5.ffn_down_exps.weight"] == QT.Q3_K and types["blk.5.ffn_up_exps.weight"] == QT.Q2_K
    with pytest.raises(BadInput):
        get_recipe("q2k", ["no-equals-sign"])
    with pytest.raises(UnsupportedModel):
        get_recipe("q2k", ["*=Q9_Z"])
    with pytest.raises(BadInput, match="unknown recipe"):
        get_recipe("q1")


@pytest.fixture()
def broken_copy(tiny_ckpt, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, dst)
    return dst


def _run_cli(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    return e.value.code, capsys.readouterr().err


def test_missing_shard_is_one_clear_error(broken_copy, tmp_path, capsys):
    (broken_copy / "model-00002-of-00003.safetensors").unlink()
    out = tmp_path / "o.gguf"
    code, err = _run_cli(capsys, "quantize", str(broken_copy), "-o", str(out), "--recipe", "q8")
    assert code == 2
    assert "missing shard model-00002-of-00003.safetensors" in err and err.count("\n") == 1
    assert not out.exists()


def _rewrite(ckpt, cfg_change=None, drop=None, retype=None, reshape=None):
    ck = Checkpoint(ckpt)
    tensors = {n: ck.get(n).clone() for n in ck.tensors}
    cfg = json.loads((ckpt / "config.json").read_text())
    if cfg_change:
        cfg.update(cfg_change)
    if drop:
        del tensors[drop]
    if retype:
        tensors[retype] = tensors[retype].float()
    if reshape:
        tensors[reshape] = tensors[reshape][:-1]
    for f in ckpt.glob("model-*.safetensors"):
        f.unlink()
    write_checkpoint(ckpt, cfg, tensors)


@pytest.mark.parametrize("case,match", [
    (dict(drop="layers.3.attn.wq_b.weight"), "tensor layers.3.attn.wq_b.weight is missing"),
    (dict(retype="layers.1.attn.wkv.weight"), "layers.1.attn.wkv.weight has dtype F32, expected F8_E4M3"),
    (dict(reshape="layers.2.ffn.gate.weight"), "layers.2.ffn.gate.weight has shape"),
])
def test_bad_tensors_name_file_and_tensor(broken_copy, tmp_path, case, match):
    _rewrite(broken_copy, **case)
    out = tmp_path / "o.gguf"
    with pytest.raises(CheckpointError, match=match) as e:
        convert(broken_copy, out, get_recipe("q8"))
    assert ".safetensors" in str(e.value) or "missing" in str(e.value)
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_unsupported_architecture(broken_copy, tmp_path):
    cfg = json.loads((broken_copy / "config.json").read_text())
    cfg.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (broken_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModel, match="LlamaForCausalLM"):
        convert(broken_copy, tmp_path / "o.gguf", get_recipe("q8"))


def test_no_disk_space(tiny_ckpt, tmp_path, monkeypatch):
    import shutil as sh

    real = sh.disk_usage
    monkeypatch.setattr(sh, "disk_usage", lambda p: real(p)._replace(free=10 << 20))
    with pytest.raises(DiskSpaceError, match="GB needed"):
        convert(tiny_ckpt, tmp_path / "o.gguf", get_recipe("q8"))
    assert not list(tmp_path.iterdir())


def test_interrupted_conversion_leaves_nothing_that_looks_complete(tiny_ckpt, tmp_path):
    out = tmp_path / "o.gguf"
    seen = []

    def stop_midway(p):
        seen.append(p.done_bytes)
        if p.done_bytes > p.total_bytes // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(tiny_ckpt, out, get_recipe("q8"), progress=stop_midway)
    assert len(seen) > 2
    assert not out.exists() and not partial_path(out).exists()
    assert list(tmp_path.iterdir()) == []


def test_cli_dry_run_flash_prints_exact_size(capsys):
    main(["quantize", "flash", "--dry-run", "--recipe", "q2k"])
    out = capsys.readouterr().out
    total = sum(t.nbytes for t in plan(FLASH_CONFIG, get_recipe("q2k")))
    assert f"output size: {total:,} bytes" in out
