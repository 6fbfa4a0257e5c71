"""Anthropic Messages API: `/v1/messages` (JSON and SSE) and `/v1/messages/count_tokens`, what Claude Code speaks.

Requests become one `ChatRequest`: `system` (a string or text blocks) → System; `text` blocks → User / the
assistant's content; `thinking` blocks sent back (signature or not) → the assistant turn's reasoning; `tool_use`
→ the assistant's ToolCall (id kept); `tool_result` (a string or text blocks) → ToolResult. Fields we have no use
for (cache_control, metadata, citations, service_tier, ...) are ignored; images and documents are refused with a
400 naming them, since this model reads text only.

Thinking mode, in this order:
- `thinking: {"type": "disabled"}` → non-think;
- `output_config.effort` → through EFFORT_MODES (low → non-think, medium/high → high, xhigh/max → max);
- `thinking: {"type": "enabled", "budget_tokens": N}` → max when N ≥ MAX_BUDGET, else high;
  `{"type": "adaptive"}` (and any newer type) → high;
- no `thinking` → non-think: the API's meaning of leaving it out (Claude Code sends it when thinking is on).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from v4cli.engine.grammar import Constraint
from v4cli.engine.sampling import SamplingParams
from quant.errors import V4Error
from v4cli.prompt.encoding import Assistant, Message, Mode, System, ToolCall, ToolResult, User
from v4cli.prompt.parser import ContentDelta, ReasoningDelta, ToolCallEvent
from v4cli.serve.http import APIError, Server, api_error, read_json
from v4cli.serve.core import EFFORT_MODES, ChatRequest, Result
from v4cli.serve.sse import event_stream, frame, with_pings

log = logging.getLogger("v4.serve")

# A thinking budget this large asks for the deepest thinking: Claude Code's "ultrathink" sends 31,999 tokens,
# "think" and "think hard" 4,000 and 10,000.
MAX_BUDGET = 16_384

# Claude Code puts this block first in `system`, with a hash that changes on every request: kept, it would make
# every prompt differ from the first token and defeat prefix reuse. It tells the model nothing.
BILLING_HEADER = "x-anthropic-billing-header:"

_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "cancelled": "end_turn"}
_UNREADABLE = {"image": "images", "document": "documents (PDF)", "search_result": "search results",
               "container_upload": "file uploads"}


def _bad(message: str) -> APIError:
    return APIError(400, message, "invalid_request_error")


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


# ------------------------------------------------------------------------------------------- request → ChatRequest


def _blocks(content: Any, where: str) -> list[Mapping[str, Any]]:
    """Content as a list of blocks (a string is one text block)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(b, Mapping) for b in content):
        raise _bad(f"{where} must be a string or a list of content blocks")
    return content


def _refuse(block: Mapping[str, Any], where: str) -> None:
    kind = block.get("type")
    if kind in _UNREADABLE:
        raise _bad(f"{_UNREADABLE[kind]} are not supported: this model reads text only ({where})")


def _text(content: Any, where: str) -> str:
    """The text of a string or of a list of text blocks (system prompts, tool results)."""
    parts = []
    for block in _blocks(content, where):
        _refuse(block, where)
        if block.get("type") == "text":
            parts.append(_str(block.get("text", ""), f"{where}: a text block's text"))
    return "\n".join(parts)


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _bad(f"{what} must be a string")
    return value


def system_prompt(system: Any) -> str | None:
    """`system` as one string (blocks joined by a newline, Claude Code's billing header left out)."""
    if system is None:
        return None
    if isinstance(system, list):
        system = [b for b in system if not (isinstance(b, Mapping) and str(b.get("text", "")).startswith(
            BILLING_HEADER))]
    return _text(system, "system")


def _user(content: Any, where: str) -> list[Message]:
    out: list[Message] = []
    for block in _blocks(content, where):
        _refuse(block, where)
        kind = block.get("type")
        if kind == "text":
            out.append(User(_str(block.get("text", ""), f"{where}: text")))
        elif kind == "tool_result":
            call_id = block.get("tool_use_id")
            text = _text(block.get("content", ""), f"{where}: tool_result")
            # The prompt format has no error flag for a tool result, so the model learns of a failure from the text.
            if block.get("is_error") and not text.lower().startswith("error"):
                text = "Error: " + text
            out.append(ToolResult(text, call_id if isinstance(call_id, str) else None))
        # other blocks (server tool results, redacted content) carry nothing this model can read
    return out


