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


def test_every_generated_turn_of_a_long_history_is_spliced(tok):
    # request 3 carries two generated turns: both come back as sampled, in order, the second keyed after the first
    encoder, tokenizer = tok
    h = History()
    h.remember(request([SYSTEM, ASK]), result(generated(), RAW), encoder.encode(RAW))
    second_raw = "Now I know.</think>It prints hi."
    second_ids = encoder.encode("Now I know.</think>") + [encoder.encode(c)[0] for c in "It prints hi."]
    history2 = [SYSTEM, ASK, as_client_sends_it(), ToolResult("print('hi')", "toolu_9")]
    h.remember(request(history2), result(Assistant("It prints hi.", "Now I know."), second_raw), second_ids)
    msgs = history2 + [Assistant("It prints hi."), User("thanks")]
    ids = h.encode(msgs, Mode.HIGH, TOOLS, encoder, tokenizer)
    assert h.spliced == 2
    text = render(h.prepare(msgs, Mode.HIGH, TOOLS), Mode.HIGH, TOOLS)
    assert RAW + EOS in text and second_raw + EOS in text and tokenizer.decode(ids, skip_special_tokens=False) == text
    at = text.index(second_raw)
    assert ids[len(encoder.encode(text[:at])):][: len(second_ids)] == second_ids


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


# ---------------------------------------------------------------- a real server


AGENT_TOOLS = [{"type": "function", "function": {
    "name": "read_file", "description": "Read a file of the repository",
    # an enum and a boolean: constrained decoding closes the call in a few tokens even on random weights
    "parameters": {"type": "object", "required": ["path", "limit"],
                   "properties": {"path": {"type": "string", "enum": ["a.py", "b.py"]},
                                  "limit": {"type": "boolean"}}}}}]


@pytest.mark.slow
def test_agent_request_reuses_the_previous_one_from_ram_and_from_disk(tiny_gguf, tmp_path):
    """Request 2 = request 1's history + the assistant turn as the client returns it (reasoning_content dropped,
    arguments re-serialized) + a tool result: its cached prompt tokens cover request 1's prompt and every token
    the model generated, in RAM; after a restart (same V4_HOME) the disk prefix cache covers all of it."""
    import json

    import openai
    from serve_util import served

    system = "You are a coding agent working in a small repository. " * 40
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "What does a.py print?"}]
    kw = dict(model="tiny", tools=AGENT_TOOLS, reasoning_effort="high", seed=3)
    gguf = tiny_gguf("q8")

    def followup(m, arguments):
        call = m.tool_calls[0]
        turn = {"role": "assistant", "content": m.content,  # no reasoning_content: clients drop it
                "tool_calls": [{"id": call.id, "type": "function",
                                "function": {"name": call.function.name, "arguments": arguments}}]}
        return msgs + [turn, {"role": "tool", "tool_call_id": call.id, "content": "print('hi')"}]

    with served(gguf, "--alias", "tiny", home=tmp_path) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused")
        r1 = client.chat.completions.create(
            messages=msgs, max_tokens=300, tool_choice={"type": "function", "function": {"name": "read_file"}}, **kw)
        m = r1.choices[0].message
        assert r1.choices[0].finish_reason == "tool_calls" and m.reasoning_content
        p1, c1 = r1.usage.prompt_tokens, r1.usage.completion_tokens
        args = json.loads(m.tool_calls[0].function.arguments)
        second = followup(m, json.dumps(args, indent=2, sort_keys=True))  # re-serialized by the client
        r2 = client.chat.completions.create(messages=second, max_tokens=4, **kw)
        # everything fed to the engine so far: request 1's prompt and its generated tokens but the last sampled
        # one (EOS, never fed back), matched token for token
        assert r2.usage.prompt_tokens_details.cached_tokens == p1 + c1 - 1
        assert r2.usage.prompt_tokens_details.cached_tokens >= 0.9 * p1
        # the control: a turn the model did not produce (the other file) shares only request 1's prompt
        other = {**args, "path": "b.py" if args["path"] == "a.py" else "a.py"}
        r3 = client.chat.completions.create(messages=followup(m, json.dumps(other)), max_tokens=4, **kw)
        assert p1 - 1 <= r3.usage.prompt_tokens_details.cached_tokens < p1 + c1 - 1

    with served(gguf, "--alias", "tiny", home=tmp_path) as srv:  # a restart: RAM is gone, the disk prefix cache is not
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused")
        again = client.chat.completions.create(messages=second, max_tokens=4, **kw)
        # the history file brought back the reasoning and the sampled ids: the same prompt as before the restart,
        # restored from the snapshot request 2 saved one token short of its end
        assert again.usage.prompt_tokens == r2.usage.prompt_tokens
        assert again.usage.prompt_tokens_details.cached_tokens == r2.usage.prompt_tokens - 1 >= 0.9 * p1


def test_history_file_survives_a_restart(tmp_path):
    path = tmp_path / "model" / "serve-history.jsonl"
    h = History(path=path)
    h.remember(request([SYSTEM, ASK]), result(generated(), RAW), [5, 6, 7])
    again = History(path=path)  # a restarted server
    assert RAW + EOS in next_prompt(again, as_client_sends_it()) and again.hits == 1
    assert again._turns[next(iter(again._turns))].ids == (5, 6, 7)


def test_history_file_skips_what_it_did_not_write_and_stays_bounded(tmp_path):
    path = tmp_path / "serve-history.jsonl"
    h = History(path=path)
    h.remember(request([SYSTEM, ASK]), result(generated(), RAW))
    good = path.read_bytes()
    path.write_bytes(b"not json\n" + b'{"key": "../x", "answer": "a", "ids": []}\n' + b"\xff\xfe\n"
                     + good + good[:-20])  # the last line cut short, as by a crash mid-write
    with pytest.warns(Warning, match="skipped 4 unreadable"):
        h = History(path=path)
    assert len(h) == 1 and RAW + EOS in next_prompt(h, as_client_sends_it())
    # many turns: the file is compacted, never more than about twice what memory holds
    small = History(max_entries=4, path=tmp_path / "small.jsonl")
    for i in range(100):
        small.remember(request([User(f"q{i}")], tools=[]), result(Assistant(f"a{i}"), f"r{i}</think>a{i}"))
    lines = (tmp_path / "small.jsonl").read_text().splitlines()
    assert len(lines) <= 2 * 4 + 16 and len(History(max_entries=4, path=tmp_path / "small.jsonl")) == 4
    assert History(path=tmp_path / "small.jsonl").prepare([User("q99"), Assistant("a99"), User("?")])[1].exact == "a99"


def test_for_session_keeps_the_file_next_to_the_disk_cache(tmp_path):
    from types import SimpleNamespace

    assert History.for_session(SimpleNamespace(store=None)).path is None  # --cache-size 0
    folder = tmp_path / "prefix-cache" / "0123456789abcdef"
    kept = History.for_session(SimpleNamespace(store=SimpleNamespace(folder=folder)))
    assert kept.path == folder / "serve-history.jsonl"
