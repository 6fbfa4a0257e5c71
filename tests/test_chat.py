"""`v4 chat` below the terminal: piecewise prompt ids, /save and /load, slash commands and multi-line input, one
turn through a Session (prefix reuse across turns, Ctrl-C policy), and the streaming renderer (never raw DSML)."""

from __future__ import annotations

import io
import json
import os
import re
import sys

import pytest
import torch
from rich.console import Console

from v4cli.chat import slash
from v4cli.chat.answer import Chat, InterruptLatch, Reply, run_turn
from v4cli.chat.conversation import Conversation, PromptEncoder
from v4cli.chat.render import StreamView, split_finished, status_line
from v4cli.engine import SamplingParams
from v4cli.engine.records import DoneRecord, Memory, Timings, TokenRecord
from quant.errors import BadInput, NotFoundError
from v4cli.prompt.encoding import (
    DSML,
    EOS,
    Assistant,
    Mode,
    System,
    ToolCall,
    User,
    load_tokenizer,
    render,
)
from v4cli.prompt.parser import ContentDelta, ReasoningDelta

TOOL_BLOCK = (f'\n\n<{DSML}tool_calls>\n<{DSML}invoke name="search">\n<{DSML}parameter name="q" string="true">'
              f'cats</{DSML}parameter>\n</{DSML}invoke>\n</{DSML}tool_calls>')


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def encoder(tok):
    return PromptEncoder(tok._tok)


# ---------------------------------------------------------------------------------------------- prompt ids


@pytest.mark.parametrize("mode", list(Mode))
def test_piecewise_ids_equal_whole_text_ids(tok, encoder, mode):
    convs = [
        [User("hello")],
        [System("Be brief."), User("2+2?"), Assistant("4", reasoning="add"), User("and <think> 3+3 </think>?")],
        [User("héllo 世界 \n\n  code:\n```py\nx = 1\n```"), Assistant("ok" + EOS[:3]), User("more  ")],
    ]
    for msgs in convs:
        text = render(msgs, mode)
        assert encoder.encode(text) == tok.encode(text)
        assert encoder.encode(text) == tok.encode(text)  # second time from the piece cache


def test_conversation_prompt_and_mark(encoder):
    conv = Conversation(Mode.HIGH, system="sys")
    conv.add_user("hi")
    ids, stable = conv.prompt_ids(encoder)
    assert ids[:stable] == encoder.encode(conv.stable_text()) and stable == len(ids) - 1  # all but <think>
    conv.add_answer(Assistant("hello", reasoning="r"))
    conv.add_user("again")
    ids2, _ = conv.prompt_ids(encoder)
    assert ids2[:stable] == ids[:stable] and ids2[stable] != ids[stable]  # the reasoning was dropped
    with pytest.raises(BadInput):
        conv.add_user("twice")


def test_save_load_round_trip(tmp_path):
    conv = Conversation(Mode.NON_THINK, system="You are terse.")
    conv.add_user("q1 ✓")
    conv.add_answer(Assistant("a1", reasoning="why", tool_calls=()))
    conv.add_user("q2")
    conv.add_answer(Assistant("", None, (ToolCall("search", {"q": "cats", "opts": {"n": [1, 2.5, None, True]}}),)))
    path = tmp_path / "sub" / "c.json"
    conv.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["c.json"]  # atomic: no temp file left behind
    back = Conversation.load(path)
    assert back == conv and json.loads(path.read_text())["format"] == 1


def session_file(*answer: dict, **top) -> dict:
    """A saved conversation whose one answer has the fields given (content "a" unless given)."""
    return {"format": 1, "mode": "high", "messages": [{"role": "user", "content": "q"},
                                                      {"role": "assistant", "content": "a", **dict(*answer)}], **top}


