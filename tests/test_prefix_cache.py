"""The disk prefix cache: a restored state continues with exactly the logits of an uninterrupted run, lookups pick
the longest sound prefix, the size bound evicts least recently used entries, bad entries are never loaded, and a
writer killed mid-entry leaves the cache usable."""

from __future__ import annotations

import io
import itertools
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from v4cli.cli import app
from v4cli.engine import Engine, SamplingParams, TokenRecord, prefix_cache
from v4cli.engine.prefix_cache import (
    _HEADER,
    SUFFIX,
    PrefixCache,
    PrefixCacheWarning,
    _prefix_key,
    _token_bytes,
    cache_root,
    clear,
    list_models,
    model_fingerprint,
    parse_cache_size,
    prefix_keys,
)
from v4cli.engine.session import Session
from quant.errors import BadInput
from v4cli.model import cache as model_cache
from v4cli.model.cache import STATE_LAYOUT, BadState
from v4cli.testing.tiny import random_token_ids

FP = "ab" * 32
OTHER_FP = "cd" * 32
GREEDY = SamplingParams(temperature=0.0, max_tokens=5, stop_on_eos=False)
BOUNDARIES = [1, 5, 17, 63, 130]  # tiny preset: ratios 4 and 16, window 16; most are aligned to neither


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny ops on a shared 2-core box


@pytest.fixture(scope="module")
def engines(tiny_gguf):
    path = tiny_gguf("f32")
    return {fmt: Engine.load(path, kv_format=fmt) for fmt in ("f32", "bf16", "fp8")}


def blob(n: int, seed: int = 0) -> bytes:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8).numpy().tobytes()


