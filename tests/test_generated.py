"""Shell completions and the CLI reference are generated from the app and must be current."""

from v4cli.generated import expected_files


def test_completions_and_cli_reference_are_current():
    stale = [str(p) for p, text in expected_files().items() if not p.exists() or p.read_text() != text]
    assert not stale, f"stale generated files {stale}: run `python -m v4cli.generated`"
