"""`v4 serve [-m MODEL]`: the model behind the OpenAI Chat Completions, Anthropic Messages and Responses APIs."""

from __future__ import annotations

import ipaddress
import socket

import typer
from rich.text import Text

from v4cli import ui
from v4cli.commands.options import CACHE_SIZE, CTX, MODEL, MODEL_POSITIONAL, LoadOptions, options, pick_model
from quant.errors import BadInput
from v4cli.units import parse_size

LOOPBACK_NAMES = ("localhost",)
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so `--port 0` can print the port the system picked."""
    host = host.strip("[]")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        raise BadInput(f"cannot listen on {host}:{port}: {e.strerror or e}",
                       hint="pick another --port (0 lets the system choose)") from None
    return sock


@options(load=LoadOptions)
def serve_cmd(
    model_opt: str | None = MODEL,
    model: str | None = MODEL_POSITIONAL,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; anything but loopback needs "
                                                           "--api-key (or --no-auth)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port to listen on (0: any free one)."),
    api_key: str | None = typer.Option(None, "--api-key", envvar="V4_API_KEY", show_envvar=True,
                                       help="Require this key (Authorization: Bearer KEY, or x-api-key: KEY)."),
    no_auth: bool = typer.Option(False, "--no-auth", help="Serve a non-loopback --host without a key."),
    ctx: int | None = CTX,
    cache_size: str = CACHE_SIZE,
    max_tokens: int = typer.Option(32_768, "--max-tokens", min=1,
                                   help="Most tokens one answer may generate, whatever a request asks for."),
    max_body: str = typer.Option("32M", "--max-body", metavar="SIZE",
                                 help="Largest request body accepted; larger ones get 413."),
    max_queue: int = typer.Option(64, "--max-queue", min=0,
                                  help="Requests that may wait for the engine; more get 503 at once."),
    alias: list[str] = typer.Option([], "--alias", help="Another model name to answer to (repeatable), e.g. "
                                                         "the name a client insists on sending."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn's log level: debug, info, warning, error."),
    *,
    load: LoadOptions,
) -> None:
    """Serve a model over HTTP: OpenAI /v1/chat/completions, Anthropic /v1/messages, OpenAI /v1/responses.

    One model, loaded once; requests queue and run one at a time (/health shows the queue). A client that
    disconnects cancels its answer at the next token.
    """
    import uvicorn

    from v4cli.chat.render import busy
    from v4cli.serve.app import create_app
    from v4cli.serve.http import Server
    from v4cli.serve.runner import Runner

    if not _is_loopback(host) and not api_key and not no_auth:
        raise BadInput(f"--host {host} is reachable from other machines and no --api-key is set",
                       hint="pass --api-key KEY (or set $V4_API_KEY), or --no-auth to serve it open")
    if log_level.lower() not in LOG_LEVELS:
        raise BadInput(f"--log-level {log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    body_limit = parse_size(max_body)
    name = pick_model(model_opt, model)
    sock = _bind(host, port)  # before the load: a taken port fails in a second, not after minutes of loading
    try:
        with busy(ui.err, "loading the model"):
            runner = Runner.load(name, engine=load.engine, kv_format=load.kv_format, device=load.device,
                                 threads=load.threads, chunk=load.chunk, ctx=ctx, cache_size=cache_size,
                                 aliases=tuple(alias), max_tokens=max_tokens, max_queue=max_queue)
        server = Server(runner, api_key=api_key or None, max_body=body_limit)
        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        ui.err.print(Text(f"serving {runner.model_name} on http://{shown}:{bound_port} · context {runner.ctx:,} "
                          f"tokens · one request at a time · {'key required' if api_key else 'no key'}",
                          style="dim"), soft_wrap=True)
        config = uvicorn.Config(create_app(server), log_level=log_level.lower(), timeout_graceful_shutdown=5)

        class Uvicorn(uvicorn.Server):
            def handle_exit(self, sig, frame) -> None:
                # stop the generation at once: uvicorn's graceful wait would otherwise let it run on
                runner.close()
                super().handle_exit(sig, frame)

        try:
            Uvicorn(config).run(sockets=[sock])
        finally:
            runner.close()
    finally:
        sock.close()


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_cmd)
