"""The Anthropic Messages API of `v4 serve`: a real server on the tiny model, driven by the official `anthropic` SDK.

The tiny model's weights are random, so answers are checked for shape (blocks, stop reasons, usage) and the
request → prompt path on token counts: count_tokens and usage against our encoder's ids for the same typed
messages. The translator itself is checked against typed messages without a server.
"""

from __future__ import annotations

import asyncio
import time

import anthropic
import pytest
from serve_util import serve_fixture

from v4cli.engine.grammar import Constraint
from v4cli.chat.conversation import PromptEncoder
from v4cli.prompt.encoding import DSML, Assistant, Mode, System, ToolCall, ToolResult, User, render
from v4cli.serve.anthropic import MAX_BUDGET, chat_request
from v4cli.serve.http import APIError
from v4cli.serve.sse import with_pings

KEY = "s3cret"
served_tiny = serve_fixture("--ctx", "4096", "--api-key", KEY)

READ_FILE = {"name": "read_file", "description": "Read a file.", "cache_control": {"type": "ephemeral"},
             "input_schema": {"type": "object", "properties": {"path": {"type": "string", "maxLength": 12}},
                              "required": ["path"]}}
SCHEMA = {"name": "read_file", "description": "Read a file.", "parameters": READ_FILE["input_schema"]}
TOOLS = [READ_FILE, {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}]  # a server tool: ignored

# Claude Code's second request: system blocks (billing header first), a thinking + tool_use turn, its result.
HISTORY = {
    "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.37.0d9; cch=fa690;"},
               {"type": "text", "text": "You are Claude Code."},
               {"type": "text", "text": "Be terse.", "cache_control": {"type": "ephemeral"}}],
    "messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is in a.py?"}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "I should read it.", "signature": "c2lnbmF0dXJl"},
            {"type": "text", "text": "Reading."},
            {"type": "tool_use", "id": "toolu_01", "name": "read_file", "input": {"path": "a.py"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_01", "content": [{"type": "text", "text": "print(1)"}]},
            {"type": "text", "text": "And now?", "cache_control": {"type": "ephemeral"}}]},
    ],
    "tools": TOOLS, "metadata": {"user_id": "u1"}, "thinking": {"type": "enabled", "budget_tokens": 4000},
}
HISTORY_TYPED = [
    System("You are Claude Code.\nBe terse."),
    User("What is in a.py?"),
    Assistant("Reading.", "I should read it.", (ToolCall("read_file", {"path": "a.py"}, "toolu_01"),)),
    ToolResult("print(1)", "toolu_01"),
    User("And now?"),
]


@pytest.fixture(scope="module")
def model(served_tiny) -> str:
    return served_tiny.get("/v1/models", headers={"x-api-key": KEY})[1]["data"][0]["id"]


@pytest.fixture(scope="module")
def client(served_tiny):
    return anthropic.Anthropic(base_url=served_tiny.url, api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def encoder(tiny_gguf):
    """Our encoder with the served GGUF's own tokenizer: the ids the server must feed the model."""
    from v4cli.engine.detok import tokenizer_from_metadata
    from v4cli.gguf_file import open_gguf

    with open_gguf(tiny_gguf("q8")) as gf:
        return PromptEncoder(tokenizer_from_metadata(gf.metadata))


# ---------------------------------------------------------------------------------------------- the translator


def test_claude_code_history_becomes_typed_messages():
    """Billing header dropped, thinking → reasoning (signature ignored), tool_use id kept, tool_result text blocks
    → ToolResult, cache_control/metadata ignored, the server tool left out; the prompt keeps the exact DSML."""
    req = chat_request({"model": "m", "max_tokens": 10, **HISTORY})
    assert req.messages == HISTORY_TYPED and req.tools == [SCHEMA] and req.mode is Mode.HIGH
    text = render(req.messages, req.mode, req.tools)
    assert "billing" not in text
    assert (f'I should read it.</think>Reading.\n\n<{DSML}tool_calls>\n<{DSML}invoke name="read_file">\n'
            f'<{DSML}parameter name="path" string="true">a.py</{DSML}parameter>') in text
    assert text.endswith("<｜User｜><tool_result>print(1)</tool_result>\n\nAnd now?<｜Assistant｜><think>")


def test_tool_result_error_and_string_content():
    body = {"model": "m", "max_tokens": 1, "system": "plain", "messages": [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "run", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "boom",
                                      "is_error": True}]}]}
    assert chat_request(body).messages == [System("plain"), User("go"),
                                           Assistant("", None, (ToolCall("run", {}, "t1"),)),
                                           ToolResult("Error: boom", "t1")]


