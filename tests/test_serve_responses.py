"""The OpenAI Responses API of `v4 serve` (what Codex CLI speaks): a real server on the tiny model, driven by the
official `openai` SDK.

The weights are random, so answers are checked for shape (items, statuses, event order, usage) and the request →
prompt path on token counts (usage.input_tokens against our encoder's ids for the same typed messages); the
translator itself is checked against typed messages without a server.
"""

from __future__ import annotations

import json

import openai
import pytest
from serve_util import serve_fixture

from v4cli.engine.grammar import Constraint
from v4cli.chat.conversation import PromptEncoder
from v4cli.prompt.encoding import DSML, Assistant, Mode, System, ToolCall, ToolResult, User, render
from v4cli.serve.http import APIError
from v4cli.serve.responses import chat_request

served_tiny = serve_fixture("--ctx", "4096")

SHELL = {"type": "function", "name": "shell", "description": "Run a command.", "strict": False,
         "parameters": {"type": "object", "properties": {"command": {"type": "array", "items": {"type": "string"}}},
                        "required": ["command"]}}
SCHEMA = {"name": "shell", "description": "Run a command.", "parameters": SHELL["parameters"]}
READ = {"type": "function", "name": "read_file", "description": "Read a file.",
        "parameters": {"type": "object", "properties": {"path": {"type": "string", "maxLength": 12}},
                       "required": ["path"]}}
# tool types Codex sends that this server does not run: ignored, not rejected
OTHER_TOOLS = [{"type": "local_shell"}, {"type": "web_search"},
               {"type": "custom", "name": "apply_patch", "description": "patch", "format": {"type": "text"}}]

# A Codex-shaped second turn: developer + user context, a reasoning item and a call, its output, a new question.
CODEX_INPUT = [
    {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Sandbox: read-only."}]},
    {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "List the files."}]},
    {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "Run ls."}],
     "encrypted_content": None},
    {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "shell",
     "arguments": json.dumps({"command": ["ls"]})},
    {"type": "function_call_output", "call_id": "call_1", "output": "a.py\nb.py"},
    {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Two files."}]},
    {"role": "user", "content": "Now read a.py."},
]
CODEX_TYPED = [
    System("You are Codex.\n\nSandbox: read-only."),
    User("List the files."),
    Assistant("", "Run ls.", (ToolCall("shell", {"command": ["ls"]}, "call_1"),)),
    ToolResult("a.py\nb.py", "call_1"),
    Assistant("Two files."),
    User("Now read a.py."),
]
CODEX = {"model": "m", "instructions": "You are Codex.", "input": CODEX_INPUT, "tools": [SHELL, *OTHER_TOOLS],
         "tool_choice": "auto", "parallel_tool_calls": False, "reasoning": {"effort": "high", "summary": "auto"},
         "store": False, "stream": True, "include": ["reasoning.encrypted_content"], "prompt_cache_key": "abc"}


@pytest.fixture(scope="module")
def model(served_tiny) -> str:
    return served_tiny.get("/v1/models")[1]["data"][0]["id"]


