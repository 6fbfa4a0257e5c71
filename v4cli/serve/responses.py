"""OpenAI Responses API: `/v1/responses`, what Codex CLI speaks. Stateless: the client sends the whole history.

`input` (a string or a list of items) becomes typed messages: `instructions` and system/developer messages →
System (adjacent ones joined by a blank line, as on the Chat route); user messages → User; an assistant turn is the
run of `reasoning`, assistant `message` and `function_call` items between two user-side items → one Assistant
(reasoning from the item's reasoning_text content, else its summary; calls keep their call_id);
`function_call_output` → ToolResult. Function tools (flat Responses shape, or
Chat's nested one) are mapped; other tool types (web_search, local_shell, custom, mcp, ...) and items of them are
ignored, since nothing here runs them. `reasoning.effort` maps through EFFORT_MODES; without it, OpenAI's default
effort (medium) → high. `store` is ignored; `previous_response_id` is refused with a 400 (nothing is stored).

The answer is `output` items: a `reasoning` item (the model's reasoning as reasoning_text), a `message` and one
`function_call` per call, streamed with the Responses event types in the order the official SDK checks. A turn cut
by max_output_tokens ends as status "incomplete" (`response.incomplete`), as OpenAI's API does.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from v4cli.engine.grammar import Constraint
from v4cli.engine.sampling import SamplingParams
from quant.errors import BadInput
from v4cli.prompt.encoding import Assistant, Message, Mode, System, ToolCall, ToolResult, User
from v4cli.prompt.parser import ContentDelta, ReasoningDelta, ToolCallEvent
from v4cli.serve.http import APIError, Server, api_error, read_json
from v4cli.serve.core import EFFORT_MODES, ChatRequest, Result
from v4cli.serve.sse import COMMENT_PING, event_stream, frame, with_pings
from v4cli.serve.openai_chat import arguments

log = logging.getLogger("v4.serve")

DEFAULT_EFFORT = "medium"  # OpenAI's default for reasoning models
_TEXT_PARTS = ("input_text", "output_text", "text", "summary_text", "reasoning_text")
_UNREADABLE = ("input_image", "input_file", "input_audio", "image_url", "image")


def _bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


# ------------------------------------------------------------------------------------------- request → ChatRequest


def _text(content: Any, where: str) -> str:
    """A string, or the text of a list of text parts (joined with newlines)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(f"{where} must be a string or a list of content parts", where)
    out = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind in _UNREADABLE:
            raise _bad(f"{where}[{i}]: {kind} parts are not supported: images and files are not supported, "
                       "the model reads text only", where)
        if kind in _TEXT_PARTS and isinstance(part.get("text"), str):
            out.append(part["text"])
        elif kind != "refusal":
            raise _bad(f"{where}[{i}] is not a text part", where)
    return "\n".join(out)


class _Turn:
    """An assistant turn being gathered from consecutive output items."""

    def __init__(self) -> None:
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.calls: list[ToolCall] = []

    def message(self) -> Assistant:
        return Assistant("".join(self.content), "".join(self.reasoning) if self.reasoning else None,
                         tuple(self.calls))