def _assistant(content: Any, where: str) -> Assistant:
    reasoning, texts, calls = [], [], []
    for block in _blocks(content, where):
        kind = block.get("type")
        if kind == "thinking":
            reasoning.append(_str(block.get("thinking", ""), f"{where}: thinking"))
        elif kind == "text":
            texts.append(_str(block.get("text", ""), f"{where}: text"))
        elif kind == "tool_use":
            args = block.get("input", {})
            if not isinstance(args, Mapping):
                raise _bad(f"{where}: a tool_use block's input must be a JSON object")
            name = _str(block.get("name"), f"{where}: a tool_use block's name")
            call_id = block.get("id")
            calls.append(ToolCall(name, dict(args), call_id if isinstance(call_id, str) else None))
        # redacted_thinking holds encrypted text from another model: nothing to render
    return Assistant("".join(texts), "".join(reasoning) if reasoning else None, tuple(calls))


def messages_of(body: Mapping[str, Any]) -> list[Message]:
    """The typed conversation: system, then each message's blocks in order."""
    out: list[Message] = []
    system = system_prompt(body.get("system"))
    if system:
        out.append(System(system))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages: a non-empty list of {role, content} objects is required")
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, Mapping):
            raise _bad(f"{where} must be an object")
        role = msg.get("role")
        if role == "user":
            out.extend(_user(msg.get("content", ""), where))
        elif role == "assistant":
            out.append(_assistant(msg.get("content", ""), where))
        else:
            raise _bad(f"{where}.role must be 'user' or 'assistant', got {role!r}")
    if isinstance(out[-1], Assistant):
        raise _bad("the last message must be a user message: continuing an assistant message (prefill) is not "
                   "supported")
    return out