@pytest.fixture(scope="module")
def client(served_tiny):
    return openai.OpenAI(base_url=served_tiny.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def encoder(tiny_gguf):
    """Our encoder with the served GGUF's own tokenizer: the ids the server must feed the model."""
    from v4cli.engine.detok import tokenizer_from_metadata
    from v4cli.gguf_file import open_gguf

    with open_gguf(tiny_gguf("q8")) as gf:
        return PromptEncoder(tokenizer_from_metadata(gf.metadata))


# ---------------------------------------------------------------------------------------------- the translator


def test_codex_input_becomes_typed_messages():
    """instructions and developer → System, reasoning + function_call → one assistant turn (call_id kept),
    function_call_output → ToolResult; only the function tool reaches the prompt."""
    req = chat_request(CODEX, "m")
    assert req.messages == CODEX_TYPED and req.tools == [SCHEMA] and req.mode is Mode.HIGH and req.stream
    text = render(req.messages, req.mode, req.tools)
    assert (f'Run ls.</think>\n\n<{DSML}tool_calls>\n<{DSML}invoke name="shell">\n'
            f'<{DSML}parameter name="command" string="false">["ls"]</{DSML}parameter>') in text
    assert "<tool_result>a.py\nb.py</tool_result>" in text


def test_string_input_reasoning_content_and_chat_shaped_tools():
    assert chat_request({"input": "hi"}, "m").messages == [User("hi")]
    body = {"input": [{"role": "user", "content": "q"},
                      {"type": "reasoning", "summary": [{"type": "summary_text", "text": "short"}],
                       "content": [{"type": "reasoning_text", "text": "full"}]},
                      {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "a"}]},
                      {"role": "user", "content": [{"type": "input_text", "text": "q2"}]}],
            "tools": [{"type": "function", "function": SCHEMA}]}
    req = chat_request(body, "m")
    assert req.messages == [User("q"), Assistant("a", "full"), User("q2")] and req.tools == [SCHEMA]


@pytest.mark.parametrize("effort, mode", [(None, Mode.HIGH), ("none", Mode.NON_THINK), ("low", Mode.NON_THINK),
                                          ("medium", Mode.HIGH), ("xhigh", Mode.MAX)])
def test_reasoning_effort_chooses_the_mode(effort, mode):
    body = {"input": "hi", **({"reasoning": {"effort": effort}} if effort else {})}
    assert chat_request(body, "m").mode is mode


@pytest.mark.parametrize("extra, constraint, kept", [
    ({"tool_choice": "auto"}, None, True),
    ({"tool_choice": "required"}, Constraint("required"), True),
    ({"tool_choice": {"type": "function", "name": "shell"}}, Constraint("tool", "shell"), True),
    ({"tool_choice": "none"}, None, False),
    ({"tool_choice": {"type": "web_search"}}, None, True),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}}},
     Constraint("json", schema={"type": "object"}), True),
])
def test_tool_choice_and_text_format_map_to_a_constraint(extra, constraint, kept):
    req = chat_request({"input": "hi", "tools": [SHELL, *OTHER_TOOLS], **extra}, "m")
    assert req.constraint == constraint and req.tools == ([SCHEMA] if kept else [])


@pytest.mark.parametrize("body, words", [
    ({"input": "hi", "previous_response_id": "resp_1"}, "send the full history"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}]},
     "images and files are not supported"),
    ({"input": []}, "input is required"),
    ({"input": "hi", "reasoning": {"effort": "ultra"}}, "reasoning.effort"),
    ({"input": "hi", "tools": [SHELL], "tool_choice": {"type": "function", "name": "nope"}}, "'nope'"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "shell", "arguments": "{not json"},
                {"type": "function_call_output", "call_id": "c", "output": "x"}]}, "not valid JSON"),
    ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
])
def test_bad_bodies_are_400s_naming_the_field(body, words):
    with pytest.raises(APIError) as e:
        chat_request(body, "m")
    assert e.value.status == 400 and words in e.value.message


# ---------------------------------------------------------------------------------------------- the server


def test_codex_request_streams(client, model, encoder):
    """The Codex-shaped request, streamed: the SDK parses every event; items open, stream and close in order and
    the final response holds them; its prompt is our encoder's ids for the same typed messages."""
    body = {k: v for k, v in CODEX.items() if k not in ("model", "stream")}
    events = list(client.responses.create(model=model, stream=True, max_output_tokens=12, **body))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert final.id == events[0].response.id and final.status == kinds[-1].split(".")[1]
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert done and [i.id for i in final.output] == [i.id for i in done]
    assert kinds.count("response.output_item.added") == len(done)
    # thinking mode (effort high): the answer starts with a reasoning item streamed as reasoning_text
    assert final.output[0].type == "reasoning" and "response.reasoning_text.delta" in kinds
    reasoning = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert final.output[0].content[0].text == reasoning
    want = encoder.encode(render(CODEX_TYPED, Mode.HIGH, [SCHEMA]))
    assert final.usage.input_tokens == len(want) and final.usage.output_tokens == 12


