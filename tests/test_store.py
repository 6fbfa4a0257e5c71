"""The registry of names, the model store (manifest, resolve, list, remove) and `v4 ls` / `v4 rm`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from v4cli.cli import app, main
from quant.config import FLASH_CONFIG
from quant.errors import BadInput, NotFoundError
from v4cli.registry import CHECKPOINT_PATTERNS, REGISTRY, HubSpec, LocalSpec, resolve_name
from v4cli.store import (
    MANIFEST,
    CheckpointTarget,
    FileRecord,
    GGUFTarget,
    HubTarget,
    Manifest,
    Store,
    atomic_write_json,
    check_file,
    default_root,
    find_gguf_model,
    find_model,
    format_bytes,
    git_blob_oid,
)

FLASH_REV = "60d8d70770c6776ff598c94bb586a859a38244f1"


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("V4_HOME", str(tmp_path / "v4"))
    return tmp_path / "v4"


def put_model(store: Store, name: str, repo_id: str, revision: str, files: dict[str, bytes]) -> Manifest:
    """Write files and their manifest as a completed pull would."""
    import hashlib

    d = store.model_dir(name)
    records = {}
    for p, data in files.items():
        (d / p).parent.mkdir(parents=True, exist_ok=True)
        (d / p).write_bytes(data)
        lfs = p.endswith((".safetensors", ".gguf"))
        records[p] = FileRecord(p, len(data), sha256=hashlib.sha256(data).hexdigest() if lfs else None,
                                git_oid=None if lfs else git_blob_oid(data))
    m = Manifest(name, repo_id, revision, records)
    store.write_manifest(m)
    return m


# ---- registry ------------------------------------------------------------------------------------------------


def test_registry_names():
    flash = resolve_name("flash")
    assert flash == HubSpec("flash", "deepseek-ai/DeepSeek-V4-Flash", FLASH_REV, CHECKPOINT_PATTERNS, flash.description)
    assert resolve_name("FLASH") is flash
    assert {n: (s.repo_id, s.revision) for n, s in REGISTRY.items()} == {
        "flash": ("deepseek-ai/DeepSeek-V4-Flash", FLASH_REV),
        "flash-base": ("deepseek-ai/DeepSeek-V4-Flash-Base", None),
        "flash-0731": ("deepseek-ai/DeepSeek-V4-Flash-0731", None),
        "pro": ("deepseek-ai/DeepSeek-V4-Pro", None),
    }


def test_hf_names():
    assert resolve_name("hf:unsloth/Foo-GGUF:*Q2_K*.gguf") == HubSpec(
        "hf:unsloth/Foo-GGUF", "unsloth/Foo-GGUF", None, ("*Q2_K*.gguf",))
    assert resolve_name("hf:a/b").patterns == CHECKPOINT_PATTERNS
    for bad in ("hf:nope", "hf:a/b/c", "hf:../x", "hf:"):
        with pytest.raises(BadInput, match="is not a Hub repo name"):
            resolve_name(bad)


def test_unknown_names_suggest_close_ones():
    with pytest.raises(NotFoundError) as e:
        resolve_name("flsh")
    assert (str(e.value), e.value.hint) == ("unknown model 'flsh'", "did you mean flash, flash-base or flash-0731?")
    with pytest.raises(NotFoundError) as e:
        resolve_name("llama")
    assert e.value.hint == "known names: flash, flash-base, flash-0731, pro; or hf:OWNER/REPO"


def test_local_paths_are_judged_by_content(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    with pytest.raises(NotFoundError, match="neither a checkpoint folder"):
        resolve_name(str(ckpt))
    (ckpt / "config.json").write_text("{}")
    assert resolve_name(str(ckpt)) == LocalSpec(ckpt, "checkpoint")

    gguf = tmp_path / "m.bin"  # the name says nothing; the magic does
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00")
    assert resolve_name(str(gguf)) == LocalSpec(gguf, "gguf")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf")
    with pytest.raises(NotFoundError, match="neither"):
        resolve_name(str(fake))
    with pytest.raises(NotFoundError, match="does not exist"):
        resolve_name(str(tmp_path / "missing.gguf"))


# ---- store ---------------------------------------------------------------------------------------------------


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("V4_HOME", str(tmp_path / "h"))
    assert default_root() == tmp_path / "h"
    monkeypatch.delenv("V4_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_root() == tmp_path / "xdg" / "v4"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_root() == tmp_path / "home" / ".cache" / "v4"


def test_atomic_json_and_manifest_round_trip(home):
    store = Store()
    m = put_model(store, "flash", "deepseek-ai/DeepSeek-V4-Flash", FLASH_REV,
                  {"config.json": b"{}", "model-00001-of-00001.safetensors": b"x" * 100})
    assert store.read_manifest("flash") == m
    d = store.model_dir("flash")
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model-00001-of-00001.safetensors", MANIFEST]
    atomic_write_json(d / "x.json", {"a": 1})
    assert json.loads((d / "x.json").read_text()) == {"a": 1}
    assert not [p for p in d.iterdir() if p.name.endswith(".tmp")]


def test_check_file_catches_size_and_hash(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"hello")
    good = FileRecord("f", 5, git_oid=git_blob_oid(b"hello"))
    assert check_file(p, good) is None
    assert check_file(p, FileRecord("f", 6, git_oid=good.git_oid)) == "size 5 != 6"
    p.write_bytes(b"hellp")
    assert check_file(p, good).startswith("git blob id ")
    assert check_file(p, good, full=False) is None
    assert check_file(tmp_path / "nope", good) == "missing"


def test_find_model_of_a_hub_name(home, tmp_path):
    store = Store()
    found = find_model("flash", store)
    assert isinstance(found, HubTarget) and found.spec is REGISTRY["flash"] and found.spec.config is FLASH_CONFIG
    assert (str(found.not_pulled), found.not_pulled.hint) == ("flash has not been pulled", "v4 pull flash")
    assert isinstance(find_model("flash-base", store), HubTarget) and find_model("pro", store).spec.config is None

    (store.partial_dir("flash")).mkdir(parents=True)
    assert str(find_model("flash", store).not_pulled) == "flash is only partly pulled"

    put_model(store, "flash", "deepseek-ai/DeepSeek-V4-Flash", FLASH_REV,
              {"config.json": b"{}", "model-00001-of-00001.safetensors": b"x" * 100})
    assert find_model("flash", store) == CheckpointTarget(store.model_dir("flash"), REGISTRY["flash"], ())

    (store.model_dir("flash") / "model-00001-of-00001.safetensors").unlink()
    found = find_model("flash", store)
    assert str(found.not_pulled) == "flash: model-00001-of-00001.safetensors is missing"
    assert found.not_pulled.hint == "v4 pull flash"


def test_find_model_of_paths_and_store_files(home, tmp_path):
    store = Store()
    local = tmp_path / "ckpt"
    local.mkdir()
    (local / "config.json").write_text("{}")
    assert find_model(str(local), store) == CheckpointTarget(local.resolve(), None, ())
    with pytest.raises(BadInput, match="is a checkpoint, not a GGUF"):
        find_gguf_model(str(local), store)
    out = store.gguf_path("ckpt", "q8")
    out.parent.mkdir(parents=True)
    out.write_bytes(b"GGUF" + bytes(60))
    # a typed folder's quantize outputs are named after it: the one output runs
    assert find_model(str(local), store).outputs == (out,) and find_gguf_model(str(local), store) == out
    assert find_model("ckpt", store) == GGUFTarget(out, "store")
    assert find_model("ckpt-q8", store) == find_model("ckpt-q8.gguf", store) == GGUFTarget(out, "store")
    assert find_model(str(out), store) == GGUFTarget(out.resolve(), "path")
    store.gguf_path("ckpt", "q2k").write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(BadInput, match="ckpt has 2 quantized outputs: ckpt-q2k.gguf, ckpt-q8.gguf"):
        find_model("ckpt", store)
    with pytest.raises(NotFoundError, match="unknown model 'flsh'"):
        find_model("flsh", store)
    with pytest.raises(NotFoundError, match="does not exist"):
        find_model(str(tmp_path / "missing.gguf"), store)


def test_find_model_of_a_hub_name_with_outputs_runs_the_output(home):
    store = Store()
    out = store.gguf_path("flash", "q2k")
    out.parent.mkdir(parents=True)
    out.write_bytes(b"GGUF" + bytes(60))
    found = find_model("flash", store)
    assert isinstance(found, HubTarget) and found.outputs == (out,)
    assert find_gguf_model("flash", store) == out
    with pytest.raises(NotFoundError, match="pro has not been pulled"):
        find_gguf_model("pro", store)


def test_find_model_rejects_other_revision(home):
    store = Store()
    put_model(store, "flash", "deepseek-ai/DeepSeek-V4-Flash", "e" * 40, {"config.json": b"{}"})
    assert str(find_model("flash", store).not_pulled) == "flash is stored at revision eeeeeee, not 60d8d70"


def test_gguf_path(home):
    store = Store()
    assert store.gguf_path("flash", "Q4_K_M") == home / "gguf" / "flash-Q4_K_M.gguf"
    assert store.gguf_path("hf:owner/Repo", "Q2_K") == home / "gguf" / "hf-owner-Repo-Q2_K.gguf"


def test_list_and_remove(home):
    store = Store()
    assert store.list() == []
    put_model(store, "flash", "deepseek-ai/DeepSeek-V4-Flash", FLASH_REV, {"config.json": b"{}"})
    put_model(store, "hf:someone/Foo-GGUF", "someone/Foo-GGUF", "a" * 40, {"Foo-Q2_K.gguf": b"GGUF" + b"\0" * 96})
    store.partial_dir("pro").mkdir(parents=True)
    store.write_state("pro", {"repo_id": "deepseek-ai/DeepSeek-V4-Pro", "revision": "b" * 40,
                              "files": {"config.json": {}}, "verified": {}})
    store.gguf_dir.mkdir()
    store.gguf_path("flash", "Q4_K_M").write_bytes(b"GGUF" + b"\0" * 10)

    rows = [(e.name, e.kind, e.complete, e.size, e.repo_id) for e in store.list()]
    assert rows == [
        ("flash", "model", True, 2, "deepseek-ai/DeepSeek-V4-Flash"),
        ("hf:someone/Foo-GGUF", "model", True, 100, "someone/Foo-GGUF"),
        ("pro", "model", False, (store.partial_dir("pro") / "state.json").stat().st_size,
         "deepseek-ai/DeepSeek-V4-Pro"),
        ("flash-Q4_K_M.gguf", "gguf", True, 14, None),
    ]
    assert store.remove("hf:someone/Foo-GGUF:*Q2_K*").name == "hf:someone/Foo-GGUF"
    assert not store.model_dir("hf:someone/Foo-GGUF").exists()
    assert store.remove("flash-Q4_K_M.gguf").kind == "gguf"
    assert [e.name for e in store.list()] == ["flash", "pro"]
    with pytest.raises(NotFoundError, match="flash-base is not in the store"):
        store.remove("flash-base")
    with pytest.raises(BadInput, match="is a local path"):
        store.remove(str(store.model_dir("flash")))


# ---- CLI ---------------------------------------------------------------------------------------------------


def test_cli_ls(home):
    res = CliRunner().invoke(app, ["ls"])
    assert res.exit_code == 0
    assert res.stdout == f"the store at {home} is empty (v4 pull flash adds a model)\n"

    store = Store()
    put_model(store, "flash", "deepseek-ai/DeepSeek-V4-Flash", FLASH_REV, {"config.json": b"{}" * 700})
    store.gguf_dir.mkdir()
    store.gguf_path("flash", "Q4_K_M").write_bytes(b"GGUF" + b"\0" * 2_000_000)
    res = CliRunner().invoke(app, ["ls"])
    assert res.exit_code == 0
    assert res.stdout.splitlines() == [
        "NAME               SIZE     STATUS    SOURCE",
        "flash              1.40 KB  complete  deepseek-ai/DeepSeek-V4-Flash@60d8d70",
        f"flash-Q4_K_M.gguf  2.00 MB  gguf      {home}/gguf/flash-Q4_K_M.gguf",
    ]


def test_cli_ls_shows_unfinished_quantize_outputs(home):
    """A killed `v4 quantize` leaves a hidden file as large as the model: `v4 ls` must not hide it."""
    from v4cli.partials import partial_path

    store = Store()
    store.gguf_dir.mkdir(parents=True)
    store.gguf_path("flash", "q8").write_bytes(b"GGUF" + b"\0" * 96)
    part = partial_path(store.gguf_path("flash", "q4k"))
    part.write_bytes(b"\0" * 3_000_000)
    res = CliRunner().invoke(app, ["ls"])
    assert res.exit_code == 0
    assert res.stdout.splitlines()[1:] == [
        f"flash-q8.gguf{' ' * (len(part.name) - 13)}  100 B    gguf        {store.gguf_path('flash', 'q8')}",
        f"{part.name}  3.00 MB  unfinished  {part}",
    ]


def test_cli_rm(home, capsys):
    store = Store()
    put_model(store, "flash", "deepseek-ai/DeepSeek-V4-Flash", FLASH_REV, {"config.json": b"{}"})

    res = CliRunner().invoke(app, ["rm", "flash"], input="n\n")
    assert res.exit_code == 1
    assert res.stdout == f"remove flash (2 B, {store.model_dir('flash')})? [y/N]: n\n"
    assert res.stderr.startswith("Aborted")  # click words it
    assert store.model_dir("flash").exists()

    res = CliRunner().invoke(app, ["rm", "flash"], input="y\n")
    assert res.exit_code == 0
    assert res.stdout.splitlines()[-1] == "removed flash (2 B)"
    assert not store.model_dir("flash").exists()

    with pytest.raises(SystemExit) as e:
        main(["rm", "flash", "--yes"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: flash is not in the store (the store is empty)\n"


def test_format_bytes():
    assert [format_bytes(n) for n in (0, 999, 1000, 159_609_485_896)] == ["0 B", "999 B", "1.00 KB", "159.61 GB"]