def tools_of(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Client tools as {"name", "description", "parameters"}; Anthropic's server tools (web search, code
    execution, computer use: a `type` other than "custom") are left out, since nothing here would run them."""
    tools = body.get("tools") or []
    if not isinstance(tools, list):
        raise _bad("tools must be a list")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise _bad(f"tools[{i}] must be an object")
        if tool.get("type") not in (None, "custom"):
            continue
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise _bad(f"tools[{i}].name is required")
        schema = tool.get("input_schema", {"type": "object", "properties": {}})
        if not isinstance(schema, Mapping):
            raise _bad(f"tools[{i}].input_schema must be a JSON schema object")
        out.append({"name": name, "description": tool.get("description") or "", "parameters": dict(schema)})
    return out


def constraint_of(body: Mapping[str, Any], tools: list[dict[str, Any]]) -> tuple[Constraint | None, bool]:
    """(constraint, keep tools) from `tool_choice` and `output_config.format`.

    auto → none; any → a call to some tool; tool → a call to that one; none → the tools are left out of the
    prompt (nothing else stops this model calling one it was shown)."""
    choice = body.get("tool_choice")
    kind = choice.get("type") if isinstance(choice, Mapping) else choice
    if kind == "none":
        return None, False
    if kind == "any" and tools:
        return Constraint("required"), True
    if kind == "tool":
        name = choice.get("name")
        if name not in {t["name"] for t in tools}:
            raise _bad(f"tool_choice names the tool {name!r}, which is not in tools")
        return Constraint("tool", name), True
    if kind not in (None, "auto", "any"):
        raise _bad(f"tool_choice.type must be auto, any, tool or none, got {kind!r}")
    config = body.get("output_config")
    fmt = config.get("format") if isinstance(config, Mapping) else None
    if isinstance(fmt, Mapping) and fmt.get("type") == "json_schema":
        schema = fmt.get("schema")
        return Constraint("json", schema=schema if isinstance(schema, Mapping) else None), True
    return None, True


def mode_of(body: Mapping[str, Any]) -> Mode:
    """The thinking mode (rules in the module docstring)."""
    thinking = body.get("thinking")
    if thinking is not None and not isinstance(thinking, Mapping):
        raise _bad("thinking must be an object such as {\"type\": \"enabled\", \"budget_tokens\": 4096}")
    kind = thinking.get("type") if thinking else None
    if kind == "disabled":
        return Mode.NON_THINK
    config = body.get("output_config")
    effort = config.get("effort") if isinstance(config, Mapping) else None
    if effort is not None:
        if effort not in EFFORT_MODES:
            raise _bad(f"output_config.effort must be one of {', '.join(EFFORT_MODES)}, got {effort!r}")
        return EFFORT_MODES[effort]
    if kind is None:
        return Mode.NON_THINK
    if kind == "enabled":
        budget = thinking.get("budget_tokens", 0)
        if not isinstance(budget, int) or isinstance(budget, bool):
            raise _bad("thinking.budget_tokens must be an integer")
        return Mode.MAX if budget >= MAX_BUDGET else Mode.HIGH
    return Mode.HIGH


def _number(body: Mapping[str, Any], key: str, default: Any) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _bad(f"{key} must be a number")
    return value


def chat_request(body: Mapping[str, Any], *, counting: bool = False) -> ChatRequest:
    """The body of /v1/messages (or of count_tokens, which needs no max_tokens) as a ChatRequest."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model is required")
    max_tokens = body.get("max_tokens")
    if counting:
        max_tokens = 1
    elif max_tokens is None:
        raise _bad("max_tokens is required")
    elif not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise _bad(f"max_tokens must be a positive integer, got {max_tokens!r}")
    stops = body.get("stop_sequences") or []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop_sequences must be a list of strings")
    tools = tools_of(body)
    constraint, keep_tools = constraint_of(body, tools)
    try:
        sampling = SamplingParams(
            temperature=float(_number(body, "temperature", 1.0)), top_p=float(_number(body, "top_p", 1.0)),
            top_k=int(_number(body, "top_k", 0)), max_tokens=max_tokens, stop=tuple(s for s in stops if s))
    except V4Error as e:
        raise _bad(str(e)) from None
    return ChatRequest(model=model, messages=messages_of(body), mode=mode_of(body), sampling=sampling,
                       tools=tools if keep_tools else [], constraint=constraint, stream=bool(body.get("stream")))


# ------------------------------------------------------------------------------------------- Result → response


