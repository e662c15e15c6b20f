"""Fault injection for chaos tests: a TCP proxy that can cut a server away, and process kills.

:class:`ChaosProxy` sits between the services and PostgreSQL or the broker (the broker advertises the
proxy's port, so every client connection goes through it). ``cut()`` aborts every open connection and
refuses new ones until ``restore()``: to the services it looks exactly like the server went away.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
from dataclasses import dataclass, field

from servicekit.embedded import free_port

__all__ = ["ChaosProxy", "ServiceProcess"]


class ChaosProxy:
    """A loopback TCP proxy to ``upstream_port`` that can simulate an outage."""

    def __init__(self, upstream_port: int, *, port: int | None = None) -> None:
        self.upstream_port = upstream_port
        self.port = port or free_port()
        self.down = False
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        return self.port

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self) -> None:
        """Abort every open connection and refuse new ones."""
        self.down = True
        self.cuts += 1
        for w in list(self._open):
            w.transport.abort()
        self._open.clear()

    def restore(self) -> None:
        self.down = False

    async def outage(self, seconds: float) -> None:
        self.cut()
        try:
            await asyncio.sleep(seconds)
        finally:
            self.restore()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        self._open.update((writer, up_writer))
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                self._open.discard(w)
                w.transport.abort()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(OSError, RuntimeError):
            writer.transport.abort()


@dataclass
class ServiceProcess:
    """One service as a child process (``python -m <module>``), killable and restartable."""

    module: str
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    kills: int = 0
    log_path: str | None = None
    _logs: list[object] = field(default_factory=list)

    def start(self) -> None:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        if self.log_path:
            self._logs.append(out)
        self.proc = subprocess.Popen([sys.executable, "-m", self.module], env=self.env,
                                     stdout=subprocess.DEVNULL, stderr=out)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.kills += 1

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for f in self._logs:
            with contextlib.suppress(Exception):
                f.close()  # type: ignore[attr-defined]
        return self.proc.returncode
