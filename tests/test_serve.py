"""`v4 serve` end to end: a real server process on the tiny model, driven over loopback by the official `openai` SDK.

The tiny model's weights are random, so answers are checked against the same model run in this process (greedy,
seeded), never against expected words. The request → prompt path is checked on token ids: the server's /tokenize
and usage against our encoder's ids for the same typed messages.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import openai
import pytest
from serve_util import serve_fixture, served

from v4cli.chat.answer import Reply, load_engine, open_session, run_turn
from v4cli.chat.conversation import PromptEncoder
from v4cli.engine.sampling import SamplingParams
from v4cli.prompt.encoding import DSML, Assistant, Mode, System, ToolCall, ToolResult, User, render
from v4cli.serve import openai_chat

CTX = 4096
served_tiny = serve_fixture("--ctx", str(CTX), "--max-body", "256K", "--max-tokens", "3000", "--alias", "deepseek-v4")

TOOLS = [{"type": "function", "function": {"name": "read_file", "description": "Read a file.",
                                           "parameters": {"type": "object",
                                                          "properties": {"path": {"type": "string"}},
                                                          "required": ["path"]}}},
         {"type": "web_search_preview"}]  # a tool type we do not run: ignored, not rejected
# an agent's second request: system + developer, text parts, an assistant tool call with reasoning, its result
AGENT_MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
    {"role": "user", "content": [{"type": "text", "text": "What is in "}, {"type": "text", "text": "a.py?"}]},
    {"role": "assistant", "content": None, "reasoning_content": "I should read it.",
     "tool_calls": [{"id": "call_1", "type": "function",
                     "function": {"name": "read_file", "arguments": "{\"path\": \"a.py\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "print(1)"},
]
AGENT_TYPED = [
    System("You are terse.\n\nUse tools."),
    User("What is in a.py?"),
    Assistant("", "I should read it.", (ToolCall("read_file", {"path": "a.py"}, "call_1"),)),
    ToolResult("print(1)", "call_1"),
]
AGENT_SCHEMAS = [TOOLS[0]["function"]]


@pytest.fixture(scope="module")
def client(served_tiny):
    return openai.OpenAI(base_url=served_tiny.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local(tiny_gguf, one_thread):
    """The same GGUF in this process: the answers the server must reproduce."""
    eng = load_engine(tiny_gguf("q8"), threads=1)
    encoder = PromptEncoder(eng.tokenizer)

    def answer(messages, mode: Mode, sampling: SamplingParams) -> Reply:
        reply = Reply(mode)
        run_turn(open_session(eng, 64, "0"), encoder.encode(render(messages, mode)), sampling, reply)
        return reply

    answer.encoder, answer.tokenizer = encoder, eng.tokenizer
    return answer


def _stream_text(client, **kw) -> tuple[str, str, str | None, object]:
    """(content, reasoning, finish_reason, usage) of a streamed completion."""
    content, reasoning, finish, usage = [], [], None, None
    for ch in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            content.append(c.delta.content or "")
            reasoning.append(getattr(c.delta, "reasoning_content", None) or "")
            finish = c.finish_reason or finish
    return "".join(content), "".join(reasoning), finish, usage


# ---------------------------------------------------------------------------------------------- answers


def test_stream_and_non_stream_equal_the_local_engine(client, local):
    ask = dict(model="tiny-q8.gguf", messages=[{"role": "user", "content": "Say hi."}], max_tokens=6,
               temperature=0, seed=3)
    want = local([User("Say hi.")], Mode.NON_THINK, SamplingParams(temperature=0, max_tokens=6))
    r = client.chat.completions.create(reasoning_effort="none", **ask)
    msg = r.choices[0].message
    assert msg.content == want.answer and want.answer
    assert getattr(msg, "reasoning_content", None) is None  # non-think: no reasoning field at all
    assert r.choices[0].finish_reason == {"eos": "stop", "length": "length"}[want.finish_reason]
    assert r.usage.prompt_tokens == want.prompt_tokens and r.usage.completion_tokens == want.completion_tokens
    content, reasoning, finish, usage = _stream_text(client, reasoning_effort="none", **ask)
    assert (content, reasoning, finish) == (want.answer, "", r.choices[0].finish_reason)
    assert usage.prompt_tokens == r.usage.prompt_tokens
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1  # the same prompt, from RAM


def test_thinking_answer_streams_reasoning_content(client, local):
    """Default effort is high: the reasoning arrives as reasoning_content, stream and non-stream alike."""
    want = local([User("Think.")], Mode.HIGH, SamplingParams(temperature=0, max_tokens=5))
    ask = dict(model="tiny-q8", messages=[{"role": "user", "content": "Think."}], max_tokens=5, temperature=0)
    msg = client.chat.completions.create(**ask).choices[0].message
    assert msg.reasoning_content == want.reasoning and want.reasoning
    assert _stream_text(client, **ask)[:2] == (want.answer, want.reasoning)


def test_seeded_sampling_is_reproducible_across_stream_and_not(client):
    ask = dict(model="tiny-q8.gguf", messages=[{"role": "user", "content": "Go."}], max_tokens=8,
               temperature=1.0, top_p=0.9, seed=1234, reasoning_effort="low")
    a = client.chat.completions.create(**ask).choices[0].message.content
    assert _stream_text(client, **ask)[0] == a
    b = client.chat.completions.create(**{**ask, "seed": 4321}).choices[0].message.content
    assert a != b  # the seed is used, not ignored


def test_stop_string_cuts_the_answer(client):
    ask = dict(model="tiny-q8.gguf", messages=[{"role": "user", "content": "Count."}], max_tokens=12,
               temperature=0, reasoning_effort="none")
    full = client.chat.completions.create(**ask).choices[0].message.content
    stop = full[len(full) // 2: len(full) // 2 + 2]
    r = client.chat.completions.create(stop=[stop, "\x00never"], **ask)
    assert r.choices[0].message.content == full[: full.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    assert _stream_text(client, stop=stop, **ask)[0] == full[: full.find(stop)]


def test_logprobs_match_the_sampled_tokens(client):
    r = client.chat.completions.create(model="tiny-q8.gguf", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=4, temperature=0, reasoning_effort="none", logprobs=True,
                                       top_logprobs=3)
    lps = r.choices[0].logprobs.content
    assert len(lps) == r.usage.completion_tokens - (r.choices[0].finish_reason == "stop")
    for lp in lps:
        assert len(lp.top_logprobs) == 3 and lp.logprob <= 0
        # greedy: the sampled token is the most likely one
        assert lp.top_logprobs[0].token == lp.token and lp.top_logprobs[0].logprob == pytest.approx(lp.logprob)
    streamed = [lp for ch in client.chat.completions.create(
        model="tiny-q8.gguf", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0,
        reasoning_effort="none", logprobs=True, top_logprobs=3, stream=True)
        for c in ch.choices if c.logprobs for lp in c.logprobs.content]
    assert [(lp.token, lp.logprob) for lp in streamed] == [(lp.token, lp.logprob) for lp in lps]


def test_max_tokens_is_capped_by_the_server(client):
    r = client.chat.completions.create(model="tiny-q8.gguf", messages=[{"role": "user", "content": "Go on."}],
                                       max_completion_tokens=2, temperature=0, reasoning_effort="none")
    assert r.usage.completion_tokens <= 2


def test_what_real_clients_send_is_tolerated(served_tiny):
    """Fields we do not use, tool types we do not run, tool_choice none, the thinking switches of other servers."""
    body = {"model": "tiny-q8.gguf", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
            "user": "u1", "metadata": {"a": "b"}, "store": False, "parallel_tool_calls": True,
            "frequency_penalty": 0, "presence_penalty": 0, "stream_options": None, "service_tier": "auto",
            "tools": [{"type": "web_search_preview"}, {"type": "custom", "custom": {"name": "x"}}],
            "tool_choice": "none", "chat_template_kwargs": {"thinking": False}}
    status, r = served_tiny.post("/v1/chat/completions", body)
    assert status == 200 and "reasoning_content" not in r["choices"][0]["message"]  # non-think, as asked
    # the prompt is a plain non-think one: no tools block for tools we do not run
    plain = {"messages": body["messages"], "reasoning_effort": "none"}
    want = served_tiny.post("/tokenize", plain)[1]["tokens"]
    assert served_tiny.post("/tokenize", body)[1]["tokens"] == want
    assert served_tiny.post("/tokenize", {**plain, "reasoning_effort": None, "thinking": {"type": "disabled"}}
                            )[1]["tokens"] == want
    assert served_tiny.post("/tokenize", {"messages": body["messages"]})[1]["tokens"] != want  # default: high


def test_response_format_json_schema_is_enforced(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    r = client.chat.completions.create(
        model="tiny-q8.gguf", messages=[{"role": "user", "content": "Answer in JSON."}], max_tokens=30,
        temperature=0, reasoning_effort="none",
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content)["ok"], bool)


# ---------------------------------------------------------------------------------------------- the prompt


def test_agent_request_renders_what_our_encoder_renders(served_tiny, client, local):
    """System + developer + text parts + an assistant tool call + its result → exactly our encoder's ids."""
    body = {"model": "tiny-q8.gguf", "messages": AGENT_MESSAGES, "tools": TOOLS}
    req = openai_chat.to_request(body, "tiny-q8.gguf")
    assert req.messages == AGENT_TYPED and req.tools == AGENT_SCHEMAS and req.mode is Mode.HIGH
    text = render(AGENT_TYPED, Mode.HIGH, AGENT_SCHEMAS)
    # thinking mode with tools keeps the reasoning; the call is canonical DSML; the result a <tool_result>
    assert (f'I should read it.</think>\n\n<{DSML}tool_calls>\n<{DSML}invoke name="read_file">\n'
            f'<{DSML}parameter name="path" string="true">a.py</{DSML}parameter>') in text
    assert text.endswith("<｜User｜><tool_result>print(1)</tool_result><｜Assistant｜><think>")
    want = local.encoder.encode(text)
    status, got = served_tiny.post("/tokenize", body)
    assert status == 200 and got["tokens"] == want and got["max_model_len"] == CTX
    r = client.chat.completions.create(max_tokens=1, temperature=0, **body)
    assert r.usage.prompt_tokens == len(want)


