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
from servicekit.leases import (
    ConnectionLeases,
    LeaseLost,
    PgLeaseStore,
    TenantGate,
    holder_name,
    supervise_leased,
    tenant_slot,
)
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
    infra: Infra, stop: asyncio.Event, *, source: str, runner: ConnectionRunner, relist_s: float = 5.0,
    scope: str | None = None,
) -> None:
    """Keep one ``runner`` task per live connection of ``source`` THIS copy holds the lease of, until
    ``stop`` (see the module docstring).

    Copies of a service share the connections through leases in PostgreSQL (``servicekit.leases``, one
    ``scope`` per service: two services working on the same connections pass different scopes): each
    runs its even share, a killed copy's connections move within ``FLASH_LEASE_TTL_S``, and each runner's
    cursor writes are fenced by its lease. A runner that returns on purpose (a configuration error it
    marked ``failed``) stays stopped; a database outage while listing keeps the running tasks as they are
    (until their leases would have expired) and lists again later.
    """
    store = PgConnectionStore(infra.pool, CredentialCipher.from_settings(infra.settings))
    settings = infra.settings
    leases = ConnectionLeases(PgLeaseStore(infra.pool), scope or source, holder_name(settings.instance_id),
                              ttl_s=settings.lease_ttl_s)

    async def list_live() -> dict[tuple[str, str], Connection]:
        async with db_errors("listing connections"):
            conns = await store.list(source=source, states=("live",))
        return {(c.tenant_id, c.connection_id): c for c in conns}

    async def run(c: Connection) -> None:
        await runner(c, infra, stop)

    await supervise_leased(leases, stop, list_live=list_live, run=run, fingerprint=fingerprint,
                           gate=TenantGate(settings.tenant_concurrency), relist_s=relist_s)


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
            async with tenant_slot(conn.tenant_id):  # per-tenant fairness (servicekit.leases)
                delay = await cycle()
            failures = 0
            if once:
                return
        except ConfigError as exc:
            await mark_failed(conn, infra, exc)
            return
        except LeaseLost as exc:  # another copy owns the connection now; the supervisor stops this task
            log.warning("lease lost; stopping", tenant_id=conn.tenant_id, connection_id=conn.connection_id,
                        error=str(exc)[:300])
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
