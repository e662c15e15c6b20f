"""Malformed JSON, a missing tenant_id and an unknown event version each get a clear DLQ reason, the
consumer keeps going, and transient failures are retried before they are dead-lettered."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal

from canonical.events import ProductData, ProductUpserted, encode
from servicekit.consumer import Delivery, PipeConsumer, UnitOfWork
from servicekit.db import migrate
from servicekit.errors import Transient
from servicekit.kafka import ensure_topics
from servicekit.runtime import Infra
from servicekit.testing.relay import MIGRATIONS, hop2


@dataclass
class Rec:
    value: bytes | None
    offset: int
    topic: str = "test.in"
    partition: int = 0
    key: bytes | None = b"k"
    headers: Sequence[tuple[str, bytes]] = field(default_factory=list)
    timestamp: int = 0


def good(i: int) -> bytes:
    return encode(ProductUpserted(tenant_id="acme", connection_id="c", source="flash", entity="relay-in",
                                  source_id=f"g{i}", source_version="1", product=ProductData(price=Decimal(1))))


async def test_bad_messages_get_clear_reasons_and_the_stream_goes_on(infra: Infra) -> None:
    await migrate(infra.pool, [MIGRATIONS])
    await ensure_topics(infra.bootstrap, infra.settings, (), extra=["dlq.decode-test.v1"])
    consumer = PipeConsumer("decode-test", ["test.in"], hop2, settings=infra.settings, pool=infra.pool,
                            publisher=infra.publisher)
    obj = json.loads(good(99))
    records = [
        Rec(good(0), 0),
        Rec(b'{"event_type": "product.upserted", "tenant_id": ', 1),
        Rec(json.dumps({k: v for k, v in obj.items() if k != "tenant_id"}).encode(), 2),
        Rec(json.dumps({**obj, "version": 7}).encode(), 3),
        Rec(good(1), 4),
    ]
    await consumer.process_batch(records)
    rows = await infra.pool.fetch("SELECT source_offset, error_class, error_message, stage, tenant_id "
                                  "FROM dead_letters ORDER BY source_offset")
    assert [(r["source_offset"], r["error_class"], r["stage"]) for r in rows] == [
        (1, "MalformedMessage", "decode"), (2, "MissingTenant", "decode"), (3, "UnsupportedEventVersion", "decode"),
    ]
    assert "not valid JSON" in rows[0]["error_message"]
    assert "no tenant_id" in rows[1]["error_message"]
    assert "version 7 is not supported" in rows[2]["error_message"] and rows[2]["tenant_id"] == "acme"
    effects = await infra.pool.fetch("SELECT source_id FROM relay_effects ORDER BY source_id")
    assert [r["source_id"] for r in effects] == ["g0", "g1"], "good messages around bad ones still land"


async def test_transient_failures_are_retried_then_dead_lettered(infra: Infra) -> None:
    await migrate(infra.pool, [MIGRATIONS])
    await ensure_topics(infra.bootstrap, infra.settings, (), extra=["dlq.flaky.v1"])
    calls: dict[str, int] = {}

    async def flaky(batch: Sequence[Delivery[ProductUpserted]], uow: UnitOfWork) -> None:
        for d in batch:
            calls[d.event.source_id] = calls.get(d.event.source_id, 0) + 1
            if d.event.source_id == "g1" and calls["g1"] < 2:
                raise Transient("vendor answered 503; retry")
            if d.event.source_id == "g2":
                raise Transient("vendor keeps answering 503")
        await hop2(batch, uow)

    consumer = PipeConsumer("flaky", ["test.in"], flaky, settings=infra.settings, pool=infra.pool,
                            publisher=infra.publisher)
    await consumer.process_batch([Rec(good(i), i) for i in range(4)])
    effects = sorted(r["source_id"] for r in await infra.pool.fetch("SELECT source_id FROM relay_effects"))
    assert effects == ["g0", "g1", "g3"], "a message that recovers lands once; others are not held back"
    row = await infra.pool.fetchrow("SELECT error_class, attempts, error_message FROM dead_letters")
    assert row is not None
    assert row["error_class"] == "Transient" and row["attempts"] == infra.settings.max_attempts
    assert "keeps answering 503" in row["error_message"]


async def test_dedupe_handles_each_event_once_on_every_path(infra: Infra) -> None:
    """All new (the plain insert), a redelivery mixing done and new events (the savepoint falls back to
    ON CONFLICT), and the same event twice in one batch: each event's effect happens exactly once."""
    from servicekit import metrics

    await migrate(infra.pool, [MIGRATIONS])
    consumer = PipeConsumer("dedupe-test", ["test.in"], hop2, settings=infra.settings, pool=infra.pool,
                            publisher=infra.publisher)
    dupes = metrics.DUPLICATES.labels("dedupe-test")
    before = dupes._value.get()
    await consumer.process_batch([Rec(good(i), i) for i in range(3)])
    await consumer.process_batch([Rec(good(i), 3 + i) for i in range(1, 5)])  # g1, g2 done; g3, g4 new
    await consumer.process_batch([Rec(good(5), 7), Rec(good(5), 8), Rec(good(6), 9)])
    effects = await infra.pool.fetch("SELECT source_id, count(*) AS n FROM relay_effects GROUP BY 1 ORDER BY 1")
    assert [(r["source_id"], r["n"]) for r in effects] == [(f"g{i}", 1) for i in range(7)]
    assert await infra.pool.fetchval("SELECT count(*) FROM processed WHERE consumer = 'dedupe-test'") == 7
    assert dupes._value.get() - before == 3, "two redelivered and one in-batch duplicate are counted"