def test_missing_reasoning_content_is_tolerated(served_tiny, client, local):
    """Clients drop reasoning_content: the turn renders with an empty reasoning, and the request is answered."""
    messages = [dict(m) for m in AGENT_MESSAGES]
    del messages[3]["reasoning_content"]
    body = {"model": "tiny-q8.gguf", "messages": messages, "tools": TOOLS}
    _, ids = served_tiny.post("/tokenize", body)
    typed = [*AGENT_TYPED[:2], Assistant("", None, AGENT_TYPED[2].tool_calls), AGENT_TYPED[3]]
    text = render(typed, Mode.HIGH, AGENT_SCHEMAS)
    assert f"<｜Assistant｜><think></think>\n\n<{DSML}tool_calls>" in text
    assert ids["tokens"] == local.encoder.encode(text)
    r = client.chat.completions.create(max_tokens=2, temperature=0, **body)
    assert r.choices[0].finish_reason in ("length", "stop", "tool_calls")


ENUM_TOOL = {"type": "function", "function": {
    "name": "read_file", "description": "Read a file.",
    # an enum ends the argument in a few tokens: a free string on random weights runs to max_tokens
    "parameters": {"type": "object", "properties": {"path": {"type": "string", "enum": ["a.py", "b.py"]}},
                   "required": ["path"]}}}


