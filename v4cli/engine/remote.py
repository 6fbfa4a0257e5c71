"""A V4 model behind an OpenAI-compatible server, for `v4 chat --remote` and `v4 ask --remote`.

`Remote` is the connection (base URL, model, context length, which server it is); `RemoteSession` plugs in where a
local `Session` runs a turn: `generate` yields the same `TokenRecord`/`DoneRecord` stream, its text rebuilt in V4's
own output format (`{reasoning}</think>{content}{DSML}`) from the server's `reasoning_content`, `content` and
`tool_calls` deltas, so `run_turn`, the `StreamParser`, the renderer, `/commands` and `--json` are the local ones.

The prompt is sent as typed messages (the server renders them with its own V4 encoder); the ids the local path built
from the same messages are used only to count tokens for the context budget before a request goes out.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from v4cli.engine.records import DoneRecord, Memory, Timings, TokenRecord
from v4cli.engine.sampling import SamplingParams
from quant.errors import BadInput, RemoteError
from v4cli.prompt.encoding import (
    THINK_END,
    Assistant,
    Message,
    Mode,
    System,
    ToolCall,
    ToolResult,
    User,
    render_tool_calls,
)

# --api-key's variable (read by the CLI). Only our own: OPENAI_API_KEY is not read, so a key meant for OpenAI is
# never sent to another host.
API_KEY_ENV = "V4_API_KEY"
# a server without auth ignores the header; the SDK insists on some key
NO_KEY = "none"
# the model's max_position_embeddings: the budget when the server does not say its context length
DEFAULT_CTX = 1_048_576
# /v1/models fields that carry the context length: vLLM and SGLang `max_model_len`; others use these names
CTX_FIELDS = ("max_model_len", "context_length", "context_window", "max_context_length", "n_ctx")
CONNECT_TIMEOUT_S = 10.0
# a 1M-token prefill on a busy cluster can take minutes before the first delta
READ_TIMEOUT_S = 3600.0

# How each server family takes the thinking mode (DeepSeek's API: docs "Thinking Mode"; vLLM's recipe for V4 keeps
# it in chat_template_kwargs; SGLang reads the same template kwargs). Anything else gets OpenAI's reasoning_effort,
# which `v4 serve` maps back to the mode (v4cli.serve.core.EFFORT_MODES).
EFFORTS = {Mode.NON_THINK: "none", Mode.HIGH: "high", Mode.MAX: "max"}
TEMPLATE_SERVERS = ("vllm", "sglang")


def thinking_fields(dialect: str, mode: Mode) -> dict[str, Any]:
    """The request fields that select `mode` on a server of this family."""
    mode = Mode(mode)
    if dialect in TEMPLATE_SERVERS:
        kwargs: dict[str, Any] = {"thinking": mode.thinking}
        if mode.thinking:
            kwargs["reasoning_effort"] = EFFORTS[mode]
        return {"chat_template_kwargs": kwargs}
    if dialect == "deepseek":
        if not mode.thinking:
            return {"thinking": {"type": "disabled"}}
        return {"thinking": {"type": "enabled"}, "reasoning_effort": EFFORTS[mode]}
    return {"reasoning_effort": EFFORTS[mode]}


def base_url(url: str) -> str:
    """The API root for `url`, with or without its /v1: http://host:8000 → http://host:8000/v1."""
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise BadInput(f"--remote {url!r} is not an http(s) URL", hint="e.g. --remote http://gpu-box:8000")
    return url if parts.path.endswith("/v1") else url + "/v1"


