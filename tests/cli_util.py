"""Running the real `v4` entry point in-process, error boundary included, for the CLI tests."""

from __future__ import annotations

import sys

from v4cli.cli import main


def run_cli(argv, capsys, monkeypatch=None, stdin=None) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `v4 ARGV`; with `stdin` (any file-like), it is what the command reads."""
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", stdin)
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out, err = capsys.readouterr()
    return code, out, err
