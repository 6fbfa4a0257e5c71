"""`v4 quantize`: official layout in, llama.cpp-compatible deepseek4 GGUF out — exact, validated, atomic."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from pathlib import Path

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
from quant.errors import BadInput, CheckpointError, DiskSpaceError, UnsupportedModel
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


# ---- hostile input, full disks and leftovers (issue 21 items 8-9, issue 22 items 7 and 10) -------------------


def _cli(capsys, *argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `v4 ARGV` through the real app and its error boundary."""
    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _config_only(tmp_path, cfg) -> Path:
    """A folder whose config.json holds `cfg` (a dict, or raw text): config errors come before any shard is read."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    return folder


def _tiny_cfg(tiny_ckpt, **change) -> dict:
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    cfg.update(change)
    return cfg


@pytest.mark.parametrize("change,fragment", [
    ("{\"hidden_size\": 4096,", "config.json: not valid JSON"),
    ("[1, 2]", "config.json holds a JSON list, not an object"),
    (dict(num_hidden_layers="5"), 'num_hidden_layers must be an integer from 1 to 65,536, is "5"'),
    (dict(hidden_size=-256), "hidden_size must be an integer from 1 to 4,294,967,295, is -256"),
    (dict(n_routed_experts=10 ** 9), "n_routed_experts must be an integer from 1 to 65,536, is 1000000000"),
    (dict(norm_topk_prob="yes"), 'norm_topk_prob must be true or false, is "yes"'),
    (dict(rope_scaling=[16]), "rope_scaling must be an object"),
    (dict(rope_scaling={**FLASH_CONFIG["rope_scaling"], "factor": None}),
     "rope_scaling.factor must be a finite number ≥ 0, is null"),
    (dict(compress_ratios=[0, 2, 4, 4, 4, 0]), "compress_ratios must be a list of ratios"),
    (dict(head_dim=None), "head_dim must be an integer"),
    (dict(eos_token_id=1 << 20), "eos_token_id = 1048576 is not below vocab_size"),
])
@pytest.mark.parametrize("dry_run", [False, True])
def test_malformed_config_is_one_line_naming_the_key(tiny_ckpt, tmp_path, capsys, change, fragment, dry_run):
    cfg = change if isinstance(change, str) else _tiny_cfg(tiny_ckpt, **change)
    folder = _config_only(tmp_path, cfg)
    code, out, err = _cli(capsys, "quantize", str(folder), "-o", str(tmp_path / "o.gguf"),
                          *(["--dry-run"] if dry_run else []))
    assert code == 2 and out == ""
    assert err.startswith(f"error: {folder / 'config.json'}") and fragment in err and err.count("\n") == 1, err
    assert "(the checkpoint's config.json is damaged" in err or "(the checkpoint is damaged" in err


def test_config_missing_an_inventory_key(tiny_ckpt, tmp_path):
    cfg = _tiny_cfg(tiny_ckpt)
    del cfg["o_lora_rank"]
    folder = _config_only(tmp_path, cfg)
    with pytest.raises(CheckpointError, match="config.json: missing o_lora_rank"):
        convert(folder, tmp_path / "o.gguf", get_recipe("q8"))


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors", 7])
def test_index_shard_names_must_stay_inside_the_checkpoint(tiny_ckpt, tmp_path, capsys, shard):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, folder)
    (tmp_path / "outside.safetensors").write_bytes((folder / "model-00001-of-00003.safetensors").read_bytes())
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: shard name") as e:
        Checkpoint(folder)
    assert repr(shard) in str(e.value)
    code, out, err = _cli(capsys, "quantize", str(folder), "-o", str(tmp_path / "o.gguf"))
    assert code == 2 and err.count("\n") == 1 and "shard name" in err


def test_quantize_writes_into_the_store_and_ls_lists_it(tiny_ckpt, tmp_path, monkeypatch, capsys):
    home = tmp_path / "v4home"
    monkeypatch.setenv("V4_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    code, out, err = _cli(capsys, "quantize", str(tiny_ckpt), "-r", "q8", "--threads", "1")
    assert code == 0, err
    want = home / "gguf" / f"{tiny_ckpt.name}-q8.gguf"
    assert out.startswith(f"wrote {want} (") and want.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["v4home"]  # nothing in the current directory
    code, out, _ = _cli(capsys, "ls")
    assert code == 0 and f"{tiny_ckpt.name}-q8.gguf" in out and str(want) in out


def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_quantize_removes_only_partials_whose_writer_died_here(tiny_ckpt, tmp_path, monkeypatch, capsys):
    import subprocess
    import sys

    from v4cli.partials import this_host

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dead, host = _dead_pid(), this_host()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        files = {
            "dead": out_dir / f".flash-q8.gguf.{dead}@{host}.partial",  # a killed run on this machine: removed
            "live": out_dir / f".flash-q4k.gguf.{live.pid}@{host}.partial",  # still writing: kept
            "other-host": out_dir / f".flash-q2k.gguf.{dead}@elsewhere-node.partial",  # PID means nothing here
            "old-format": out_dir / f".flash-f32.gguf.{dead}.partial",  # older v4: machine unknown, reported
        }
        for i, p in enumerate(files.values()):
            p.write_bytes(b"\0" * (1000 * (i + 1)))
        code, out, err = _cli(capsys, "quantize", str(tiny_ckpt), "-r", "q8", "-o", str(out_dir / "o.gguf"),
                              "--threads", "1")
        assert code == 0, err
        assert not files["dead"].exists()
        assert all(files[k].exists() for k in ("live", "other-host", "old-format"))
        assert err.splitlines()[:2] == [
            f"note: removed 1 unfinished output of quantize runs that died, freeing 1.00 KB in {out_dir}",
            f"note: {files['old-format']} (4.00 KB) is an unfinished output of an older v4: delete it if no "
            "quantize is writing it",
        ]
        assert (out_dir / "o.gguf").is_file()
    finally:
        live.kill()
        live.wait()


class _FailingFile:
    """A file that raises `err` once more than `limit` bytes were written to it (the disk fills up)."""

    def __init__(self, f, err: int, limit: int):
        self.f, self.err, self.left = f, err, limit

    def write(self, data) -> int:
        self.left -= memoryview(data).nbytes
        if self.left < 0:
            raise OSError(self.err, os.strerror(self.err))
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


@pytest.mark.parametrize("where,err", [("write", errno.ENOSPC), ("write", errno.EDQUOT), ("fsync", errno.ENOSPC)])
def test_disk_full_midway_is_exit_3_and_leaves_no_partial(tiny_ckpt, tmp_path, monkeypatch, capsys, where, err):
    import gguf as gguf_py

    import quant.convert as qc

    if where == "write":
        class FillingWriter(gguf_py.GGUFWriter):
            def write_ti_data_to_file(self):
                super().write_ti_data_to_file()
                self.fout[0] = _FailingFile(self.fout[0], err, 4 << 20)

        monkeypatch.setattr(qc, "GGUFWriter", FillingWriter)
    else:
        def full(fd):
            raise OSError(err, os.strerror(err))

        monkeypatch.setattr(qc.os, "fsync", full)
    out_dir = tmp_path / "out"
    code, out, stderr = _cli(capsys, "quantize", str(tiny_ckpt), "-r", "q8", "-o", str(out_dir / "o.gguf"),
                             "--threads", "1")
    assert code == 3
    assert stderr == (f"error: {out_dir} filled up while writing o.gguf ({os.strerror(err)}); the unfinished output "
                      "was removed (free space or pass -o on another disk)\n")
    assert list(out_dir.iterdir()) == []


def test_dry_run_prints_the_summary_and_lists_tensors_only_when_verbose(capsys):
    code, out, _ = _cli(capsys, "quantize", "flash", "--dry-run", "--recipe", "q2k")
    assert code == 0
    total = sum(t.nbytes for t in plan(FLASH_CONFIG, get_recipe("q2k")))
    assert out.splitlines()[-1].startswith(f"output size: {total:,} bytes")
    assert len(out.splitlines()) < 30 and "blk.0.attn_q_a.weight" not in out
    code, out, _ = _cli(capsys, "quantize", "flash", "--dry-run", "--recipe", "q2k", "--verbose")
    assert code == 0 and "blk.0.attn_q_a.weight" in out and len(out.splitlines()) > 1300
    assert out.splitlines()[-1].startswith(f"output size: {total:,} bytes")