@contextmanager
def no_warnings():
    """Any PrefixCacheWarning inside the block fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrefixCacheWarning)
        yield


# --- exactness ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["f32", "bf16", "fp8"])
def test_restore_then_continue_equals_uninterrupted_run(engines, tmp_path, fmt):
    eng = engines[fmt]
    prompt = random_token_ids(150, seed=1)
    cuts = [0, *BOUNDARIES, len(prompt)]
    # one uninterrupted run, saving the state as it passes each boundary
    writer = PrefixCache.for_engine(eng, max_bytes=10**9, root=tmp_path)
    cache, reference = eng.new_cache(), {}
    for a, b in itertools.pairwise(cuts):
        if a:
            writer.save(prompt[:a], cache.to_bytes())
        reference[a] = torch.cat(list(eng.iter_logits(prompt[a:b], chunk=16, cache=cache)))
    # a new PrefixCache object and fresh caches: what a second process sees
    reader = PrefixCache.for_engine(eng, max_bytes=10**9, root=tmp_path)
    assert reader.fingerprint == writer.fingerprint and len(reader.entries()) == len(BOUNDARIES)
    with no_warnings():
        for a, b in itertools.pairwise(cuts[1:]):
            n, state = reader.lookup(prompt[: a + 1])  # one token past the boundary: the longest prefix is a
            assert n == a
            restored = eng.new_cache()
            restored.load_bytes(state)
            assert restored.pos == a
            got = torch.cat(list(eng.iter_logits(prompt[a:b], chunk=16, cache=restored)))
            assert torch.equal(got, reference[a]), (fmt, a)


def test_fresh_session_resumes_from_disk(engines, tmp_path):
    eng = engines["f32"]
    shared = random_token_ids(63, seed=2)
    p1 = shared + random_token_ids(20, seed=3)
    list(Session(eng, store=PrefixCache.for_engine(eng, root=tmp_path), chunk=16).generate(p1, GREEDY, marks=[63]))
    p2 = shared + random_token_ids(11, seed=4)
    s = Session(eng, store=PrefixCache.for_engine(eng, root=tmp_path), chunk=16)
    out = [r.token for r in s.generate(p2, GREEDY) if isinstance(r, TokenRecord)]
    assert s.reused == 63
    assert out == [r.token for r in eng.generate(p2, GREEDY) if isinstance(r, TokenRecord)]


def test_fingerprint_tracks_file_kv_format_and_device(engines, tmp_path):
    gf = engines["f32"].source
    fp = model_fingerprint(gf, "f32")
    assert fp == model_fingerprint(gf, "f32") and len(fp) == 64
    assert len({fp, model_fingerprint(gf, "fp8"), model_fingerprint(gf, "f32", "cuda")}) == 3
    # same header, different weight bytes: the sampled tensor data tells them apart
    import shutil

    from v4cli.gguf_file import GGUFFile

    copy = tmp_path / "copy.gguf"
    shutil.copy(gf.path, copy)
    t = next(iter(gf.tensors.values()))
    with open(copy, "r+b") as f:
        f.seek(t.offset)
        byte = f.read(1)
        f.seek(t.offset)
        f.write(bytes([byte[0] ^ 1]))
    with GGUFFile(copy) as g2:
        assert model_fingerprint(g2, "f32") != fp


# --- lookup ------------------------------------------------------------------------------------------------------


def test_prefix_keys_match_whole_hashes():
    tb = _token_bytes(random_token_ids(300, seed=5))
    keys = prefix_keys(tb, [300, 1, 77, 77, 150])
    assert keys == {n: _prefix_key(tb[: 4 * n]) for n in (1, 77, 150, 300)}


def test_longest_prefix_selection(tmp_path):
    pc = PrefixCache(tmp_path, FP, 10**6)
    p = random_token_ids(40, seed=6)
    q = p[:15] + random_token_ids(20, seed=7)
    for n in (10, 20, 30):
        pc.save(p[:n], blob(100, n))
    pc.save(q[:25], blob(100, 25))
    pc2 = PrefixCache(tmp_path, FP, 10**6)
    assert pc2.lookup(p[:25]) == (20, blob(100, 20))
    assert pc2.lookup(p) == (30, blob(100, 30))
    assert pc2.lookup(q) == (25, blob(100, 25))
    assert pc2.lookup(q[:24])[0] == 10  # q shares only 15 tokens with p
    assert pc2.lookup(p[:9]) is None
    assert pc2.lookup(p, longer_than=20) == (30, blob(100, 30))
    assert pc2.lookup(p[:29], longer_than=20) is None


def test_hash_collision_is_skipped_not_loaded(tmp_path):
    pc = PrefixCache(tmp_path, FP, 10**6)
    p, q = random_token_ids(30, seed=8), random_token_ids(30, seed=9)
    pc.save(p[:10], blob(50, 1))
    pc.save(q, blob(50, 2))
    # rename q's entry to the name p[:30] would have: same length and key, other tokens inside
    (e,) = [e for e in pc.entries() if e.n_tokens == 30]
    fake = e.path.with_name(f"{30:010d}-{_prefix_key(_token_bytes(p))}{SUFFIX}")
    e.path.rename(fake)
    with no_warnings():
        assert pc.lookup(p) == (10, blob(50, 1))
    assert fake.exists()  # sound, just not this prompt's


def test_same_prefix_saved_twice_keeps_one_entry(tmp_path):
    pc = PrefixCache(tmp_path, FP, 10**6)
    p = random_token_ids(12, seed=10)
    pc.save(p, blob(64, 1))
    pc.save(p, blob(64, 1))
    assert len(pc.entries()) == 1


# --- size bound ----------------------------------------------------------------------------------------------------


def test_lru_eviction_order_and_bound(tmp_path):
    size = _HEADER.size + 4 * 10 + 1000  # one entry of 10 tokens and a 1000-byte state
    pc = PrefixCache(tmp_path, FP, 3 * size)
    a, b, c, d = (random_token_ids(10, seed=s) for s in (11, 12, 13, 14))
    for t in (a, b, c):
        pc.save(t, blob(1000))
    assert pc.lookup(a) is not None  # a is now the most recently used
    pc.save(d, blob(1000))
    assert pc.lookup(b) is None and all(pc.lookup(t) is not None for t in (a, c, d))
    pc.save(b, blob(1000))  # now a, c, d were used in that order: a goes
    assert pc.lookup(a) is None
    assert sum(e.size for e in pc.entries()) <= 3 * size and len(pc.entries()) == 3


def test_bound_covers_all_models(tmp_path):
    size = _HEADER.size + 4 * 10 + 1000
    one, two = PrefixCache(tmp_path, FP, 2 * size), PrefixCache(tmp_path, OTHER_FP, 2 * size)
    a, b, c = (random_token_ids(10, seed=s) for s in (15, 16, 17))
    one.save(a, blob(1000))
    two.save(b, blob(1000))
    two.save(c, blob(1000))
    assert one.lookup(a) is None and two.lookup(b) is not None and two.lookup(a) is None


def test_entry_bigger_than_the_limit_is_not_saved(tmp_path):
    pc = PrefixCache(tmp_path, FP, 500)
    p = random_token_ids(10, seed=18)
    with pytest.warns(PrefixCacheWarning, match="exceeds the cache size"):
        pc.save(p, blob(1000))
    assert pc.entries() == [] and pc.lookup(p) is None
    PrefixCache(tmp_path, FP, 0).save(p, blob(10))  # size 0: caching is off
    assert pc.entries() == []


def test_parse_cache_size():
    assert parse_cache_size("20G") == 20 * 10**9 and parse_cache_size("512MiB") == 512 * 2**20
    assert parse_cache_size("off") == 0 and parse_cache_size("0") == 0
    with pytest.raises(BadInput):
        parse_cache_size("lots")


# --- bad entries -------------------------------------------------------------------------------------------------


def _two_entries(tmp_path):
    pc = PrefixCache(tmp_path, FP, 10**6, kv_format="f32")
    p = random_token_ids(20, seed=19)
    pc.save(p[:8], blob(300, 1))
    pc.save(p, blob(300, 2))
    (long,) = [e for e in pc.entries() if e.n_tokens == 20]
    return pc, p, long.path


def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize("damage, message", [
    (lambda p: _patch(p, os.path.getsize(p) - 7, b"\xff\x00\xff"), "checksum mismatch"),
    (lambda p: os.truncate(p, os.path.getsize(p) - 100), "truncated"),
    (lambda p: os.truncate(p, 20), "truncated header"),
    (lambda p: _patch(p, 0, b"JUNK"), "not a prefix-cache entry"),
    (lambda p: _patch(p, 4, (99).to_bytes(2, "little")), "format version 99"),
    (lambda p: _patch(p, 8, OTHER_FP.encode()), "another model"),
    (lambda p: _patch(p, 72, b"fp8\0"), "KV format fp8"),
])
def test_bad_entry_is_ignored_with_a_warning(tmp_path, damage, message):
    _, p, path = _two_entries(tmp_path)
    damage(path)
    with pytest.warns(PrefixCacheWarning, match=message):
        assert PrefixCache(tmp_path, FP, 10**6, kv_format="f32").lookup(p) == (8, blob(300, 1))
    assert not path.exists()  # deleted, so it is never read again


def test_entry_from_another_model_copied_in_is_refused(tmp_path):
    foreign = PrefixCache(tmp_path / "other", OTHER_FP, 10**6, kv_format="f32")
    p = random_token_ids(20, seed=20)
    foreign.save(p, blob(300))
    pc = PrefixCache(tmp_path, FP, 10**6, kv_format="f32")
    pc.folder.mkdir(parents=True)
    (src,) = foreign.entries()
    os.replace(src.path, pc.folder / src.path.name)
    with pytest.warns(PrefixCacheWarning, match="another model"):
        assert pc.lookup(p) is None


# --- states that cannot be restored ------------------------------------------------------------------------------
# Each entry below has a sound header and checksum (PrefixCache.save writes it), so only restoring its payload can
# tell it is bad; before the check every one was loaded into the live cache and crashed the run or answered wrong.


def _state_bytes(eng, tokens, edit=None, layout=STATE_LAYOUT) -> bytes:
    cache = eng.new_cache()
    eng.prefill(tokens, cache, 16)
    sd = cache.state_dict()
    if edit is not None:
        edit(sd)
    buf = io.BytesIO()
    torch.save({"layout": layout, "kv_format": eng.kv_format, "state": sd}, buf)
    return buf.getvalue()


def _renamed(sd):  # the same tensors under another layout's names
    for k in [k for k in sd if ".window." in k]:
        sd[k.replace(".window.", ".swa.")] = sd.pop(k)


def _edit(key, fn):
    return lambda sd: sd.__setitem__(key, fn(sd[key]))


HOSTILE = {  # name: (tokens the state is of, edit of its state_dict, layout), saved as the entry for 24 tokens
    "garbage": None,
    "other layout": (24, _renamed, STATE_LAYOUT + 1),
    "wrong shape": (24, _edit("0.window.x", lambda x: x[:, :-1]), STATE_LAYOUT),
    "wrong dtype": (24, _edit("2.compressor.buf_kv", lambda x: x.double()), STATE_LAYOUT),
    "position != token count": (20, None, STATE_LAYOUT),
    "counter != position": (24, _edit("2.compressor.count", lambda c: c + 1), STATE_LAYOUT),
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_unrestorable_state_is_warned_deleted_and_prefilled_from_scratch(engines, tmp_path, kind):
    eng = engines["f32"]
    prompt = random_token_ids(40, seed=30)
    spec = HOSTILE[kind]
    payload = blob(5000) if spec is None else _state_bytes(eng, prompt[: spec[0]], spec[1], spec[2])
    pc = PrefixCache.for_engine(eng, root=tmp_path)
    pc.save(prompt[:24], payload)
    (entry,) = pc.entries()
    s = Session(eng, store=PrefixCache.for_engine(eng, root=tmp_path), chunk=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = [r.token for r in s.generate(prompt, GREEDY) if isinstance(r, TokenRecord)]
    assert [str(w.message) for w in caught if w.category is PrefixCacheWarning] == [
        next(str(w.message) for w in caught if "state not restorable" in str(w.message))]  # exactly one, this one
    assert not entry.path.exists() and s.reused == 0
    assert out == [r.token for r in eng.generate(prompt, GREEDY) if isinstance(r, TokenRecord)]


def test_bad_state_falls_back_to_the_next_longest_entry(engines, tmp_path):
    eng = engines["f32"]
    prompt = random_token_ids(40, seed=31)
    pc = PrefixCache.for_engine(eng, root=tmp_path)
    pc.save(prompt[:10], _state_bytes(eng, prompt[:10]))
    pc.save(prompt[:24], _state_bytes(eng, prompt[:20]))
    s = Session(eng, store=pc, chunk=16)
    with pytest.warns(PrefixCacheWarning, match="pos is 20, expected 24"):
        out = [r.token for r in s.generate(prompt, GREEDY) if isinstance(r, TokenRecord)]
    assert s.reused == 10 and [e.n_tokens for e in pc.entries()] == [10]
    assert out == [r.token for r in eng.generate(prompt, GREEDY) if isinstance(r, TokenRecord)]


def test_refused_state_leaves_the_cache_unchanged(engines):
    eng = engines["fp8"]
    prompt = random_token_ids(30, seed=32)
    live = eng.new_cache()
    eng.prefill(prompt[:9], live, 16)
    before = {k: v.clone() for k, v in live.state_dict().items()}
    bad = _state_bytes(eng, prompt[:21], _edit("3.compressor.entries.e", lambda e: e.to(torch.int16)))
    with pytest.raises(BadState, match=r"layer 3 compressor: entries\.e is torch\.int16"):
        live.load_bytes(bad, 21)
    after = live.state_dict()
    assert live.pos == 9 and before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    live.load_bytes(_state_bytes(eng, prompt[:21]), 21)  # a sound one of the same run restores
    assert live.pos == 21


def test_entry_of_another_state_layout_is_a_miss(engines, tmp_path, monkeypatch):
    eng = engines["f32"]
    prompt = random_token_ids(40, seed=33)
    monkeypatch.setattr(model_cache, "STATE_LAYOUT", STATE_LAYOUT + 1)  # a future v4 writes...
    writer = PrefixCache.for_engine(eng, root=tmp_path)
    writer.save(prompt[:24], _state_bytes(eng, prompt[:24], layout=STATE_LAYOUT + 1))
    monkeypatch.setattr(model_cache, "STATE_LAYOUT", STATE_LAYOUT)  # ...and this one reads
    reader = PrefixCache.for_engine(eng, root=tmp_path)
    with no_warnings():
        assert reader.lookup(prompt, restore=lambda b, n: eng.new_cache().load_bytes(b, n)) is None
    assert reader.folder != writer.folder and len(writer.entries()) == 1  # a miss: the future's entry stays


@pytest.mark.slow  # three `v4 ask` processes
def test_v4_ask_answers_with_one_warning_line_when_an_entry_is_unrestorable(tiny_gguf, tmp_path):
    (tmp_path / "notes.txt").write_text("The compressor pools four tokens into one entry.\n" * 30)
    argv = [sys.executable, "-m", "v4cli", "ask", "-m", str(tiny_gguf("f32")), "notes.txt", "What is pooled?",
            "--json", "--max-tokens", "4", "--temperature", "0", "--threads", "1", "--mode", "non-think"]
    root = str(Path(prefix_cache.__file__).parents[2])  # the children run the code under test
    env = {**os.environ, "V4_HOME": str(tmp_path / "home"), "PYTHONPATH": root}

    def ask():
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout), [line for line in done.stderr.splitlines() if line.startswith("warning:")]

    first, warned = ask()
    assert not warned
    (model,) = list_models(cache_root(tmp_path / "home" / "prefix-cache"))
    longest = max(model.entries, key=lambda e: e.n_tokens)
    head = longest.path.read_bytes()[: _HEADER.size + 4 * longest.n_tokens]
    tokens = list(struct.unpack(f"<{longest.n_tokens}I", head[_HEADER.size:]))
    longest.path.unlink()
    pc = PrefixCache(model.path.parent, model.info["fingerprint"], 10**9, kv_format=model.info["kv_format"])
    pc.save(tokens, blob(4000))  # a sound checksum over a payload that is no state
    again, warned = ask()
    assert len(warned) == 1 and "state not restorable" in warned[0] and longest.path.name in warned[0]
    assert again["answer"] == first["answer"] and again["usage"]["reused_tokens"] < longest.n_tokens
    _, warned = ask()  # it was deleted: no warning the next time
    assert not warned


def test_names_on_disk_must_be_ours(tmp_path):
    pc = PrefixCache(tmp_path / "cache", FP, 10**6)
    p = random_token_ids(12, seed=34)
    pc.save(p, blob(100))
    (entry,) = pc.entries()
    # other scripts' digits and upper-case hex look like an entry to a lax pattern (int("٠٠٠٠٠٠٠٠١٢") == 12)
    os.link(entry.path, pc.folder / ("\u0660" * 8 + "\u0661\u0662" + entry.path.name[10:]))
    os.link(entry.path, pc.folder / entry.path.name.upper().replace(".V4PC", SUFFIX))
    # a model folder that is a symlink: clearing the cache must not delete the entries where it points
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / entry.path.name
    victim.write_bytes(b"someone else's file")
    (tmp_path / "cache" / OTHER_FP[:16]).symlink_to(outside)
    assert [e.path for e in pc.entries()] == [entry.path]
    assert [m.fingerprint for m in list_models(tmp_path / "cache")] == [FP[:16]]
    assert clear(tmp_path / "cache") == (1, entry.size)
    assert victim.read_bytes() == b"someone else's file"


# --- crash safety ------------------------------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import importlib.util, sys, time

    # load the module by path: importing the v4cli.engine package would pull in torch (seconds per child)
    root, n_old, source = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    spec = importlib.util.spec_from_file_location("prefix_cache", source)
    pc_mod = sys.modules["prefix_cache"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pc_mod)
    PrefixCache = pc_mod.PrefixCache

    def slow_write_all(f, parts):  # the real writer, slowed down so the parent can kill it mid-entry
        for part in parts:
            for i in range(0, len(part), 1 << 16):
                f.write(part[i: i + (1 << 16)])
                f.flush()
                time.sleep(0.002)

    pc = PrefixCache(root, "ab" * 32, 10**9)
    for k in range(n_old):
        pc.save(list(range(k + 1)), bytes([k]) * 1000)
    pc_mod._write_all = slow_write_all
    print("writing", flush=True)
    for k in range(100):
        pc.save(list(range(1000, 1100 + k)), bytes([k]) * (8 << 20))  # 128 chunks: ~0.3 s or more each
""")


