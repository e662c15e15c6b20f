"""Composition root of the points engine."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Sequence
from typing import Any

from canonical.topics import CANONICAL_PRODUCT, RESOLVED_ORDER, RESOLVED_RETURN
from points import rules
from points.handlers import Clock, make_handler, mature_orders, utcnow
from servicekit.consumer import PipeConsumer
from servicekit.db import Migrations, db_errors
from servicekit.logging import get_logger
from servicekit.outbox import TaskOutbox
from servicekit.runtime import Infra, Service, every

__all__ = ["ACCEPTED", "CONSUMER", "MIGRATIONS", "SERVICE", "build_service", "mature_once"]

log = get_logger(__name__)

CONSUMER = "points"
MIGRATIONS = Migrations("points", "points")
ACCEPTED = frozenset(
    {
        "order.resolved",
        "order.line_upserted",
        "order.line_deleted",
        "order.deleted",
        "return.resolved",
        "return.deleted",
        "product.upserted",
        "product.deleted",
    }
)
MATURE_INTERVAL_S = 30.0


async def mature_once(box: TaskOutbox, now: dt.datetime) -> int:
    """One pass of the return-window task: award what matured, in one transaction with its emits."""
    async with db_errors("points maturity"), box.pool.acquire() as conn, conn.transaction():
        uow = box.unit_of_work(conn)
        n = await mature_orders(conn, uow, now=now)
        await box.write(conn, uow)
    await box.flush()
    return n


def build_service(clock: Clock = utcnow, mature_interval_s: float = MATURE_INTERVAL_S) -> Service:
    """The points Service; tests pass a clock and a short maturity interval."""
    handler = make_handler(clock)

    def consumers(infra: Infra) -> Sequence[PipeConsumer[Any]]:
        rules.configure(default_per_order_cap=infra.settings.points_max_per_order)
        return [
            PipeConsumer(
                CONSUMER,
                [RESOLVED_ORDER, RESOLVED_RETURN, CANONICAL_PRODUCT],
                handler,
                settings=infra.settings,
                pool=infra.pool,
                publisher=infra.publisher,
                accepted=ACCEPTED,
            )
        ]

    def tasks(infra: Infra, stop: asyncio.Event) -> Sequence[Awaitable[None]]:
        box = TaskOutbox(f"{CONSUMER}-maturity", infra.pool, infra.publisher, infra.settings)
        return [every(mature_interval_s, stop, lambda: mature_once(box, clock()), what="points maturity")]

    return Service(CONSUMER, migrations=[MIGRATIONS], consumers=consumers, tasks=tasks)


SERVICE = build_service()
