"""`v4 demo`, the README's first command: the whole pipeline on the embedded tiny model, through the real CLI; its
model as a store entry (`v4 ls`, `v4 rm`, the default of chat/ask); the one-time kernel build shown and untimed."""

import re
import shutil
import time
import warnings
from contextlib import redirect_stdout
from io import StringIO

import pytest

from kernels import backends, cpu_ext
from v4cli.cli import main
from quant.errors import V4Warning
from v4cli.store import Store, find_gguf_model

NEXT = ["next        v4 chat", '            v4 ask . "what is this?"', "            v4 ls",
        "            v4 pull flash"]


def _prefill_s(out: str) -> float:
    return float(re.search(r"prefill (\d+\.\d+) s = \d+ tok/s", out).group(1))


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory):
    """A store after one `v4 demo` (lossless recipe, 3 tokens) and what it printed."""
    home = tmp_path_factory.mktemp("demo-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("V4_HOME", str(home))
        out = StringIO()
        with redirect_stdout(out):
            main(["demo", "--max-tokens", "3", "--recipe", "lossless"])
    return home, out.getvalue()


@pytest.mark.slow
def test_demo_builds_quantizes_answers_and_says_what_next(demo_home, monkeypatch, capsys):
    home, out = demo_home
    assert "TINY RANDOM-WEIGHT" in out
    assert (home / "demo" / "tiny-checkpoint" / "model.safetensors.index.json").exists()
    assert (home / "demo" / "tiny-lossless.gguf").exists()
    assert "non-think mode" in out
    assert "finish: length" in out
    lines = out.splitlines()
    assert [next(ln for ln in lines if ln.startswith(p)) for p in NEXT]  # each suggestion on one line of its own
    assert "v4 rm tiny-lossless removes it" in out
    monkeypatch.setenv("V4_HOME", str(home))
    main(["demo", "--max-tokens", "1", "--recipe", "lossless"])  # a second run reuses both
    assert "(cached)" in capsys.readouterr().out


@pytest.mark.slow
def test_first_load_shows_the_kernel_build_and_the_timed_prefill_excludes_it(demo_home, tmp_path, monkeypatch,
                                                                              capsys):
    """A compile that takes BUILD_S seconds (the real library, copied after a sleep) into an empty kernel cache:
    the note is printed once, and the prefill the demo reports is shorter than the compile, so it was not in it."""
    BUILD_S = 6.0
    home, _ = demo_home
    built = cpu_ext.build()  # the real library (cached after the first build on this machine)

    def slow_compile(cxx, out):
        time.sleep(BUILD_S)
        shutil.copyfile(built, out)

    monkeypatch.delenv("V4_KERNELS", raising=False)  # conftest's reference default would skip the kernels
    monkeypatch.setenv("V4_HOME", str(home))
    monkeypatch.setattr(cpu_ext, "cache_dir", lambda: tmp_path / "ext")
    monkeypatch.setattr(cpu_ext, "_compile", slow_compile)
    monkeypatch.setattr(cpu_ext, "_lib", None)  # as in a fresh process
    monkeypatch.setattr(backends, "_installed", None)
    main(["demo", "--max-tokens", "1", "--recipe", "lossless", "--prompt", "hi"])
    cap = capsys.readouterr()
    assert cap.err.count(cpu_ext.BUILD_NOTE) == 2  # "... once ..." then "...: done in N s"
    done = float(re.search(r"building CPU kernels, once: done in (\d+\.\d) s", cap.err).group(1))
    assert done >= BUILD_S
    assert float(re.search(r"loaded .*\((\d+\.\d) s", cap.out).group(1)) >= BUILD_S  # it happened at load
    assert _prefill_s(cap.out) < BUILD_S
    assert list((tmp_path / "ext").glob("*.so"))

    monkeypatch.setattr(cpu_ext, "_lib", None)
    monkeypatch.setattr(backends, "_installed", None)
    main(["demo", "--max-tokens", "1", "--recipe", "lossless", "--prompt", "hi"])  # cached: loaded, not built
    assert cpu_ext.BUILD_NOTE not in capsys.readouterr().err


@pytest.mark.slow
def test_store_lists_removes_and_defaults_to_the_demo_model(demo_home, tmp_path, monkeypatch, capsys):
    home, _ = demo_home
    monkeypatch.setenv("V4_HOME", str(tmp_path))
    shutil.copytree(home / "demo", tmp_path / "demo")  # a copy: the other tests keep theirs

    main(["ls"])
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split() == ["NAME", "SIZE", "STATUS", "SOURCE"]
    assert rows[1].split()[0] == "tiny-lossless.gguf" and rows[1].split()[3] == "demo"
    assert rows[1].endswith(str(tmp_path / "demo" / "tiny-lossless.gguf"))

    monkeypatch.setattr("sys.stdin", StringIO("a log line\n"))  # what `cat log | v4 ask` gives it
    main(["ask", "--dry-run", "what is this?"])  # no model named: the demo's, with a line saying so
    err = capsys.readouterr().err
    assert "warning: no model given: using tiny-lossless, v4 demo's tiny random-weight model" in err

    main(["rm", "-y", "tiny-lossless"])  # the name without .gguf, as the demo prints it
    assert capsys.readouterr().out.startswith("removed tiny-lossless.gguf (")
    assert not (tmp_path / "demo").exists()  # the checkpoint went with the last demo GGUF
    main(["ls"])
    assert "is empty" in capsys.readouterr().out


def _gguf(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF" + b"\0" * 60)
    return path


def test_default_model_is_the_demo_only_while_the_store_holds_nothing_else(tmp_path, monkeypatch):
    monkeypatch.setenv("V4_HOME", str(tmp_path))
    monkeypatch.delenv("V4_MODEL", raising=False)
    store = Store()
    demo = _gguf(store.demo_dir / "tiny-q8.gguf")
    with pytest.warns(V4Warning, match="no model given: using tiny-q8, v4 demo's tiny random-weight model"):
        assert find_gguf_model(None) == demo
    assert find_gguf_model("tiny-q8") == demo == find_gguf_model("tiny-q8.gguf")  # by its `v4 ls` name, no warning

    real = _gguf(store.gguf_path("flash", "q2k"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", V4Warning)
        assert find_gguf_model(None) == real  # a real model wins, without the demo's warning


def test_store_entries_for_demo_models(tmp_path):
    store = Store(tmp_path)
    _gguf(store.demo_dir / "tiny-q8.gguf")
    _gguf(store.demo_dir / "tiny-lossless.gguf")
    (store.demo_dir / "tiny-checkpoint").mkdir()
    _gguf(store.gguf_path("flash", "q8"))
    assert [(e.name, e.kind) for e in store.list()] == [
        ("flash-q8.gguf", "gguf"), ("tiny-lossless.gguf", "demo"), ("tiny-q8.gguf", "demo")]
    assert store.entry("flash-q8").kind == "gguf"  # `.gguf` optional for every GGUF file
    assert store.remove("tiny-q8").name == "tiny-q8.gguf"
    assert (store.demo_dir / "tiny-checkpoint").is_dir()  # another demo GGUF still uses the checkpoint
    assert store.remove("tiny-lossless.gguf").kind == "demo"
    assert not store.demo_dir.exists()
    assert [e.name for e in store.list()] == ["flash-q8.gguf"]
