"""`v4 chat` below the terminal: piecewise prompt ids, /save and /load, slash commands and multi-line input, one
turn through a Session (prefix reuse across turns, Ctrl-C policy), and the streaming renderer (never raw DSML)."""

from __future__ import annotations

import io
import json

import pytest
import torch
from rich.console import Console

from v4cli.chat import slash
from v4cli.chat.answer import Chat, InterruptLatch, Reply, run_turn
from v4cli.chat.conversation import Conversation, PromptEncoder
from v4cli.chat.render import StreamView, split_finished, status_line
from v4cli.engine import SamplingParams
from v4cli.engine.records import DoneRecord, Memory, Timings, TokenRecord
from v4cli.errors import BadInput, NotFoundError
from v4cli.prompt.encoding import (
    DSML,
    EOS,
    Assistant,
    Mode,
    System,
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
    path = tmp_path / "sub" / "c.json"
    conv.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["c.json"]  # atomic: no temp file left behind
    back = Conversation.load(path)
    assert back == conv and json.loads(path.read_text())["format"] == 1


@pytest.mark.parametrize("data", [
    {"format": 2}, [], {"format": 1, "mode": "ultra"}, {"format": 1, "messages": [{"role": "assistant"}]},
    {"format": 1, "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
])
def test_load_rejects_bad_files(tmp_path, data):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(BadInput):
        Conversation.load(path)


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