def usage(result: Result) -> dict[str, int]:
    """Anthropic's usage: input_tokens excludes the tokens read from the prefix cache, as the API counts them."""
    u = result.usage
    return {"input_tokens": u.prompt_tokens - u.cached_tokens, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": u.cached_tokens, "output_tokens": u.completion_tokens}


def stop_reason(result: Result) -> str:
    return "stop_sequence" if result.stop_sequence else _STOP_REASONS[result.finish_reason]


def content_blocks(message: Assistant) -> list[dict[str, Any]]:
    """The answer's blocks: thinking, text, then one tool_use per call."""
    blocks: list[dict[str, Any]] = []
    if message.reasoning:
        blocks.append({"type": "thinking", "thinking": message.reasoning, "signature": ""})
    if message.content:
        blocks.append({"type": "text", "text": message.content})
    for call in message.tool_calls:
        blocks.append({"type": "tool_use", "id": _new_id("toolu"), "name": call.name, "input": dict(call.arguments)})
    return blocks


def message_json(msg_id: str, model: str, result: Result) -> dict[str, Any]:
    return {"id": msg_id, "type": "message", "role": "assistant", "model": model,
            "content": content_blocks(result.message), "stop_reason": stop_reason(result),
            "stop_sequence": result.stop_sequence, "usage": usage(result)}


class _Blocks:
    """The SSE content blocks of one streamed answer: opens a block when the kind of delta changes."""

    def __init__(self) -> None:
        self.index = -1
        self.open: str | None = None

    def _start(self, kind: str, block: dict[str, Any]) -> list[bytes]:
        out = self.stop()
        self.index += 1
        self.open = kind
        return out + [frame("content_block_start", {"type": "content_block_start", "index": self.index,
                                                     "content_block": block})]

    def stop(self) -> list[bytes]:
        if self.open is None:
            return []
        out = []
        if self.open == "thinking":  # the SDK keeps a thinking block's signature; ours is empty (nothing signs it)
            out.append(frame("content_block_delta", {"type": "content_block_delta", "index": self.index,
                                                     "delta": {"type": "signature_delta", "signature": ""}}))
        self.open = None
        return out + [frame("content_block_stop", {"type": "content_block_stop", "index": self.index})]

    def delta(self, kind: str, text: str) -> list[bytes]:
        out = []
        if self.open != kind:
            block = {"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking" \
                else {"type": "text", "text": ""}
            out = self._start(kind, block)
        key, delta_type = ("thinking", "thinking_delta") if kind == "thinking" else ("text", "text_delta")
        return out + [frame("content_block_delta", {"type": "content_block_delta", "index": self.index,
                                                    "delta": {"type": delta_type, key: text}})]

    def tool_use(self, event: ToolCallEvent) -> list[bytes]:
        out = self._start("tool_use", {"type": "tool_use", "id": _new_id("toolu"), "name": event.name,
                                       "input": {}})
        out.append(frame("content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": {
            "type": "input_json_delta", "partial_json": json.dumps(event.arguments, ensure_ascii=False)}}))
        return out + self.stop()


async def stream(server: Server, job: Any, req: ChatRequest, request: Request) -> AsyncIterator[bytes]:
    """The SSE sequence the SDK expects: message_start, ping, content blocks (start, deltas, stop), message_delta
    with stop_reason and usage, message_stop. A failure after the start is sent as an `error` event."""
    msg_id = _new_id("msg")
    prompt = len(job.ids)
    yield frame("message_start", {"type": "message_start", "message": {
        "id": msg_id, "type": "message", "role": "assistant", "model": req.model, "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": prompt, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                  "output_tokens": 0}}})
    yield frame("ping", {"type": "ping"})
    blocks = _Blocks()
    try:
        async for ev in with_pings(server.runner.events(job, request.is_disconnected)):
            if ev is None:
                yield frame("ping", {"type": "ping"})
            elif isinstance(ev, ReasoningDelta) and ev.text:
                for b in blocks.delta("thinking", ev.text):
                    yield b
            elif isinstance(ev, ContentDelta) and ev.text:
                for b in blocks.delta("text", ev.text):
                    yield b
            elif isinstance(ev, ToolCallEvent):
                for b in blocks.tool_use(ev):
                    yield b
            elif isinstance(ev, Result):
                for b in blocks.stop():
                    yield b
                yield frame("message_delta", {"type": "message_delta", "delta": {
                    "stop_reason": stop_reason(ev), "stop_sequence": ev.stop_sequence}, "usage": usage(ev)})
                yield frame("message_stop", {"type": "message_stop"})
    except Exception as e:  # the status line is sent: the error goes in the stream, in the API's shape
        err = api_error(e)
        if err.status >= 500:
            log.exception("error while streaming a message")
        yield frame("error", {"type": "error", "error": {"type": err.kind, "message": err.message}})


async def _collect(server: Server, job: Any, request: Request) -> Result:
    async for ev in server.runner.events(job, request.is_disconnected):
        if isinstance(ev, Result):
            return ev
    raise APIError(500, "the generation ended without a result", "api_error")


def router(server: Server) -> APIRouter:
    """/v1/messages and /v1/messages/count_tokens."""
    r = APIRouter()
    runner = server.runner

    @r.post("/v1/messages")
    async def messages(request: Request):
        req = chat_request(await read_json(request))
        job = runner.prepare(req)  # a bad or over-budget request fails here, before any byte is sent
        if req.stream:
            return event_stream(stream(server, job, req, request))
        result = await _collect(server, job, request)
        return JSONResponse(message_json(_new_id("msg"), req.model, result))

    @r.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request):
        req = chat_request(await read_json(request), counting=True)
        runner.check_model(req.model)
        return {"input_tokens": runner.count_tokens(req)}

    return r

