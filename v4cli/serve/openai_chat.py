"""OpenAI Chat Completions: `/v1/chat/completions`, stream and non-stream.

`to_request` turns the body into a `ChatRequest` (tolerant of fields we do not use, strict about the ones we do);
the runner's events become the completion object or its `chat.completion.chunk` SSE stream. Tool-call arguments
travel as JSON strings, as OpenAI's clients expect; reasoning goes out as `reasoning_content` (DeepSeek's name).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from fastapi.sse import format_sse_event

from v4cli.engine.grammar import Constraint
from v4cli.engine.sampling import SamplingParams
from quant.errors import BadInput, V4Error
from v4cli.prompt.encoding import Assistant, Message, Mode, System, ToolCall, ToolResult, User
from v4cli.prompt.parser import ContentDelta, ReasoningDelta, ToolCallEvent
from v4cli.serve.http import APIError, Server, api_error, log, openai_error, read_json
from v4cli.serve.core import EFFORT_MODES, ChatRequest, Result, TokenLogprobs
from v4cli.serve.sse import COMMENT_PING, event_stream, frame, with_pings

DEFAULT_EFFORT = "high"
MAX_TOP_LOGPROBS = 20


# ---------------------------------------------------------------------------------------------- request → ChatRequest


def _text(content: Any, where: str) -> str:
    """Message content as text: a string, null, or a list of text parts (joined as the client split them)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for i, part in enumerate(content):
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, Mapping) and isinstance(part.get("text"), str) \
                    and part.get("type", "text") in ("text", "input_text", "output_text"):
                out.append(part["text"])
            elif isinstance(part, Mapping) and part.get("type") in ("image_url", "input_image", "input_audio",
                                                                       "file", "image"):
                raise APIError(400, f"{where}[{i}]: {part['type']} parts are not supported (the model reads text)",
                               param=where)
            else:
                raise APIError(400, f"{where}[{i}] is not a text part", param=where)
        return "".join(out)
    raise APIError(400, f"{where} must be a string or a list of text parts", param=where)


def arguments(raw: Any, where: str) -> dict[str, Any]:
    """A tool call's `arguments`: a JSON string of an object (an object itself is accepted too)."""
    if raw is None or raw == "":
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise APIError(400, f"{where} is not valid JSON: {e}", param=where) from None
    if not isinstance(raw, dict):
        raise APIError(400, f"{where} must encode a JSON object", param=where)
    return raw


