"""`v4 demo`, the README's first command: the whole pipeline on the embedded tiny model, through the real CLI."""

import pytest

from v4cli.cli import main


@pytest.mark.slow
def test_demo_builds_quantizes_and_answers(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("V4_HOME", str(tmp_path))
    main(["demo", "--max-tokens", "3", "--recipe", "lossless"])
    out = capsys.readouterr().out
    assert "TINY RANDOM-WEIGHT" in out
    assert (tmp_path / "demo" / "tiny-checkpoint" / "model.safetensors.index.json").exists()
    assert (tmp_path / "demo" / "tiny-lossless.gguf").exists()
    assert "non-think mode" in out
    assert "finish: length" in out
    main(["demo", "--max-tokens", "1", "--recipe", "lossless"])  # second run reuses both
    assert "(cached)" in capsys.readouterr().out
