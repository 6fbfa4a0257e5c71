"""Load check for `v4 serve`: many concurrent clients on loopback, every request answered or cleanly refused.

C clients × R requests each, all short (a few tokens, non-think), cycling through four kinds: non-streamed, streamed
to the end, streamed then abandoned after the first token (the server must cancel it and move on), and a malformed
body (the server must answer 400 without touching the engine). Reports per-kind outcomes, latency percentiles, the
deepest queue /health showed, and the server's RSS after loading, after a warm-up round and after the run — flat
memory means no per-request leak. Exits 1 on any unexpected outcome or a run that outlives --deadline (a deadlock).

    python benchmarks/serve_load.py [--model GGUF] [--clients 8] [--requests 20] [--max-queue 64] [--deadline 900]

Without --model it builds the tiny test model under --work (random weights: the answers are noise, the serving
is what is measured).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KINDS = ("complete", "stream", "abandon", "malformed")
EXPECTED = {"complete": {200}, "stream": {200}, "abandon": {200}, "malformed": {400}}


def tiny_model(work: Path) -> Path:
    from quant.convert import convert
    from quant.recipes import get_recipe
    from v4cli.testing.tiny import make_tiny_checkpoint

    out = work / "tiny-q8.gguf"
    if not out.exists():
        convert(make_tiny_checkpoint(work / "ckpt", preset="tiny"), out, get_recipe("q8"))
    return out


def start(model: Path, args: argparse.Namespace, home: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "V4_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "v4cli", "serve", "-m", str(model), "--port", "0", "--log-level", "warning",
           "--max-queue", str(args.max_queue), "--ctx", str(args.ctx), *(["--threads", str(args.threads)]
                                                                        if args.threads else [])]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    for line in proc.stderr:
        if m := re.search(r"serving \S+ on (http://\S+)", line):
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # keep draining
            return proc, m.group(1)
        print(line, end="", file=sys.stderr)
    raise SystemExit(f"v4 serve exited with {proc.wait()} before listening")


def call(url: str, kind: str, i: int, max_tokens: int) -> tuple[str, int, float]:
    """One request of `kind`: (kind, HTTP status or 0 for a connection failure, seconds)."""
    body = {"messages": [{"role": "user", "content": f"Request {i}: say something short."}],
            # an abandoned stream asks for more, so the hang-up lands mid-generation
            "max_tokens": max_tokens * (16 if kind == "abandon" else 1),
            "temperature": 1.0, "seed": i, "reasoning_effort": "none",
            "stream": kind in ("stream", "abandon")}
    data = b'{"messages": [' if kind == "malformed" else json.dumps(body).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=data,
                                 headers={"content-type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            status = r.status
            if kind == "abandon":
                events = 0
                while events < 2:  # the role chunk (sent at once), then the first token's: it is running
                    line = r.readline()
                    if not line:
                        break
                    events += line.startswith(b"data: ")
            else:
                text = r.read().decode()
                if kind == "stream" and not text.rstrip().endswith("data: [DONE]"):
                    status = -1  # a stream that ended without its terminator
                elif kind == "stream" and '{"error"' in text:
                    status = 503  # refused after its 200 (the queue filled between admission and its turn)
    except urllib.error.HTTPError as e:
        status = e.code
        e.read()
    except (OSError, http.client.HTTPException):  # refused connection, or a response cut short
        status = 0
    return kind, status, time.perf_counter() - t0


def health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=30) as r:
        return json.loads(r.read())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="GGUF to serve (default: the tiny test model)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/v4-serve-load"))
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=20, help="per client")
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--max-queue", type=int, default=64)
    ap.add_argument("--ctx", default="4096")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--deadline", type=float, default=900, help="seconds before the run counts as deadlocked")
    args = ap.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    model = args.model or tiny_model(args.work)
    proc, url = start(model, args, args.work / "home")
    try:
        server = psutil.Process(proc.pid)
        while True:
            try:
                health(url)
                break
            except OSError:
                time.sleep(0.1)
        rss_loaded = server.memory_info().rss
        with ThreadPoolExecutor(args.clients) as pool:  # warm-up: one round of every kind
            list(pool.map(lambda k: call(url, KINDS[k % len(KINDS)], k, args.max_tokens), range(args.clients)))
        rss_warm = server.memory_info().rss

        deepest, stop = 0, threading.Event()

        def watch() -> None:
            nonlocal deepest
            while not stop.wait(0.05):
                try:
                    deepest = max(deepest, health(url)["queued"])
                except OSError:
                    pass

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        jobs = [(KINDS[(c + r) % len(KINDS)], c * 1000 + r) for c in range(args.clients) for r in range(args.requests)]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            futures = [pool.submit(call, url, kind, i, args.max_tokens) for kind, i in jobs]
            results = [f.result(timeout=max(1.0, args.deadline - (time.perf_counter() - t0))) for f in futures]
        wall = time.perf_counter() - t0
        stop.set()
        time.sleep(0.5)  # let the last abandoned stream's cancellation land
        final = health(url)
        rss_after = server.memory_info().rss
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)

    bad = [(k, s) for k, s, _ in results if s not in EXPECTED[k] and not (s == 503 and k != "malformed")]
    print(f"v4 serve load: {args.clients} clients x {args.requests} requests = {len(results)} in {wall:.1f}s "
          f"({len(results) / wall:.1f} req/s), model {model.name}, max_tokens {args.max_tokens}")
    for kind in KINDS:
        mine = [(s, t) for k, s, t in results if k == kind]
        lat = sorted(t for _, t in mine)
        counts = {s: sum(1 for x, _ in mine if x == s) for s in sorted({s for s, _ in mine})}
        print(f"  {kind:<9} {len(mine):>4}  statuses {counts}  latency p50 {statistics.median(lat):.2f}s "
              f"p95 {lat[int(0.95 * (len(lat) - 1))]:.2f}s max {lat[-1]:.2f}s")
    print(f"  deepest queue {deepest}; server counted served {final['served']}, cancelled {final['cancelled']}; "
          f"busy at the end {final['busy']}, queued {final['queued']}")
    mib = 1 << 20
    print(f"  server RSS: loaded {rss_loaded / mib:.0f} MiB, after warm-up {rss_warm / mib:.0f} MiB, "
          f"after the run {rss_after / mib:.0f} MiB ({(rss_after - rss_warm) / mib:+.0f} MiB)")
    if bad or final["busy"] or final["queued"]:
        print(f"FAILED: {len(bad)} unexpected outcomes {bad[:10]}", file=sys.stderr)
        return 1
    print("ok: every request answered or cleanly refused, the engine idle at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