@pytest.mark.slow
def test_tool_call_round_trip(served_tiny, client, local):
    """tool_choice=named: constrained decoding makes even random weights call the tool. The call comes back as
    OpenAI tool_calls (JSON arguments, a call_ id, finish tool_calls), identically when streamed; sent back with
    its result, the next prompt is our rendering of those typed messages and reuses the first request's work."""
    first = [{"role": "user", "content": "Read a.py."}]
    ask = dict(model="tiny-q8.gguf", tools=[ENUM_TOOL], max_tokens=60, temperature=0, reasoning_effort="none")
    forced = {"type": "function", "function": {"name": "read_file"}}
    r = client.chat.completions.create(messages=first, tool_choice=forced, **ask)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    args = json.loads(call.function.arguments)
    assert call.id.startswith("call_") and call.function.name == "read_file" and args["path"] in ("a.py", "b.py")
    streamed, finish = [], None
    for ch in client.chat.completions.create(messages=first, tool_choice=forced, stream=True, **ask):
        streamed += ch.choices[0].delta.tool_calls or []
        finish = ch.choices[0].finish_reason or finish
    assert finish == "tool_calls" and [(c.function.name, c.function.arguments) for c in streamed] == \
        [("read_file", call.function.arguments)]

    second = [*first, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
              {"role": "tool", "tool_call_id": call.id, "content": "print(1)"}]
    typed = [User("Read a.py."), Assistant("", None, (ToolCall("read_file", args, call.id),)),
             ToolResult("print(1)", call.id)]
    text = render(typed, Mode.NON_THINK, [ENUM_TOOL["function"]])
    assert f'<{DSML}parameter name="path" string="true">{args["path"]}</{DSML}parameter>' in text
    assert text.endswith("<｜User｜><tool_result>print(1)</tool_result><｜Assistant｜></think>")
    status, got = served_tiny.post("/tokenize", {"messages": second, **ask})
    assert status == 200 and local.tokenizer.decode(got["tokens"], skip_special_tokens=False) == text
    r2 = client.chat.completions.create(messages=second, **{**ask, "max_tokens": 1})
    assert r2.usage.prompt_tokens == got["count"]
    assert r2.usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens


