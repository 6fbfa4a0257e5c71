"""Prefix reuse across requests (v4cli/serve/history.py): a turn the server generated comes back from a client —
reasoning dropped, arguments re-serialized, content trimmed — and still re-renders to the exact sampled text and
the exact sampled token ids, so the next request's prompt extends what the engine's cache holds."""

from __future__ import annotations

import pytest

from v4cli.engine.sampling import SamplingParams
from v4cli.prompt.encoding import (
    DSML,
    EOS,
    Assistant,
    Mode,
    System,
    ToolCall,
    ToolResult,
    User,
    default_tokenizer_path,
    render,
)
from v4cli.serve.core import ChatRequest, Result, Usage
from v4cli.serve.history import History, split_raw

TOOLS = [{"name": "read_file", "description": "Read a file", "parameters": {
    "type": "object", "properties": {"path": {"type": "string"}, "limit": {"type": "integer"}}}}]
SYSTEM = System("You are a coding agent.")
ASK = User("What is in a.py?")
# The model's own DSML, not canonical: the integer comes before the string and carries a space in its JSON.
SAMPLED_DSML = (f'\n\n<{DSML}tool_calls>\n<{DSML}invoke name="read_file">\n'
                f'<{DSML}parameter name="limit" string="false"> 10</{DSML}parameter>\n'
                f'<{DSML}parameter name="path" string="true">a.py</{DSML}parameter>\n'
                f'</{DSML}invoke>\n</{DSML}tool_calls>')
REASONING = "I should read the file first."
RAW = f"{REASONING}</think>Let me look. {SAMPLED_DSML}"


def request(messages, mode=Mode.HIGH, tools=TOOLS) -> ChatRequest:
    return ChatRequest(model="tiny", messages=list(messages), mode=mode, sampling=SamplingParams(), tools=tools)


def result(message: Assistant, raw: str) -> Result:
    return Result("tool_calls" if message.tool_calls else "stop", Usage(10, 0, 5), message, raw)


def generated() -> Assistant:
    """What the parser made of RAW (and what the API sent the client)."""
    return Assistant("Let me look. ", REASONING, (ToolCall("read_file", {"limit": 10, "path": "a.py"}, "call_1"),))


def remembered(**kw) -> History:
    h = History(**kw)
    h.remember(request([SYSTEM, ASK]), result(generated(), RAW))
    return h


def as_client_sends_it(**changes) -> Assistant:
    """The turn as an OpenAI client sends it back: reasoning_content dropped, arguments re-serialized (keys in
    another order, other spacing, parsed again), content trimmed, its own call id."""
    base = dict(content="Let me look.", reasoning=None,
                tool_calls=(ToolCall("read_file", {"path": "a.py", "limit": 10}, "toolu_9"),))
    base.update(changes)
    return Assistant(**base)


def next_prompt(h: History, turn: Assistant, mode=Mode.HIGH, tools=TOOLS) -> str:
    msgs = [SYSTEM, ASK, turn, ToolResult("print('hi')", "toolu_9")]
    return render(h.prepare(msgs, mode, tools), mode, tools)


def test_reformatted_client_turn_renders_exactly_as_sampled():
    h = remembered()
    first = render([SYSTEM, ASK], Mode.HIGH, TOOLS)
    prompt = next_prompt(h, as_client_sends_it())
    # request 1's prompt, then the sampled text byte for byte (reasoning and non-canonical DSML), then EOS
    assert prompt.startswith(first + RAW + EOS + "<｜User｜><tool_result>print('hi')</tool_result>")
    assert h.hits == 1
    # without the history the same client turn renders differently (no reasoning, canonical DSML)
    assert not render([SYSTEM, ASK, as_client_sends_it(), ToolResult("x")], Mode.HIGH, TOOLS).startswith(first + RAW)


@pytest.mark.parametrize("changes", [
    {"reasoning": "the client's own summary of the reasoning"},  # reformatted reasoning_content
    {"content": "\n Let me look.  "},  # whitespace around the content
    {"tool_calls": (ToolCall("read_file", {"limit": 10, "path": "a.py"}),)},  # no id, original key order
])
def test_client_variations_still_hit(changes):
    h = remembered()
    assert RAW + EOS in next_prompt(h, as_client_sends_it(**changes))


@pytest.mark.parametrize("changes", [
    {"content": "Let me look at it."},  # a different answer
    {"tool_calls": (ToolCall("read_file", {"path": "b.py", "limit": 10}),)},  # a different argument value
    {"tool_calls": (ToolCall("read_file", {"path": "a.py", "limit": 10.5}),)},
    {"tool_calls": ()},  # the calls dropped
])
def test_a_different_turn_misses(changes):
    h = remembered()
    prompt = next_prompt(h, as_client_sends_it(**changes))
    assert REASONING not in prompt and SAMPLED_DSML not in prompt and h.hits == 0


def test_the_same_turn_in_another_conversation_misses():
    # the same visible answer after another question must not borrow this conversation's reasoning
    h = remembered()
    msgs = [SYSTEM, User("What is in b.py?"), as_client_sends_it(), ToolResult("x")]
    assert REASONING not in render(h.prepare(msgs, Mode.HIGH, TOOLS), Mode.HIGH, TOOLS)