# each: what /load reads → the field the one-line error must name. Before the field-by-field check, "load"
# marks a traceback from /load itself, "turn" a file that loaded and then failed the next turn with a traceback
# (either ended the chat), "kept" a bad value that loaded silently; the rest were one-line errors already.
HOSTILE_SESSIONS = {
    "format is true": ({"format": True, "messages": []}, "not a saved v4 conversation"),  # kept
    "messages not a list": ({"format": 1, "messages": "hi"}, "messages must be a list, not a string"),
    "message not an object": ({"format": 1, "messages": [3]}, "message 0 must be an object, not a number"),
    "mode not a string": (session_file(mode=["high"]), "mode must be a string, not a list"),
    "content not a string": (session_file({"content": {"t": 1}}), "message 1: content must be a string"),
    "reasoning not a string": (session_file({"reasoning": 42}), "message 1: reasoning must be a string, not a"
                                                                 " number"),  # kept
    "tool_calls not a list": (session_file({"tool_calls": {"name": "x"}}),
                              "tool_calls must be a list, not an obj"),  # load
    "tool call not an object": (session_file({"tool_calls": ["search"]}), "tool_calls[0] must be an object"),  # load
    "tool call without name": (session_file({"tool_calls": [{"arguments": {}}]}),
                               "tool_calls[0].name must be a string, not null"),  # load
    "arguments a list": (session_file({"tool_calls": [{"name": "s", "arguments": [1]}]}),
                         "tool_calls[0].arguments must be an object, not a list"),  # turn
    "arguments a string": (session_file({"tool_calls": [{"name": "s", "arguments": "{\"q\": 1}"}]}),
                           "arguments must be an object, not a string"),  # turn
    "lone surrogate": (session_file({"content": "\ud800"}), "content is not valid Unicode"),  # turn
    "unknown field": (session_file({"tool_call": []}), "unknown field 'tool_call'"),  # kept
    "unanswered user message": ({"format": 1, "messages": [{"role": "user", "content": "q"}]},
                                "message 0 is a user message with no answer"),  # every later turn refused
}


