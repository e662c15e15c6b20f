"""What every vendor connector shares: one task per live connection, kept in step with the table."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import Awaitable, Callable

from servicekit.connections import Connection, CredentialCipher, PgConnectionStore
from servicekit.errors import Transient
from servicekit.logging import get_logger
from servicekit.runtime import Infra

__all__ = ["ConnectionRunner", "fingerprint", "supervise_connections"]

log = get_logger(__name__)

ConnectionRunner = Callable[[Connection, Infra, asyncio.Event], Awaitable[None]]


def fingerprint(c: Connection) -> str:
    """Changes whenever the endpoint, settings or credentials change (so the task restarts)."""
    blob = json.dumps([c.endpoint, c.settings, c.credentials], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


async def supervise_connections(
    infra: Infra, stop: asyncio.Event, *, source: str, runner: ConnectionRunner, relist_s: float = 5.0
) -> None:
    """Keep one ``runner`` task per live connection of ``source`` until ``stop``.

    Re-lists ``connections`` every ``relist_s`` seconds: starts tasks for connections that went live,
    restarts a task when its connection changed or its task crashed, and stops tasks whose connection left
    ``live``. A runner that returns on purpose (a configuration error it marked ``failed``) stays stopped.
    """
    store = PgConnectionStore(infra.pool, CredentialCipher.from_settings(infra.settings))
    running: dict[tuple[str, str], tuple[str, asyncio.Task[None]]] = {}
    try:
        while not stop.is_set():
            try:
                live = {(c.tenant_id, c.connection_id): c for c in await store.list(source=source, states=("live",))}
            except Transient as exc:
                log.warning("listing connections failed", source=source, error=str(exc))
                live = None
            if live is not None:
                for key, (fp, task) in list(running.items()):
                    c = live.get(key)
                    if c is not None and fingerprint(c) == fp:
                        if not task.done() or task.cancelled() or task.exception() is None:
                            continue  # running, or finished on purpose (a config error marked it failed)
                        log.warning("connection task crashed; restarting", tenant_id=c.tenant_id,
                                    connection_id=c.connection_id, error=str(task.exception())[:300])
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
                    del running[key]
                for key, c in live.items():
                    if key not in running:
                        running[key] = (fingerprint(c), asyncio.ensure_future(runner(c, infra, stop)))
                        log.info("connection started", source=source, tenant_id=c.tenant_id,
                                 connection_id=c.connection_id)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), relist_s)
    finally:
        for _, task in running.values():
            task.cancel()
        await asyncio.gather(*(t for _, t in running.values()), return_exceptions=True)
