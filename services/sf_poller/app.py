"""Composition root of the Salesforce poller: one background task per live ``salesforce`` connection.

The supervisor re-lists ``connections`` every ``RELIST_S`` seconds, starts a task per live connection,
restarts it when its endpoint, settings or credentials change and stops it when it leaves ``live``. A
connection whose configuration is wrong is marked ``failed`` with the message saying what to fix.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from connectorkit.runner import mark_failed, poll_forever, supervise_connections
from servicekit.connections import Connection, PgCursorStore
from servicekit.db import migrate
from servicekit.errors import ConfigError
from servicekit.logging import bind, get_logger
from servicekit.runtime import Infra, Service
from sf_poller.sync import ConnectionSync
from sfconnect.client import SalesforceClient, build_client, http_client
from sfconnect.config import CDC_SUBSCRIBED, SfConnection, parse_connection
from sfconnect.deadletters import KitDeadLetters
from sfconnect.guarded import GuardedCursorStore
from sfconnect.published import MIGRATIONS, PgPublishedStore

__all__ = ["CDC_SUBSCRIBED", "RELIST_S", "SERVICE", "build_client", "build_sync", "http_client",
           "run_connection", "supervise"]

log = get_logger(__name__)

RELIST_S = 5.0
PRODUCER = "sf-poller"
"""Dead-letter topic (``dlq.sf-poller.v1``) and service name."""
SOURCE = "salesforce"
Runner = Callable[[Connection, Infra, asyncio.Event], Awaitable[None]]


def build_sync(cc: SfConnection, client: SalesforceClient, infra: Infra) -> ConnectionSync:
    cursors = GuardedCursorStore(PgCursorStore(infra.pool))

    async def cdc_ready() -> bool:
        return await cursors.load(cc.tenant_id, cc.connection_id, CDC_SUBSCRIBED) is not None

    return ConnectionSync(cc, client, infra.publisher, cursors, infra.settings, store=PgPublishedStore(infra.pool),
                          dead_letters=KitDeadLetters(infra.pool, infra.publisher, infra.settings, PRODUCER),
                          consumer=PRODUCER, ready_for_backfill=cdc_ready if cc.cdc else None)


async def run_connection(conn: Connection, infra: Infra, stop: asyncio.Event, *, once: bool = False) -> None:
    """Poll one connection until ``stop`` (or one full cycle with ``once``)."""
    bind(tenant_id=conn.tenant_id, connection_id=conn.connection_id)
    try:
        cc = parse_connection(conn)
    except ConfigError as exc:
        await mark_failed(conn, infra, exc)
        return
    async with http_client(cc) as http:
        sync = build_sync(cc, build_client(cc, http, infra), infra)

        async def cycle() -> float:
            await sync.ensure_shape()
            results = await sync.run_cycle()
            log.debug("cycle done", results={k: (v.upserts, v.deletes, v.skipped) for k, v in results.items()})
            waiting = any(r.skipped for r in results.values())
            if waiting:  # the CDC listener has not subscribed yet: look again soon
                return min(cc.poll_interval_s, 1.0)
            return cc.reconcile_interval_s if cc.cdc and await sync.backfilled() else cc.poll_interval_s

        await poll_forever(conn, infra, stop, cycle, once=once)


async def supervise(infra: Infra, stop: asyncio.Event, runner: Runner = run_connection, *,
                    relist_s: float = RELIST_S) -> None:
    """Keep one ``runner`` task per live salesforce connection."""
    await migrate(infra.pool, [MIGRATIONS])  # idempotent; lets embedders (demo, tests, bench) skip it
    await supervise_connections(infra, stop, source=SOURCE, runner=runner, relist_s=relist_s)


def _tasks(infra: Infra, stop: asyncio.Event) -> Sequence[Awaitable[None]]:
    return [supervise(infra, stop)]


SERVICE = Service("sf-poller", migrations=[MIGRATIONS], tasks=_tasks)