def _tool_calls(calls: Any, where: str) -> tuple[ToolCall, ...]:
    if not calls:
        return ()
    if not isinstance(calls, list):
        raise APIError(400, f"{where} must be a list", param=where)
    out = []
    for i, c in enumerate(calls):
        at = f"{where}[{i}]"
        fn = c.get("function") if isinstance(c, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise APIError(400, f"{at} needs function.name", param=at)
        out.append(ToolCall(fn["name"], arguments(fn.get("arguments"), f"{at}.function.arguments"), c.get("id")))
    return tuple(out)


def to_messages(raw: Any) -> list[Message]:
    """OpenAI messages → typed messages. Leading system/developer messages become one system prompt."""
    if not isinstance(raw, list) or not raw:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    out: list[Message] = []
    for i, m in enumerate(raw):
        at = f"messages[{i}]"
        if not isinstance(m, Mapping):
            raise APIError(400, f"{at} must be an object", param=at)
        role, content = m.get("role"), m.get("content")
        if role in ("system", "developer"):
            text = _text(content, f"{at}.content")
            if out and isinstance(out[-1], System):
                out[-1] = System(out[-1].content + "\n\n" + text)
            else:
                out.append(System(text))
        elif role == "user":
            out.append(User(_text(content, f"{at}.content")))
        elif role == "assistant":
            reasoning = m.get("reasoning_content", m.get("reasoning"))
            if reasoning is not None and not isinstance(reasoning, str):
                raise APIError(400, f"{at}.reasoning_content must be a string", param=at)
            out.append(Assistant(_text(content, f"{at}.content"), reasoning or None,
                                 _tool_calls(m.get("tool_calls"), f"{at}.tool_calls")))
        elif role in ("tool", "function"):
            call_id = m.get("tool_call_id")
            out.append(ToolResult(_text(content, f"{at}.content"), call_id if isinstance(call_id, str) else None))
        else:
            raise APIError(400, f"{at}.role must be system, developer, user, assistant or tool, not {role!r}",
                           param=at)
    return out


def to_tools(raw: Any) -> list[dict[str, Any]]:
    """Function tools as {name, description, parameters}; tools of other types are ignored (we run none)."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise APIError(400, "tools must be a list", param="tools")
    out = []
    for i, t in enumerate(raw):
        if not isinstance(t, Mapping) or t.get("type", "function") != "function":
            continue
        fn = t.get("function", t)
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise APIError(400, f"tools[{i}] needs function.name", param=f"tools[{i}]")
        out.append({k: fn[k] for k in ("name", "description", "parameters") if fn.get(k) is not None})
    return out


def to_constraint(body: Mapping[str, Any], tools: list[dict[str, Any]]) -> Constraint | None:
    """tool_choice required/named → a tool constraint; response_format json_schema/json_object → JSON."""
    choice = body.get("tool_choice")
    names = {t["name"] for t in tools}
    if isinstance(choice, Mapping):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, Mapping) else choice.get("name")
        if not isinstance(name, str) or name not in names:
            raise APIError(400, f"tool_choice names {name!r}, which is not among the request's function tools",
                           param="tool_choice")
        return Constraint("tool", name=name)
    if choice == "required":
        if not tools:
            raise APIError(400, "tool_choice is 'required' but the request has no function tools",
                           param="tool_choice")
        return Constraint("required")
    if choice not in (None, "auto", "none"):
        raise APIError(400, f"tool_choice must be auto, none, required or a function, not {choice!r}",
                       param="tool_choice")
    fmt = body.get("response_format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, Mapping) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("json")
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        if schema is not None and not isinstance(schema, Mapping):
            raise APIError(400, "response_format.json_schema.schema must be an object", param="response_format")
        return Constraint("json", schema=schema)
    raise APIError(400, "response_format.type must be text, json_object or json_schema", param="response_format")


def _number(body: Mapping[str, Any], key: str, kind: type, default: Any) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) \
            or (kind is float and not math.isfinite(value)) or (kind is int and abs(value) >= 1 << 63):
        raise APIError(400, f"{key} must be {'a finite number' if kind is float else 'a 64-bit integer'}",
                       param=key)
    return kind(value)


def to_request(body: Mapping[str, Any], default_model: str) -> ChatRequest:
    """A Chat Completions body → ChatRequest (APIError 400 naming the field that is wrong)."""
    messages = to_messages(body.get("messages"))
    tools = to_tools(body.get("tools"))
    # vLLM/SGLang clients put the switches in chat_template_kwargs; DeepSeek's API has thinking: {type: disabled}
    template = body.get("chat_template_kwargs") if isinstance(body.get("chat_template_kwargs"), Mapping) else {}
    effort = body.get("reasoning_effort") or template.get("reasoning_effort") or DEFAULT_EFFORT
    if effort not in EFFORT_MODES:
        raise APIError(400, f"reasoning_effort must be one of {', '.join(EFFORT_MODES)}, not {effort!r}",
                       param="reasoning_effort")
    mode = EFFORT_MODES[effort]
    thinking = body.get("thinking")
    if (isinstance(thinking, Mapping) and thinking.get("type") == "disabled") or template.get("thinking") is False:
        mode = Mode.NON_THINK
    if _number(body, "n", int, 1) != 1:
        raise APIError(400, "n must be 1: one choice per request", param="n")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop)):
        raise APIError(400, "stop must be a string or a list of strings", param="stop")
    max_tokens = _number(body, "max_completion_tokens", int, None) or _number(body, "max_tokens", int, None)
    if max_tokens is not None and max_tokens < 1:
        raise APIError(400, "max_tokens must be at least 1", param="max_tokens")
    logprobs = None
    if body.get("logprobs"):
        logprobs = _number(body, "top_logprobs", int, 0)
        if not 0 <= logprobs <= MAX_TOP_LOGPROBS:
            raise APIError(400, f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}", param="top_logprobs")
    try:
        sampling = SamplingParams(
            temperature=_number(body, "temperature", float, SamplingParams.temperature),
            top_p=_number(body, "top_p", float, SamplingParams.top_p),
            seed=_number(body, "seed", int, None),
            max_tokens=max_tokens if max_tokens is not None else 1 << 62,  # the runner fits it to the context
            stop=tuple(stop or ()),
        )
    except BadInput as e:
        raise APIError(400, str(e).replace("--", "")) from None
    model = body.get("model") or default_model
    if not isinstance(model, str):
        raise APIError(400, "model must be a string", param="model")
    return ChatRequest(model=model, messages=messages, mode=mode, sampling=sampling, tools=tools,
                       constraint=to_constraint(body, tools), logprobs=logprobs, stream=bool(body.get("stream")))


# ---------------------------------------------------------------------------------------------- events → response


def _call(ev: ToolCallEvent) -> dict[str, Any]:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": ev.name, "arguments": json.dumps(ev.arguments, ensure_ascii=False)}}


def _logprob(lp: TokenLogprobs) -> dict[str, Any]:
    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, p) for t, p in lp.top]}


def usage(result: Result) -> dict[str, Any]:
    u = result.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


class _Completion:
    """The ids and timestamps one completion's chunks share."""

    def __init__(self, model: str):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def chunk(self, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> bytes:
        body = {**self.head("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
        return frame(None, body)


async def _stream(server: Server, job, request: Request, include_usage: bool) -> AsyncIterator[bytes]:
    c = _Completion(server.runner.model_name)
    yield c.chunk({"role": "assistant", "content": ""})
    calls = 0
    try:
        async for ev in with_pings(server.runner.events(job, request.is_disconnected)):
            if ev is None:  # queued or prefilling: a comment keeps idle-timeout clients and proxies waiting
                yield COMMENT_PING
            elif isinstance(ev, ReasoningDelta):
                yield c.chunk({"reasoning_content": ev.text})
            elif isinstance(ev, ContentDelta):
                yield c.chunk({"content": ev.text})
            elif isinstance(ev, ToolCallEvent):
                yield c.chunk({"tool_calls": [{"index": calls, **_call(ev)}]})
                calls += 1
            elif isinstance(ev, TokenLogprobs):
                yield c.chunk({}, logprobs={"content": [_logprob(ev)]})
            elif isinstance(ev, Result):
                if ev.finish_reason == "cancelled":  # the client is gone, or the server is going
                    yield frame(None, openai_error(_stopped(server)))
                    return
                yield c.chunk({}, ev.finish_reason)
                if include_usage:
                    yield frame(None, {**c.head("chat.completion.chunk"), "choices": [], "usage": usage(ev)})
    except Exception as e:  # the status line is sent: the error goes out as the stream's last event
        if not isinstance(e, (APIError, V4Error)):
            log.exception("internal error in a chat completion stream")
        yield frame(None, openai_error(api_error(e)))
    # the stream ends properly even after an error: a cut connection reads as a network failure to the client
    yield format_sse_event(data_str="[DONE]")


async def _complete(server: Server, job, request: Request) -> dict[str, Any]:
    content, reasoning, calls, logprobs = [], [], [], []
    result: Result | None = None
    async for ev in server.runner.events(job, request.is_disconnected):
        if isinstance(ev, ReasoningDelta):
            reasoning.append(ev.text)
        elif isinstance(ev, ContentDelta):
            content.append(ev.text)
        elif isinstance(ev, ToolCallEvent):
            calls.append(_call(ev))
        elif isinstance(ev, TokenLogprobs):
            logprobs.append(_logprob(ev))
        elif isinstance(ev, Result):
            result = ev
    if result.finish_reason == "cancelled":
        raise _stopped(server)
    message: dict[str, Any] = {"role": "assistant", "content": "".join(content) or (None if calls else "")}
    if job.req.mode.thinking:
        message["reasoning_content"] = "".join(reasoning)
    if calls:
        message["tool_calls"] = calls
    c = _Completion(server.runner.model_name)
    return {**c.head("chat.completion"),
            "choices": [{"index": 0, "message": message, "finish_reason": result.finish_reason,
                         "logprobs": {"content": logprobs} if job.req.logprobs is not None else None}],
            "usage": usage(result)}


def _stopped(server: Server) -> APIError:
    why = "the server is shutting down" if server.runner.closing else "the client went away"
    return APIError(503, f"the answer was stopped: {why}", "overloaded_error")


def router(server: Server) -> APIRouter:
    r = APIRouter()

    @r.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request)
        req = to_request(body, server.runner.model_name)
        # a bad or oversized request fails here, before any byte is sent; tokenizing a long prompt takes a while,
        # so off the event loop (other streams keep flowing)
        job = await run_in_threadpool(server.runner.prepare, req)
        if req.stream:
            opts = body.get("stream_options")
            include_usage = isinstance(opts, Mapping) and bool(opts.get("include_usage"))
            server.runner.admit()  # a full queue is a 503 the SDKs retry, not an error inside a 200 stream
            return event_stream(_stream(server, job, request, include_usage))
        return JSONResponse(await _complete(server, job, request))

    @r.post("/tokenize")
    async def tokenize(request: Request):
        """The prompt ids a Chat Completions body would be fed as (vLLM's /tokenize shape): for checking a client's
        prompt, and the tests' proof that the wire format renders what our encoder renders."""
        req = to_request(await read_json(request), server.runner.model_name)
        server.runner.check_model(req.model)
        ids = await run_in_threadpool(server.runner.prompt_ids, req)
        return {"count": len(ids), "max_model_len": server.runner.ctx, "tokens": ids}

    return r
