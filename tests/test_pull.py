"""`v4 pull` against a local fake Hub: verification, resume, errors, offline, the CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
from fakehub import FakeHub, git_blob_oid, write_small_repo
from huggingface_hub import constants as hf_constants
from typer.testing import CliRunner

from v4cli import hub
from v4cli.cli import app, main
from quant.errors import BadInput, DiskSpaceError, DownloadError, NotFoundError
from v4cli.registry import CHECKPOINT_PATTERNS, REGISTRY, HubSpec
from v4cli.store import MANIFEST, PARTIAL, GGUFTarget, HubTarget, Store, find_gguf_model, find_model, format_bytes

FLASH = REGISTRY["flash"]
SHARD = "model-00002-of-00003.safetensors"
PULLED = sorted([
    "config.json", "encoding/encoding_dsv4.py", "generation_config.json", "model-00001-of-00003.safetensors",
    "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json",
])


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A private store, HF home and token file; no ambient token or offline switch leaks in."""
    monkeypatch.setenv("V4_HOME", str(tmp_path / "v4"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    monkeypatch.setattr(hf_constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf" / "stored_tokens"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    return tmp_path


@pytest.fixture
def repo(env):
    return write_small_repo(env / "src")


@pytest.fixture
def fake(env, repo, monkeypatch):
    with FakeHub() as h:
        h.add_repo(FLASH.repo_id, repo, commit=FLASH.revision)
        monkeypatch.setenv("HF_ENDPOINT", h.endpoint)
        yield h


def _store_dir() -> Path:
    return Store().model_dir("flash")


def _stored_files(d: Path) -> list[str]:
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file() and p.name != MANIFEST)


def test_full_pull_writes_verified_files_and_manifest(fake, repo):
    events = []
    result = hub.pull("flash", max_workers=2, on_progress=events.append)

    d = _store_dir()
    assert _stored_files(d) == PULLED  # README.md and inference/ are not fetched
    for p in PULLED:
        assert (d / p).read_bytes() == (repo / p).read_bytes()
    assert not (d / PARTIAL).exists()

    manifest = json.loads((d / MANIFEST).read_text())
    assert manifest["repo_id"] == "deepseek-ai/DeepSeek-V4-Flash"
    assert manifest["revision"] == "60d8d70770c6776ff598c94bb586a859a38244f1"
    assert sorted(manifest["files"]) == PULLED
    shard = manifest["files"][SHARD]
    assert shard == {"size": (repo / SHARD).stat().st_size,
                     "sha256": hashlib.sha256((repo / SHARD).read_bytes()).hexdigest(), "git_oid": None}
    assert manifest["files"]["config.json"]["git_oid"] == git_blob_oid((repo / "config.json").read_bytes())

    total = sum((repo / p).stat().st_size for p in PULLED)
    assert (result.files, result.total_bytes, result.downloaded_bytes, result.up_to_date) == (9, total, total, False)
    assert events[-1].bytes_done == events[-1].bytes_total == total
    assert events[-1].files_done == events[-1].files_total == 9
    assert find_model("flash").path == d

    # A second pull asks for the listing only and downloads nothing.
    n = len(fake.downloads())
    again = hub.pull("flash")
    assert again.up_to_date and again.downloaded_bytes == 0
    assert len(fake.downloads()) == n


@pytest.mark.parametrize("redirect", [False, True], ids=["direct", "cdn-redirect"])
def test_interrupted_pull_resumes_with_range(fake, repo, monkeypatch, redirect):
    fake.redirect_lfs = redirect
    monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", 4096)  # several writes per small shard
    size = (repo / SHARD).stat().st_size

    seen = []

    def ctrl_c(p):
        if p.current == SHARD:
            seen.append(p.bytes_done)
            if len(seen) == 4:  # the opening event, then three 4 KiB writes
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        hub.pull("flash", max_workers=1, on_progress=ctrl_c)
    assert not (_store_dir() / MANIFEST).exists()
    assert "only partly pulled" in str(find_model("flash").not_pulled)
    (part,) = (_store_dir() / PARTIAL).glob("*.part")
    have = part.stat().st_size
    assert have == 3 * 4096 < size

    finished = [p for p in PULLED if p != SHARD and fake.downloads(p)]
    assert finished  # max_workers=1 goes in name order: some files were complete before the shard
    result = hub.pull("flash", max_workers=1)
    last = fake.downloads(SHARD)[-1]
    assert last.range == f"bytes={have}-"
    if redirect:
        assert last.url.startswith("/__cdn/")
    assert all(len(fake.downloads(p)) == 1 for p in PULLED if p != SHARD)  # nothing fetched twice
    assert (_store_dir() / SHARD).read_bytes() == (repo / SHARD).read_bytes()
    already = have + sum((repo / p).stat().st_size for p in finished)
    assert result.downloaded_bytes == result.total_bytes - already


def test_dropped_connection_is_resumed_within_a_run(fake, repo, monkeypatch):
    monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    fake.fail_once[SHARD] = 10_000  # two whole 4 KiB chunks reach the file before the drop
    hub.pull("flash", max_workers=1)
    ranges = [r.range for r in fake.downloads(SHARD)]
    assert ranges == [None, "bytes=8192-"]
    assert (_store_dir() / SHARD).read_bytes() == (repo / SHARD).read_bytes()


def test_corrupted_file_is_rejected_and_deleted(fake, repo):
    fake.corrupt.add(SHARD)
    with pytest.raises(DownloadError, match=f"{SHARD} from deepseek-ai/DeepSeek-V4-Flash failed verification"):
        hub.pull("flash", max_workers=1)
    d = _store_dir()
    assert not (d / SHARD).exists()
    assert not (d / MANIFEST).exists()
    assert not list((d / PARTIAL).glob("*.part"))

    # Once the mirror serves good bytes, only the rejected file (and those not reached) are fetched.
    fake.corrupt.clear()
    hub.pull("flash", max_workers=1)
    assert all(len(fake.downloads(p)) == 1 for p in PULLED if p != SHARD)
    assert len(fake.downloads(SHARD)) == 2
    assert (d / SHARD).read_bytes() == (repo / SHARD).read_bytes()


def test_unknown_repo_and_revision_are_not_found(fake):
    with pytest.raises(NotFoundError, match="repository nobody/nothing not found"):
        hub.pull("hf:nobody/nothing")
    spec = HubSpec("flash", FLASH.repo_id, "0" * 40, CHECKPOINT_PATTERNS)
    with pytest.raises(NotFoundError, match=f"revision {'0' * 40} not found in {FLASH.repo_id}"):
        hub.pull(spec)


def test_private_repo_without_token_is_explained(fake):
    fake.private = True  # the API answers 401 RepoNotFound, as the Hub does for private repos and no token
    fake.require_token = "hf_good"
    with pytest.raises(DownloadError) as e:
        hub.pull("flash")
    assert str(e.value) == f"{FLASH.repo_id} was not found, or it is private or gated and needs a token (401)"
    assert e.value.hint.startswith("check the name; if it is gated, accept the license at")
    assert hub.pull("flash", token="hf_good", max_workers=1).files == 9


def test_new_revision_fetches_only_changed_files(fake, repo):
    name = f"hf:{FLASH.repo_id}"  # no pinned revision: follows main
    first = hub.pull(name, max_workers=1)
    (repo / "config.json").write_text(json.dumps({"model_type": "deepseek_v4", "expert_dtype": "fp4"}))
    (repo / "model-00003-of-00003.safetensors").unlink()
    (repo / "model.safetensors.index.json").write_text("{}")
    new = fake.add_repo(FLASH.repo_id, repo)  # a new commit
    second = hub.pull(name, max_workers=1)

    assert (first.revision, second.revision) == (FLASH.revision, new.commit)
    counts = {p: len(fake.downloads(p)) for p in PULLED}
    assert counts == {p: 2 if p in ("config.json", "model.safetensors.index.json") else 1 for p in PULLED}
    assert not (second.path / "model-00003-of-00003.safetensors").exists()
    assert _stored_files(second.path) == [p for p in PULLED if p != "model-00003-of-00003.safetensors"]
    assert find_model(name).path == second.path


def test_listed_file_missing_on_download_is_a_download_error(fake):
    fake.missing.add("config.json")
    with pytest.raises(DownloadError, match="config.json is listed but the Hub does not serve it"):
        hub.pull("flash", max_workers=1)


def test_gated_repo_needs_a_token(fake, monkeypatch):
    fake.require_token = "hf_good"
    with pytest.raises(DownloadError, match=r"is gated: the Hub refused access \(401\)") as e:
        hub.pull("flash", max_workers=1)
    assert "accept the license" in e.value.hint and "--token" in e.value.hint
    with pytest.raises(DownloadError, match=r"\(403\)"):
        hub.pull("flash", token="hf_bad", max_workers=1)

    hub.pull("flash", token="hf_good", max_workers=1)
    assert {r.authorization for r in fake.downloads()} >= {"Bearer hf_good"}

    shutil.rmtree(_store_dir())
    monkeypatch.setenv("HF_TOKEN", "hf_good")  # read by huggingface_hub at request time
    assert not hub.pull("flash", max_workers=1).up_to_date


def test_disk_space_is_checked_before_downloading(fake, repo, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 999, 999))
    total = sum((repo / p).stat().st_size for p in PULLED)
    need = int(total * 1.02)
    with pytest.raises(DiskSpaceError) as e:
        hub.pull("flash")
    assert str(e.value) == (
        f"flash needs {format_bytes(need)} more ({format_bytes(total)} + 2% margin) "
        f"but {_store_dir()} has 999 B free"
    )
    assert fake.downloads() == []


def test_offline_verifies_without_network(fake, repo, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(NotFoundError, match="offline: flash has not been pulled"):
        hub.pull("flash")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    hub.pull("flash", max_workers=1)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    n = len(fake.requests)
    result = hub.pull("flash")
    assert result.offline and result.up_to_date and result.files == 9
    assert len(fake.requests) == n

    # Damage one stored file: offline verification names it and the folder stops counting as complete.
    damaged = _store_dir() / "model-00003-of-00003.safetensors"
    data = bytearray(damaged.read_bytes())
    data[100] ^= 1
    damaged.write_bytes(bytes(data))
    with pytest.raises(DownloadError, match="offline: 1 of 9 files of flash failed verification: "
                                            "model-00003-of-00003.safetensors \\(sha256"):
        hub.pull("flash")
    assert len(fake.requests) == n
    assert isinstance(find_model("flash"), HubTarget)

    # Back online, only the damaged file is fetched again.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    hub.pull("flash", max_workers=1)
    assert len(fake.downloads("model-00003-of-00003.safetensors")) == 2
    assert all(len(fake.downloads(p)) == 1 for p in PULLED if p != "model-00003-of-00003.safetensors")
    assert damaged.read_bytes() == (repo / "model-00003-of-00003.safetensors").read_bytes()


def test_network_down_is_a_download_error(env, monkeypatch):
    with FakeHub() as h:
        endpoint = h.endpoint  # a port nothing listens on once this server is closed
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    with pytest.raises(DownloadError, match=f"network error while fetching {FLASH.repo_id} from {endpoint}"):
        hub.pull("flash")


def test_gguf_pattern_pull_merges_and_resolves(env, monkeypatch):
    src = env / "gguf-src"
    src.mkdir()
    (src / "Foo-Q2_K.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 4)
    (src / "Foo-Q4_K_M.gguf").write_bytes(b"GGUF" + bytes(range(255, -1, -1)) * 4)
    (src / "README.md").write_text("x")
    with FakeHub() as h:
        h.add_repo("someone/Foo-GGUF", src)
        monkeypatch.setenv("HF_ENDPOINT", h.endpoint)
        r = hub.pull("hf:someone/Foo-GGUF:*Q2_K*.gguf")
        assert r.name == "hf:someone/Foo-GGUF" and r.files == 1
        store = Store()
        assert find_model("hf:someone/Foo-GGUF:*Q2_K*.gguf", store).path == r.path / "Foo-Q2_K.gguf"
        r2 = hub.pull("hf:someone/Foo-GGUF:*Q4_K_M*.gguf")
        assert r2.files == 2  # same commit: the second quant joins the first
        assert find_model("hf:someone/Foo-GGUF:*Q4_K_M*.gguf", store).path == r.path / "Foo-Q4_K_M.gguf"
        assert find_model("hf:someone/Foo-GGUF:*Q2_K*.gguf", store).path == r.path / "Foo-Q2_K.gguf"
        with pytest.raises(NotFoundError, match="has no files matching \\*Q8_0\\*"):
            hub.pull("hf:someone/Foo-GGUF:*Q8_0*.gguf")


def test_split_gguf_set_pulls_and_runs_as_one_model(env, monkeypatch, tiny_gguf):
    from quant.split import split_gguf

    src = env / "gguf-src"
    parts = split_gguf(tiny_gguf("lossless"), src / "Q2_K" / "Foo-Q2_K", max_tensors=60)
    (src / "Foo-Q8_0.gguf").write_bytes(b"GGUF" + bytes(range(256)))
    (src / "README.md").write_text("x")
    with FakeHub() as h:
        h.add_repo("someone/Foo-GGUF", src)
        monkeypatch.setenv("HF_ENDPOINT", h.endpoint)
        r = hub.pull("hf:someone/Foo-GGUF:Q2_K/*.gguf")
        assert r.files == 3
        first = r.path / "Q2_K" / parts[0].name
        # the repo's name alone (no pattern) finds its one model: the set, by its first part
        assert find_model("hf:someone/Foo-GGUF") == GGUFTarget(first, "store")
        assert find_gguf_model("hf:someone/Foo-GGUF") == first == find_gguf_model(None)
        res = CliRunner().invoke(app, ["info", "hf:someone/Foo-GGUF"])
        assert res.exit_code == 0, (res.output, res.exception)
        lines = res.output.splitlines()
        assert lines[0] == f"file        {first}"
        assert lines[1] == "parts       3: " + ", ".join(p.name for p in parts)
        assert "check       ok: every tensor present with the shape the config implies" in lines
        # a second model in the same repo: the user must name one, and the names offered work
        hub.pull("hf:someone/Foo-GGUF:*Q8_0*.gguf")
    res = CliRunner().invoke(app, ["info", "hf:someone/Foo-GGUF"])
    assert isinstance(res.exception, BadInput)
    assert str(res.exception) == ("hf:someone/Foo-GGUF holds 2 GGUF models: hf:someone/Foo-GGUF:Foo-Q8_0.gguf, "
                                  "hf:someone/Foo-GGUF:Q2_K/Foo-Q2_K-*-of-00003.gguf")
    assert find_model("hf:someone/Foo-GGUF:Q2_K/Foo-Q2_K-*-of-00003.gguf").path == first
    assert find_model("hf:someone/Foo-GGUF:Foo-Q8_0.gguf").path == r.path / "Foo-Q8_0.gguf"


def test_hf_hub_download_does_not_resume_across_runs(fake, env, monkeypatch):
    """Why hub.py keeps its own partial files: hf_hub_download (2.x) drops its temp file when interrupted.
    If this starts failing, huggingface_hub resumes again and hub.py could lean on it."""
    from huggingface_hub import hf_hub_download

    monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", 4096)

    class CtrlC:
        seen = 0

        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            CtrlC.seen += n
            if CtrlC.seen >= 8192:
                raise KeyboardInterrupt

    kw = {"revision": FLASH.revision, "endpoint": fake.endpoint, "cache_dir": env / "hf-cache"}
    with pytest.raises(KeyboardInterrupt):
        hf_hub_download(FLASH.repo_id, SHARD, tqdm_class=CtrlC, **kw)
    hf_hub_download(FLASH.repo_id, SHARD, **kw)
    assert [r.range for r in fake.downloads(SHARD)] == [None, None]


@pytest.mark.slow  # the tiny checkpoint is ~145 MB (full-size tokenizer and tid2eid tables): ~25 s
def test_tiny_official_checkpoint_round_trips(env, monkeypatch):
    tiny = pytest.importorskip("v4cli.testing.tiny")
    src = tiny.make_tiny_checkpoint(env / "tiny")
    with FakeHub() as h:
        h.add_repo("deepseek-ai/DeepSeek-V4-Flash-0731", src)
        monkeypatch.setenv("HF_ENDPOINT", h.endpoint)
        r = hub.pull("flash-0731", max_workers=2)
    index = json.loads((r.path / "model.safetensors.index.json").read_text())
    for shard in set(index["weight_map"].values()):
        assert (r.path / shard).read_bytes() == (src / shard).read_bytes()
    assert (r.path / "config.json").read_bytes() == (src / "config.json").read_bytes()
    assert find_model("flash-0731").path == r.path


# ---- CLI ---------------------------------------------------------------------------------------------------


def test_cli_pull_output(fake, repo):
    total = sum((repo / p).stat().st_size for p in PULLED)
    res = CliRunner().invoke(app, ["pull", "flash", "--workers", "2"])
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == [
        (
            f"pulled flash: 9 files, {format_bytes(total)} from deepseek-ai/DeepSeek-V4-Flash@60d8d70 "
            f"({format_bytes(total)} downloaded)"
        ),
        f"stored in {_store_dir()}",
    ]
    res = CliRunner().invoke(app, ["pull", "flash"])
    assert res.stdout.splitlines()[0] == (
        f"flash is up to date: 9 files, {format_bytes(total)} from deepseek-ai/DeepSeek-V4-Flash@60d8d70"
    )
    res = CliRunner().invoke(app, ["pull", "flash", "--offline"])
    assert res.stdout.splitlines()[0] == (
        f"flash verified offline: 9 files, {format_bytes(total)} from deepseek-ai/DeepSeek-V4-Flash@60d8d70"
    )


def _main(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_cli_pull_errors(fake, capsys):
    assert _main(["pull", "flsh"], capsys) == (
        2, "", "error: unknown model 'flsh' (did you mean flash, flash-base or flash-0731?)\n")
    assert _main(["pull", "hf:nobody/nothing"], capsys) == (
        2, "", f"error: repository nobody/nothing not found on {fake.endpoint} (check the name)\n")
    fake.require_token = "hf_good"
    assert _main(["pull", "flash", "--workers", "1"], capsys) == (
        4, "",
        (
            "error: deepseek-ai/DeepSeek-V4-Flash is gated: the Hub refused access (401) (accept the license at "
            f"{fake.endpoint}/deepseek-ai/DeepSeek-V4-Flash, then v4 pull flash --token hf_... (or set HF_TOKEN))\n"
        ),
    )
    assert _main(["pull", "./no/such/dir"], capsys) == (2, "", "error: ./no/such/dir does not exist\n")


# ---- hostile endpoints (issue 21) ------------------------------------------------------------------------------


def _tree(root: Path) -> set[str]:
    """Every file and link under `root`, but the per-model lock files a pull always creates."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*")
            if (p.is_file() or p.is_symlink()) and ".locks" not in p.parts}


@pytest.mark.parametrize("hostile", ["../../../x.safetensors", "encoding/../../../../x.py", "ABSOLUTE"])
def test_listing_name_leaving_the_store_is_refused_before_any_write(fake, env, capsys, hostile):
    name = str(env / "abs" / "x.safetensors") if hostile == "ABSOLUTE" else hostile
    fake.add_file(FLASH.repo_id, name, b"import os  # planted by a hostile mirror\n" * 100)
    before = _tree(env)
    code, out, err = _main(["pull", "flash"], capsys)
    assert (code, out) == (2, "")
    why = "is an absolute path" if hostile == "ABSOLUTE" else "has an empty, '.' or '..' segment"
    assert err == (f"error: file name from {fake.endpoint} {name!r} {why}; refusing it "
                   "(the source is corrupt or hostile: check the URL)\n")
    assert _tree(env) == before  # nothing written anywhere: not the planted file, not even the model folder
    assert fake.downloads() == []


def test_listing_hash_that_is_not_hex_is_refused_before_any_write(fake, env, repo):
    size = (repo / SHARD).stat().st_size
    fake.listing[SHARD] = {"lfs": {"sha256": "../../../../pwned", "size": size, "pointerSize": 130}}
    before = _tree(env)
    with pytest.raises(BadInput, match=rf"sha256 of {SHARD} '../../../../pwned' is not 64 hex characters"):
        hub.pull("flash")
    assert _tree(env) == before and fake.downloads() == []


@pytest.mark.parametrize("link", ["encoding", PARTIAL])
def test_symlink_in_the_model_folder_cannot_redirect_writes(fake, env, capsys, link):
    elsewhere = env / "elsewhere"
    elsewhere.mkdir()
    _store_dir().mkdir(parents=True)
    (_store_dir() / link).symlink_to(elsewhere)
    code, out, err = _main(["pull", "flash", "--workers", "1"], capsys)
    assert code == 2
    what = "partial folder '.v4-partial'" if link == PARTIAL else \
        f"file name from {fake.endpoint} 'encoding/encoding_dsv4.py'"
    assert err == (f"error: {what} resolves outside {_store_dir()}; refusing it "
                   "(a symlink inside the folder points out of it: remove it)\n")
    assert list(elsewhere.iterdir()) == [] and fake.downloads() == []


def test_symlink_in_the_model_folder_cannot_redirect_stale_deletes(fake, env, repo):
    name = f"hf:{FLASH.repo_id}"  # follows main
    folder = hub.pull(name, max_workers=1).path
    victim = env / "elsewhere"
    shutil.move(folder / "encoding", victim)
    (folder / "encoding").symlink_to(victim)
    shutil.rmtree(repo / "encoding")
    fake.add_repo(FLASH.repo_id, repo)  # a new commit without encoding/, so its file is stale
    with pytest.raises(BadInput, match="stored file name 'encoding/encoding_dsv4.py' resolves outside"):
        hub.pull(name, max_workers=1)
    assert (victim / "encoding_dsv4.py").is_file()
    assert (folder / MANIFEST).is_file()  # refused before the folder was touched: still the complete old pull


def test_unsafe_name_in_an_old_manifest_is_not_deleted_as_stale(fake, env):
    # What an older v4 recorded after pulling from a hostile mirror, at another revision.
    victim = env / "v4" / "victim.txt"
    victim.parent.mkdir(parents=True)
    victim.write_text("not the store's to delete")
    _store_dir().mkdir(parents=True)
    (_store_dir() / MANIFEST).write_text(json.dumps({
        "name": "flash", "repo_id": FLASH.repo_id, "revision": "1" * 40,
        "files": {"../../victim.txt": {"size": 25, "sha256": None, "git_oid": None}},
    }))
    with pytest.raises(BadInput, match=r"stored file name '../../victim.txt' has an empty, '.' or '..' segment; "
                                       r"refusing it \(recorded by an earlier pull of flash\)") as e:
        hub.pull("flash", max_workers=1)
    assert e.value.hint == "v4 rm flash, then v4 pull flash"
    assert victim.read_text() == "not the store's to delete"
    assert fake.downloads() == []


def test_endpoint_without_hashes_is_refused_unless_no_verify(fake, env, repo, capsys):
    fake.no_hashes = True  # a plain mirror or proxy: sizes, no LFS sha256, no git blob ids
    before = _tree(env)
    assert _main(["pull", "flash"], capsys) == (4, "", (
        f"error: {fake.endpoint} gives no hash for 9 of 9 files of {FLASH.repo_id} (config.json, "
        "encoding/encoding_dsv4.py, generation_config.json, ...), so they cannot be verified (use an endpoint that "
        "sends hashes, or v4 pull flash --no-verify to accept them checked by size only)\n"))
    assert _tree(env) == before and fake.downloads() == []

    total = sum((repo / p).stat().st_size for p in PULLED)
    what = f"9 files, {format_bytes(total)} from {FLASH.repo_id}@60d8d70"
    res = CliRunner().invoke(app, ["pull", "flash", "--no-verify", "--workers", "2"])
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == [
        f"pulled flash: {what} ({format_bytes(total)} downloaded)",
        "unverified: 9 of 9 files had no hash and were checked by size only",
        f"stored in {_store_dir()}",
    ]
    manifest = json.loads((_store_dir() / MANIFEST).read_text())
    assert manifest["unverified"] == PULLED
    assert all(r["sha256"] is None and r["git_oid"] is None for r in manifest["files"].values())

    res = CliRunner().invoke(app, ["ls"])
    (row,) = [line for line in res.stdout.splitlines() if line.startswith("flash ")]
    assert row.split()[3:5] == ["complete,", "unverified"]
    res = CliRunner().invoke(app, ["pull", "flash", "--offline"])
    assert res.stdout.splitlines()[:2] == [
        f"flash checked offline: {what}", "unverified: 9 of 9 files had no hash and were checked by size only"]


def test_equal_size_files_in_parallel_and_resumed_never_share_a_partial(env, monkeypatch):
    """Without hashes both files' content key is their size: one shared partial, two writers, a spliced resume."""
    import numpy as np

    src = env / "pair"
    src.mkdir()
    rng = np.random.default_rng(0)
    for f in ("a.safetensors", "b.safetensors"):
        (src / f).write_bytes(rng.bytes(65536))
    monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    got: dict[str, int] = {}
    last = [0]

    def ctrl_c_once_both_have_8k(p):
        got[p.current] = got.get(p.current, 0) + p.bytes_done - last[0]
        last[0] = p.bytes_done
        if got.get("a.safetensors", 0) >= 8192 and got.get("b.safetensors", 0) >= 8192:
            raise KeyboardInterrupt

    with FakeHub() as h:
        h.add_repo("someone/Pair", src)
        h.no_hashes = True
        # Each file's first 8 KiB arrive together, then the link stalls: both workers are mid-file at once.
        h.hold = {"a.safetensors": 8192, "b.safetensors": 8192}
        monkeypatch.setenv("HF_ENDPOINT", h.endpoint)
        with pytest.raises(KeyboardInterrupt):
            hub.pull("hf:someone/Pair", no_verify=True, max_workers=2, on_progress=ctrl_c_once_both_have_8k)
        folder = Store().model_dir("hf:someone/Pair")
        have = sorted(p.stat().st_size for p in (folder / PARTIAL).glob("*.part"))
        assert len(have) == 2 and have[0] >= 8192  # one partial each, both written to at once

        r = hub.pull("hf:someone/Pair", no_verify=True, max_workers=2)
        ranges = [[d.range for d in h.downloads(f)] for f in ("a.safetensors", "b.safetensors")]
        assert [first for first, _ in ranges] == [None, None]
        assert sorted(int(again[len("bytes="):-1]) for _, again in ranges) == have  # each resumed its own
    for f in ("a.safetensors", "b.safetensors"):
        assert (r.path / f).read_bytes() == (src / f).read_bytes()
    assert r.unverified == 2
