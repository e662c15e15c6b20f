"""Composition root of the CE poller: one background task per live ``dynamics-ce`` connection.

The supervisor re-lists the ``connections`` table every ``RELIST_S`` seconds, starts a task for each live
connection, and restarts it when its settings or credentials change (or stops it when it leaves ``live``).
A connection whose configuration is wrong is marked ``failed`` with the message saying what to fix; the
other connections keep running.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Sequence

import httpx

from ce_poller.client import DataverseClient, MsalTokenSource
from ce_poller.config import CeConnection, parse_connection
from ce_poller.limiter import budget_for
from ce_poller.stores import KnownKeys, PgKnownKeys, index_dead_letters
from ce_poller.sync import ConnectionSync, DeadLetterSink, Publisher
from connectorkit.runner import mark_failed, poll_forever, supervise_connections
from servicekit.connections import Connection, CursorStore, PgCursorStore
from servicekit.db import Migrations
from servicekit.errors import ConfigError
from servicekit.logging import bind, get_logger
from servicekit.runtime import Infra, Service
from servicekit.settings import FlashSettings

__all__ = [
    "MIGRATIONS", "RELIST_S", "SERVICE", "build_sync", "http_client", "run_connection", "supervise", "sync_for_infra",
]

log = get_logger(__name__)

MIGRATIONS = Migrations("ce_poller", "ce_poller")
RELIST_S = 5.0
SOURCE = "dynamics-ce"


def http_client(cc: CeConnection) -> httpx.AsyncClient:
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=cc.ca_bundle) if cc.ca_bundle else True
    limit = int(cc.limits.get("concurrent", 52))
    return httpx.AsyncClient(
        verify=verify, timeout=httpx.Timeout(120.0, connect=15.0), trust_env=False,
        limits=httpx.Limits(max_connections=limit, max_keepalive_connections=min(limit, 20)),
    )


def build_sync(
    cc: CeConnection, http: httpx.AsyncClient, *, publisher: Publisher, cursors: CursorStore, keys: KnownKeys,
    settings: FlashSettings, dead_letter_sink: DeadLetterSink | None = None,
) -> ConnectionSync:
    """A connection's sync with a real MSAL token source and its user's shared budget."""
    tokens = MsalTokenSource(authority=cc.authority, client_id=cc.client_id, client_secret=cc.client_secret,
                             scope=cc.scope, ca_bundle=cc.ca_bundle)
    client = DataverseClient(http, cc.api, tokens, budget_for(cc.authority, cc.client_id, cc.limits),
                             backoff_base_s=settings.backoff_base_s, backoff_max_s=settings.backoff_max_s)
    return ConnectionSync(cc, client, publisher, cursors, keys, settings, dead_letter_sink=dead_letter_sink)


def sync_for_infra(cc: CeConnection, http: httpx.AsyncClient, infra: Infra) -> ConnectionSync:
    async def sink(rows: Sequence[tuple[object, ...]]) -> None:
        await index_dead_letters(infra.pool, rows)

    return build_sync(cc, http, publisher=infra.publisher, cursors=PgCursorStore(infra.pool),
                      keys=PgKnownKeys(infra.pool), settings=infra.settings, dead_letter_sink=sink)


async def run_connection(conn: Connection, infra: Infra, stop: asyncio.Event, *, once: bool = False) -> None:
    """Poll one connection until ``stop`` (or one full cycle with ``once``)."""
    bind(tenant_id=conn.tenant_id, connection_id=conn.connection_id)
    try:
        cc = parse_connection(conn)
    except ConfigError as exc:
        await mark_failed(conn, infra, exc)
        return
    async with http_client(cc) as http:
        sync = sync_for_infra(cc, http, infra)

        async def cycle() -> float:
            await sync.check_token_ages()
            results = await sync.run_cycle()
            log.debug("cycle done", results={k: (v.upserts, v.deletes) for k, v in results.items()})
            return cc.poll_interval_s

        await poll_forever(conn, infra, stop, cycle, once=once)


async def supervise(infra: Infra, stop: asyncio.Event, *, relist_s: float = RELIST_S) -> None:
    """Keep one :func:`run_connection` task per live dynamics-ce connection."""
    await supervise_connections(infra, stop, source=SOURCE, runner=run_connection, relist_s=relist_s)


def _tasks(infra: Infra, stop: asyncio.Event) -> Sequence[Awaitable[None]]:
    return [supervise(infra, stop)]


SERVICE = Service("ce-poller", migrations=[MIGRATIONS], tasks=_tasks)
