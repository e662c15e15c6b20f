"""Composition root of the Salesforce poller: one background task per live ``salesforce`` connection.

The supervisor re-lists ``connections`` every ``RELIST_S`` seconds, starts a task per live connection,
restarts it when its endpoint, settings or credentials change and stops it when it leaves ``live``. A
connection whose configuration is wrong is marked ``failed`` with the message saying what to fix.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable, Sequence

import httpx

from connectorkit.runner import mark_failed, poll_forever, supervise_connections
from servicekit.connections import Connection, PgCursorStore
from servicekit.errors import ConfigError
from servicekit.logging import bind, get_logger
from servicekit.runtime import Infra, Service
from sf_poller.client import QuotaGovernor, SalesforceClient
from sf_poller.config import SfConnection, parse_connection
from sf_poller.sync import ConnectionSync

__all__ = ["CDC_SUBSCRIBED", "RELIST_S", "SERVICE", "build_client", "build_sync", "http_client",
           "run_connection", "supervise"]

log = get_logger(__name__)

RELIST_S = 5.0
SOURCE = "salesforce"
CDC_SUBSCRIBED = "cdc:subscribed"
"""Cursor entity the CDC listener writes once its first subscription succeeded."""

Runner = Callable[[Connection, Infra, asyncio.Event], Awaitable[None]]


def http_client(cc: SfConnection) -> httpx.AsyncClient:
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=cc.ca_bundle) if cc.ca_bundle else True
    return httpx.AsyncClient(verify=verify, timeout=httpx.Timeout(130.0, connect=15.0), trust_env=False,
                             limits=httpx.Limits(max_connections=10, max_keepalive_connections=10))


def build_client(cc: SfConnection, http: httpx.AsyncClient, infra: Infra | None = None) -> SalesforceClient:
    base = infra.settings.backoff_base_s if infra else 0.5
    top = infra.settings.backoff_max_s if infra else 30.0
    return SalesforceClient(http, cc.my_domain, cc.client_id, cc.client_secret, cc.api_version,
                            QuotaGovernor(cc.quota), backoff_base_s=base, backoff_max_s=top)


def build_sync(cc: SfConnection, client: SalesforceClient, infra: Infra) -> ConnectionSync:
    cursors = PgCursorStore(infra.pool)

    async def cdc_ready() -> bool:
        return await cursors.load(cc.tenant_id, cc.connection_id, CDC_SUBSCRIBED) is not None

    return ConnectionSync(cc, client, infra.publisher, cursors, infra.settings,
                          ready_for_backfill=cdc_ready if cc.cdc else None)


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
    await supervise_connections(infra, stop, source=SOURCE, runner=runner, relist_s=relist_s)


def _tasks(infra: Infra, stop: asyncio.Event) -> Sequence[Awaitable[None]]:
    return [supervise(infra, stop)]


SERVICE = Service("sf-poller", tasks=_tasks)
