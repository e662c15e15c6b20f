"""Tables that grow with failures are bounded: dead letters, replay audits and parked rows expire after
their retention, and a replay that fails again replaces its letter instead of adding a copy (issue 15)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from canonical.events import ProductData, ProductUpserted, encode
from servicekit.consumer import Delivery, PipeConsumer, UnitOfWork
from servicekit.db import migrate
from servicekit.errors import Poison
from servicekit.kafka import ensure_topics
from servicekit.retention import prune_platform_tables
from servicekit.runtime import Infra
from servicekit.testing.relay import MIGRATIONS


@dataclass
class Rec:
    value: bytes | None
    offset: int
    topic: str = "test.in"
    partition: int = 0
    key: bytes | None = None
    headers: Sequence[tuple[str, bytes]] = field(default_factory=list)
    timestamp: int = 0


async def _letter(infra: Infra, offset: int, age_days: int, replayed: bool = False) -> int:
    return int(await infra.pool.fetchval(
        """INSERT INTO dead_letters (consumer, tenant_id, error_class, error_message, stage, source_topic,
               source_partition, source_offset, attempts, first_failed_at, last_failed_at, dlq_topic, value,
               replayed_at)
           VALUES ('c', 'acme', 'Poison', 'x', 'handle', 'test.in', 0, $1, 1, now() - ($2 || ' days')::interval,
               now() - ($2 || ' days')::interval, 'dlq.c.v1', '{}', CASE WHEN $3 THEN now() END) RETURNING id""",
        offset, str(age_days), replayed))


async def test_dead_letters_and_replay_audits_expire(infra: Infra) -> None:
    for i, age in enumerate((1, 89, 91, 400)):
        await _letter(infra, i, age)
        await infra.pool.execute(
            """INSERT INTO dlq_replays (requested_by, filter, started_at)
               VALUES ('me', '{}', now() - ($1 || ' days')::interval)""",
            str(age))
    settings = infra.settings
    assert settings.dead_letter_retention_days == 90 and settings.dlq_replay_retention_days == 365
    while await prune_platform_tables(infra.pool, settings):
        pass
    assert await infra.pool.fetchval("SELECT count(*) FROM dead_letters") == 2
    assert await infra.pool.fetchval("SELECT count(*) FROM dlq_replays") == 3


async def test_parked_rows_expire(infra: Infra) -> None:
    from resolver.app import MIGRATIONS as RESOLVER
    from resolver.app import prune_parked

    await migrate(infra.pool, [RESOLVER])
    for i, age in enumerate((1, 100)):
        await infra.pool.execute(
            """INSERT INTO parked (tenant_id, order_source_id, kind, connection_id, source, event_id, event_type,
                   payload, parked_at)
               VALUES ('acme', $1, 'order', 'c', 'dynamics-ce', $1, 'order.upserted', '{}',
                   now() - ($2 || ' days')::interval)""", f"o{i}", str(age))
    assert await prune_parked(infra.pool, infra.settings) == 1
    assert [r["order_source_id"] for r in await infra.pool.fetch("SELECT order_source_id FROM parked")] == ["o0"]


async def test_a_replay_that_fails_again_replaces_its_letter(infra: Infra) -> None:
    await migrate(infra.pool, [MIGRATIONS])
    await ensure_topics(infra.bootstrap, infra.settings, (), extra=["dlq.c.v1"])

    async def refuse(batch: Sequence[Delivery[ProductUpserted]], uow: UnitOfWork) -> None:
        raise Poison("still wrong")

    consumer = PipeConsumer("c", ["test.in"], refuse, settings=infra.settings, pool=infra.pool,
                            publisher=infra.publisher)
    body = encode(ProductUpserted(tenant_id="acme", connection_id="c", source="flash", entity="p", source_id="p1",
                                  source_version="1", product=ProductData()))
    await consumer.process_batch([Rec(body, 0)])
    first = await infra.pool.fetchval("SELECT id FROM dead_letters")
    await infra.pool.execute("UPDATE dead_letters SET replayed_at = now() WHERE id = $1", first)
    for offset in (1, 2):  # two replays, each failing again
        last = await infra.pool.fetchval("SELECT max(id) FROM dead_letters")
        await consumer.process_batch([Rec(body, offset, headers=[("x-flash-replay-of", str(last).encode())])])
        await infra.pool.execute("UPDATE dead_letters SET replayed_at = now() WHERE replayed_at IS NULL")
    rows = await infra.pool.fetch("SELECT source_offset FROM dead_letters")
    assert [r["source_offset"] for r in rows] == [2], "one letter per message, the latest failure"
