"""Every service as its own process, N copies each, as a deployment runs them: for the scale-out test
(tests/e2e/test_scale_out.py) and ``bench/e2e.py``.

:class:`Fleet` starts ``python -m <module>`` copies with the environment of :func:`service_env` (each copy
named ``<service>-<i>`` in ``FLASH_INSTANCE_ID``; output to one log file per copy), waits until each says
``services started``, kills one copy (SIGKILL, as a crash or an OOM kill would), stops all (SIGTERM), and
reports RSS per service. :class:`RequestLog` is an aiohttp middleware for the vendor simulators that
records which process made each request to which org (the client's TCP port mapped to its process), so a
test can show that no connection was polled by two copies at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
from aiohttp import web

__all__ = ["Copy", "Fleet", "RequestLog"]


@dataclass
class Copy:
    service: str
    index: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclass
class Fleet:
    """Copies of services as child processes (see the module docstring)."""

    env: Mapping[str, str]
    log_dir: Path
    copies: list[Copy] = field(default_factory=list)

    def start(self, service: str, module: str, n: int, **extra_env: str) -> list[Copy]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        started = []
        for _ in range(n):
            index = sum(1 for c in self.copies if c.service == service)
            log = self.log_dir / f"{service}-{index}.log"
            env = {**self.env, "FLASH_INSTANCE_ID": f"{service}-{index}", "FLASH_LOG_FORMAT": "console",
                   "FLASH_LOG_LEVEL": self.env.get("FLASH_LOG_LEVEL", "INFO"), **extra_env}
            with log.open("wb") as out:
                proc = subprocess.Popen([sys.executable, "-m", module], env=env, stdout=out, stderr=subprocess.STDOUT)
            copy = Copy(service, index, proc, log)
            self.copies.append(copy)
            started.append(copy)
        return started

    def alive(self, service: str | None = None) -> list[Copy]:
        return [c for c in self.copies if c.proc.poll() is None and (service is None or c.service == service)]

    async def wait_started(self, timeout: float = 180.0) -> float:
        """Wait until every live copy logged ``services started``; returns the seconds it took."""
        began = time.monotonic()
        pending = list(self.alive())
        while pending:
            for c in list(pending):
                if c.proc.poll() is not None:
                    raise RuntimeError(f"{c.service}-{c.index} exited with {c.proc.returncode}:\n{self.tail(c)}")
                if b"services started" in c.log.read_bytes():
                    pending.remove(c)
            if time.monotonic() - began > timeout:
                raise TimeoutError(f"not started after {timeout}s: {[f'{c.service}-{c.index}' for c in pending]}")
            await asyncio.sleep(0.25)
        return time.monotonic() - began

    def kill_one(self, service: str, instance_id: str | None = None) -> Copy:
        """SIGKILL the live copy named ``instance_id`` (else the first live copy) of ``service``: nothing is
        released, so its leases must expire and its consumer group membership time out."""
        live = self.alive(service)
        victim = next((c for c in live if f"{c.service}-{c.index}" == instance_id), live[0])
        victim.proc.kill()
        victim.proc.wait()
        return victim

    async def stop(self, timeout: float = 60.0) -> dict[str, float]:
        """SIGTERM every live copy and wait; returns seconds to exit per copy name."""
        live = self.alive()
        began = time.monotonic()
        for c in live:
            c.proc.send_signal(signal.SIGTERM)
        took: dict[str, float] = {}
        deadline = began + timeout
        for c in live:
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(c.proc.wait, max(0.0, deadline - time.monotonic()))
            if c.proc.poll() is None:
                c.proc.kill()
                c.proc.wait()
            took[f"{c.service}-{c.index}"] = time.monotonic() - began
        return took

    def rss_mb(self) -> dict[str, list[float]]:
        """Resident memory of each live copy, per service (MB)."""
        out: dict[str, list[float]] = {}
        for c in self.alive():
            with contextlib.suppress(psutil.Error):
                out.setdefault(c.service, []).append(psutil.Process(c.pid).memory_info().rss / 1e6)
        return out

    def service_of(self, pid: int) -> str | None:
        for c in self.copies:
            if c.pid == pid:
                return c.service
        return None

    def tail(self, c: Copy, lines: int = 30) -> str:
        return "\n".join(c.log.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class _Request:
    org: str
    pid: int | None
    at: float


class RequestLog:
    """Which process made each request to which org of a simulator (``/orgs/<org>/...``, ``/envs/<env>/...``)."""

    def __init__(self) -> None:
        self.requests: list[_Request] = []
        self._port_pid: dict[int, int | None] = {}

    def _pid_of(self, peer_port: int) -> int | None:
        if peer_port not in self._port_pid:
            for conn in psutil.net_connections("tcp"):
                if conn.laddr and conn.pid:
                    self._port_pid[conn.laddr.port] = conn.pid
            self._port_pid.setdefault(peer_port, None)
        return self._port_pid[peer_port]

    @web.middleware
    async def middleware(self, request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        parts = request.path.split("/")
        if len(parts) > 2 and parts[1] in ("orgs", "envs"):  # Dataverse/Salesforce orgs, F&O environments
            peer: Any = request.transport.get_extra_info("peername") if request.transport else None
            pid = self._pid_of(int(peer[1])) if peer else None
            self.requests.append(_Request(parts[2], pid, time.monotonic()))
        return await handler(request)

    def runs(self, service_of: Callable[[int], str | None]) -> dict[tuple[str, str], list[int]]:
        """Per (org, service): the processes that made its requests, in order, one entry per unbroken run.

        One copy owning a connection makes one run; a handover (a killed copy, a rebalance) starts
        another; two copies polling the same connection at once interleave into many short runs.
        """
        out: dict[tuple[str, str], list[int]] = {}
        for r in sorted(self.requests, key=lambda r: r.at):
            if r.pid is None or r.pid == os.getpid():
                continue
            service = service_of(r.pid)
            if service is None:
                continue
            seq = out.setdefault((r.org, service), [])
            if not seq or seq[-1] != r.pid:
                seq.append(r.pid)
        return out