def messages_of(body: Mapping[str, Any]) -> list[Message]:
    """`instructions` + `input` as typed messages (rules in the module docstring)."""
    out: list[Message] = []
    instructions = body.get("instructions")
    if instructions:
        out.append(System(_text(instructions, "instructions")))
    items = body.get("input")
    if isinstance(items, str):
        items = [{"type": "message", "role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise _bad("input is required: a string or a non-empty list of items", "input")
    turn: _Turn | None = None

    def flush() -> None:
        nonlocal turn
        if turn is not None:
            out.append(turn.message())
            turn = None

    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, Mapping):
            raise _bad(f"{where} must be an object", where)
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            text = _text(item.get("content"), f"{where}.content")
            if role == "assistant":
                if turn is None or turn.calls:
                    flush()
                    turn = _Turn()
                turn.content.append(text)
                continue
            flush()
            if role in ("system", "developer"):
                # adjacent ones (instructions, then Codex's developer message) make one system prompt, as on the
                # Chat route, so the tools block follows all of it
                if out and isinstance(out[-1], System):
                    out[-1] = System(out[-1].content + "\n\n" + text)
                else:
                    out.append(System(text))
            elif role == "user":
                out.append(User(text))
            else:
                raise _bad(f"{where}.role must be user, assistant, system or developer, not {role!r}", where)
        elif kind == "reasoning":
            if turn is not None and (turn.content or turn.calls):
                flush()
            turn = turn or _Turn()
            text = _text(item.get("content"), f"{where}.content") or _text(item.get("summary"), f"{where}.summary")
            turn.reasoning.append(text)
        elif kind == "function_call":
            turn = turn or _Turn()
            name = item.get("name")
            if not isinstance(name, str) or not name:
                raise _bad(f"{where}.name is required", where)
            call_id = item.get("call_id")
            turn.calls.append(ToolCall(name, arguments(item.get("arguments"), f"{where}.arguments"),
                                       call_id if isinstance(call_id, str) else None))
        elif kind == "function_call_output":
            flush()
            call_id = item.get("call_id")
            out.append(ToolResult(_text(item.get("output"), f"{where}.output"),
                                  call_id if isinstance(call_id, str) else None))
        elif kind == "item_reference":
            raise _bad(f"{where}: item_reference needs stored items; this server stores nothing, send the items "
                       "themselves", where)
        # other items (local_shell_call, web_search_call, custom_tool_call and their outputs) belong to tools
        # this server neither offers nor runs
    flush()
    if isinstance(out[-1], (Assistant, System)):
        raise _bad("input must end with a user message or a function_call_output", "input")
    return out


def tools_of(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Function tools as {"name", "description", "parameters"}; the other tool types are left out."""
    tools = body.get("tools") or []
    if not isinstance(tools, list):
        raise _bad("tools must be a list", "tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping) or tool.get("type") != "function":
            continue
        fn = tool.get("function") if isinstance(tool.get("function"), Mapping) else tool  # Chat's nested shape
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise _bad(f"tools[{i}].name is required", "tools")
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, Mapping):
            raise _bad(f"tools[{i}].parameters must be a JSON schema object", "tools")
        out.append({"name": name, "description": fn.get("description") or "", "parameters": dict(params)})
    return out


def constraint_of(body: Mapping[str, Any], tools: list[dict[str, Any]]) -> tuple[Constraint | None, bool]:
    """(constraint, keep tools) from `tool_choice` and `text.format`: a forced tool wins over a JSON format.

    "none" leaves the tools out of the prompt; hosted-tool and allowed_tools choices are treated as "auto"."""
    choice = body.get("tool_choice")
    kind = choice.get("type") if isinstance(choice, Mapping) else choice
    if kind == "none":
        return None, False
    if kind == "required" and tools:
        return Constraint("required"), True
    if kind == "function":
        name = choice.get("name") or (choice.get("function") or {}).get("name")
        if name not in {t["name"] for t in tools}:
            raise _bad(f"tool_choice names the function {name!r}, which is not in tools", "tool_choice")
        return Constraint("tool", name), True
    text = body.get("text")
    fmt = text.get("format") if isinstance(text, Mapping) else None
    if isinstance(fmt, Mapping) and fmt.get("type") == "json_schema":
        schema = fmt.get("schema")
        return Constraint("json", schema=schema if isinstance(schema, Mapping) else None), True
    if isinstance(fmt, Mapping) and fmt.get("type") == "json_object":
        return Constraint("json"), True
    return None, True


def mode_of(body: Mapping[str, Any]) -> Mode:
    reasoning = body.get("reasoning")
    effort = reasoning.get("effort") if isinstance(reasoning, Mapping) else None
    effort = effort or DEFAULT_EFFORT
    if effort not in EFFORT_MODES:
        raise _bad(f"reasoning.effort must be one of {', '.join(EFFORT_MODES)}, not {effort!r}", "reasoning.effort")
    return EFFORT_MODES[effort]


def _number(body: Mapping[str, Any], key: str, kind: type, default: Any) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise _bad(f"{key} must be {'an integer' if kind is int else 'a number'}", key)
    return kind(value)


def chat_request(body: Mapping[str, Any], default_model: str) -> ChatRequest:
    """A /v1/responses body → ChatRequest (APIError 400 naming what is wrong)."""
    for key in ("previous_response_id", "conversation"):
        if body.get(key):
            raise _bad(f"{key} is not supported: this server is stateless and stores no responses; send the full "
                       "history in input (Codex CLI does)", key)
    tools = tools_of(body)
    constraint, keep_tools = constraint_of(body, tools)
    max_tokens = _number(body, "max_output_tokens", int, None)
    if max_tokens is not None and max_tokens < 1:
        raise _bad("max_output_tokens must be at least 1", "max_output_tokens")
    try:
        sampling = SamplingParams(
            temperature=_number(body, "temperature", float, SamplingParams.temperature),
            top_p=_number(body, "top_p", float, SamplingParams.top_p),
            max_tokens=max_tokens if max_tokens is not None else 1 << 62)  # the runner fits it to the context
    except BadInput as e:
        raise _bad(str(e).replace("--", "")) from None
    model = body.get("model") or default_model
    if not isinstance(model, str):
        raise _bad("model must be a string", "model")
    return ChatRequest(model=model, messages=messages_of(body), mode=mode_of(body), sampling=sampling,
                       tools=tools if keep_tools else [], constraint=constraint, stream=bool(body.get("stream")))


# ------------------------------------------------------------------------------------------- Result → response


def _reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "reasoning", "summary": [], "status": status,
            "content": [{"type": "reasoning_text", "text": text}] if text else []}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": [_text_part(text)] if text is not None else []}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


class _Response:
    """One response's fixed fields, its output items and (when streamed) its event sequence numbers."""

    def __init__(self, req: ChatRequest, body: Mapping[str, Any]):
        self.id = _new_id("resp")
        self.created = int(time.time())
        self.req, self.body = req, body
        self.output: list[dict[str, Any]] = []
        self.seq = 0
        self.reasoning_tokens = 0

    def json(self, status: str, result: Result | None = None, error: dict | None = None) -> dict[str, Any]:
        effort = (self.body.get("reasoning") or {}).get("effort") if isinstance(self.body.get("reasoning"),
                                                                                Mapping) else None
        out = {"id": self.id, "object": "response", "created_at": self.created, "status": status,
               "error": error, "incomplete_details": None, "instructions": self.body.get("instructions"),
               "max_output_tokens": self.body.get("max_output_tokens"), "model": self.req.model,
               "output": self.output, "parallel_tool_calls": True, "previous_response_id": None,
               "reasoning": {"effort": effort, "summary": None}, "store": False,
               "temperature": self.req.sampling.temperature, "top_p": self.req.sampling.top_p,
               "text": self.body.get("text") or {"format": {"type": "text"}},
               "tool_choice": self.body.get("tool_choice") or "auto",
               "tools": [{"type": "function", "strict": False, **t} for t in self.req.tools],
               "truncation": "disabled", "usage": None, "metadata": self.body.get("metadata") or {}, "user": None}
        if status == "incomplete":
            out["incomplete_details"] = {"reason": "max_output_tokens"}
        if result is not None:
            u = result.usage
            out["usage"] = {"input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": u.cached_tokens},
                            "output_tokens": u.completion_tokens,
                            "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
                            "total_tokens": u.prompt_tokens + u.completion_tokens}
        return out

    def event(self, kind: str, **fields: Any) -> bytes:
        self.seq += 1
        return frame(kind, {"type": kind, "sequence_number": self.seq - 1, **fields})


def status_of(result: Result) -> str:
    return "incomplete" if result.finish_reason == "length" else "completed"


def response_json(resp: _Response, result: Result) -> dict[str, Any]:
    """The non-streamed answer, built from the parsed message."""
    msg, status = result.message, status_of(result)
    if msg.reasoning:
        resp.output.append(_reasoning_item(_new_id("rs"), msg.reasoning, status))
    if msg.content or not msg.tool_calls:
        resp.output.append(_message_item(_new_id("msg"), msg.content, status))
    for call in msg.tool_calls:
        resp.output.append(_call_item(_new_id("fc"), _new_id("call"), call.name,
                                      json.dumps(dict(call.arguments), ensure_ascii=False), status))
    return resp.json(status, result)


class _Items:
    """The streamed output items: an item opens when the kind of delta changes and closes before the next."""

    def __init__(self, resp: _Response):
        self.resp = resp
        self.open: dict[str, Any] | None = None
        self.text: list[str] = []

    def _add(self, item: dict[str, Any]) -> list[bytes]:
        out = self.close("completed")
        self.open, self.text = item, []
        self.resp.output.append(item)
        index = len(self.resp.output) - 1
        out.append(self.resp.event("response.output_item.added", output_index=index, item=dict(item)))
        if item["type"] == "message":
            out.append(self.resp.event("response.content_part.added", item_id=item["id"], output_index=index,
                                       content_index=0, part=_text_part("")))
        elif item["type"] == "reasoning":
            out.append(self.resp.event("response.content_part.added", item_id=item["id"], output_index=index,
                                       content_index=0, part={"type": "reasoning_text", "text": ""}))
        return out

    def delta(self, kind: str, text: str) -> list[bytes]:
        out = []
        if self.open is None or self.open["type"] != kind:
            out = self._add(_reasoning_item(_new_id("rs"), "", "in_progress") if kind == "reasoning"
                            else _message_item(_new_id("msg"), None, "in_progress"))
        self.text.append(text)
        name = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
        extra = {} if kind == "reasoning" else {"logprobs": []}
        return out + [self.resp.event(name, item_id=self.open["id"], output_index=len(self.resp.output) - 1,
                                      content_index=0, delta=text, **extra)]

    def call(self, ev: ToolCallEvent) -> list[bytes]:
        args = json.dumps(ev.arguments, ensure_ascii=False)
        item = _call_item(_new_id("fc"), _new_id("call"), ev.name, "", "in_progress")
        out = self._add(item)
        index, item_id = len(self.resp.output) - 1, item["id"]
        out.append(self.resp.event("response.function_call_arguments.delta", item_id=item_id, output_index=index,
                                   delta=args))
        self.text = [args]
        return out + self.close("completed")

    def close(self, status: str) -> list[bytes]:
        """Finish the open item: its done events, with the whole text and the final item."""
        item = self.open
        if item is None:
            return []
        self.open = None
        index, text = len(self.resp.output) - 1, "".join(self.text)
        ids = {"item_id": item["id"], "output_index": index}
        out = []
        if item["type"] == "message":
            item.update(_message_item(item["id"], text, status))
            out += [self.resp.event("response.output_text.done", **ids, content_index=0, text=text, logprobs=[]),
                    self.resp.event("response.content_part.done", **ids, content_index=0, part=_text_part(text))]
        elif item["type"] == "reasoning":
            item.update(_reasoning_item(item["id"], text, status))
            out += [self.resp.event("response.reasoning_text.done", **ids, content_index=0, text=text),
                    self.resp.event("response.content_part.done", **ids, content_index=0,
                                    part={"type": "reasoning_text", "text": text})]
        else:
            item.update(arguments=text, status=status)
            out.append(self.resp.event("response.function_call_arguments.done", **ids, name=item["name"],
                                       arguments=text))
        return out + [self.resp.event("response.output_item.done", output_index=index, item=dict(item))]


async def stream(server: Server, job: Any, resp: _Response, request: Request) -> AsyncIterator[bytes]:
    """response.created, in_progress, the items' events, then response.completed (or .incomplete at
    max_output_tokens); a failure after the start ends the stream with response.failed."""
    yield resp.event("response.created", response=resp.json("in_progress"))
    yield resp.event("response.in_progress", response=resp.json("in_progress"))
    items = _Items(resp)
    try:
        async for ev in with_pings(server.runner.events(job, request.is_disconnected)):
            if ev is None:
                yield COMMENT_PING
            elif isinstance(ev, ReasoningDelta) and ev.text:
                for b in items.delta("reasoning", ev.text):
                    yield b
            elif isinstance(ev, ContentDelta) and ev.text:
                for b in items.delta("message", ev.text):
                    yield b
            elif isinstance(ev, ToolCallEvent):
                for b in items.call(ev):
                    yield b
            elif isinstance(ev, Result):
                status = status_of(ev)
                for b in items.close(status):
                    yield b
                resp.reasoning_tokens = _reasoning_tokens(server, ev)
                yield resp.event(f"response.{status}", response=resp.json(status, ev))
    except Exception as e:  # the status line is sent: the failure goes in the stream, in the API's shape
        err = api_error(e)
        if err.status >= 500:
            log.exception("error while streaming a response")
        yield resp.event("response.failed", response=resp.json(
            "failed", error={"code": "server_error", "message": err.message}))


def _reasoning_tokens(server: Server, result: Result) -> int:
    """How many of the answer's tokens were reasoning (its text re-encoded: within a token or two of sampled)."""
    text = result.message.reasoning
    return len(server.runner.encoder.encode(text)) if text else 0


def router(server: Server) -> APIRouter:
    """/v1/responses."""
    r = APIRouter()
    runner = server.runner

    @r.post("/v1/responses")
    async def responses(request: Request):
        body = await read_json(request)
        req = chat_request(body, runner.model_name)
        job = runner.prepare(req)  # a bad or over-budget request fails here, before any byte is sent
        resp = _Response(req, body)
        if req.stream:
            return event_stream(stream(server, job, resp, request))
        result = None
        async for ev in runner.events(job, request.is_disconnected):
            if isinstance(ev, Result):
                result = ev
        if result is None:
            raise APIError(500, "the generation ended without a result", "api_error")
        resp.reasoning_tokens = _reasoning_tokens(server, result)
        return JSONResponse(response_json(resp, result))

    return r