def _kill_mid_write(root, delay: float, n_old: int = 3):
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(root), str(n_old), prefix_cache.__file__], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
        time.sleep(delay)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stdout.close()


def test_kill_during_write_leaves_cache_usable(tmp_path):
    _kill_mid_write(tmp_path, 0.15)
    pc = PrefixCache(tmp_path, FP, 10**9)
    assert list(pc.folder.glob(".*.tmp")), "the kill should have landed mid-write"
    with no_warnings():
        for k in range(3):
            assert pc.lookup(list(range(k + 1)) + [7]) == (k + 1, bytes([k]) * 1000)
        assert pc.lookup(list(range(1000, 1200))) is None
        pc.save([5, 6, 7], b"after")  # the lock died with the writer; the orphan temp file is removed
    assert pc.lookup([5, 6, 7, 8]) == (3, b"after") and not list(pc.folder.glob(".*.tmp"))


def test_kills_at_random_points_never_leave_a_bad_entry(tmp_path):
    rng = torch.Generator().manual_seed(0)
    for i in range(4):
        _kill_mid_write(tmp_path, float(torch.rand((), generator=rng)) * 0.8, n_old=1 if i else 3)
        pc = PrefixCache(tmp_path, FP, 10**9)
        with no_warnings():
            assert pc.lookup([0, 1, 2]) == (3, bytes([2]) * 1000)
            for e in pc.entries():  # whatever got published is whole and sound
                n, state = pc.lookup(list(range(1000, 1000 + e.n_tokens)) if e.n_tokens >= 100 else
                                     list(range(e.n_tokens)))
                assert n == e.n_tokens and len(state) in (1000, 8 << 20)


