"""One consistent CLI: shared flag declarations, -m everywhere, one size/context parser, argument help, wording."""

from __future__ import annotations

import dataclasses
import inspect
import io
import re
from pathlib import Path

import click
import pytest
from cli_util import run_cli
import typer.main
from typer.testing import CliRunner

from v4cli.cli import app
from v4cli.commands.ask import ask_cmd
from v4cli.commands.chat import chat_cmd
from v4cli.commands.info import info
from v4cli.commands.options import OLD_SPELLINGS, RunOptions
from v4cli.commands.plan import plan

ROOT = Path(__file__).resolve().parent.parent
WIDE = {"COLUMNS": "300", "TERM": "dumb", "NO_COLOR": "1"}  # no wrapping: help texts stay on one line


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("V4_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("V4_MODEL", raising=False)


def _group() -> click.Group:
    return typer.main.get_command(app)


def _commands() -> dict[str, click.Command]:
    group = _group()
    return {name: group.get_command(click.Context(group), name) for name in group.list_commands(click.Context(group))}


def _help(*args: str) -> str:
    res = CliRunner().invoke(app, [*args, "--help"], prog_name="v4", env=WIDE, color=False)
    assert res.exit_code == 0, res.output
    return res.output


def _run(argv, capsys, monkeypatch, stdin: str = "") -> tuple[int, str, str]:
    return run_cli(argv, capsys, monkeypatch, io.StringIO(stdin))  # piped: not a terminal


# ---------------------------------------------------------------------------------------------- item 8: argument help


def test_every_argument_has_help_and_help_shows_it():
    shown = 0
    for name, cmd in _commands().items():
        text = _help(name)
        for p in cmd.params:
            if isinstance(p, click.Argument) and not p.hidden:
                assert p.help, f"v4 {name}: argument {p.name} has no help"
                assert p.help in text, f"v4 {name} --help does not show {p.help!r}"
                shown += 1
    assert shown >= 8  # pull, rm, info, plan, chat, ask, quantize, bench, ...


def test_pull_help_and_cli_reference_list_the_names():
    names = "flash, flash-base, flash-0731, pro, hf:OWNER/REPO[:PATTERN]"
    assert names in _help("pull")
    assert names in (ROOT / "docs" / "cli.md").read_text()


# ---------------------------------------------------------------------------------------------- item 9: one set of flags


def test_chat_and_ask_share_one_declaration_of_the_run_flags():
    fields = dataclasses.fields(RunOptions)
    assert len(fields) == 16
    sig = {f.__name__: inspect.signature(f).parameters for f in (chat_cmd, ask_cmd)}
    for f in fields:
        # the very same OptionInfo object in both signatures: one declaration, not two copies that could drift
        assert sig["chat_cmd"][f.name].default is f.metadata["flag"] is sig["ask_cmd"][f.name].default
    cmds = _commands()
    for name in ("chat", "ask"):
        params = {p.name: p for p in cmds[name].params}
        for f in fields:
            assert params[f.name].default == f.default or params[f.name].default == getattr(f.default, "value", None)
    opts = {name: {o for p in cmds[name].params for o in p.opts} for name in ("chat", "ask")}
    run_flags = {o for f in fields for o in f.metadata["flag"].param_decls}
    assert run_flags <= opts["chat"] and run_flags <= opts["ask"]


def test_run_options_reach_the_command(monkeypatch, capsys):
    seen = {}

    def fake_ask(**kw):
        seen.update(kw)

    monkeypatch.setattr("v4cli.commands.ask._ask", fake_ask)
    code, _, err = _run(["ask", "x", "q?", "--temperature", "0.5", "--ctx", "64K", "--kv", "fp8", "--top-k", "7"],
                        capsys, monkeypatch)
    assert code == 0, err
    run = seen["run"]
    assert (run.temperature, run.ctx, run.kv_format, run.top_k, run.max_tokens) == (0.5, 65536, "fp8", 7, 32768)
    assert run.sampling().top_k == 7


def test_model_is_named_with_m_in_chat_and_ask(tiny_gguf, tmp_path, capsys, monkeypatch):
    gguf = str(tiny_gguf("q8"))
    for argv in (["chat", "-m", gguf], ["chat", "--model", gguf], ["chat", gguf]):  # the old positional still works
        code, _, err = _run([*argv, "--threads", "1", "--ctx", "4K"], capsys, monkeypatch)
        assert code == 0, err
        assert f"{Path(gguf).name} · mode high · context 4,096 tokens" in err
    code, _, err = _run(["chat", "-m", gguf, "other.gguf"], capsys, monkeypatch)
    assert code == 2 and f"error: two models named: -m {gguf} and other.gguf" in err
    notes = tmp_path / "notes.txt"
    notes.write_text("The answer is 42.\n")
    code, out, err = _run(["ask", "-m", gguf, str(notes), "What is the answer?", "--dry-run"], capsys, monkeypatch)
    assert code == 0, err
    assert "notes.txt" in out
    names = {name: {o for p in cmd.params for o in p.opts} for name, cmd in _commands().items()}
    for name in ("chat", "ask", "info", "plan", "eval", "bench", "imatrix"):
        assert {"-m", "--model"} <= names[name], name


def test_info_reads_contexts_like_every_other_command(tiny_gguf, capsys, monkeypatch):
    gguf = str(tiny_gguf("q8"))
    code, out, err = _run(["info", gguf, "--plan", "--ctx", "1M", "--vram", "0", "--ram", "16G"], capsys, monkeypatch)
    assert code == 0, err
    one_m = [line for line in out.splitlines() if line.startswith("│ KV cache (")]
    code, out, err = _run(["info", "-m", gguf, "--plan", "--ctx", "1048576", "--vram", "0", "--ram", "16G"], capsys,
                          monkeypatch)
    assert code == 0, err
    assert one_m and one_m == [line for line in out.splitlines() if line.startswith("│ KV cache (")]
    assert "1M tokens)" in one_m[0]
    code, _, err = _run(["info", gguf, "--plan", "--ctx", "lots"], capsys, monkeypatch)
    assert code == 2 and "cannot read context length 'lots'" in err


def test_info_and_plan_take_the_same_memory_flags():
    cmds = _commands()
    for flag in ("--ram", "--vram", "--ctx", "--kv"):
        decls = [next(p for p in cmds[name].params if flag in p.opts) for name in ("info", "plan")]
        assert all(d.metavar == decls[0].metavar for d in decls), flag
    for old in OLD_SPELLINGS:  # kept working, never advertised
        assert f"--{old}" not in _help("info") and f"--{old}" not in _help("plan")
    # the memory flags are the same objects in both signatures where their meaning is the same
    info_sig, plan_sig = inspect.signature(info).parameters, inspect.signature(plan).parameters
    assert info_sig["ram"].default is plan_sig["ram"].default and info_sig["vram"].default is plan_sig["vram"].default


def test_old_spellings_still_work(capsys, monkeypatch):
    common = ["plan", "flash", "--ram-bw", "90", "--disk", "1T"]
    _, new, _ = _run([*common, "--ram", "128G", "--vram", "0", "--ctx", "256K", "--kv", "bf16"], capsys, monkeypatch)
    code, old, err = _run([*common, "--cpu-mem", "128G", "--gpu-mem", "0", "--context", "256K", "--kv-format", "bf16"],
                          capsys, monkeypatch)
    assert code == 0, err
    assert old == new and "KV cache: bf16, " in new and "256K context" in new


# ---------------------------------------------------------------------------------------------- item 10: wording


def test_unknown_command_suggests_once(capsys, monkeypatch):
    code, _, err = _run(["list"], capsys, monkeypatch)
    assert code == 2
    assert err.count("Did you mean") == 1 and "Did you mean 'ls'?" in err


def _hints() -> list[tuple[str, str]]:
    """(file name, text) of every literal `hint=` in the package."""
    return [(path.name, "".join(hint)) for path in (ROOT / "v4cli").rglob("*.py")
            for hint in re.findall(r"""hint=f?(?:"([^"]*)"|'([^']*)')""", path.read_text())]


def test_every_command_a_hint_names_exists():
    commands = set(_commands())
    named = {cmd: where for where, hint in _hints() for cmd in re.findall(r"\bv4 ([a-z][a-z-]*)", hint)}
    prose = {"runs", "reads"}  # "v4 runs DeepSeek-V4 GGUFs only": the program speaking, not a command
    missing = {cmd: where for cmd, where in named.items() if cmd not in commands | prose}
    assert not missing, f"hints name commands that do not exist: {missing}"
    assert {"ls", "pull", "quantize"} <= set(named)  # the check reads the hints it means to read


def test_every_flag_a_hint_names_exists():
    flags = {o for cmd in _commands().values() for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
    named = {flag: where for where, hint in _hints() for flag in re.findall(r"--[a-z][a-z0-9-]*", hint)}
    missing = {flag: where for flag, where in named.items() if flag not in flags}
    assert not missing, f"hints name flags that no command has: {missing}"
    assert {"--max-tokens", "--ctx", "--kv"} <= set(named)  # the check reads the hints it means to read


def test_sampling_errors_name_the_flags(capsys, monkeypatch):
    code, _, err = _run(["ask", "x", "q?", "--top-p", "2", "--dry-run"], capsys, monkeypatch, stdin="text")
    assert code == 2 and "--top-p must be in (0, 1], got 2.0" in err and "top_p" not in err



def test_every_size_and_context_flag_reads_the_same_units():
    checked = []
    for name, cmd in _commands().items():
        ctx = click.Context(cmd)
        for p in cmd.params:
            if "--ctx" in p.opts:
                assert p.type.convert("1M", p, ctx) == 1 << 20 and p.type.convert("32768", p, ctx) == 32768, name
                checked.append((name, "--ctx"))
            for flag in {"--ram", "--vram", "--disk", "--fit"} & set(p.opts):
                assert p.type.convert("64G", p, ctx) == 64 * 10**9, (name, flag)
                checked.append((name, flag))
    assert {("info", "--ctx"), ("plan", "--ctx"), ("chat", "--ctx"), ("ask", "--ctx"), ("info", "--ram"),
            ("plan", "--vram")} <= set(checked)
