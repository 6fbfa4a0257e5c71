"""`v4 ask` end to end on the tiny model: a generated repo (.gitignore, a binary, a .env, nested directories),
stdin piping, the over-budget error before any model load, --dry-run, --json, exit codes, Ctrl-C → 130."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
from cli_util import run_cli
import torch

from v4cli.chat import answer
from v4cli.chat.answer import ask_marks, wrap_ids
from v4cli.chat.conversation import PromptEncoder
from v4cli.prompt.encoding import DSML, Mode, System, User, load_tokenizer, render

@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("V4_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("V4_MODEL", raising=False)
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def repo(tmp_path, monkeypatch):
    root = tmp_path / "proj"
    files = {
        ".gitignore": "build/\n*.log\n",
        "README.md": "# Proj\n\nA tiny project.\n",
        "src/app.py": "from src.pkg.deep import util\n\n\ndef main():\n    return util.add(1, 2)\n",
        "src/pkg/deep/util.py": "def add(a, b):\n    return a + b\n" * 20,
        "build/out.txt": "generated\n",
        "debug.log": "noise\n",
        ".env": "API_KEY=hunter2\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    monkeypatch.chdir(tmp_path)
    return root


class Stdin:
    """A piped (not a terminal) stdin for in-process runs."""

    def __init__(self, text: str):
        import io

        self.buffer = io.BytesIO(text.encode())

    def isatty(self) -> bool:
        return False

    def read(self) -> str:
        return self.buffer.read().decode()


def run(argv, capsys, monkeypatch, stdin: str = "") -> tuple[int, str, str]:
    return run_cli(argv, capsys, monkeypatch, Stdin(stdin))


def no_load(*a, **k):
    raise AssertionError("the model must not be loaded")


# ---------------------------------------------------------------------------------------------- units


@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize("system", [None, "Answer in French."])
def test_wrapped_ids_equal_rendered_prompt(mode, system):
    tok = load_tokenizer()
    encoder = PromptEncoder(tok._tok)
    head, tail = wrap_ids(encoder, mode, system)
    body = "files...\nquestion?"
    msgs = ([System(system)] if system else []) + [User(body)]
    assert head + tok.encode(body) + tail == tok.encode(render(msgs, mode))


@dataclass
class P:
    kind: str
    n_tokens: int


def test_ask_marks_spacing():
    pieces = [P("tree", 100)] + [P("file", 3000)] * 6 + [P("stdin", 50), P("question", 10)]
    # boundaries at 10+100+3000k; ends at 10+100+18000+50 = 18160
    assert ask_marks(10, pieces) == [12110, 18160]  # the first boundary ≥ 4096 tokens before the end, then the end
    # geometric spacing back from the end (recent files come last): 5K, 20K, 80K before it, then nothing more
    many = [P("file", 1000)] * 100
    assert ask_marks(10, many) == [20010, 80010, 95010, 100010]
    assert len(ask_marks(0, [P("file", 10)] * 100000, gap=16)) == 5  # at most 4 boundaries + the end
    assert ask_marks(10, pieces, gap=10**6) == [18160]
    assert ask_marks(5, [P("question", 4)]) == []


# ---------------------------------------------------------------------------------------------- the CLI


def test_dry_run_shows_token_tree_and_exclusions_without_loading(repo, capsys, monkeypatch, tiny_gguf):
    monkeypatch.setattr(answer, "load_engine", no_load)
    code, out, err = run(["ask", "-m", str(tiny_gguf("q8")), "proj", "What does main return?", "--dry-run"],
                         capsys, monkeypatch)
    assert code == 0, err
    lines = out.splitlines()
    names = [line[10:].strip() for line in lines if line[:8].strip().replace(",", "").isdigit()]
    assert names[:6] == ["./", "proj/", "src/", "pkg/", "deep/", "util.py"]  # largest first, nested
    assert {"app.py", "README.md", ".gitignore", "[file tree]", "[question]", "[prompt format]"} <= set(names)
    left_out = "\n".join(lines[lines.index(next(x for x in lines if x.startswith("left out"))):])
    for path, why in [("proj/.env", "secret"), ("proj/logo.png", "binary"), ("proj/build/", "ignored"),
                      ("proj/debug.log", "ignored")]:
        assert f"{path}  {why}" in left_out
    assert "hunter2" not in out and lines[-1].startswith("total ") and lines[-1].endswith("(fits)")


def test_dry_run_needs_no_model(repo, capsys, monkeypatch):
    code, out, err = run(["ask", "proj/src", "q?", "--dry-run", "--ctx", "64K"], capsys, monkeypatch)
    assert code == 0, err
    assert "util.py" in out and "of a 32,768 budget" in out  # 64K context − 32K answer reserve


def test_over_budget_lists_largest_before_any_prefill(repo, capsys, monkeypatch, tiny_gguf):
    monkeypatch.setattr(answer, "load_engine", no_load)
    code, out, err = run(["ask", "-m", str(tiny_gguf("q8")), "proj", "q?", "--ctx", "400", "--max-tokens", "200"],
                         capsys, monkeypatch)
    assert code == 2 and out == ""
    assert "over the budget of 200" in err
    assert "largest directories: proj/ " in err and "proj/src/pkg/deep/util.py " in err
    assert "--exclude" in err  # the hint names the fix


def test_ask_json_end_to_end(repo, capsys, monkeypatch, tiny_gguf):
    gguf = str(tiny_gguf("q8"))
    common = ["proj", "What does main return?", "--mode", "non-think"]
    code, out, _ = run(["ask", "-m", gguf, *common, "--dry-run"], capsys, monkeypatch)
    total = int(out.splitlines()[-1].split()[1].replace(",", ""))
    code, out, err = run(["ask", "-m", gguf, *common, "--json", "--max-tokens", "3", "--temperature", "0",
                          "--threads", "1"], capsys, monkeypatch)
    assert code == 0, err
    rec = json.loads(out)
    assert rec["usage"]["prompt_tokens"] == total and rec["usage"]["reused_tokens"] == 0
    assert 1 <= rec["usage"]["completion_tokens"] <= 3 and rec["finish_reason"] in ("eos", "length")
    assert rec["mode"] == "non-think" and rec["model"] == "tiny-q8.gguf" and rec["reasoning"] is None
    assert DSML not in rec["answer"] and rec["timings"]["prefill_s"] > 0


def test_stdin_and_paths_combine(repo, capsys, monkeypatch):
    code, out, err = run(["ask", "-", "proj/src/app.py", "q?", "--dry-run"], capsys, monkeypatch,
                         stdin="piped notes\n" * 5)
    assert code == 0, err
    assert "[<stdin>]" in out and "app.py" in out
    code, out, err = run(["ask", "q?", "--dry-run"], capsys, monkeypatch, stdin="only stdin\n")
    assert code == 0 and "[<stdin>]" in out and "./" not in out


@pytest.mark.parametrize("argv, message", [
    (["ask", "missing-dir", "q?"], "no such file or directory: missing-dir"),
    (["ask", "q?"], "nothing to read"),
    (["ask", "proj", "-"], "the last argument must be the question"),
    (["ask", "proj", "q?", "--mode", "ultra"], "ultra"),
])
def test_bad_input_exits_2(repo, capsys, monkeypatch, tiny_gguf, argv, message):
    monkeypatch.setenv("V4_MODEL", str(tiny_gguf("q8")))
    code, _, err = run(argv, capsys, monkeypatch)
    assert code == 2 and message in err


def test_dry_run_json_is_json_and_every_run_says_what_it_read(repo, capsys, monkeypatch):
    code, out, err = run(["ask", "proj", "What does main return?", "--dry-run", "--json"], capsys, monkeypatch)
    assert code == 0, err
    rec = json.loads(out)
    assert {f["path"] for f in rec["files"]} == {"proj/.gitignore", "proj/README.md", "proj/src/app.py",
                                                 "proj/src/pkg/deep/util.py"}
    assert {(x["path"], x["reason"]) for x in rec["left_out"]} == {
        ("proj/.env", "secret"), ("proj/logo.png", "binary"), ("proj/build/", "ignored"), ("proj/debug.log", "ignored")}
    assert rec["fits"] and rec["total_tokens"] == sum(f["tokens"] for f in rec["files"]) + sum(
        o["tokens"] for o in rec["other"])
    assert f"4 files, {rec['total_tokens']:,} tokens, 4 left out" in err  # the one-line summary, on stderr


def test_nothing_read_is_an_error_before_any_model_load(repo, capsys, monkeypatch, tiny_gguf):
    monkeypatch.setattr(answer, "load_engine", no_load)
    (repo.parent / "empty").mkdir()
    code, out, err = run(["ask", "-m", str(tiny_gguf("q8")), "empty", "q?"], capsys, monkeypatch)
    assert code == 2 and out == "" and "no file to read in empty: it is empty" in err
    code, out, err = run(["ask", "-m", str(tiny_gguf("q8")), "proj/logo.png", "proj/.env", "q?"], capsys, monkeypatch)
    assert code == 2 and out == ""
    assert "all 2 left out: proj/.env (secret: dotenv file), proj/logo.png (binary: NUL byte)" in err


@pytest.mark.parametrize("argv", [["ask", "proj"], ["ask", "proj/src", "proj/README.md"]])
def test_forgotten_question_is_named(repo, capsys, monkeypatch, argv):
    code, _, err = run(argv, capsys, monkeypatch)
    assert code == 2
    assert f"the last argument '{argv[-1]}' is a path, not a question" in err and 'v4 ask PATH... "QUESTION"' in err


def test_missing_model_is_bad_input(repo, capsys, monkeypatch):
    code, _, err = run(["ask", "proj", "q?"], capsys, monkeypatch)
    assert code == 2 and "no model given and the store holds no GGUF" in err


def test_runtime_failure_exits_1(repo, capsys, monkeypatch, tiny_gguf):
    class Broken:
        tokenizer = None

        def new_cache(self):
            raise RuntimeError("out of device memory")

    monkeypatch.setattr(answer, "load_engine", lambda *a, **k: Broken())
    code, _, err = run(["ask", "-m", str(tiny_gguf("q8")), "proj", "q?"], capsys, monkeypatch)
    assert code == 1 and "generation failed: out of device memory" in err


# ---------------------------------------------------------------------------------------------- real processes


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "v4cli", *args]


@pytest.mark.slow
def test_stdin_pipe_in_a_real_process(tmp_path, tiny_gguf):
    env = dict(os.environ, V4_HOME=str(tmp_path / "home"), V4_MODEL=str(tiny_gguf("q8")))
    proc = subprocess.run(cli("ask", "Summarize this.", "--json", "--max-tokens", "2", "--threads", "1",
                              "--mode", "non-think"),
                          input="line one\nline two\n", check=False, capture_output=True, text=True, env=env, timeout=240,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(proc.stdout)
    assert rec["usage"]["prompt_tokens"] > 10 and rec["usage"]["completion_tokens"] >= 1


@pytest.mark.slow
def test_ctrl_c_exits_130(tmp_path, tiny_gguf):
    env = dict(os.environ, V4_HOME=str(tmp_path / "home"), PYTHONUNBUFFERED="1")
    (tmp_path / "notes.txt").write_text("some notes\n")
    proc = subprocess.Popen(cli("ask", "-m", str(tiny_gguf("q8")), "notes.txt", "Go on forever.", "--mode",
                                "non-think", "--max-tokens", "5000", "--temperature", "1", "--seed", "1",
                                "--threads", "1"),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            cwd=tmp_path,
                            # a runner started in the background (`cmd &`) ignores SIGINT, and children inherit
                            # that: give the CLI the terminal's default, as a user's shell would
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 180
        got = b""
        while not got and time.monotonic() < deadline:  # wait until the answer streams
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                got = os.read(proc.stdout.fileno(), 1024)
        assert got, "no answer text streamed"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and b"interrupted" in err
