"""Composition root of the fo-poller: one task per live ``dynamics-fo`` connection, and the process's
Business Events receiver.

Built on the connector kit (``connectorkit.runner``: supervision, ConfigError -> connection ``failed`` with
what to fix, our own outages waited out; ``connectorkit.cursors``: typed cursors and the published-versions
ledger). At start each connection reads ``$metadata`` and re-confirms its field mapping: an environment that
changed under a live connection stops it with the fields named, rather than mapping the wrong ones.

Receiver (optional): ``FLASH_FO_EVENTS_PORT`` (unset: no receiver), ``FLASH_FO_EVENTS_HOST`` (``0.0.0.0``),
``FLASH_FO_EVENTS_CERT`` / ``FLASH_FO_EVENTS_KEY`` (PEM; required: the endpoint is HTTPS),
``FLASH_FO_EVENTS_PUBLIC_URL`` (how the environment reaches it; shown by verify).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Sequence

from connectorkit import MIGRATIONS as KIT_MIGRATIONS
from connectorkit.cursors import PgCursorStore, PgPublishedVersions
from connectorkit.deadletters import PgSourceDeadLetters
from connectorkit.runner import mark_failed, poll_forever, supervise_connections
from fo_poller.client import FoClient
from fo_poller.config import FoConnection, parse_connection
from fo_poller.control import http_client, unconfirmed_message
from fo_poller.events import EventInbox, EventReceiver, PgEventStore
from fo_poller.metadata import ROLES_BY_STREAM, check_fields, check_statuses
from fo_poller.records import PRODUCER, SOURCE
from fo_poller.streams import FoSync
from servicekit.connections import Connection
from servicekit.db import Migrations
from servicekit.errors import ConfigError
from servicekit.logging import bind, get_logger
from servicekit.runtime import Infra, Service
from servicekit.settings import FlashSettings

__all__ = ["MIGRATIONS", "SERVICE", "run_connection", "start_sync", "supervise"]

log = get_logger(__name__)

MIGRATIONS = Migrations("fo_poller", "fo_poller")
RELIST_S = 5.0


async def start_sync(cc: FoConnection, client: FoClient, infra: Infra, inbox: EventInbox | None) -> FoSync:
    """Read ``$metadata``, confirm the field mapping (ConfigError naming the fields otherwise), build the sync."""
    roles = sorted({r for s in cc.streams for r in ROLES_BY_STREAM[s]})
    meta = await client.metadata([cc.entity_sets[r] for r in roles])
    missing = [cc.entity_sets[r] for r in roles if cc.entity_sets[r] not in meta]
    if missing:
        raise ConfigError(f"connection {cc.connection_id}: $metadata has no entity set {', '.join(missing)}; "
                          "set settings.entity_sets or settings.streams and verify again")
    failing = [c for c in check_fields(cc, meta) if not c.ok]
    if failing:
        raise ConfigError(unconfirmed_message(cc, failing))
    bad = [f"{sc.detail} -> {sc.fix}" for sc in check_statuses(cc, meta) if not sc.ok]
    if bad:
        raise ConfigError(f"connection {cc.connection_id}: " + " | ".join(bad))
    return FoSync(cc, client, infra.publisher, PgCursorStore(infra.pool), PgPublishedVersions(infra.pool),
                  infra.settings, meta, inbox=inbox,
                  dead_letters=PgSourceDeadLetters(infra.pool, infra.publisher, infra.settings, PRODUCER))


async def run_connection(conn: Connection, infra: Infra, stop: asyncio.Event, *,
                         receiver: EventReceiver | None = None, once: bool = False) -> None:
    """Sync one connection until ``stop`` (or one full cycle with ``once``)."""
    bind(tenant_id=conn.tenant_id, connection_id=conn.connection_id)
    try:
        cc = parse_connection(conn)
    except ConfigError as exc:
        await mark_failed(conn, infra, exc)
        return
    inbox: EventInbox | None = None
    if cc.events_enabled:
        inbox = EventInbox(cc, PgEventStore(infra.pool))
        await inbox.restore()
        if receiver is not None:
            receiver.register(inbox)
        else:
            log.warning("business events enabled but this process has no receiver (set FLASH_FO_EVENTS_PORT); "
                        "relying on the date windows and scans")
    try:
        async with http_client(cc) as http:
            client = FoClient(cc, http, backoff_base_s=infra.settings.backoff_base_s,
                              backoff_max_s=infra.settings.backoff_max_s)
            sync: FoSync | None = None

            async def cycle() -> float:
                nonlocal sync
                if sync is None:
                    sync = await start_sync(cc, client, infra, inbox)
                result = await sync.run_cycle()
                log.debug("cycle done", published=dict(result.published), read=dict(result.read),
                          requests=client.requests)
                return cc.poll_interval_s

            await poll_forever(conn, infra, stop, cycle, once=once)
    finally:
        if inbox is not None and receiver is not None:
            receiver.unregister(inbox)


async def supervise(infra: Infra, stop: asyncio.Event, *, receiver: EventReceiver | None = None,
                    relist_s: float = RELIST_S) -> None:
    """Keep one :func:`run_connection` task per live dynamics-fo connection."""

    async def runner(conn: Connection, infra: Infra, stop: asyncio.Event) -> None:
        await run_connection(conn, infra, stop, receiver=receiver)

    await supervise_connections(infra, stop, source=SOURCE, runner=runner, relist_s=relist_s)


def receiver_tls(settings: FlashSettings) -> ssl.SSLContext:
    if not settings.fo_events_cert or not settings.fo_events_key:
        raise ConfigError("FLASH_FO_EVENTS_PORT is set but FLASH_FO_EVENTS_CERT / FLASH_FO_EVENTS_KEY are not: the "
                          "Business Events endpoint is HTTPS; give it a certificate and key (PEM files)")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(settings.fo_events_cert, settings.fo_events_key)
    return ctx


async def _run(infra: Infra, stop: asyncio.Event) -> None:
    settings = infra.settings
    if settings.fo_events_port is None:
        await supervise(infra, stop)
        return
    receiver = EventReceiver()
    async with receiver.serve(settings.fo_events_host, settings.fo_events_port, receiver_tls(settings)) as bound:
        log.info("business events receiver listening", port=bound)
        await supervise(infra, stop, receiver=receiver)


def _tasks(infra: Infra, stop: asyncio.Event) -> Sequence[Awaitable[None]]:
    return [_run(infra, stop)]


SERVICE = Service("fo-poller", migrations=[KIT_MIGRATIONS, MIGRATIONS], tasks=_tasks)
