"""Serve a simulator app over TLS on a loopback port, in-process (tests) or as a process (demo)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from aiohttp import web

from sandbox.tls import SandboxTLS, make_tls

__all__ = ["RunningSandbox", "serve"]


@dataclass(frozen=True)
class RunningSandbox:
    host: str
    port: int
    tls: SandboxTLS

    @property
    def base_url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def url_for_host(self, host: str) -> str:
        """The same server under another loopback name (e.g. ``localhost`` for a non-My-Domain host)."""
        return f"https://{host}:{self.port}"


@asynccontextmanager
async def serve(
    app: web.Application,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    tls: SandboxTLS | None = None,
    shutdown_timeout: float = 1.0,
) -> AsyncIterator[RunningSandbox]:
    """Run ``app`` over HTTPS on ``host:port`` (0 picks a free port) until the block exits.

    On exit, requests still in flight get ``shutdown_timeout`` seconds, then are cancelled: a long poll
    (CometD ``/meta/connect``) whose client already left would otherwise hold the exit for aiohttp's
    default 60 s (measured: the demo took ~61 s to exit after Ctrl-C).
    """
    tls = tls or make_tls()
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=tls.server_context(), reuse_address=True)
    await site.start()
    sockets = getattr(site._server, "sockets", None)  # aiohttp exposes no public accessor for the bound port
    assert sockets
    bound_port = int(sockets[0].getsockname()[1])
    try:
        yield RunningSandbox(host=host, port=bound_port, tls=tls)
    finally:
        await runner.cleanup()
