"""Structured output through a real `v4 serve` on the tiny model, driven by the official `openai` SDK.

Random weights never choose to call a tool or write JSON; constrained decoding makes them. test_serve.py has the
non-think forced-call round trip; here: the thinking round trip (reasoning kept beside the DSML in the next
prompt), "required" over two tools, and response_format json_schema, each checked against the schema.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from serve_util import serve_fixture

from v4cli.prompt.encoding import (ASSISTANT, EOS, THINK_END, THINK_START, TOOL_RESULT_CLOSE, TOOL_RESULT_OPEN,
                                   USER, Assistant, Mode, ToolCall, ToolResult, User, encode, load_tokenizer,
                                   render, render_tool_calls)

served_tools = serve_fixture("--ctx", "4096", "--max-tokens", "1000")

# bounded, so random weights finish: a free string or number would run to max_tokens
LOOKUP = {"name": "lookup", "description": "Look up a city.", "parameters": {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 6},
                   "days": {"type": "integer", "minimum": 1, "maximum": 9},
                   "opts": {"type": "object", "properties": {"metric": {"type": "boolean"}},
                            "required": ["metric"], "additionalProperties": False}},
    "required": ["city", "days", "opts"]}}
NOW = {"name": "now", "description": "The time.", "parameters": {"type": "object", "properties": {}}}
TOOLS = [{"type": "function", "function": f} for f in (LOOKUP, NOW)]
SCHEMAS = {"lookup": LOOKUP["parameters"], "now": NOW["parameters"]}
ANSWER = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["ok", "n"], "additionalProperties": False}


@pytest.fixture(scope="module")
def client(served_tools):
    return openai.OpenAI(base_url=served_tools.url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


@pytest.mark.slow
def test_thinking_tool_call_round_trip(served_tools, client, model):
    """reasoning_effort high + a named tool: reasoning (cut at its budget), then the forced call as tool_calls.
    Sent back with a result, the next prompt is our encoder's: the first prompt's ids, the reasoning and the exact
    DSML of the call (thinking with tools keeps both), then `<tool_result>` and a new `<think>`."""
    first = [{"role": "user", "content": "Weather in Oslo?"}]
    ask = dict(model=model, tools=TOOLS, max_tokens=240, temperature=1.0, seed=11, reasoning_effort="high")
    r = client.chat.completions.create(messages=first, tool_choice={"type": "function", "function": {"name": "lookup"}},
                                       **ask)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    args = json.loads(call.function.arguments)
    assert call.function.name == "lookup"
    jsonschema.validate(args, LOOKUP["parameters"])
    reasoning = choice.message.reasoning_content
    assert reasoning

    second = [*first, {"role": "assistant", "content": None, "reasoning_content": reasoning,
                       "tool_calls": [call.model_dump()]},
              {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    typed = [User("Weather in Oslo?"), Assistant("", reasoning, (ToolCall("lookup", args, call.id),)),
             ToolResult("sunny", call.id)]
    tok = load_tokenizer()
    text = render(typed, Mode.HIGH, [LOOKUP, NOW])
    dsml = render_tool_calls([ToolCall("lookup", args)])
    tail = EOS + USER + TOOL_RESULT_OPEN + "sunny" + TOOL_RESULT_CLOSE + ASSISTANT + THINK_START
    assert text.endswith(reasoning + THINK_END + dsml + tail)
    status, got = served_tools.post("/tokenize", {"messages": second, **ask})
    assert status == 200 and tok.decode(got["tokens"]) == text
    p1 = encode([User("Weather in Oslo?")], Mode.HIGH, [LOOKUP, NOW], tok)
    assert got["tokens"][: len(p1)] == p1 and got["tokens"][-len(tok.encode(tail)):] == tok.encode(tail)
    # the turn's tokens are the ones sampled: all of them but the last (never fed back) come from the live cache
    r2 = client.chat.completions.create(messages=second, **{**ask, "max_tokens": 1})
    assert r2.usage.prompt_tokens == got["count"]
    assert r2.usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens + r.usage.completion_tokens - 1


@pytest.mark.slow
def test_required_calls_tools_from_the_request(client, model):
    """tool_choice required: one or more calls, each to a request tool with arguments valid under its schema,
    streamed as the same calls the non-streamed request returns."""
    ask = dict(model=model, messages=[{"role": "user", "content": "Go."}], tools=TOOLS, tool_choice="required",
               max_tokens=300, temperature=1.0, seed=3, reasoning_effort="none")
    r = client.chat.completions.create(**ask)
    assert r.choices[0].finish_reason == "tool_calls"
    calls = [(c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls]
    assert calls
    for name, arguments in calls:
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])
    streamed, finish = [], None
    for ch in client.chat.completions.create(stream=True, **ask):
        streamed += ch.choices[0].delta.tool_calls or []
        finish = ch.choices[0].finish_reason or finish
    assert finish == "tool_calls" and [(c.function.name, c.function.arguments) for c in streamed] == calls


@pytest.mark.slow
@pytest.mark.parametrize("effort", ["none", "high"])
def test_response_format_json_schema(client, model, effort):
    """The answer (after any reasoning) is JSON valid under the schema, and the turn ends by itself."""
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER, "strict": True}}
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Answer."}],
                                       response_format=fmt, max_tokens=200, temperature=1.0, seed=5,
                                       reasoning_effort=effort)
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), ANSWER)