def test_reasoning_rendered_only_where_the_format_keeps_it():
    # thinking without tools drops earlier reasoning; the exact answer text is still used
    h = History()
    raw = f"{REASONING}</think>It prints hi."
    h.remember(request([ASK], tools=[]), result(Assistant("It prints hi.", REASONING), raw))
    msgs = [ASK, Assistant("It prints hi."), User("thanks")]
    prompt = render(h.prepare(msgs, Mode.HIGH, []), Mode.HIGH, None)
    assert REASONING not in prompt and "<｜Assistant｜></think>It prints hi." + EOS in prompt
    # non-think: raw is all answer
    h.remember(request([ASK], mode=Mode.NON_THINK, tools=[]), result(Assistant("Sure  thing"), "Sure  thing"))
    msgs = [ASK, Assistant("Sure  thing"), User("ok")]
    assert "</think>Sure  thing" + EOS in render(h.prepare(msgs, Mode.NON_THINK), Mode.NON_THINK)


def test_split_raw():
    assert split_raw(f"r</think>a{EOS}", True) == ("r", "a")
    assert split_raw("still thinking", True) == ("still thinking", "")  # stopped before </think>
    assert split_raw("a</think>b", False) == (None, "a</think>b")


def test_lru_bound_on_entries_and_size():
    h = History(max_entries=3)
    for i in range(4):
        h.remember(request([User(f"q{i}")], tools=[]), result(Assistant(f"a{i}"), f"r{i}</think>a{i}"))
    assert len(h) == 3

    def hit(i):
        before = h.hits
        h.prepare([User(f"q{i}"), Assistant(f"a{i}"), User("more")])
        return h.hits > before

    assert not hit(0) and hit(1)  # the oldest went first; a hit makes q1 the most recent
    h.remember(request([User("q9")], tools=[]), result(Assistant("a9"), "r9</think>a9"))
    assert hit(1) and not hit(2) and hit(3) and hit(9)
    # the size bound: a turn larger than the whole budget is not kept; others are evicted to make room
    small = History(max_chars=100)
    small.remember(request([User("q")], tools=[]), result(Assistant("a"), "r</think>a"))
    small.remember(request([User("big")], tools=[]), result(Assistant("x" * 200), "x" * 200))
    assert len(small) == 1
    small.remember(request([User("mid")], tools=[]), result(Assistant("y" * 99), "y" * 99))
    assert len(small) == 1 and small._chars == 99  # "q" went to make room


# ---------------------------------------------------------------- token ids


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer

    from v4cli.chat.conversation import PromptEncoder

    t = Tokenizer.from_file(str(default_tokenizer_path()))
    return PromptEncoder(t), t


def test_encode_splices_the_sampled_ids(tok):
    encoder, tokenizer = tok
    canonical = encoder.encode(RAW)
    # the model spelled "Let me look." one character at a time: the same text, other ids
    i = RAW.index("Let me look.")
    head, word, tail = RAW[:i], "Let me look.", RAW[i + len("Let me look."):]
    sampled = encoder.encode(head) + [encoder.encode(c)[0] for c in word] + encoder.encode(tail)
    assert tokenizer.decode(sampled, skip_special_tokens=False) == RAW and sampled != canonical
    h = History()
    h.remember(request([SYSTEM, ASK]), result(generated(), RAW), sampled + [1])  # EOS id last: dropped
    msgs = [SYSTEM, ASK, as_client_sends_it(), ToolResult("print('hi')")]
    ids = h.encode(msgs, Mode.HIGH, TOOLS, encoder, tokenizer)
    first = encoder.encode(render([SYSTEM, ASK], Mode.HIGH, TOOLS))
    assert ids[: len(first) + len(sampled)] == first + sampled
    text = render(h.prepare(msgs, Mode.HIGH, TOOLS), Mode.HIGH, TOOLS)
    rest = text[len(render([SYSTEM, ASK], Mode.HIGH, TOOLS) + RAW):]
    assert rest.startswith(EOS) and ids[len(first) + len(sampled):] == encoder.encode(rest)
    assert h.spliced == 1
    # the same ids decode to the prompt a plain render of the prepared messages gives
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_encode_without_reasoning_splices_the_answer_ids(tok):
    # thinking mode without tools: the next prompt renders only the answer; its ids follow the sampled </think>
    encoder, tokenizer = tok
    raw = f"{REASONING}</think>It prints hi."
    sampled = encoder.encode(f"{REASONING}</think>") + [encoder.encode(c)[0] for c in "It prints hi."]
    h = History()
    h.remember(request([ASK], tools=[]), result(Assistant("It prints hi.", REASONING), raw), sampled)
    msgs = [ASK, Assistant("It prints hi."), User("thanks")]
    ids = h.encode(msgs, Mode.HIGH, [], encoder, tokenizer)
    answer = [encoder.encode(c)[0] for c in "It prints hi."]
    assert h.spliced == 1 and answer == ids[ids.index(128822) + 1:][: len(answer)]
    assert tokenizer.decode(ids, skip_special_tokens=False) == render(h.prepare(msgs, Mode.HIGH), Mode.HIGH)


def test_encode_falls_back_when_ids_do_not_spell_the_text(tok):
    encoder, tokenizer = tok
    h = History()
    h.remember(request([SYSTEM, ASK]), result(generated(), RAW), encoder.encode("something else"))
    msgs = [SYSTEM, ASK, as_client_sends_it(), ToolResult("x")]
    ids = h.encode(msgs, Mode.HIGH, TOOLS, encoder, tokenizer)
    assert h.spliced == 0 and ids == encoder.encode(render(h.prepare(msgs, Mode.HIGH, TOOLS), Mode.HIGH, TOOLS))


def test_marks_one_short_of_the_prompt():
    assert History.marks([0, 5, 6]) == [2] and History.marks([0]) == []
