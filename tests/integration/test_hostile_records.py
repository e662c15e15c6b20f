"""Hostile records never cost other records: each ends handled or dead-lettered with a reason, and a
producer cannot suppress another record by reusing its event id (issue 15)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal

from canonical.events import ProductData, ProductUpserted, encode
from servicekit.consumer import Delivery, PipeConsumer, UnitOfWork
from servicekit.db import migrate
from servicekit.kafka import ensure_topics
from servicekit.runtime import Infra
from servicekit.testing.relay import MIGRATIONS, hop2


@dataclass
class Rec:
    value: bytes | None
    offset: int
    topic: str = "test.in"
    partition: int = 0
    key: bytes | None = None
    headers: Sequence[tuple[str, bytes]] = field(default_factory=list)
    timestamp: int = 0


def product(i: int | str, **over: object) -> bytes:
    fields: dict[str, object] = {
        "tenant_id": "acme", "connection_id": "c", "source": "flash", "entity": "relay-in",
        "source_id": f"g{i}", "source_version": "1", "product": ProductData(price=Decimal(1)),
    }
    fields.update(over)
    return encode(ProductUpserted(**fields))  # type: ignore[arg-type]


async def _consumer(infra: Infra, name: str, handler=hop2) -> PipeConsumer[ProductUpserted]:  # type: ignore[no-untyped-def]
    await migrate(infra.pool, [MIGRATIONS])
    await ensure_topics(infra.bootstrap, infra.settings, (), extra=[f"dlq.{name}.v1"])
    return PipeConsumer(name, ["test.in"], handler, settings=infra.settings, pool=infra.pool,
                        publisher=infra.publisher)


async def _letters(infra: Infra) -> list[tuple[int, str]]:
    rows = await infra.pool.fetch("SELECT source_offset, error_class FROM dead_letters ORDER BY source_offset")
    return [(r["source_offset"], r["error_class"]) for r in rows]


async def _effects(infra: Infra) -> list[str]:
    return sorted(r["source_id"] for r in await infra.pool.fetch("SELECT source_id FROM relay_effects"))


async def test_deeply_nested_record_is_dead_lettered_and_its_batch_lands(infra: Infra) -> None:
    consumer = await _consumer(infra, "deep")
    deep_body = b'{"event_type":"product.upserted","tenant_id":"acme","x":' + b"[" * 2000 + b"]" * 2000 + b"}"
    deep_array = b"[" * 2000 + b"]" * 2000
    await consumer.process_batch([Rec(product(0), 0), Rec(deep_body, 1), Rec(deep_array, 2), Rec(product(1), 3)])
    assert await _effects(infra) == ["g0", "g1"]
    assert await _letters(infra) == [(1, "NestingTooDeep"), (2, "NestingTooDeep")]


async def test_oversized_record_is_dead_lettered(infra: Infra) -> None:
    consumer = await _consumer(infra, "big")
    limit = infra.settings.max_message_bytes
    big = json.loads(product(5))
    big["padding"] = "x" * limit
    await consumer.process_batch([Rec(product(0), 0), Rec(json.dumps(big).encode(), 1)])
    assert await _effects(infra) == ["g0"]
    assert await _letters(infra) == [(1, "MessageTooLarge")]


async def test_key_of_another_tenant_is_refused(infra: Infra) -> None:
    consumer = await _consumer(infra, "keys")
    await consumer.process_batch([
        Rec(product(0), 0, key=b"acme:g0"),
        Rec(product(1), 1, key=b"other:g1"),
        Rec(product(2), 2, key=None),
    ])
    assert await _effects(infra) == ["g0", "g2"]
    assert await _letters(infra) == [(1, "TenantMismatch")]


async def test_a_producer_cannot_suppress_another_record_with_its_event_id(infra: Infra) -> None:
    consumer = await _consumer(infra, "ids")
    victim = json.loads(product("victim"))
    attacker = json.loads(product("attacker"))
    attacker["event_id"] = victim["event_id"]
    await consumer.process_batch([Rec(json.dumps(attacker).encode(), 0), Rec(json.dumps(victim).encode(), 1)])
    assert await _effects(infra) == ["gattacker", "gvictim"], "ids are derived, never taken from the producer"


async def test_same_id_different_content_is_handled_not_dropped(infra: Infra) -> None:
    consumer = await _consumer(infra, "conflict")
    first = product(7)
    second = product(7, product=ProductData(price=Decimal(2)))
    again = json.loads(first)
    again["observed_at"] = "2030-01-01T00:00:00Z"  # a re-read of the same version: same content, later
    await consumer.process_batch([Rec(first, 0)])
    await consumer.process_batch([Rec(second, 1), Rec(json.dumps(again).encode(), 2), Rec(second, 3)])
    assert await _effects(infra) == ["g7", "g7"], "a re-read is a duplicate; a rewrite is handled, once"
    assert await _letters(infra) == []


async def test_poison_the_database_refuses_is_dead_lettered_at_once(infra: Infra) -> None:
    """NUL in text, lone surrogates and int64 overflow can never succeed: no retry schedule for them."""
    attempts: dict[str, int] = {}

    async def store(batch: Sequence[Delivery[ProductUpserted]], uow: UnitOfWork) -> None:
        for d in batch:
            attempts[d.event.source_id] = attempts.get(d.event.source_id, 0) + 1
            sku = {"NUL": "a\x00b", "SURROGATE": "a\ud800b"}.get(d.event.product.sku or "", "")
            big = 2**63 if d.event.product.sku == "OVERFLOW" else 1
            await uow.conn.execute("SELECT $1::text, $2::bigint", sku, big)
        await hop2(batch, uow)

    consumer = await _consumer(infra, "dbpoison", store)
    recs = [
        Rec(product(0), 0),
        Rec(product(1, product=ProductData(sku="NUL")), 1),
        Rec(product(2, product=ProductData(sku="SURROGATE")), 2),
        Rec(product(3, product=ProductData(sku="OVERFLOW")), 3),
        Rec(product(4), 4),
    ]
    await consumer.process_batch(recs)
    assert await _effects(infra) == ["g0", "g4"]
    letters = await _letters(infra)
    assert [o for o, _ in letters] == [1, 2, 3]
    assert all(c.startswith("Poison:") for _, c in letters), letters
    assert max(attempts[f"g{i}"] for i in (1, 2, 3)) <= 3, "poison is not retried through the schedule"


async def test_poison_of_one_tenant_does_not_stall_the_others(infra: Infra) -> None:
    """Ten records that can never succeed cost no backoff at all; an unclassified failure is retried per
    message (bounded), never by holding the whole batch through the retry schedule."""
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    async def store(batch: Sequence[Delivery[ProductUpserted]], uow: UnitOfWork) -> None:
        for d in batch:
            if d.event.tenant_id == "evil":
                await uow.conn.execute("SELECT $1::text", "nul\x00")
        await hop2(batch, uow)

    await migrate(infra.pool, [MIGRATIONS])
    await ensure_topics(infra.bootstrap, infra.settings, (), extra=["dlq.stall.v1"])
    consumer = PipeConsumer("stall", ["test.in"], store, settings=infra.settings, pool=infra.pool,
                            publisher=infra.publisher, sleep=sleep)
    recs = [Rec(product(i, tenant_id="evil" if i % 2 else "acme"), i) for i in range(20)]
    await consumer.process_batch(recs)
    assert await _effects(infra) == sorted(f"g{i}" for i in range(0, 20, 2))
    assert len(await _letters(infra)) == 10
    assert slept == [], "poison is never waited for"