# ---------------------------------------------------------------------------------------------- cancellation


def test_disconnect_cancels_and_frees_the_engine(served_tiny, client):
    """A streaming client that goes away mid-answer stops its generation: the next request starts at once."""
    before = served_tiny.get("/health")[1]
    stream = client.chat.completions.create(model="tiny-q8.gguf", messages=[{"role": "user", "content": "Go."}],
                                            max_tokens=3000, temperature=1.0, seed=5, reasoning_effort="none",
                                            stream=True)
    seen = 0
    for _ in stream:
        seen += 1
        if seen == 4:
            break
    assert served_tiny.get("/health")[1]["busy"] is True
    stream.close()  # the client disconnects
    t0 = time.monotonic()
    r = client.chat.completions.create(model="tiny-q8.gguf", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=1, temperature=0, reasoning_effort="none")
    waited = time.monotonic() - t0
    assert r.usage.completion_tokens == 1
    # the worker thread hands the engine back just after its last event has been answered
    _wait_until(lambda: not served_tiny.get("/health")[1]["busy"], 5)
    health = served_tiny.get("/health")[1]
    assert health["cancelled"] == before["cancelled"] + 1 and health["queued"] == 0
    # 3000 tokens would take minutes; a freed engine answers a 1-token request in about one token's time
    assert waited < 15, f"the next request waited {waited:.1f}s"


def _wait_until(check, seconds: float) -> float:
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < seconds, f"not within {seconds}s"
        time.sleep(0.05)
    return time.monotonic() - t0


def test_non_stream_clients_that_leave_are_cancelled(served_tiny, client):
    """A non-streaming client that gives up, while queued or while its answer is generated, costs nothing more:
    the queued one never runs, the running one stops (the server looks for it even while no token arrives)."""
    import urllib.request

    def give_up(seconds: float) -> None:
        body = json.dumps({"model": "tiny-q8.gguf", "messages": [{"role": "user", "content": "Go."}],
                           "max_tokens": 3000, "temperature": 1.0, "reasoning_effort": "none"}).encode()
        req = urllib.request.Request(served_tiny.url + "/v1/chat/completions", data=body,
                                     headers={"content-type": "application/json"})
        with pytest.raises(OSError):  # a read timeout: 3000 tokens take minutes
            urllib.request.urlopen(req, timeout=seconds)

    health = lambda: served_tiny.get("/health")[1]  # noqa: E731
    before = health()["cancelled"]
    running = client.chat.completions.create(model="tiny-q8.gguf", messages=[{"role": "user", "content": "Go."}],
                                             max_tokens=3000, temperature=1.0, reasoning_effort="none", stream=True)
    next(iter(running)), next(iter(running))  # the role chunk, then a token: it holds the engine
    give_up(1.5)  # queued behind it the whole time
    _wait_until(lambda: health()["queued"] == 0, 5)
    running.close()
    _wait_until(lambda: not health()["busy"], 15)
    give_up(3)  # this one runs, then its client leaves
    _wait_until(lambda: not health()["busy"], 15)
    assert health()["cancelled"] == before + 3


def test_requests_queue_one_at_a_time(served_tiny, client):
    """Concurrent requests all get answers; /health saw the queue while they ran."""
    results, seen_queue = [], []
    done = threading.Event()

    def ask(i):
        r = client.chat.completions.create(model="tiny-q8.gguf", messages=[{"role": "user", "content": f"#{i}"}],
                                           max_tokens=6, temperature=0, reasoning_effort="none")
        results.append(r.usage.completion_tokens)

    def watch():
        while not done.is_set():
            seen_queue.append(served_tiny.get("/health")[1]["queued"])
            time.sleep(0.02)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    watcher = threading.Thread(target=watch)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    done.set()
    watcher.join()
    assert len(results) == 4 and all(1 <= n <= 6 for n in results)
    assert max(seen_queue) >= 1


# ---------------------------------------------------------------------------------------------- bad requests