def to_openai(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Typed messages as OpenAI chat messages: assistant turns keep their reasoning (`reasoning_content`) and tool
    calls (JSON `arguments`), tool results become `tool` messages."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if isinstance(m, System):
            out.append({"role": "system", "content": m.content})
        elif isinstance(m, User):
            out.append({"role": "user", "content": m.content})
        elif isinstance(m, ToolResult):
            out.append({"role": "tool", "content": m.content, "tool_call_id": m.call_id or f"call_{i}"})
        elif isinstance(m, Assistant):
            msg: dict[str, Any] = {"role": "assistant", "content": m.content}
            if m.reasoning is not None:
                msg["reasoning_content"] = m.reasoning
            if m.tool_calls:
                msg["tool_calls"] = [{"id": c.id or f"call_{i}_{j}", "type": "function",
                                      "function": {"name": c.name,
                                                   "arguments": json.dumps(dict(c.arguments), ensure_ascii=False)}}
                                     for j, c in enumerate(m.tool_calls)]
            out.append(msg)
    return out


def _one_line(text: str, most: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= most else text[: most - 1] + "…"


def remote_error(e: Exception, url: str, keyed: bool) -> RemoteError:
    """One line for what the SDK raised: unreachable, key refused, or the server's own message."""
    import openai

    if isinstance(e, openai.APITimeoutError):
        return RemoteError(f"the remote at {url} did not answer in time", hint="check the server, or try again")
    if isinstance(e, openai.APIConnectionError):
        cause = e.__cause__ or e
        return RemoteError(f"cannot reach the remote at {url}: {_one_line(cause)}",
                           hint="is the server running there? `v4 serve` starts one; check the --remote URL")
    if isinstance(e, (openai.AuthenticationError, openai.PermissionDeniedError)):
        what = "rejected the API key" if keyed else "wants an API key"
        return RemoteError(f"the remote at {url} {what} (HTTP {e.status_code})",
                           hint=f"pass --api-key KEY or set ${API_KEY_ENV}")
    if isinstance(e, openai.APIStatusError):
        body = e.body if isinstance(e.body, Mapping) else {}
        err = body.get("error", body)
        detail = err.get("message") if isinstance(err, Mapping) else None
        return RemoteError(f"the remote at {url} answered HTTP {e.status_code}: {_one_line(detail or e.message)}")
    return RemoteError(f"the remote at {url} failed: {_one_line(e)}")


@dataclass
class Remote:
    """A connected OpenAI-compatible server: which model to ask, its context length and its family."""

    url: str
    model: str
    ctx: int
    dialect: str  # "vllm", "sglang", "deepseek" or "openai" (anything else, `v4 serve` included)
    client: Any
    keyed: bool

    @classmethod
    def connect(cls, url: str, model: str | None = None, api_key: str | None = None,
                ctx: int | None = None) -> Remote:
        """Ask the server which models it serves (this also checks that it is up and takes the key); pick `model`
        (default: the first listed) and the context length: the server's, capped by `ctx`, else `ctx`, else 1M."""
        import openai

        root = base_url(url)
        key = api_key or None
        client = openai.OpenAI(base_url=root, api_key=key or NO_KEY, max_retries=0,
                               timeout=openai.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S))
        try:
            listed = list(client.models.list())
        except openai.OpenAIError as e:
            raise remote_error(e, root, key is not None) from None
        names = [m.id for m in listed]
        if model is None:
            if not listed:
                raise RemoteError(f"the remote at {root} lists no models", hint="name one with --remote-model")
            entry = listed[0]
        else:
            entry = next((m for m in listed if m.id == model), None)
            if entry is None and listed:
                raise BadInput(f"the remote at {root} serves no model {model!r}; it serves: {', '.join(names)}",
                               hint="--remote-model NAME")
        fields = dict(getattr(entry, "model_extra", None) or {}) if entry is not None else {}
        reported = next((int(fields[k]) for k in CTX_FIELDS if isinstance(fields.get(k), int) and fields[k] > 0),
                        None)
        owner = str(getattr(entry, "owned_by", "") or "").lower()
        host = urlsplit(root).hostname or ""
        dialect = ("deepseek" if owner == "deepseek" or host.endswith("deepseek.com")
                   else owner if owner in TEMPLATE_SERVERS else "openai")
        n_ctx = min(x for x in (reported, ctx) if x) if reported or ctx else DEFAULT_CTX
        return cls(root, model if model is not None else entry.id, n_ctx, dialect, client, key is not None)

    def request(self, messages: Sequence[Message], mode: Mode, sampling: SamplingParams) -> dict[str, Any]:
        """The chat-completions body (as SDK keyword arguments) for one streamed answer."""
        body: dict[str, Any] = {
            "model": self.model, "messages": to_openai(messages), "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": sampling.temperature, "top_p": sampling.top_p, "max_tokens": sampling.max_tokens,
        }
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        extra = thinking_fields(self.dialect, mode)
        if "reasoning_effort" in extra:
            body["reasoning_effort"] = extra.pop("reasoning_effort")
        # not OpenAI's, but vLLM and SGLang take them; sent only when set, so stricter servers never see them
        if sampling.top_k:
            extra["top_k"] = sampling.top_k
        if sampling.min_p:
            extra["min_p"] = sampling.min_p
        if extra:
            body["extra_body"] = extra
        return body

    def stream(self, messages: Sequence[Message], mode: Mode, sampling: SamplingParams) -> Any:
        """Open the SSE stream of one answer (RemoteError if the server refuses it)."""
        import openai

        try:
            return self.client.chat.completions.create(**self.request(messages, mode, sampling))
        except openai.OpenAIError as e:
            raise remote_error(e, self.url, self.keyed) from None


# the server's finish reason in run_turn's words: the model ending its turn (with or without calls) is "eos"
FINISH = {"stop": "eos", "tool_calls": "eos", "length": "length"}


def _cached(usage: Any) -> int:
    details = getattr(usage, "prompt_tokens_details", None)
    cached = getattr(details, "cached_tokens", None) if details is not None else None
    if cached is None:  # DeepSeek's API reports its context cache this way
        cached = (getattr(usage, "model_extra", None) or {}).get("prompt_cache_hit_tokens")
    return int(cached or 0)


def _tool_call(parts: dict[str, str]) -> ToolCall:
    try:
        args = json.loads(parts["arguments"] or "{}")
    except json.JSONDecodeError:
        args = None
    # DSML takes named parameters; arguments that are not a JSON object are kept whole under one name
    if not isinstance(args, dict):
        args = {"arguments": parts["arguments"]}
    return ToolCall(parts["name"], args, parts["id"] or None)


class RemoteSession:
    """What `run_turn` drives in place of a local `Session` when the model runs on a remote server.

    `conversation()` returns the messages and mode of the turn to answer (the prompt ids run_turn passes are the
    local count of the same messages). After a turn, `reused` is the server's cached prompt tokens and `tokens`
    stands for the context the server holds (prompt + answer), for the status line."""

    def __init__(self, remote: Remote, conversation: Callable[[], tuple[Sequence[Message], Mode]]):
        self.remote, self.conversation = remote, conversation
        self.reused = 0
        self._held = 0

    @property
    def tokens(self) -> range:
        return range(self._held)

    def generate(self, prompt: Sequence[int], sampling: SamplingParams = SamplingParams(), marks: Sequence[int] = (),
                 progress: Callable[[int, int], None] | None = None) -> Iterator[TokenRecord | DoneRecord]:
        """Stream one answer as records; closing the generator (Ctrl-C, a latch) closes the HTTP stream, which
        the server takes as a cancel."""
        import openai

        messages, mode = self.conversation()
        self.reused = 0
        t0 = time.perf_counter()
        t_first = None
        thinking = Mode(mode).thinking  # still inside the reasoning
        emitted, finish, usage = 0, None, None
        calls: dict[int, dict[str, str]] = {}
        stream = self.remote.stream(messages, mode, sampling)
        try:
            for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices[:1]:
                    delta, text = choice.delta, ""
                    if delta is not None:
                        # vLLM's newer releases name the field `reasoning`
                        reasoning = getattr(delta, "reasoning_content", None) or getattr(delta, "reasoning", None)
                        if reasoning and thinking:
                            text += reasoning
                        for tc in delta.tool_calls or ():
                            c = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                            c["id"] = tc.id or c["id"]
                            if tc.function is not None:
                                c["name"] += tc.function.name or ""
                                c["arguments"] += tc.function.arguments or ""
                        if delta.content or (calls and thinking):
                            if thinking:  # the answer starts: close the reasoning as the model would
                                text, thinking = text + THINK_END, False
                            text += delta.content or ""
                    if choice.finish_reason:
                        finish = choice.finish_reason
                    if text:
                        if t_first is None:
                            t_first = time.perf_counter()
                        emitted += 1
                        yield TokenRecord(-1, text)
        except openai.OpenAIError as e:
            raise remote_error(e, self.remote.url, self.remote.keyed) from None
        finally:
            stream.close()
        if calls:
            emitted += 1
            yield TokenRecord(-1, render_tool_calls([_tool_call(calls[i]) for i in sorted(calls)]))
        reason = FINISH.get(finish or "", finish or "eos")
        n_prompt = usage.prompt_tokens if usage is not None else len(prompt)
        n_done = usage.completion_tokens if usage is not None else emitted
        self.reused = _cached(usage) if usage is not None else 0
        self._held = n_prompt + n_done
        # run_turn counts one record per token (and one more for EOS); a chunk may carry several tokens
        for _ in range(n_done - emitted - (reason == "eos")):
            yield TokenRecord(-1, "")
        now = time.perf_counter()
        first = t_first or now
        yield DoneRecord(reason, "", Timings(prompt_tokens=n_prompt, prefill_s=first - t0, ttft_s=first - t0,
                                             decode_tokens=max(n_done - 1, 0), decode_s=now - first),
                         Memory(0, 0))
