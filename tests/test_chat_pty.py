"""`v4 chat` end to end through a pseudo-terminal: two turns with a /mode switch, Ctrl-C in the middle of a long
answer (the session survives and the next turn reuses the prefix), /tokens, /exit."""

from __future__ import annotations

import os
import re
import sys
import time

import pytest

pexpect = pytest.importorskip("pexpect")

PROMPT = ">>> "
STATUS = re.compile(r"(\d[\d,]*) tokens · [\d.]+ tok/s · prefill ([\d,]+) tokens \([\d.]+ tok/s\), ([\d,]+) reused")
TIMEOUT = 120  # per step; the whole test takes ~20-40 s on an idle 2-core box


def _num(s: str) -> int:
    return int(s.replace(",", ""))


def test_chat_through_a_terminal(tiny_gguf, tmp_path):
    gguf = tiny_gguf("q8")
    env = dict(os.environ, TERM="xterm-256color", COLUMNS="120", LINES="40", V4_HOME=str(tmp_path / "home"),
               PYTHONUNBUFFERED="1")
    env.pop("NO_COLOR", None)
    child = pexpect.spawn(sys.executable, ["-m", "v4cli", "chat", str(gguf), "--max-tokens", "6", "--temperature",
                                           "0", "--threads", "1", "--mode", "high", "--ctx", "8K"],
                          env=env, dimensions=(40, 120), timeout=TIMEOUT, cwd=str(tmp_path), encoding="utf-8",
                          codec_errors="replace")
    log = []
    child.logfile_read = type("Log", (), {"write": lambda self, s: log.append(s), "flush": lambda self: None})()
    try:
        child.expect_exact(PROMPT)
        # turn 1, thinking mode
        child.sendline("What does the compressor do?")
        child.expect(STATUS)
        assert _num(child.match.group(3)) == 0  # nothing to reuse yet
        child.expect_exact(PROMPT)
        child.sendline("/mode non-think")
        child.expect_exact("mode: non-think")
        child.expect_exact(PROMPT)
        # turn 2: reuses turn 1's prompt up to its final <｜Assistant｜>
        child.sendline("And the indexer?")
        child.expect(STATUS)
        assert _num(child.match.group(3)) > 0
        child.expect_exact(PROMPT)
        # turn 3: a long answer, stopped with Ctrl-C once it streams
        child.sendline("/set max-tokens 2000")
        child.expect_exact("max-tokens = 2000")
        child.expect_exact(PROMPT)
        child.sendline("Explain everything in detail.")
        child.expect_exact("\x1b[?25l")  # Rich's live region hides the cursor: the answer is streaming
        time.sleep(1.0)
        child.sendintr()
        child.expect_exact("[interrupted]")
        child.expect(STATUS)
        assert 0 < _num(child.match.group(1)) < 2000
        child.expect_exact(PROMPT)
        child.sendline("/tokens")
        child.expect(r"last turn +prompt [\d,]+ \([\d,]+ reused, [\d,]+ prefilled\), completion ([\d,]+), "
                     r"finish interrupted")
        child.expect_exact(PROMPT)
        # the session is intact: the next turn works and reuses the interrupted turn's prefix
        child.sendline("/set max-tokens 4")
        child.expect_exact(PROMPT)
        child.sendline("Short, please.")
        child.expect(STATUS)
        assert _num(child.match.group(3)) > 0
        child.expect_exact(PROMPT)
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, "".join(log)[-3000:]