# --- Session checkpoints -----------------------------------------------------------------------------------------


def test_save_every_checkpoints_supersede_each_other(engines, tmp_path):
    eng = engines["f32"]
    prompt = random_token_ids(100, seed=21)
    pc = PrefixCache.for_engine(eng, root=tmp_path)
    list(Session(eng, store=pc, chunk=16, save_every=32).generate(prompt, GREEDY, marks=[50]))
    # 32 (auto), 50 (mark: 32 goes), 64 (auto), 96 (auto: 64 goes)
    assert sorted(e.n_tokens for e in pc.entries()) == [50, 96]


def test_interrupted_prefill_resumes_from_last_checkpoint(engines, tmp_path):
    eng = engines["f32"]
    prompt = random_token_ids(120, seed=22)

    def stop_late(done, total):
        if done >= 70:
            raise KeyboardInterrupt

    s = Session(eng, store=PrefixCache.for_engine(eng, root=tmp_path), chunk=16, save_every=32)
    with pytest.raises(KeyboardInterrupt):
        list(s.generate(prompt, GREEDY, progress=stop_late))
    pc = PrefixCache.for_engine(eng, root=tmp_path)
    assert [e.n_tokens for e in pc.entries()] == [64]
    s2 = Session(eng, store=pc, chunk=16)
    out = [r.token for r in s2.generate(prompt, GREEDY) if isinstance(r, TokenRecord)]
    assert s2.reused == 64
    assert out == [r.token for r in eng.generate(prompt, GREEDY) if isinstance(r, TokenRecord)]


