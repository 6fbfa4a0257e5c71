"""A real `v4 serve` process for tests: started on 127.0.0.1 with a port the system picks, killed afterwards.

    from serve_util import served, serve_fixture   # tests/ is on sys.path under pytest
    served_tiny = serve_fixture()            # module-scoped fixture: one server on tiny_gguf("q8")

    def test_x(served_tiny):
        client = openai.OpenAI(base_url=served_tiny.url + "/v1", api_key="x")

or, for a server with its own flags, `with served(gguf, "--api-key", "k", home=tmp_path) as srv: ...`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

START_TIMEOUT = 180  # seconds: the tiny model loads in a few, but the box is shared and may be busy
_LISTENING = re.compile(r"serving \S+ on (http://\S+)")


@dataclass
class Served:
    """A running server: its base URL (no trailing /v1), the process, and everything it wrote to stderr."""

    url: str
    proc: subprocess.Popen
    lines: list[str] = field(default_factory=list)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def get(self, path: str, headers: dict | None = None) -> tuple[int, dict]:
        return self.request("GET", path, headers=headers)

    def post(self, path: str, body: dict | bytes, headers: dict | None = None) -> tuple[int, dict]:
        return self.request("POST", path, body, headers)

    def request(self, method: str, path: str, body: dict | bytes | None = None,
                headers: dict | None = None, timeout: float = 120) -> tuple[int, dict]:
        """(status, JSON body) of one plain HTTP request; error statuses are returned, not raised."""
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"content-type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")


def serve_cmd(gguf: str | Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "v4cli", "serve", "-m", str(gguf), "--port", "0", "--threads", "1",
            "--log-level", "warning", *args]


@contextlib.contextmanager
def served(gguf: str | Path, *args: str, home: str | Path | None = None, env: dict | None = None
           ) -> Iterator[Served]:
    """Start `v4 serve` on the GGUF with extra flags, wait until /health answers, stop it on exit (even when the
    test fails). `home` is its V4_HOME (prefix cache, store); default: the test session's."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if home is not None:
        env["V4_HOME"] = str(home)
    proc = subprocess.Popen(serve_cmd(gguf, *args), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    lines: list[str] = []
    found = threading.Event()
    url: list[str] = []

    def drain() -> None:  # keep reading, or a chatty server blocks on a full pipe
        for line in proc.stderr:
            lines.append(line)
            if not found.is_set() and (m := _LISTENING.search(line)):
                url.append(m.group(1))
                found.set()
        found.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not found.wait(0.2):
            if time.monotonic() > deadline:
                raise TimeoutError(f"v4 serve did not start in {START_TIMEOUT}s:\n{''.join(lines)}")
        if not url:
            raise RuntimeError(f"v4 serve exited with {proc.wait()}:\n{''.join(lines)}")
        srv = Served(url[0], proc, lines)
        while True:  # the line is printed just before uvicorn starts serving
            try:
                if srv.get("/health")[0] == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"v4 serve never answered /health:\n{''.join(lines)}")
            time.sleep(0.1)
        yield srv
    finally:
        stop(proc)
        reader.join(timeout=5)


def stop(proc: subprocess.Popen) -> None:
    """SIGINT (uvicorn's graceful stop), then SIGKILL to the whole process group if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


def serve_fixture(*args: str, recipe: str = "q8", scope: str = "module"):
    """A pytest fixture: one `v4 serve` on the session's tiny GGUF (with `args`) for a whole module."""

    @pytest.fixture(scope=scope)
    def fixture(tiny_gguf, tmp_path_factory):
        with served(tiny_gguf(recipe), *args, home=tmp_path_factory.mktemp("serve-home")) as srv:
            yield srv

    return fixture