@pytest.mark.parametrize("extra, mode", [
    ({}, Mode.NON_THINK),
    ({"thinking": {"type": "disabled"}}, Mode.NON_THINK),
    ({"thinking": {"type": "enabled", "budget_tokens": 4000}}, Mode.HIGH),
    ({"thinking": {"type": "enabled", "budget_tokens": MAX_BUDGET}}, Mode.MAX),
    ({"thinking": {"type": "adaptive"}}, Mode.HIGH),
    ({"thinking": {"type": "adaptive"}, "output_config": {"effort": "max"}}, Mode.MAX),
    ({"thinking": {"type": "enabled", "budget_tokens": 31999}, "output_config": {"effort": "low"}}, Mode.NON_THINK),
    ({"output_config": {"effort": "medium"}}, Mode.HIGH),
    ({"thinking": {"type": "disabled"}, "output_config": {"effort": "max"}}, Mode.NON_THINK),
])
def test_thinking_and_effort_choose_the_mode(extra, mode):
    body = {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}], **extra}
    assert chat_request(body).mode is mode


@pytest.mark.parametrize("choice, constraint, kept", [
    ({"type": "auto"}, None, True),
    ({"type": "any"}, Constraint("required"), True),
    ({"type": "tool", "name": "read_file"}, Constraint("tool", "read_file"), True),
    ({"type": "none"}, None, False),
])
def test_tool_choice_maps_to_a_constraint(choice, constraint, kept):
    body = {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS,
            "tool_choice": choice}
    req = chat_request(body)
    assert req.constraint == constraint and req.tools == ([SCHEMA] if kept else [])


@pytest.mark.parametrize("body, words", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "max_tokens is required"),
    ({"max_tokens": 0, "messages": [{"role": "user", "content": "hi"}]}, "max_tokens must be a positive"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}]},
     "images are not supported"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                                                  "content": [{"type": "image"}]}]}]},
     "images are not supported"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A"}]},
     "prefill"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS,
      "tool_choice": {"type": "tool", "name": "nope"}}, "'nope'"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "output_config": {"effort": "ultra"}},
     "effort"),
])
def test_bad_bodies_are_400s_naming_the_field(body, words):
    with pytest.raises(APIError) as e:
        chat_request({"model": "m", **body})
    assert e.value.status == 400 and e.value.kind == "invalid_request_error" and words in e.value.message


def test_pings_fill_silences_and_closing_cancels_the_stream():
    """A stream silent for longer than the interval gets pings (None) between its items; closing the pinged
    stream while it waits cancels the step in flight, which is how a vanished client stops a generation."""
    ended = []

    async def slow():
        try:
            yield "a"
            await asyncio.sleep(0.25)
            yield "b"
            await asyncio.sleep(10)
            yield "never"
        finally:
            ended.append(True)

    async def run():
        out, it = [], with_pings(slow(), interval=0.1)
        async for item in it:
            out.append(item)
            if item == "b":
                break
        await asyncio.sleep(0.15)  # the wrapper is not running now: nothing is awaiting the next item
        nxt = asyncio.ensure_future(anext(it))
        assert await nxt is None  # a ping: the source is asleep
        await it.aclose()
        await asyncio.sleep(0)  # let the cancelled step unwind
        return out

    out = asyncio.run(run())
    assert out[0] == "a" and out[-1] == "b" and out[1:-1] and set(out[1:-1]) == {None} and ended == [True]


