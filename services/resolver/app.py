"""Composition root of the member resolver."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import Any

import asyncpg

from canonical.topics import CANONICAL_CUSTOMER, CANONICAL_ORDER, CANONICAL_RETURN, MEMBERS
from resolver.adapters import PgResolverStore
from resolver.handlers import handle, release_stranded, relink_members
from servicekit.consumer import PipeConsumer
from servicekit.db import Migrations, db_errors
from servicekit.logging import get_logger
from servicekit.outbox import TaskOutbox
from servicekit.retention import prune_older_than
from servicekit.runtime import Infra, Service, every
from servicekit.settings import FlashSettings

__all__ = ["ACCEPTED", "CONSUMER", "MIGRATIONS", "SERVICE", "prune_parked", "relink_once"]

log = get_logger(__name__)

CONSUMER = "resolver"
MIGRATIONS = Migrations("resolver", "resolver")
ACCEPTED = frozenset(
    {
        "member.upserted",
        "customer.upserted",
        "customer.deleted",
        "order.upserted",
        "order.deleted",
        "order.line_upserted",
        "order.line_deleted",
        "return.upserted",
        "return.deleted",
    }
)
RELINK_INTERVAL_S = 1.0
SWEEP_INTERVAL_S = 5.0


def consumers(infra: Infra) -> Sequence[PipeConsumer[Any]]:
    return [
        PipeConsumer(
            CONSUMER,
            [MEMBERS, CANONICAL_CUSTOMER, CANONICAL_ORDER, CANONICAL_RETURN],
            handle,
            settings=infra.settings,
            pool=infra.pool,
            publisher=infra.publisher,
            accepted=ACCEPTED,
        )
    ]


async def relink_once(box: TaskOutbox, limit: int = 1000) -> int:
    """Re-link members written outside the members topic (``flash members import``); returns how many.

    The members are claimed with SKIP LOCKED, re-linked and marked in one transaction whose emits go
    through the task's outbox, so a crash re-does or finds done, like a consumer batch.
    """
    async with db_errors("member relink"), box.pool.acquire() as conn, conn.transaction():
        uow = box.unit_of_work(conn)
        rows = await PgResolverStore(conn).claim_unlinked_members(limit)
        if rows:
            await relink_members(rows, uow)
            await PgResolverStore(conn).mark_relinked((r["tenant_id"], r["member_id"]) for r in rows)
            await box.write(conn, uow)
    await box.flush()
    return len(rows)


async def sweep_stranded_once(box: TaskOutbox) -> int:
    """One pass of :func:`resolver.handlers.release_stranded`, by one copy at a time (a transaction-scoped
    advisory lock; the others skip the round). Returns 0: the next pass waits for the interval."""
    async with db_errors("parked sweep"), box.pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock(hashtext('flash-resolver-parked-sweep'))"):
            return 0
        uow = box.unit_of_work(conn)
        if await release_stranded(uow):
            await box.write(conn, uow)
    await box.flush()
    return 0


async def prune_parked(pool: asyncpg.Pool, settings: FlashSettings) -> int:
    """One chunk of parked orders/returns that waited longer than FLASH_PARKED_RETENTION_DAYS for a member."""
    return await prune_older_than(pool, "parked", "parked_at", settings.parked_retention_days)


def tasks(infra: Infra, stop: asyncio.Event, *, interval: float = RELINK_INTERVAL_S) -> Sequence[Awaitable[None]]:
    box = TaskOutbox(f"{CONSUMER}-relink", infra.pool, infra.publisher, infra.settings)
    sweep = TaskOutbox(f"{CONSUMER}-sweep", infra.pool, infra.publisher, infra.settings)
    return [
        every(interval, stop, lambda: relink_once(box), what="member re-link"),
        every(SWEEP_INTERVAL_S, stop, lambda: sweep_stranded_once(sweep), what="parked sweep"),
        every(3600, stop, lambda: prune_parked(infra.pool, infra.settings), what="parked pruning"),
    ]


SERVICE = Service(CONSUMER, migrations=[MIGRATIONS], consumers=consumers, tasks=tasks)
