"""`--remote URL`: `v4 ask` and `v4 chat` against a real `v4 serve` process on the tiny model give the same greedy
answers as the local engine; the remote's context length is the budget; a server that is down or refuses the key
is one line and exit code 4. Also the request each server family gets for each thinking mode."""

from __future__ import annotations

import io
import json
import socket
import sys

import pytest
from cli_util import run_cli
from serve_util import serve_fixture, served

from v4cli.engine.remote import base_url, thinking_fields, to_openai
from v4cli.engine.sampling import SamplingParams
from quant.errors import BadInput
from v4cli.prompt.encoding import Assistant, Mode, System, ToolCall, ToolResult, User

served_tiny = serve_fixture()
GREEDY = ["--temperature", "0", "--seed", "1", "--threads", "1"]


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("V4_HOME", str(tmp_path / "home"))
    for var in ("V4_MODEL", "V4_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "notes.md").write_text("# Notes\n\nThe compressor folds four tokens into one entry.\n")
    monkeypatch.chdir(tmp_path)


def run(argv, capsys, monkeypatch, stdin: str = "") -> tuple[int, str, str]:
    return run_cli(argv, capsys, monkeypatch, io.StringIO(stdin))  # piped, not a terminal


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- units


def test_base_url_takes_either_spelling():
    assert base_url("http://gpu:8000") == base_url("http://gpu:8000/v1/") == "http://gpu:8000/v1"
    with pytest.raises(BadInput, match="not an http"):
        base_url("gpu:8000")


def test_each_server_family_gets_the_mode_its_way():
    # v4 serve (and any other OpenAI-style server): reasoning_effort, read back through serve.core.EFFORT_MODES
    from v4cli.serve.core import EFFORT_MODES

    for mode in Mode:
        assert EFFORT_MODES[thinking_fields("openai", mode)["reasoning_effort"]] is mode
    # vLLM / SGLang: the V4 template's kwargs; DeepSeek's API: its thinking switch plus an effort
    assert thinking_fields("vllm", Mode.NON_THINK) == {"chat_template_kwargs": {"thinking": False}}
    assert thinking_fields("sglang", Mode.MAX) == {"chat_template_kwargs": {"thinking": True,
                                                                            "reasoning_effort": "max"}}
    assert thinking_fields("deepseek", Mode.NON_THINK) == {"thinking": {"type": "disabled"}}
    assert thinking_fields("deepseek", Mode.HIGH) == {"thinking": {"type": "enabled"}, "reasoning_effort": "high"}


def test_typed_messages_become_openai_messages():
    msgs = [System("s"), User("q"), Assistant("", "why", (ToolCall("search", {"q": "cats", "n": 2}, "c1"),)),
            ToolResult("found", "c1"), Assistant("a")]
    assert to_openai(msgs) == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "reasoning_content": "why",
         "tool_calls": [{"id": "c1", "type": "function",
                         "function": {"name": "search", "arguments": '{"q": "cats", "n": 2}'}}]},
        {"role": "tool", "content": "found", "tool_call_id": "c1"},
        {"role": "assistant", "content": "a"},
    ]


def test_request_fields_per_family():
    from v4cli.engine.remote import Remote

    greedy = SamplingParams(temperature=0.0, seed=1, max_tokens=9)
    body = Remote("http://h/v1", "m", 1000, "openai", None, False).request([User("q")], Mode.NON_THINK, greedy)
    assert body["reasoning_effort"] == "none" and "extra_body" not in body  # nothing a strict server would refuse
    assert (body["temperature"], body["seed"], body["max_tokens"], body["stream"]) == (0.0, 1, 9, True)
    body = Remote("http://h/v1", "m", 1000, "vllm", None, False).request(
        [User("q")], Mode.MAX, SamplingParams(top_k=20, min_p=0.05))
    assert "reasoning_effort" not in body
    assert body["extra_body"] == {"chat_template_kwargs": {"thinking": True, "reasoning_effort": "max"},
                                  "top_k": 20, "min_p": 0.05}