# ---------------------------------------------------------------------------------------------- the server


def test_non_stream_message(client, model, encoder):
    m = client.messages.create(model=model, max_tokens=6, system=[{"type": "text", "text": "Be terse."}],
                               messages=[{"role": "user", "content": "hi"}], stop_sequences=["\n\nHuman:"])
    assert m.type == "message" and m.role == "assistant" and m.model == model and m.id.startswith("msg_")
    assert [b.type for b in m.content] == ["text"] and m.content[0].text
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 6
    want = len(encoder.encode(render([System("Be terse."), User("hi")], Mode.NON_THINK)))
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == want


def test_stop_sequence_is_reported(client, model):
    """A stop string ends the answer before it, and the message says which one (stop_reason stop_sequence)."""
    ask = dict(model=model, max_tokens=12, messages=[{"role": "user", "content": "Count."}],
               extra_body={"temperature": 0})  # this SDK no longer takes temperature as an argument
    full = client.messages.create(**ask).content[0].text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    m = client.messages.create(stop_sequences=["\x00never", stop], **ask)
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == stop
    assert (m.content[0].text if m.content else "") == full[: full.find(stop)]
    with client.messages.stream(stop_sequences=[stop], **ask) as s:
        final = s.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == stop


def test_stream_text_and_thinking_blocks(client, model):
    """The SDK's stream helper accepts our event sequence; text and thinking arrive as deltas of their blocks."""
    with client.messages.stream(model=model, max_tokens=8, messages=[{"role": "user", "content": "hi"}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text and [b.type for b in final.content] == ["text"] and final.content[0].text == text
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 8

    with client.messages.stream(model=model, max_tokens=8, messages=[{"role": "user", "content": "hi"}],
                                thinking={"type": "enabled", "budget_tokens": 2000}) as s:
        events = [ev.type for ev in s]
        final = s.get_final_message()
    assert events[0] == "message_start" and events[-1] == "message_stop" and "message_delta" in events
    assert events[1] == "content_block_start" and "thinking" in events and "content_block_stop" in events
    assert final.content[0].type == "thinking" and final.content[0].thinking
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens > 0


def test_count_tokens_equals_our_encoder(client, model, encoder):
    """A thinking + tool_use + tool_result history is accepted and counted as our encoder renders it."""
    n = client.messages.count_tokens(model=model, system=HISTORY["system"], messages=HISTORY["messages"],
                                     tools=TOOLS, thinking=HISTORY["thinking"])
    assert n.input_tokens == len(encoder.encode(render(HISTORY_TYPED, Mode.HIGH, [SCHEMA])))
    # the same history is answered, from a prompt of that many tokens
    m = client.messages.create(model=model, max_tokens=2, system=HISTORY["system"], messages=HISTORY["messages"],
                               tools=TOOLS, thinking=HISTORY["thinking"])
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == n.input_tokens


def test_forced_tool_round_trip(client, model, encoder):
    """tool_choice names a tool: constrained decoding makes even random weights call it (stop_reason tool_use);
    sent back with a tool_result, the next prompt holds that call's exact DSML and reuses the first prompt."""
    ask = [{"role": "user", "content": "Read a.py"}]
    # greedy: a sampled argument string can tokenize otherwise than our encoder would (the server splices the
    # sampled ids back for reuse), which would make the counts below differ now and then
    m = client.messages.create(model=model, max_tokens=200, tools=[READ_FILE], messages=ask,
                               tool_choice={"type": "tool", "name": "read_file"}, extra_body={"temperature": 0})
    assert m.stop_reason == "tool_use" and [b.type for b in m.content][-1] == "tool_use"
    call = m.content[-1]
    assert call.name == "read_file" and set(call.input) == {"path"} and call.id.startswith("toolu_")
    history = [*ask, {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in m.content]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "print(1)"}]}]
    typed = [User("Read a.py"), Assistant("", None, (ToolCall("read_file", dict(call.input), call.id),)),
             ToolResult("print(1)", call.id)]
    text = render(typed, Mode.NON_THINK, [SCHEMA])
    assert f'<{DSML}parameter name="path" string="true">{call.input["path"]}</{DSML}parameter>' in text
    n = client.messages.count_tokens(model=model, tools=[READ_FILE], messages=history)
    assert n.input_tokens == len(encoder.encode(text))
    m2 = client.messages.create(model=model, max_tokens=2, tools=[READ_FILE], messages=history)
    first = m.usage.input_tokens + m.usage.cache_read_input_tokens
    assert m2.usage.input_tokens + m2.usage.cache_read_input_tokens == n.input_tokens
    assert m2.usage.cache_read_input_tokens >= first


