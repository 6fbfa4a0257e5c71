"""`v4 eval` through the real app: a bad --text/--tokens file is one line before any load; progress on a terminal."""

from __future__ import annotations

import os
import re
import sys

import pytest
from cli_util import run_cli



def run(argv, capsys) -> tuple[int, str, str]:
    return run_cli(argv, capsys)


@pytest.fixture
def no_load(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("the model must not be loaded for a bad input file")

    monkeypatch.setattr("v4cli.engine.select.load_engine", fail)


@pytest.mark.parametrize("flag", ["--text", "--tokens"])
def test_missing_file_is_one_line_before_loading(flag, tmp_path, capsys, no_load):
    code, out, err = run(["eval", tmp_path / "model.gguf", flag, tmp_path / "nope.txt"], capsys)
    assert (code, out) == (2, "")
    assert err == f"error: {flag} {tmp_path / 'nope.txt'}: no such file (check the path)\n"


def test_unreadable_text_is_one_line(tmp_path, capsys, no_load):
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    code, out, err = run(["eval", tmp_path / "model.gguf", "--text", tmp_path / "latin1.txt"], capsys)
    assert (code, out) == (2, "")
    assert err.startswith(f"error: --text {tmp_path / 'latin1.txt'}: not UTF-8 text (byte 3)") and err.count("\n") == 1
    code, out, err = run(["eval", tmp_path / "model.gguf", "--text", tmp_path], capsys)
    assert code == 2 and err.count("\n") == 1 and "a folder, not a file" in err


def test_progress_shows_tokens_speed_and_eta_on_a_terminal(tiny_gguf, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    text = tmp_path / "text.txt"
    text.write_text("The compressor folds every few tokens into one entry; the indexer picks the top ones. " * 12)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TERM="xterm-256color", COLUMNS="150", LINES="40", PYTHONUNBUFFERED="1", NO_COLOR="1",
               PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    child = pexpect.spawn(sys.executable, ["-m", "v4cli", "eval", str(tiny_gguf("q8")), "--text", str(text),
                                           "--chunk", "8", "--threads", "1"],
                          env=env, dimensions=(40, 150), timeout=180, cwd=str(tmp_path), encoding="utf-8",
                          codec_errors="replace")
    # mid-run: tokens scored of the total, tok/s since the start, time left
    child.expect(r"scoring.*?(\d+)/(\d+) tokens\s+([\d,]+) tok/s\s+(\d+:\d\d:\d\d|-:--:--)")
    done, total = int(child.match.group(1)), int(child.match.group(2))
    assert 0 < done < total
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    # Rich still bolds numbers under NO_COLOR, and the bar's lines end in \r
    lines = re.split(r"[\r\n]+", re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", child.before))
    assert f"tokens      {total}" in lines  # the bar counted the tokens the result reports
    assert any(re.fullmatch(r"perplexity  [\d.]+", ln) for ln in lines)