@pytest.mark.parametrize("kind", list(HOSTILE_SESSIONS))
def test_load_names_the_bad_field_in_one_line(tmp_path, kind):
    data, message = HOSTILE_SESSIONS[kind]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(BadInput, match=re.escape(message)) as err:
        Conversation.load(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("data", [
    {"format": 2}, [], {"format": 1, "mode": "ultra"}, {"format": 1, "messages": [{"role": "assistant"}]},
    {"format": 1, "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
])
def test_load_rejects_bad_files(tmp_path, data):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(BadInput):
        Conversation.load(path)


def test_load_and_save_refuse_what_is_not_a_file(tmp_path):
    (tmp_path / "latin1.json").write_bytes('{"format": 1, "system": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(BadInput, match=r"not UTF-8 text \(byte 28\)"):
        Conversation.load(tmp_path / "latin1.json")
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(BadInput, match="nested too deeply"):
        Conversation.load(tmp_path / "deep.json")
    deep = {"format": 1, "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a",
            "tool_calls": [{"name": "s", "arguments": {"a": json.loads("[" * 500 + "]" * 500)}}]}]}
    (tmp_path / "deep-args.json").write_text(json.dumps(deep))
    with pytest.raises(BadInput, match="nested more than 100 levels"):
        Conversation.load(tmp_path / "deep-args.json")
    with pytest.raises(BadInput, match="it is a directory"):
        Conversation.load(tmp_path)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(BadInput, match="not a regular file"):  # reading it would block the chat
        Conversation.load(tmp_path / "fifo")
    conv = Conversation()
    with pytest.raises(BadInput, match="it is a directory"):
        conv.save(tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(BadInput, match="cannot save to"):
        conv.save(tmp_path / "file" / "under-a-file.json")
    with pytest.raises(BadInput, match="cannot save to"):
        conv.save(tmp_path / "nul\0.json")


def test_load_missing_and_non_json(tmp_path):
    with pytest.raises(NotFoundError):
        Conversation.load(tmp_path / "nope.json")
    (tmp_path / "x.json").write_text("{")
    with pytest.raises(BadInput, match="not JSON"):
        Conversation.load(tmp_path / "x.json")


# ---------------------------------------------------------------------------------------------- input


def lines(*items):
    it = iter(items)
    prompts = []

    def read(prompt):
        prompts.append(prompt)
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return read, prompts


def test_read_message_multiline():
    read, prompts = lines("first \\", "second\\", "third", "next")
    assert slash.read_message(read) == "first \nsecond\nthird" and prompts == [">>> ", "... ", "... "]
    read, _ = lines('"""', "a", "", "  b", '"""')
    assert slash.read_message(read) == "a\n\n  b"
    read, _ = lines('"""', "never closed")
    with pytest.raises(EOFError):
        slash.read_message(read)


def test_parse_slash_commands():
    assert slash.parse("hello") is None and slash.parse("//etc/passwd is a path") is None
    assert slash.message_text("//etc") == "/etc" and slash.message_text("plain") == "plain"
    inv = slash.parse("  /mode   max ")
    assert inv.command.name == "mode" and inv.arg == "max"
    assert slash.parse("/quit").command.name == "exit" and slash.parse("/?").command.name == "help"
    with pytest.raises(BadInput, match="unknown command /mdoe") as e:
        slash.parse("/mdoe high")
    assert "/mode" in e.value.hint
    with pytest.raises(BadInput, match="needs an argument"):
        slash.parse("/save")
    with pytest.raises(BadInput, match="takes no argument"):
        slash.parse("/reset now")


# ---------------------------------------------------------------------------------------------- a fake engine


class FakeSession:
    """Yields fixed texts as records, like Session.generate; records what it was asked."""

    def __init__(self, texts, finish="eos", reused=0):
        self.texts, self.finish, self.reused = texts, finish, reused
        self.tokens: list[int] = []
        self.calls = []

    def generate(self, prompt, sampling, marks=(), progress=None):
        self.calls.append((list(prompt), sampling, list(marks)))
        if progress:
            progress(len(prompt), len(prompt))
        for i, t in enumerate(self.texts[: sampling.max_tokens]):
            yield TokenRecord(1000 + i, t)
        yield DoneRecord(self.finish, "", Timings(), Memory(0, 0))


def test_run_turn_parses_reasoning_answer_and_tool_calls():
    texts = ["Let me ", "think", "</think>", "The answer", " is 42."] + [TOOL_BLOCK[i:i + 7]
                                                                         for i in range(0, len(TOOL_BLOCK), 7)]
    events = []
    reply = run_turn(FakeSession(texts), [0, 1, 2], SamplingParams(max_tokens=100), Reply(Mode.HIGH),
                     on_event=events.append)
    assert reply.answer == "The answer is 42." and reply.reasoning == "Let me think"
    assert [(c.name, c.arguments) for c in reply.tool_calls] == [("search", {"q": "cats"})]
    assert reply.completion_tokens == len(texts) + 1 and reply.finish_reason == "eos"
    shown = "".join(e.text for e in events if isinstance(e, (ContentDelta, ReasoningDelta)))
    assert DSML not in shown and "</think>" not in shown
    rec = reply.to_json("m.gguf")
    assert set(rec) == {"answer", "reasoning", "tool_calls", "usage", "timings", "finish_reason", "model", "mode"}
    assert rec["usage"] == {"prompt_tokens": 3, "reused_tokens": 0, "completion_tokens": len(texts) + 1}
    assert set(rec["timings"]) == {"prefill_s", "ttft_s", "decode_s", "prefill_tps", "decode_tps"}
    assert rec["mode"] == "high" and rec["tool_calls"] == [{"name": "search", "arguments": {"q": "cats"}}]


def test_latch_stops_at_next_token_and_closes_generator():
    latch = InterruptLatch()
    seen = []

    def on_event(ev):
        seen.append(ev)
        if len(seen) == 2:
            latch.requested = True  # what the SIGINT handler does while tokens stream

    sess = FakeSession(["a", "b", "c", "d", "e"])
    reply = run_turn(sess, [0, 1], SamplingParams(max_tokens=10), Reply(Mode.NON_THINK), on_event=on_event,
                     latch=latch)
    assert reply.interrupted and reply.finish_reason == "interrupted" and reply.answer == "ab"
    assert reply.completion_tokens == 2


def test_sigint_handler_defers_while_decoding():
    import signal

    with InterruptLatch() as latch:
        handler = signal.getsignal(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            handler(signal.SIGINT, None)  # prefill: stop at once
        latch.decoding = True
        handler(signal.SIGINT, None)
        assert latch.requested
        with pytest.raises(KeyboardInterrupt):
            handler(signal.SIGINT, None)  # a second Ctrl-C does not wait
    assert signal.getsignal(signal.SIGINT) is not handler


def fake_chat(encoder, texts, mode=Mode.NON_THINK, ctx=4096):
    return Chat(FakeSession(texts), encoder, Conversation(mode), SamplingParams(max_tokens=50), ctx, "fake")


def test_chat_turn_history_marks_and_context_limit(encoder):
    chat = fake_chat(encoder, ["</think>", "Hi", " there"], mode=Mode.HIGH)
    reply = chat.turn("hello")
    assert reply.answer == "Hi there" and chat.conversation.turns[-1] == Assistant("Hi there", reasoning="")
    prompt, _, marks = chat.session.calls[-1]
    assert marks == [len(prompt) - 1]  # high mode: the stable prefix ends before <think>
    chat.conversation.mode = Mode.NON_THINK
    chat.turn("again")
    prompt, _, marks = chat.session.calls[-1]
    assert marks == [len(prompt) - 1]  # non-think: all of it is stable; Session snapshots strictly inside
    small = fake_chat(encoder, ["x"] * 50, ctx=40)
    small.turn("hi")
    _, sampling, _ = small.session.calls[-1]
    assert sampling.max_tokens == 40 - len(small.session.calls[-1][0])  # the answer is capped to the room left
    with pytest.raises(BadInput, match="the context is 40"):
        small.turn("x " * 100)
    assert small.conversation.turns[-1].content  # the rejected message left no unanswered turn


def test_ctrl_c_policy(encoder):
    # a partial answer stays in the history
    chat = fake_chat(encoder, ["Partial", " answer", " more"])

    def stop_after_first(ev):
        raise KeyboardInterrupt

    reply = chat.turn("q1", on_event=stop_after_first)
    assert reply.interrupted and chat.conversation.turns == [User("q1"), Assistant("Partial", None)]
    # interrupted while still reasoning: the turn is dropped with its question
    chat2 = fake_chat(encoder, ["thinking", " hard", "</think>", "answer"], mode=Mode.HIGH)
    reply = chat2.turn("q2", on_event=stop_after_first)
    assert reply.interrupted and reply.reasoning == "thinking" and chat2.conversation.turns == []


def test_slash_dispatch_changes_the_chat(encoder, tmp_path):
    chat = fake_chat(encoder, ["ok"])
    run = lambda line: slash.dispatch(chat, slash.parse(line))
    assert run("/mode high").lines == ["mode: high"] and chat.conversation.mode is Mode.HIGH
    out = run("/mode max").lines
    assert chat.conversation.mode is Mode.MAX and any("393,216" in line for line in out)  # 4096 < 384K: warned
    with pytest.raises(BadInput, match="unknown mode"):
        run("/mode medium")
    run("/set max-tokens 7")
    run("/set temperature 0")
    assert chat.sampling.max_tokens == 7 and chat.sampling.temperature == 0.0
    with pytest.raises(BadInput):
        run("/set top-p 2")  # SamplingParams validates
    with pytest.raises(BadInput, match="cannot set"):
        run("/set colour blue")
    run("/system Be kind.")
    chat.turn("hello")
    assert chat.conversation.messages()[0] == System("Be kind.")
    run(f"/save {tmp_path / 'c.json'}")
    run("/reset")
    assert chat.conversation.turns == [] and chat.conversation.system == "Be kind."
    run(f"/load {tmp_path / 'c.json'}")
    assert chat.conversation.turns[0] == User("hello")
    report = "\n".join(run("/tokens").lines)
    assert "2 messages" in report and "last turn" in report and "of 4,096 tokens held" in report
    assert any(line.startswith("/save FILE") for line in run("/help").lines)
    assert run("/exit").exit


def test_ctrl_c_during_a_slash_command_stops_only_the_command(encoder, tmp_path, monkeypatch):
    chat = fake_chat(encoder, ["ok"])
    chat.turn("hello")
    before = chat.conversation

    def slow_read(path):
        raise KeyboardInterrupt  # Ctrl-C while /load reads a large file

    monkeypatch.setattr(Conversation, "load", classmethod(lambda cls, path: slow_read(path)))
    with pytest.raises(BadInput, match="^/load interrupted$"):
        slash.dispatch(chat, slash.parse(f"/load {tmp_path / 'big.json'}"))
    assert chat.conversation is before and before.turns[0] == User("hello")


# ---------------------------------------------------------------------------------------------- renderer


def consoles(tty: bool):
    out, err = io.StringIO(), io.StringIO()
    kw = dict(force_terminal=tty, width=80, color_system="standard" if tty else None)
    return Console(file=out, **kw), Console(file=err, **kw), out, err


def test_split_finished():
    assert split_finished("a\n\nb") == ("a\n\n", "b")
    assert split_finished("```\nx\n\ny\n```\n\nz") == ("```\nx\n\ny\n```\n\n", "z")
    assert split_finished("```\nx\n\ny") == ("", "```\nx\n\ny")  # inside an open fence: nothing is final
    assert split_finished("one line") == ("", "one line")


def stream(view, texts, mode):
    sess = FakeSession(texts)
    with view:
        return run_turn(sess, [0], SamplingParams(max_tokens=100), Reply(mode), on_event=view.event)


def test_plain_output_answer_on_stdout_reasoning_on_stderr():
    out_c, err_c, out, err = consoles(tty=False)
    texts = ["I think", "</think>", "**Bold** answer"] + [TOOL_BLOCK[i:i + 5] for i in range(0, len(TOOL_BLOCK), 5)]
    stream(StreamView(Mode.HIGH, out_c, err_c), texts, Mode.HIGH)
    assert out.getvalue() == "**Bold** answer\n"  # plain text, not rendered Markdown
    assert "I think" in err.getvalue() and '[tool call] search({"q": "cats"})' in err.getvalue()
    assert DSML not in out.getvalue() + err.getvalue()
    out_c, err_c, out, err = consoles(tty=False)
    stream(StreamView(Mode.HIGH, out_c, err_c, hide_thinking=True), texts[:3], Mode.HIGH)
    assert "I think" not in err.getvalue() and out.getvalue() == "**Bold** answer\n"


def test_terminal_output_dims_reasoning_and_renders_markdown():
    out_c, err_c, out, _ = consoles(tty=True)
    texts = ["Reasoning here", "</think>", "# Title\n\n", "Some **bold** text\n\n", "- item"]
    stream(StreamView(Mode.HIGH, out_c, err_c), texts, Mode.HIGH)
    text = out.getvalue()
    assert "\x1b[2mReasoning here" in text  # dim
    assert "**bold**" not in text and "bold" in text and "# Title" not in text and "Title" in text


def test_status_line():
    r = Reply(Mode.HIGH, prompt_tokens=100, reused_tokens=60, completion_tokens=11, finish_reason="length",
              prefill_s=2.0, decode_s=2.0)
    line = status_line(r, held=150, ctx=1000)
    assert line == ("11 tokens · 5.0 tok/s · prefill 40 tokens (20 tok/s), 60 reused · context 150/1,000 (15.0%)"
                    " · finish: length")


# ---------------------------------------------------------------------------------------------- the tiny model


@pytest.fixture(scope="module")
def engine(tiny_gguf):
    from v4cli.engine import Engine

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Engine.load(tiny_gguf("f32"), kv_format="f32")
    torch.set_num_threads(n)


def test_turns_prefill_only_new_tokens(engine):
    from v4cli.engine.session import Session

    chat = Chat(Session(engine, chunk=64), PromptEncoder(engine.tokenizer), Conversation(Mode.HIGH),
                SamplingParams(temperature=0.0, max_tokens=4), 4096, "tiny")
    conv = Conversation(Mode.HIGH)
    conv.add_user("What is a compressor?")
    ids1, stable1 = conv.prompt_ids(chat.encoder)
    r1 = chat.turn("What is a compressor?")
    assert r1.reused_tokens == 0 and r1.prompt_tokens == len(ids1)
    r2 = chat.turn("And the indexer?")
    # thinking mode drops turn 1's reasoning: the prompt is shared up to turn 1's final <｜Assistant｜>
    assert r2.reused_tokens == stable1 == len(ids1) - 1
    # earlier turns render the same in both modes, so switching to non-think restarts at turn 2's mark
    chat.conversation.mode = Mode.NON_THINK
    r3 = chat.turn("Shorter?")
    assert r3.reused_tokens == r2.prompt_tokens - 1
    assert len(chat.session.tokens) >= r3.prompt_tokens


def test_bad_slash_commands_never_end_the_chat(tiny_gguf, tmp_path, capsys, monkeypatch):
    """The real `v4 chat` loop: every hostile /load, /save and /set prints one error line, the live conversation
    stays (the /save at the end writes it), and the chat ends only at end of input."""
    from v4cli.cli import main

    monkeypatch.setenv("V4_HOME", str(tmp_path / "home"))
    bad = []
    for i, (data, _) in enumerate(HOSTILE_SESSIONS.values()):
        bad.append(tmp_path / f"bad{i}.json")
        bad[-1].write_text(json.dumps(data))
    (tmp_path / "latin1.json").write_bytes(b'{"format": 1, "system": "caf\xe9"}')
    bad.append(tmp_path / "latin1.json")
    attempts = ([f"/load {p}" for p in bad] + [f"/save {tmp_path}", f"/save {bad[0]}/x.json", "/set temperature nan",
                "/set seed 18446744073709551616", "/load"])
    script = ["What is a compressor?", *attempts, f"/save {tmp_path / 'kept.json'}"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(script) + "\n"))
    try:
        main(["chat", str(tiny_gguf("f32")), "--mode", "non-think", "--max-tokens", "3", "--temperature", "0",
              "--threads", "1", "--cache-size", "0"])
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out, err = capsys.readouterr()
    assert code == 0, err
    errors = [line for line in (out + err).splitlines() if line.startswith("error:")]
    assert len(errors) == len(attempts), errors
    for (_, message), line in zip(HOSTILE_SESSIONS.values(), errors):
        assert message in line
    assert "Traceback" not in out + err
    kept = Conversation.load(tmp_path / "kept.json")
    assert kept.turns[0] == User("What is a compressor?") and len(kept.turns) == 2 and kept.mode is Mode.NON_THINK