def test_stream_helper_accepts_our_events(client, model):
    """`client.responses.stream` checks item identities and order as it accumulates them."""
    with client.responses.stream(model=model, input="hi", reasoning={"effort": "none"}, max_output_tokens=6) as s:
        events = list(s)
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert deltas and deltas[-1].snapshot == "".join(e.delta for e in deltas)
    done = [e for e in events if e.type == "response.output_text.done"]
    assert len(done) == 1 and done[0].text == deltas[-1].snapshot and events[-1].type == "response.incomplete"


def test_non_stream_response(client, model, encoder):
    r = client.responses.create(model=model, input="hi", instructions="Be terse.", reasoning={"effort": "low"},
                                max_output_tokens=5, store=True)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == model
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert [i.type for i in r.output] == ["message"] and r.output_text
    assert r.usage.input_tokens == len(encoder.encode(render([System("Be terse."), User("hi")], Mode.NON_THINK)))
    assert r.usage.output_tokens == 5 and r.usage.total_tokens == r.usage.input_tokens + 5


def test_forced_function_round_trip(client, model, encoder):
    """tool_choice names a function: constrained decoding makes even random weights call it; the items sent back
    with its output become a prompt holding that call's exact DSML, reusing the first prompt from the cache."""
    # greedy: a sampled argument string can tokenize otherwise than our encoder would (the server splices the
    # sampled ids back for reuse), so a random one made the token count below differ now and then
    r = client.responses.create(model=model, input="Read a.py", tools=[READ, *OTHER_TOOLS], max_output_tokens=200,
                                tool_choice={"type": "function", "name": "read_file"}, reasoning={"effort": "none"},
                                temperature=0)
    assert r.status == "completed" and [i.type for i in r.output] == ["function_call"]
    call = r.output[0]
    args = json.loads(call.arguments)
    assert call.name == "read_file" and set(args) == {"path"} and call.call_id != call.id
    items = [{"role": "user", "content": "Read a.py"}, call.model_dump(exclude_none=True),
             {"type": "function_call_output", "call_id": call.call_id, "output": "print(1)"}]
    r2 = client.responses.create(model=model, input=items, tools=[READ, *OTHER_TOOLS], max_output_tokens=2,
                                 reasoning={"effort": "none"})
    typed = [User("Read a.py"), Assistant("", None, (ToolCall("read_file", args, call.call_id),)),
             ToolResult("print(1)", call.call_id)]
    schema = {k: READ[k] for k in ("name", "description", "parameters")}
    text = render(typed, Mode.NON_THINK, [schema])
    assert f'<{DSML}parameter name="path" string="true">{args["path"]}</{DSML}parameter>' in text
    assert r2.usage.input_tokens == len(encoder.encode(text))
    assert r2.usage.input_tokens_details.cached_tokens >= r.usage.input_tokens


def test_forced_function_streams_its_arguments(client, model):
    events = list(client.responses.create(model=model, input="Read a.py", tools=[READ], stream=True,
                                          tool_choice={"type": "function", "name": "read_file"},
                                          reasoning={"effort": "none"}, max_output_tokens=200))
    kinds = [e.type for e in events]
    assert kinds[-1] == "response.completed"
    delta = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    call = events[-1].response.output[-1]
    assert call.type == "function_call" and call.name == "read_file" and call.arguments == delta == done.arguments
    assert set(json.loads(delta)) == {"path"}


def test_errors_in_openais_shape(served_tiny, client, model):
    status, body = served_tiny.post("/v1/responses", b'{"model": "x", "input": [')
    assert status == 400 and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error" and "not valid JSON" in body["error"]["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model="gpt-5-codex", input="hi")
    assert e.value.body["code"] == "model_not_found" and model in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=model, input="hi", previous_response_id="resp_123")
    assert e.value.body["param"] == "previous_response_id" and "stateless" in e.value.body["message"]
