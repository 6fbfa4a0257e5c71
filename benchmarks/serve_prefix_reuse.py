"""Prefix reuse across `v4 serve` requests: time to first token of an agent's second request, from RAM and from the
disk prefix cache after a restart, against the same request with no cache.

An agent-style conversation: a system prompt with tool schemas and a long file pasted in by the user (--tokens in
all), request 1 answered with a forced tool call (tool_choice = a named function, so even random weights emit valid
DSML), then request 2 = the same history + the assistant turn as an OpenAI client sends it back (reasoning_content
dropped, arguments re-serialized) + a tool result. Each request streams; TTFT is measured by the client (request
sent → first delta), cached tokens come from `usage.prompt_tokens_details`.

Rows: request 1 (cold); request 2 on the same server (RAM); request 2 sent again after a restart on the same
V4_HOME (disk prefix cache + the server's history file); request 2 sent for the first time after a restart that
followed request 1 (the disk holds request 1's prompt state, not its generated tokens); request 2 with the states
deleted (the baseline: the same prompt ids, all prefilled).

Usage: python benchmarks/serve_prefix_reuse.py [--gguf PATH] [--tokens 4096] [--effort high] [--threads 2]
       [--repeat 3] [--serve-arg=--device --serve-arg=cuda ...]
Without --gguf a tiny random model (preset `tiny`, q8) is built in --work.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import serve_util  # noqa: E402  (the tests' server fixture: starts, waits for /health, always stops)

TOOLS = [
    {"type": "function", "function": {
        "name": "read_file", "description": "Read a file of the repository and return its text.",
        # an enum and a boolean: constrained decoding closes the call in a few tokens even on random weights
        "parameters": {"type": "object", "required": ["path", "numbered"], "properties": {
            "path": {"type": "string", "enum": ["v4cli/serve/history.py", "v4cli/serve/runner.py"]},
            "numbered": {"type": "boolean", "description": "prefix each line with its number"}}}}},
    {"type": "function", "function": {
        "name": "run_tests", "description": "Run pytest on some test files and return the summary.",
        "parameters": {"type": "object", "properties": {"paths": {"type": "array", "items": {"type": "string"}},
                                                        "keyword": {"type": "string"}}}}},
    {"type": "function", "function": {
        "name": "apply_patch", "description": "Apply a unified diff to the working tree.",
        "parameters": {"type": "object", "required": ["diff"], "properties": {"diff": {"type": "string"}}}}},
]
SYSTEM = ("You are a coding agent working in the v4 repository. Read files before you change them, run the tests "
          "you touch, and explain each change in one sentence. ")


def tiny_gguf(work: Path) -> Path:
    from quant.convert import convert
    from quant.recipes import get_recipe
    from v4cli.testing.tiny import make_tiny_checkpoint

    out = work / "tiny-q8.gguf"
    if not out.exists():
        convert(make_tiny_checkpoint(work / "ckpt-tiny", preset="tiny"), out, get_recipe("q8"))
    return out


def file_text(n_tokens: int) -> str:
    """Repository source, about n_tokens tokens of it (our own tokenizer counts)."""
    from v4cli.prompt.encoding import load_tokenizer

    tok = load_tokenizer()
    parts, total = [], 0
    for path in sorted((ROOT / "v4cli").rglob("*.py")):
        text = path.read_text()
        parts.append(f"### {path.relative_to(ROOT)}\n{text}")
        total += len(tok.encode(parts[-1]))
        if total >= n_tokens:
            break
    text = "\n".join(parts)
    ids = tok.encode(text)
    return tok.decode(ids[:n_tokens])


@contextlib.contextmanager
def served(gguf: Path, *flags: str, home: str):
    """A `v4 serve` for one phase; its log is printed if the phase fails (a 500 names only the log)."""
    with serve_util.served(gguf, *flags, home=home) as srv:
        try:
            yield srv
        except BaseException:
            print(srv.log[-6000:], file=sys.stderr)
            raise


def stream(client, messages: list, **kw) -> dict:
    """One streamed request: TTFT (first delta of any kind), the assistant turn as a client keeps it, usage."""
    t0 = time.perf_counter()
    ttft = None
    content, reasoning, calls, usage, finish = [], [], {}, None, None
    for chunk in client.chat.completions.create(messages=messages, stream=True,
                                                stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            d = choice.delta
            text = d.content or getattr(d, "reasoning_content", None) or ""
            if ttft is None and (text or d.tool_calls):
                ttft = time.perf_counter() - t0
            content.append(d.content or "")
            reasoning.append(getattr(d, "reasoning_content", None) or "")
            for c in d.tool_calls or ():
                slot = calls.setdefault(c.index, {"id": "", "name": "", "arguments": ""})
                slot["id"] += c.id or ""
                slot["name"] += (c.function.name or "") if c.function else ""
                slot["arguments"] += (c.function.arguments or "") if c.function else ""
            finish = choice.finish_reason or finish
    return {"ttft": ttft if ttft is not None else time.perf_counter() - t0, "total": time.perf_counter() - t0,
            "content": "".join(content), "reasoning": "".join(reasoning), "calls": list(calls.values()),
            "usage": usage, "finish": finish}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, help="the model (default: a tiny random one built in --work)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/v4-serve-prefix-bench"))
    ap.add_argument("--tokens", type=int, default=4096, help="tokens of file content in the first user message")
    ap.add_argument("--effort", default="high", help="reasoning_effort (high keeps reasoning in the history)")
    ap.add_argument("--max-tokens", type=int, default=300, help="cap on request 1's answer")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--repeat", type=int, default=3, help="runs of the whole sequence; TTFT is each row's median")
    ap.add_argument("--serve-arg", action="append", default=[], help="extra `v4 serve` flag (repeatable)")
    a = ap.parse_args()
    import openai

    a.work.mkdir(parents=True, exist_ok=True)
    gguf = a.gguf or tiny_gguf(a.work)
    flags = ["--alias", "bench", "--threads", a.threads, *a.serve_arg]
    msgs = [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Here is the code I am working on:\n\n" + file_text(a.tokens)
             + "\n\nRead history.py and tell me whether the LRU bound is right."}]
    kw = dict(model="bench", tools=TOOLS, reasoning_effort=a.effort, seed=1)

    def first(client) -> tuple[dict, list]:
        """Request 1, and request 2's messages built from its answer the way an OpenAI client resends it."""
        r1 = stream(client, msgs, max_tokens=a.max_tokens,
                    tool_choice={"type": "function", "function": {"name": "read_file"}}, **kw)
        if not r1["calls"]:
            raise SystemExit(f"request 1 made no tool call (finish {r1['finish']}): raise --max-tokens")
        call = r1["calls"][0]
        turn = {"role": "assistant", "content": r1["content"] or None,  # reasoning_content dropped
                "tool_calls": [{"id": call["id"], "type": "function", "function": {
                    "name": call["name"],
                    "arguments": json.dumps(json.loads(call["arguments"]), indent=2, sort_keys=True)}}]}
        result = {"role": "tool", "tool_call_id": call["id"],
                  "content": (ROOT / "v4cli/serve/core.py").read_text()[:3000]}
        return r1, msgs + [turn, result]

    def client_of(srv):
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", timeout=3600)
        # a first request pays one-time costs (allocations, first kernel calls, the grammar engine's tokenizer
        # setup: 1.8 s here): not what is measured
        client.chat.completions.create(messages=[{"role": "user", "content": "warm up"}], max_tokens=1,
                                       model="bench", reasoning_effort="none", tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "read_file"}})
        return client

    def once() -> list[tuple[str, dict]]:
        rows = []
        with tempfile.TemporaryDirectory(prefix="v4-serve-bench-") as home:
            with served(gguf, *flags, home=home) as srv:
                client = client_of(srv)
                r1, second = first(client)
                rows.append(("1: system+tools+file (cold)", r1))
                rows.append(("2: + answer + tool result (RAM)", stream(client, second, max_tokens=1, **kw)))
            with served(gguf, *flags, home=home) as srv:
                rows.append(("2 again after a restart (disk)", stream(client_of(srv), second, max_tokens=1, **kw)))
        with tempfile.TemporaryDirectory(prefix="v4-serve-bench-") as home:
            with served(gguf, *flags, home=home) as srv:
                _, second = first(client_of(srv))
            with served(gguf, *flags, home=home) as srv:  # restarted between request 1 and request 2
                rows.append(("2 first sent after a restart", stream(client_of(srv), second, max_tokens=1, **kw)))
            # the same prompt prefilled from scratch: the states go, the history file stays (same prompt ids)
            for entry in Path(home, "prefix-cache").rglob("*.v4pc"):
                entry.unlink()
            with served(gguf, *flags, home=home) as srv:
                rows.append(("2 with nothing cached (baseline)",
                             stream(client_of(srv), second, max_tokens=1, **kw)))
        return rows

    runs = [once() for _ in range(a.repeat)]
    # the box may be shared: each row's median TTFT over the runs (token counts are the same in every run)
    rows = [(name, {**r, "ttft": statistics.median(run[i][1]["ttft"] for run in runs)})
            for i, (name, r) in enumerate(runs[0])]
    r1 = rows[0][1]

    p1 = rows[0][1]["usage"].prompt_tokens
    print(f"model {gguf.name}, effort {a.effort}, {a.repeat} run(s), request 1: "
          f"{r1['usage'].completion_tokens} tokens generated (finish {r1['finish']})")
    print(f"{'request':34} {'prompt':>7} {'cached':>7} {'cached/p1':>9} {'TTFT s':>8} {'vs baseline':>11}")
    base = rows[-1][1]["ttft"]
    for name, r in rows:
        u = r["usage"]
        cached = u.prompt_tokens_details.cached_tokens if u.prompt_tokens_details else 0
        print(f"{name:34} {u.prompt_tokens:7d} {cached:7d} {cached / p1:9.1%} {r['ttft']:8.3f} "
              f"{r['ttft'] / base:11.1%}")

if __name__ == "__main__":
    main()