def test_bad_requests_get_openai_errors(served_tiny, client):
    status, body = served_tiny.post("/v1/chat/completions", b'{"model": "tiny-q8.gguf", "messages": [')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    assert body["error"]["type"] == "invalid_request_error" and set(body["error"]) == {"message", "type", "param",
                                                                                        "code"}
    assert served_tiny.get("/v1/nothing") == (404, {"error": {"message": "no such endpoint: GET /v1/nothing",
                                                              "type": "invalid_request_error", "param": None,
                                                              "code": None}})
    assert served_tiny.get("/v1/chat/completions")[0] == 405
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found" and "tiny-q8.gguf" in e.value.body["message"]
    for bad, word in [({"messages": []}, "messages"),
                      ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
                      ({"messages": [{"role": "user", "content": "x"}], "reasoning_effort": "ultra"}, "effort"),
                      ({"messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "function",
                                                                                        "function": {"name": "nope"}}},
                       "tool_choice"),
                      ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
                      ({"messages": [{"role": "user", "content": "x"}], "seed": 1 << 70}, "seed"),
                      ({"messages": [{"role": "user", "content": "x"}], "temperature": float("nan")}, "finite"),
                      ({"messages": [{"role": "user", "content": "a\ud800b"}]}, "lone surrogate"),
                      ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
                       "not supported")]:
        status, body = served_tiny.post("/v1/chat/completions", {"model": "tiny-q8.gguf", **bad})
        assert status == 400 and word in body["error"]["message"], body


def test_over_the_context_is_a_400_naming_the_numbers(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-q8.gguf",
                                       messages=[{"role": "user", "content": "hello world " * 3000}])
    msg = e.value.body["message"]
    assert "the context is 4,096" in msg and "tokens" in msg


def test_oversize_body_is_a_413(served_tiny, client):
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="tiny-q8.gguf", messages=[{"role": "user", "content": "x" * 300_000}])
    assert e.value.status_code == 413 and "256,000 bytes" in e.value.body["message"]
    # a chunked body declares no length: it is counted as it arrives
    import http.client
    from urllib.parse import urlsplit

    url = urlsplit(served_tiny.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        conn.request("POST", "/v1/chat/completions", body=iter([b'{"messages": "'] + [b"x" * 65536] * 5),
                     headers={"content-type": "application/json"}, encode_chunked=True)
        r = conn.getresponse()
        assert r.status == 413 and json.loads(r.read())["error"]["message"].startswith("the request body is over")
    finally:
        conn.close()


def test_models_and_health(served_tiny, client):
    assert [m.id for m in client.models.list()] == ["tiny-q8.gguf"]
    _, models = served_tiny.get("/v1/models")
    assert models["models"][0]["name"] == "tiny-q8.gguf" and models["data"][0]["context_length"] == CTX
    status, health = served_tiny.get("/health")
    assert status == 200 and health["model"] == "tiny-q8.gguf" and "one request at a time" in health["scheduling"]
    # the names a request may use: the file name, its stem, an --alias
    for name in ("tiny-q8.gguf", "tiny-q8", "deepseek-v4"):
        r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
        assert r.model == "tiny-q8.gguf"


# ---------------------------------------------------------------------------------------------- security


def test_api_key_is_required_when_set(tiny_gguf, tmp_path):
    """(This server also has --max-queue 0: a request that would wait is refused at once with 503.)"""
    with served(tiny_gguf("q8"), "--api-key", "s3cret", "--max-queue", "0", home=tmp_path) as srv:
        hi = {"model": "tiny-q8.gguf", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        status, body = srv.post("/v1/chat/completions", hi)
        assert status == 401 and body["error"]["type"] == "authentication_error"
        assert srv.post("/v1/chat/completions", hi, {"authorization": "Bearer wrong"})[0] == 401
        assert srv.post("/v1/chat/completions", hi, {"authorization": "Bearer s3cret"})[0] == 200
        assert srv.post("/v1/chat/completions", hi, {"x-api-key": "s3cret"})[0] == 200
        # the Anthropic path answers in the Anthropic shape
        status, body = srv.post("/v1/messages", hi)
        assert status == 401 and body["type"] == "error" and body["error"]["type"] == "authentication_error"
        assert srv.get("/health")[0] == 200  # open: load balancers probe it without a key
        key = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert key.models.list().data[0].id == "tiny-q8.gguf"
        running = key.chat.completions.create(**{**hi, "max_tokens": 3000, "reasoning_effort": "none"}, stream=True)
        next(iter(running)), next(iter(running))  # it holds the engine
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as e:
                key.chat.completions.create(**hi, stream=stream)
            assert e.value.status_code == 503 and "--max-queue 0" in e.value.message
            assert e.value.response.headers["retry-after"] == "1" and "one request at a time" in e.value.message
        running.close()


def test_open_host_without_a_key_is_refused(tiny_gguf, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "v4cli", "serve", "-m", str(tiny_gguf("q8")), "--host", "0.0.0.0"],
                          capture_output=True, text=True, timeout=120, env={**_env(tmp_path)})
    assert proc.returncode == 2
    assert "no --api-key" in proc.stderr and "--no-auth" in proc.stderr
    assert "serving" not in proc.stderr  # refused before loading or listening


def _env(tmp_path):
    import os

    env = dict(os.environ, V4_HOME=str(tmp_path))
    env.pop("V4_API_KEY", None)
    return env


def test_stream_chunks_are_sse_data_lines(served_tiny):
    """The wire format itself: `data: {json}` events and a final `data: [DONE]`."""
    import urllib.request

    body = json.dumps({"model": "tiny-q8.gguf", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                       "stream": True, "reasoning_effort": "none"}).encode()
    req = urllib.request.Request(served_tiny.url + "/v1/chat/completions", data=body,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.read().decode().split("\n\n") if line.strip()]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1] if e.startswith("data: ")]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")


