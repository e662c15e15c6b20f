"""Composition root of the CE poller: one background task per live ``dynamics-ce`` connection.

Built on the connector kit: ``connectorkit.runner`` supervises the connections (re-listed every
``RELIST_S`` seconds; a connection whose configuration is wrong is marked ``failed`` with the message saying
what to fix, the others keep running; an outage of our database or broker is waited out), cursors are typed
``connectorkit.cursors.Checkpoint`` rows, dead letters go through ``connectorkit.deadletters``.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Sequence

import httpx

from ce_poller.client import DataverseClient, MsalTokenSource
from ce_poller.config import CeConnection, parse_connection
from ce_poller.limiter import budget_for
from ce_poller.records import PRODUCER, SOURCE
from ce_poller.stores import KnownKeys, PgKnownKeys
from ce_poller.streams import ConnectionSync
from connectorkit import MIGRATIONS as KIT_MIGRATIONS
from connectorkit.cursors import PgCursorStore, Publisher
from connectorkit.deadletters import PgSourceDeadLetters, SourceDeadLetters
from connectorkit.endpoints import HostPin
from connectorkit.runner import mark_failed, poll_forever, supervise_connections
from servicekit.connections import Connection, CursorStore
from servicekit.db import Migrations
from servicekit.errors import ConfigError
from servicekit.logging import bind, get_logger
from servicekit.runtime import Infra, Service
from servicekit.settings import FlashSettings

__all__ = [
    "MIGRATIONS", "RELIST_S", "SERVICE", "build_client", "build_sync", "http_client", "run_connection", "supervise",
    "sync_for_infra",
]

log = get_logger(__name__)

MIGRATIONS = Migrations("ce_poller", "ce_poller")
RELIST_S = 5.0


def http_client(cc: CeConnection) -> httpx.AsyncClient:
    """The connection's HTTP pool: its CA bundle, no proxy from the environment, never following redirects
    by itself (the kit's client decides, host by host)."""
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=cc.ca_bundle) if cc.ca_bundle else True
    limit = int(cc.limits.get("concurrent", 52))
    return httpx.AsyncClient(
        verify=verify, timeout=httpx.Timeout(120.0, connect=15.0), trust_env=False, follow_redirects=False,
        limits=httpx.Limits(max_connections=limit, max_keepalive_connections=min(limit, 20)),
    )


def token_source(cc: CeConnection) -> MsalTokenSource:
    return MsalTokenSource(authority=cc.authority, client_id=cc.client_id, client_secret=cc.client_secret,
                           scope=cc.scope, ca_bundle=cc.ca_bundle)


def build_client(cc: CeConnection, http: httpx.AsyncClient, settings: FlashSettings, *,
                 max_attempts: int = 8) -> DataverseClient:
    """A Dataverse client pinned to the org's host, with the application user's shared budget."""
    return DataverseClient(http, cc.api, token_source(cc), budget_for(cc.authority, cc.client_id, cc.limits),
                           backoff_base_s=settings.backoff_base_s, backoff_max_s=settings.backoff_max_s,
                           max_attempts=max_attempts, pin=HostPin.for_urls([cc.org_url]),
                           secrets=(cc.client_secret,))


def build_sync(
    cc: CeConnection, http: httpx.AsyncClient, *, publisher: Publisher, cursors: CursorStore, keys: KnownKeys,
    settings: FlashSettings, dead_letters: SourceDeadLetters | None = None,
) -> ConnectionSync:
    """A connection's sync with a real MSAL token source and its user's shared budget."""
    return ConnectionSync(cc, build_client(cc, http, settings), publisher, cursors, keys, settings,
                          dead_letters=dead_letters)


def sync_for_infra(cc: CeConnection, http: httpx.AsyncClient, infra: Infra) -> ConnectionSync:
    return build_sync(cc, http, publisher=infra.publisher, cursors=PgCursorStore(infra.pool),
                      keys=PgKnownKeys(infra.pool), settings=infra.settings,
                      dead_letters=PgSourceDeadLetters(infra.pool, infra.publisher, infra.settings, PRODUCER))


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


SERVICE = Service("ce-poller", migrations=[KIT_MIGRATIONS, MIGRATIONS], tasks=_tasks)
