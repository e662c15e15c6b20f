"""The connector runtime: one task per live connection, kept in step with the ``connections`` table.

:func:`supervise_connections` re-lists live connections of one source and keeps one ``runner`` task per
connection (restarted when the connection's endpoint, settings or credentials change, or when the task
crashed; stopped when it leaves ``live``). :func:`poll_forever` is the loop every poller runs inside its
task: a ConfigError marks the connection ``failed`` with the message saying what to fix and ends the loop;
a Transient (vendor trouble, a quota pause, OUR broker or database down: ``InfrastructureUnavailable``) is
waited out with its ``retry_after`` or an exponential backoff, and the cycle is retried from the last
acknowledged checkpoint, so nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import Awaitable, Callable

from servicekit.connections import Connection, CredentialCipher, PgConnectionStore
from servicekit.db import db_errors
from servicekit.errors import ConfigError, InfrastructureUnavailable, Transient
from servicekit.logging import get_logger
from servicekit.runtime import Infra

__all__ = ["ConnectionRunner", "fingerprint", "mark_failed", "poll_forever", "supervise_connections"]

log = get_logger(__name__)

ConnectionRunner = Callable[[Connection, Infra, asyncio.Event], Awaitable[None]]


def fingerprint(c: Connection) -> str:
    """Changes whenever the endpoint, settings or credentials change (so the task restarts)."""
    blob = json.dumps([c.endpoint, c.settings, c.credentials], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


async def supervise_connections(
    infra: Infra, stop: asyncio.Event, *, source: str, runner: ConnectionRunner, relist_s: float = 5.0
) -> None:
    """Keep one ``runner`` task per live connection of ``source`` until ``stop`` (see the module docstring).

    A runner that returns on purpose (a configuration error it marked ``failed``) stays stopped; a
    database outage while listing keeps the running tasks as they are and lists again later.
    """
    store = PgConnectionStore(infra.pool, CredentialCipher.from_settings(infra.settings))
    running: dict[tuple[str, str], tuple[str, asyncio.Task[None]]] = {}
    try:
        while not stop.is_set():
            live: dict[tuple[str, str], Connection] | None
            try:
                async with db_errors("listing connections"):
                    conns = await store.list(source=source, states=("live",))
                live = {(c.tenant_id, c.connection_id): c for c in conns}
            except Transient as exc:
                log.warning("listing connections failed", source=source, error=str(exc)[:300])
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


async def mark_failed(conn: Connection, infra: Infra, exc: ConfigError) -> None:
    """Stop syncing a misconfigured connection and record the message saying what to fix."""
    log.warning("connection stopped: configuration error", tenant_id=conn.tenant_id,
                connection_id=conn.connection_id, error=str(exc))
    store = PgConnectionStore(infra.pool, CredentialCipher.from_settings(infra.settings))
    while True:
        try:
            async with db_errors("marking a connection failed"):
                await store.set_state(conn.tenant_id, conn.connection_id, "failed", error=str(exc))
            return
        except InfrastructureUnavailable as db_exc:
            log.warning("cannot record the failure yet; database unavailable", error=str(db_exc)[:300])
            await asyncio.sleep(infra.settings.backoff_max_s)


async def poll_forever(
    conn: Connection, infra: Infra, stop: asyncio.Event, cycle: Callable[[], Awaitable[float]], *, once: bool = False
) -> None:
    """Run ``cycle`` (one sync pass, returning the seconds until the next) until ``stop``.

    A ConfigError marks the connection ``failed`` and ends the loop; a Transient is retried after its
    ``retry_after`` or an exponential backoff; ``once`` returns after the first successful pass.
    """
    settings = infra.settings
    failures = 0
    while not stop.is_set():
        try:
            delay = await cycle()
            failures = 0
            if once:
                return
        except ConfigError as exc:
            await mark_failed(conn, infra, exc)
            return
        except Transient as exc:
            failures += 1
            delay = exc.retry_after or min(settings.backoff_max_s * 4, settings.backoff_base_s * 2 ** min(failures, 8))
            what = "our database or broker is unavailable; waiting" if isinstance(exc, InfrastructureUnavailable) \
                else "cycle failed, retrying"
            log.warning(what, tenant_id=conn.tenant_id, connection_id=conn.connection_id,
                        error=str(exc)[:500], retry_in_s=delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