class Stream:
    """What the SDK's stream gives: chunks to iterate, and close()."""

    def __init__(self, chunks):
        from openai.types.chat import ChatCompletionChunk

        self.chunks = [ChatCompletionChunk.model_validate(
            {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m", **c}) for c in chunks]
        self.closed = False

    def __iter__(self):
        return iter(self.chunks)

    def close(self):
        self.closed = True


def test_deltas_become_the_local_parser_events():
    """Reasoning (under vLLM's newer name too), content and streamed tool-call fragments come out as the events,
    message and counts a local turn gives; the server's usage is the count, its cached tokens the reuse."""
    from v4cli.chat.answer import Reply, run_turn
    from v4cli.engine.remote import Remote, RemoteSession
    from v4cli.prompt.parser import ContentDelta, ReasoningDelta, ToolCallEvent

    def choice(delta, finish=None):
        return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    stream = Stream([
        choice({"role": "assistant", "reasoning_content": "think a"}), choice({"reasoning": "bout it"}),
        choice({"content": "Hi"}),
        choice({"tool_calls": [{"index": 0, "id": "t1", "function": {"name": "search", "arguments": '{"q":'}}]}),
        choice({"tool_calls": [{"index": 0, "function": {"arguments": ' "cats"}'}}]}, "tool_calls"),
        {"choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29,
                                  "prompt_tokens_details": {"cached_tokens": 5}}},
    ])

    class Server(Remote):
        def stream(self, messages, mode, sampling):
            return stream

    session = RemoteSession(Server("http://h/v1", "m", 1000, "openai", None, False),
                            lambda: ([User("q")], Mode.HIGH))
    events = []
    reply = run_turn(session, [0] * 20, SamplingParams(), Reply(Mode.HIGH), on_event=events.append)
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == "think about it"
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == "Hi"
    assert [(e.name, e.arguments) for e in events if isinstance(e, ToolCallEvent)] == [("search", {"q": "cats"})]
    assert reply.message() == Assistant("Hi", "think about it", (ToolCall("search", {"q": "cats"}),))
    assert (reply.prompt_tokens, reply.reused_tokens, reply.completion_tokens) == (20, 5, 9)
    assert reply.finish_reason == "eos" and stream.closed and len(session.tokens) == 29


# ---------------------------------------------------------------------------------------------- a real v4 serve


@pytest.mark.parametrize("mode", ["non-think", "high"])
def test_ask_remote_gives_the_local_answer(served_tiny, tiny_gguf, capsys, monkeypatch, mode):
    common = ["notes.md", "What does the compressor do?", "--mode", mode, "--max-tokens", "8", "--json", *GREEDY]
    code, out, err = run(["ask", "-m", str(tiny_gguf("q8")), *common], capsys, monkeypatch)
    assert code == 0, err
    local = json.loads(out)
    code, out, err = run(["ask", "--remote", served_tiny.url, *common], capsys, monkeypatch)
    assert code == 0, err
    remote = json.loads(out)
    assert (remote["answer"], remote["reasoning"]) == (local["answer"], local["reasoning"])
    assert remote["answer"] or remote["reasoning"]  # something was generated to compare
    assert remote["usage"]["prompt_tokens"] == local["usage"]["prompt_tokens"]
    assert remote["model"] == "tiny-q8.gguf" and remote["mode"] == mode


def test_chat_remote_gives_the_local_answers(served_tiny, tiny_gguf, capsys, monkeypatch):
    # two turns, so the second request carries the first answer back as an assistant message
    turns = "What does the compressor do?\nAnd the indexer?\n"
    common = ["--mode", "non-think", "--max-tokens", "6", *GREEDY]
    code, local, err = run(["chat", str(tiny_gguf("q8")), *common], capsys, monkeypatch, stdin=turns)
    assert code == 0, err
    code, remote, err = run(["chat", "--remote", served_tiny.url, *common], capsys, monkeypatch, stdin=turns)
    assert code == 0, err
    assert remote == local and remote.strip()
    assert f"tiny-q8.gguf at {served_tiny.url}/v1" in err


def test_budget_is_the_remotes_context(served_tiny, capsys, monkeypatch):
    ctx = served_tiny.get("/v1/models")[1]["data"][0]["context_length"]
    code, out, err = run(["ask", "--remote", served_tiny.url, "notes.md", "q?", "--dry-run", "--json",
                          "--max-tokens", "100"], capsys, monkeypatch)
    assert code == 0, err
    assert json.loads(out)["budget"] == ctx - 100
    # --ctx caps it
    code, out, err = run(["ask", "--remote", served_tiny.url, "notes.md", "q?", "--ctx", "120", "--max-tokens",
                          "100"], capsys, monkeypatch)
    assert code == 2 and "over the budget of 20" in err


def test_remote_down_is_one_line(capsys, monkeypatch):
    url = f"http://127.0.0.1:{free_port()}"
    for argv in (["ask", "--remote", url, "notes.md", "q?"], ["chat", "--remote", url]):
        code, out, err = run(argv, capsys, monkeypatch)
        assert code == 4 and out == ""
        assert err.count("\n") == 1 and err.startswith(f"error: cannot reach the remote at {url}/v1")


def test_a_refused_key_is_one_line(tiny_gguf, tmp_path, capsys, monkeypatch):
    ask = ["ask", "notes.md", "q?", "--max-tokens", "2", "--mode", "non-think", *GREEDY]
    with served(tiny_gguf("q8"), "--api-key", "sekret", home=tmp_path / "serve-home") as srv:
        code, _, err = run([*ask, "--remote", srv.url, "--api-key", "wrong"], capsys, monkeypatch)
        assert code == 4 and err.count("\n") == 1
        assert f"the remote at {srv.url}/v1 rejected the API key (HTTP 401)" in err and "--api-key" in err
        code, _, err = run([*ask, "--remote", srv.url], capsys, monkeypatch)
        assert code == 4 and "wants an API key" in err
        monkeypatch.setenv("V4_API_KEY", "sekret")  # the variable --api-key falls back to
        code, out, err = run([*ask, "--remote", srv.url], capsys, monkeypatch)
        assert code == 0, err


def test_remote_flags_without_remote(capsys, monkeypatch, tiny_gguf):
    code, _, err = run(["ask", "--remote-model", "x", "notes.md", "q?"], capsys, monkeypatch)
    assert code == 2 and "--remote-model needs --remote URL" in err
    code, _, err = run(["ask", "--remote", "http://127.0.0.1:1", "-m", str(tiny_gguf("q8")), "notes.md", "q?"],
                       capsys, monkeypatch)
    assert code == 2 and "names a local model" in err


def test_a_stopped_turn_cancels_the_remote_generation(served_tiny):
    """chat's Ctrl-C (the latch) stops a turn at the next delta: the stream is closed and the server cancels the
    generation while the chat goes on."""
    import time

    from v4cli.chat.answer import InterruptLatch, Reply, run_turn
    from v4cli.engine.remote import Remote, RemoteSession

    before = served_tiny.get("/health")[1]
    session = RemoteSession(Remote.connect(served_tiny.url), lambda: ([User("Go on forever.")], Mode.NON_THINK))
    latch, reply = InterruptLatch(), Reply(Mode.NON_THINK)

    def stop(_event) -> None:
        latch.requested = True

    sampling = SamplingParams(temperature=1.0, seed=1, max_tokens=before["context"] // 2)
    run_turn(session, [0] * 10, sampling, reply, on_event=stop, latch=latch)
    assert reply.interrupted and reply.finish_reason == "interrupted" and reply.answer
    deadline = time.monotonic() + 60
    while (now := served_tiny.get("/health")[1])["busy"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert now["cancelled"] == before["cancelled"] + 1 and not now["busy"]


@pytest.mark.slow
def test_ctrl_c_cancels_the_remote_generation(served_tiny, tmp_path):
    """Ctrl-C while the answer streams: `v4 ask` exits 130 and the server cancels the generation (it does not run
    on to --max-tokens for nobody)."""
    import os
    import select
    import signal
    import subprocess
    import time

    before = served_tiny.get("/health")[1]
    env = {**os.environ, "V4_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "v4cli", "ask", "--remote", served_tiny.url, "notes.md",
                             "Go on forever.", "--mode", "non-think", "--max-tokens", str(before["context"] // 2),
                             "--temperature", "1", "--seed", "1"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            cwd=tmp_path, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        got = b""
        while not got and time.monotonic() < deadline:  # wait until the answer streams
            if select.select([proc.stdout], [], [], 1.0)[0]:
                got = os.read(proc.stdout.fileno(), 1024)
        assert got, proc.stderr.read().decode() if proc.poll() is not None else "no output"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
        while (now := served_tiny.get("/health")[1])["busy"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert now["cancelled"] == before["cancelled"] + 1 and not now["busy"]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