def test_forced_tool_streams_as_input_json(client, model):
    """A streamed tool call is a tool_use block whose input arrives as input_json_delta, as the SDK rebuilds it."""
    with client.messages.stream(model=model, max_tokens=200, tools=[READ_FILE], messages=[
            {"role": "user", "content": "Read a.py"}], tool_choice={"type": "tool", "name": "read_file"}) as s:
        kinds = [ev.type for ev in s]
        final = s.get_final_message()
    assert "input_json" in kinds and final.stop_reason == "tool_use"
    assert final.content[-1].type == "tool_use" and set(final.content[-1].input) == {"path"}


def test_disconnect_cancels_and_frees_the_engine(served_tiny, client, model):
    """A streaming client that goes away mid-answer stops its generation (through the keep-alive wrapper)."""
    key = {"x-api-key": KEY}
    before = served_tiny.get("/health", headers=key)[1]
    with client.messages.stream(model=model, max_tokens=3000, messages=[{"role": "user", "content": "Go."}]) as s:
        for i, _ in enumerate(s):
            if i == 4:
                break
        assert served_tiny.get("/health", headers=key)[1]["busy"] is True
    t0 = time.monotonic()
    m = client.messages.create(model=model, max_tokens=1, messages=[{"role": "user", "content": "Hi"}])
    waited = time.monotonic() - t0
    health = served_tiny.get("/health", headers=key)[1]
    assert m.usage.output_tokens == 1 and health["cancelled"] == before["cancelled"] + 1 and not health["busy"]
    assert waited < 15, f"the next request waited {waited:.1f}s"  # 3000 tokens would take minutes


def test_errors_in_anthropics_shape(served_tiny, client, model):
    key = {"x-api-key": KEY}
    status, body = served_tiny.post("/v1/messages", b'{"model": "x", "messages": [', headers=key)
    assert status == 400 and body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "not valid JSON" in body["error"]["message"]
    status, body = served_tiny.post("/v1/messages", {"model": model, "messages": [{"role": "user", "content": "x"}]},
                                    headers=key)
    assert status == 400 and body == {"type": "error", "error": {"type": "invalid_request_error",
                                                                 "message": "max_tokens is required"}}
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="claude-sonnet-4-5", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert e.value.body["error"]["type"] == "not_found_error" and model in e.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model=model, max_tokens=5, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}])
    assert "images are not supported" in e.value.body["error"]["message"]


def test_x_api_key_is_checked(served_tiny, model):
    wrong = anthropic.Anthropic(base_url=served_tiny.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as e:
        wrong.messages.create(model=model, max_tokens=1, messages=[{"role": "user", "content": "x"}])
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "authentication_error"
    status, _ = served_tiny.post("/v1/messages/count_tokens", {"model": model, "messages": [
        {"role": "user", "content": "x"}]}, headers={"x-api-key": KEY})
    assert status == 200