def test_save_every_must_be_positive(engines):
    with pytest.raises(BadInput):
        Session(engines["f32"], save_every=0)


# --- CLI ---------------------------------------------------------------------------------------------------------


def test_cache_ls_and_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("V4_HOME", str(tmp_path))
    runner = CliRunner()
    res = runner.invoke(app, ["cache", "ls"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "is empty" in res.output and "20.00 GB" in res.output
    a = PrefixCache(cache_root(), FP, 10**6, kv_format="fp8", info={"name": "tiny-a", "file": "/m/a.gguf"})
    b = PrefixCache(cache_root(), OTHER_FP, 10**6, kv_format="bf16", info={"name": "tiny-b", "file": "/m/b.gguf"})
    a.save(list(range(1000)), blob(6000))
    a.save(list(range(10)), blob(100))
    b.save(list(range(50)), blob(800))
    res = runner.invoke(app, ["cache", "ls", "--cache-size", "1M"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert any(line.startswith("tiny-a  kv fp8") and "2 entries" in line for line in lines)
    assert any(line.startswith("tiny-b  kv bf16") and "1 entry," in line for line in lines)
    size = _HEADER.size + 4 * 1000 + 6000  # header, tokens as u32, state
    assert any(line.split()[:4] == ["1,000", f"{size / 1000:.2f}", "KB", f"{size / 1000:.0f}"] for line in lines)
    total = sum(m.size for m in list_models(cache_root()))
    assert f"total {total / 1000:.2f} KB of 1.00 MB limit" in res.output
    res = runner.invoke(app, ["cache", "clear", "--model", "a.gguf"])
    assert res.exit_code == 0 and "removed 2 cached states of a.gguf" in res.output
    assert [m.name for m in list_models(cache_root())] == ["tiny-b"]
    res = runner.invoke(app, ["cache", "clear", "--model", "nope"])
    assert res.exit_code != 0 and "no prefix-cache entries" in str(res.exception)
    res = runner.invoke(app, ["cache", "clear"])
    assert res.exit_code == 0 and "removed 1 cached state " in res.output and list_models(cache_root()) == []
