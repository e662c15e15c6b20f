"""Composition root of the Salesforce CDC listener (``python -m cdc_listener``): one CometD client
(:class:`cdc_listener.listener.CdcListener`) per live ``salesforce`` connection with ``settings.cdc`` on."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Sequence

import aiohttp

from cdc_listener.listener import CdcListener
from connectorkit.runner import supervise_connections
from servicekit.connections import Connection, CredentialCipher, PgConnectionStore, PgCursorStore
from servicekit.db import migrate
from servicekit.errors import ConfigError
from servicekit.logging import bind, get_logger
from servicekit.runtime import Infra, Service
from sfconnect.client import QuotaGovernor, SalesforceClient, build_client, http_client
from sfconnect.config import Quota, SfConnection, parse_connection
from sfconnect.deadletters import KitDeadLetters
from sfconnect.guarded import GuardedCursorStore
from sfconnect.published import MIGRATIONS, PgPublishedStore
from sfconnect.reader import RecordReader
from sfconnect.records import SOURCE

__all__ = ["SERVICE", "aiohttp_session", "listener_for", "run_listener", "supervise"]

log = get_logger(__name__)

RELIST_S = 5.0
PRODUCER = "cdc-listener"
"""Dead-letter topic (``dlq.cdc-listener.v1``) and service name."""


async def supervise(infra: Infra, stop: asyncio.Event, *, relist_s: float = RELIST_S) -> None:
    """Keep one listener task per live salesforce connection."""
    await migrate(infra.pool, [MIGRATIONS])  # idempotent; lets embedders (demo, tests, bench) skip it
    await supervise_connections(infra, stop, source=SOURCE, runner=run_listener, relist_s=relist_s)


def listener_for(cc: SfConnection, client: SalesforceClient, infra: Infra,
                 session: aiohttp.ClientSession) -> CdcListener:
    cursors = GuardedCursorStore(PgCursorStore(infra.pool))
    letters = KitDeadLetters(infra.pool, infra.publisher, infra.settings, PRODUCER)
    sync = RecordReader(cc, client, infra.publisher, cursors, infra.settings, store=PgPublishedStore(infra.pool),
                        dead_letters=letters, consumer=PRODUCER)
    return CdcListener(cc, client, sync, cursors, session, dead_letters=letters)


def aiohttp_session(cc: SfConnection) -> aiohttp.ClientSession:
    ctx = ssl.create_default_context(cafile=cc.ca_bundle) if cc.ca_bundle else ssl.create_default_context()
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=4))


async def run_listener(conn: Connection, infra: Infra, stop: asyncio.Event) -> None:
    """Stream one connection's change events until ``stop``."""
    bind(tenant_id=conn.tenant_id, connection_id=conn.connection_id, source=SOURCE)
    store = PgConnectionStore(infra.pool, CredentialCipher.from_settings(infra.settings))
    try:
        cc = parse_connection(conn)
    except ConfigError as exc:
        log.warning("connection misconfigured", error=str(exc))
        return
    if not cc.cdc:
        return
    # the stream only reads (fetch-backs) at the org share; the poller's per-run share does not apply
    quota = Quota(run_share=1.0, org_share=cc.quota.org_share, pause_s=cc.quota.pause_s,
                  limit_backoff_s=cc.quota.limit_backoff_s)
    async with http_client(cc) as http, aiohttp_session(cc) as session:
        client = build_client(cc, http, infra)
        client.governor = QuotaGovernor(quota)
        listener = listener_for(cc, client, infra, session)
        await listener.sync.ensure_shape()
        started = time.monotonic()
        try:
            await listener.run(stop)
        except ConfigError as exc:
            log.warning("listener stopped: configuration error", error=str(exc))
            await store.set_state(conn.tenant_id, conn.connection_id, "failed", error=str(exc))
        finally:
            log.info("listener stopped", seconds=round(time.monotonic() - started, 1), events=listener.stats.events)


def _tasks(infra: Infra, stop: asyncio.Event) -> Sequence[Awaitable[None]]:
    return [supervise(infra, stop)]


SERVICE = Service("cdc-listener", migrations=[MIGRATIONS], tasks=_tasks)