@pytest.mark.slow
@pytest.mark.llama
def test_llama_engine_serves_too(tiny_gguf, tmp_path):
    """`--engine llama`: same answers stream and non-stream, a diverging prompt restores the snapshot of the
    shared prefix (llama.cpp's sequence state), and a cancelled stream frees it."""
    pytest.importorskip("llama_cpp")
    with served(tiny_gguf("f32", "tiny-128"), "--engine", "llama", "--ctx", "4096", home=tmp_path) as srv:
        llama = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)
        ask = dict(model="tiny-128-f32.gguf", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                   temperature=0, reasoning_effort="none")
        r = llama.chat.completions.create(**ask)
        assert r.choices[0].message.content and _stream_text(llama, **ask)[0] == r.choices[0].message.content
        thinking = llama.chat.completions.create(**{**ask, "reasoning_effort": "high"})  # a diverging prompt
        assert thinking.choices[0].message.reasoning_content
        stream = llama.chat.completions.create(**{**ask, "max_tokens": 3000, "temperature": 1.0}, stream=True)
        next(iter(stream)), next(iter(stream))
        stream.close()
        t0 = time.monotonic()
        assert llama.chat.completions.create(**{**ask, "max_tokens": 1}).usage.completion_tokens == 1
        assert time.monotonic() - t0 < 15 and srv.get("/health")[1]["cancelled"] == 1


def test_ctrl_c_stops_the_answer_and_refuses_the_queue(tiny_gguf, tmp_path):
    """Shutdown does not wait for a long answer to finish: it is stopped (an error event ends its stream), the
    requests queued behind it get 503, and the process exits promptly and cleanly."""
    import signal
    import urllib.error
    import urllib.request

    with served(tiny_gguf("q8"), home=tmp_path) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
        long = dict(model="tiny-q8.gguf", messages=[{"role": "user", "content": "Go."}], max_tokens=3000,
                    temperature=1.0, reasoning_effort="none")
        stream = c.chat.completions.create(**long, stream=True)
        it = iter(stream)
        next(it), next(it)
        queued = []

        def wait_in_queue():
            req = urllib.request.Request(srv.url + "/v1/chat/completions", data=json.dumps(long).encode(),
                                         headers={"content-type": "application/json"})
            try:
                urllib.request.urlopen(req, timeout=60)
            except urllib.error.HTTPError as e:
                queued.append((e.code, json.loads(e.read())["error"]["message"]))

        waiter = threading.Thread(target=wait_in_queue)
        waiter.start()
        _wait_until(lambda: srv.get("/health")[1]["queued"] == 1, 10)
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGINT)
        with pytest.raises(openai.APIError, match="shutting down"):
            for _ in it:
                pass
        waiter.join(timeout=30)
        assert srv.proc.wait(timeout=30) == 130 and "Traceback" not in srv.log  # Ctrl-C's usual status
        assert time.monotonic() - t0 < 15  # 3000 tokens would take minutes
        assert queued == [(503, "the server is shutting down (retry once it is back)")]
