"""The batched outbox and the pipelined publish: offsets never move before a batch's outputs are
acknowledged, outputs leave in commit order, and whatever a crash leaves in either outbox table is relayed
in order. Real broker, real PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Sequence
from decimal import Decimal

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from test_dead_letter_reasons import Rec
from test_pipe_exactly_once import read_topic, wait_for

from canonical.events import ProductData, ProductUpserted, encode
from servicekit.db import migrate
from servicekit.kafka import KafkaPublisher, OutMessage, ensure_topics
from servicekit.outbox import pack_messages, relay_outbox, unpack_messages, write_outbox
from servicekit.runtime import Infra, run_services
from servicekit.testing.relay import IN_TOPIC, MID_TOPIC, MIGRATIONS, RELAY


def product(i: int) -> ProductUpserted:
    return ProductUpserted(
        tenant_id="acme", connection_id="relay", source="flash", entity="relay-in", source_id=f"p{i}",
        source_version="1", product=ProductData(sku=f"SKU-{i}", name=f"Product {i}", price=Decimal("1.00")),
    )


class GatedPublisher:
    """The real publisher, except that sends to one topic wait until the gate opens."""

    def __init__(self, inner: KafkaPublisher, topic: str) -> None:
        self.inner = inner
        self.topic = topic
        self.gate = asyncio.Event()
        self.held = 0

    async def send_all(self, messages: Sequence[OutMessage]) -> None:
        if any(m.topic == self.topic for m in messages):
            self.held += len(messages)
            await self.gate.wait()
        await self.inner.send_all(messages)


async def committed_total(infra: Infra, group: str, topic: str) -> int:
    probe = AIOKafkaConsumer(bootstrap_servers=infra.bootstrap, group_id=group, enable_auto_commit=False)
    await probe.start()
    try:
        await probe.topics()  # loads the cluster metadata, so partitions are known without subscribing
        total = 0
        for p in probe.partitions_for_topic(topic) or ():
            total += await probe.committed(TopicPartition(topic, p)) or 0
        return total
    finally:
        await probe.stop()


@dataclasses.dataclass
class GatedHop:
    """hop 1 running on the real runtime, its input published, its outputs held by ``gated``."""

    in_topic: str
    mid_topic: str
    events: list[ProductUpserted]
    gated: GatedPublisher
    stop: asyncio.Event
    runner: asyncio.Task[int]


async def start_gated_hop1(infra: Infra, monkeypatch: pytest.MonkeyPatch, n: int) -> GatedHop:
    monkeypatch.setenv("FLASH_RELAY_HOPS", "hop1")
    await migrate(infra.pool, [MIGRATIONS])
    await ensure_topics(infra.bootstrap, infra.settings, (), extra=[IN_TOPIC, MID_TOPIC])
    in_topic, mid_topic = infra.settings.topic(IN_TOPIC), infra.settings.topic(MID_TOPIC)
    gated = GatedPublisher(infra.publisher, mid_topic)
    events = [product(i) for i in range(n)]
    await infra.publisher.send_all([OutMessage(in_topic, encode(e), e.key) for e in events])
    stop = asyncio.Event()
    runner = asyncio.create_task(
        run_services([RELAY], infra.settings, stop=stop, infra=dataclasses.replace(infra, publisher=gated))  # type: ignore[arg-type]
    )
    return GatedHop(in_topic, mid_topic, events, gated, stop, runner)


@pytest.mark.timeout(120)
async def test_offsets_wait_for_the_outputs(infra: Infra, monkeypatch: pytest.MonkeyPatch) -> None:
    hop = await start_gated_hop1(infra, monkeypatch, 50)
    try:
        await wait_for(
            lambda: _count(infra, "SELECT count(*) FROM relay_effects WHERE hop = 'hop1'", 50), 60, "hop1 effects"
        )
        await wait_for(lambda: _true(hop.gated.held > 0), 10, "the publish to be attempted")
        await asyncio.sleep(1.0)  # time for a wrongly early commit to happen
        group = infra.settings.group("relay-hop1")
        assert await committed_total(infra, group, hop.in_topic) == 0, "offsets committed before outputs were acked"
        assert await infra.pool.fetchval("SELECT coalesce(sum(messages), 0) FROM outbox_batch") == 50

        hop.gated.gate.set()
        out = await read_topic(infra.bootstrap, hop.mid_topic, 50)
        assert sorted(json.loads(r.value)["source_id"] for r in out) == sorted(e.source_id for e in hop.events)
        await wait_for(lambda: _committed(infra, group, hop.in_topic, 50), 30, "offsets of all 50 committed")
    finally:
        hop.stop.set()
        await hop.runner
    # The drain at shutdown deletes what was published: nothing is left to relay.
    assert await infra.pool.fetchval("SELECT count(*) FROM outbox_batch") == 0


@pytest.mark.timeout(120)
async def test_shutdown_finishes_the_taken_batch_and_commits_its_offsets(
    infra: Infra, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopping while a batch's outputs are still being published: the stop waits for them and commits
    the batch's offsets while the consumer is still in its group, so nothing is redelivered."""
    hop = await start_gated_hop1(infra, monkeypatch, 20)
    await wait_for(lambda: _true(hop.gated.held > 0), 60, "the publish to be attempted")
    hop.stop.set()
    await asyncio.sleep(0.5)  # the stop is under way
    hop.gated.gate.set()
    await asyncio.wait_for(hop.runner, 30)
    group = infra.settings.group("relay-hop1")
    assert await committed_total(infra, group, hop.in_topic) == 20, "the last batch's offsets were committed"
    assert await infra.pool.fetchval("SELECT count(*) FROM outbox_batch") == 0


async def test_relay_publishes_legacy_rows_then_batches_in_order(infra: Infra) -> None:
    topic = infra.settings.topic("relay.order")
    await ensure_topics(infra.bootstrap, infra.settings, (), extra=["relay.order"])
    key = b"acme:one-key"  # one key: one partition, so the topic order is the publish order
    await infra.pool.execute(
        "INSERT INTO outbox (consumer, topic, key, value, headers) VALUES ('c', $1, $2, 'legacy', "
        "'[[\"tenant_id\", \"acme\"]]')", topic, key,
    )
    async with infra.pool.acquire() as conn:
        for b in range(3):
            await write_outbox(conn, "c", [OutMessage(topic, f"b{b}-{i}".encode(), key) for i in range(30)])
        await write_outbox(conn, "someone-else", [OutMessage(topic, b"not mine", key)])
    assert await relay_outbox(infra.pool, infra.publisher, "c") == 91
    out = await read_topic(infra.bootstrap, topic, 92, timeout=5)
    assert [r.value for r in out] == [b"legacy"] + [f"b{b}-{i}".encode() for b in range(3) for i in range(30)]
    assert dict(out[0].headers) == {"tenant_id": b"acme"}
    assert await infra.pool.fetchval("SELECT count(*) FROM outbox WHERE consumer = 'c'") == 0
    assert await infra.pool.fetchval("SELECT count(*) FROM outbox_batch WHERE consumer = 'c'") == 0
    assert await infra.pool.fetchval("SELECT count(*) FROM outbox_batch WHERE consumer = 'someone-else'") == 1


@pytest.mark.unit
def test_pack_round_trip() -> None:
    messages = [
        OutMessage("t.a", b'{"x":1}', b"k", [("tenant_id", b"acme"), ("bin", b"\x00\xff")]),
        OutMessage("t.b", b"", None, []),
    ]
    assert unpack_messages(pack_messages(messages)) == messages


async def _count(infra: Infra, sql: str, want: int) -> bool:
    return int(await infra.pool.fetchval(sql)) >= want


async def _true(value: bool) -> bool:
    return value


async def _committed(infra: Infra, group: str, topic: str, want: int) -> bool:
    return await committed_total(infra, group, topic) >= want


class BrokenPublisher:
    """Fails the way a bug would (not an outage): the consumer must stop, not skip or loop."""

    def __init__(self) -> None:
        self.calls = 0

    async def send_all(self, messages: Sequence[OutMessage]) -> None:
        self.calls += 1
        raise TypeError("header value must be bytes")


async def test_a_publish_that_fails_unexpectedly_stops_the_consumer_and_keeps_the_outbox(infra: Infra) -> None:
    from servicekit.consumer import PipeConsumer
    from servicekit.errors import ConfigError
    from servicekit.testing.relay import hop1

    await migrate(infra.pool, [MIGRATIONS])
    await ensure_topics(infra.bootstrap, infra.settings, (), extra=[IN_TOPIC, MID_TOPIC])
    broken = BrokenPublisher()
    consumer = PipeConsumer("relay-hop1", [IN_TOPIC], hop1, settings=infra.settings, pool=infra.pool,
                            publisher=broken)  # type: ignore[arg-type]
    events = [product(i) for i in range(5)]
    records = [Rec(encode(e), i, topic=infra.settings.topic(IN_TOPIC)) for i, e in enumerate(events)]
    committed: list[int] = []

    async def commit_offsets() -> None:
        committed.append(1)

    stops: list[BaseException] = []
    consumer.on_fatal = stops.append
    await consumer.handle_batch(records[:3], after_publish=commit_offsets)
    await consumer.handle_batch(records[3:], after_publish=commit_offsets)
    with pytest.raises(ConfigError, match="restart relays it from the outbox"):
        await consumer.drain()
    assert len(stops) == 1 and isinstance(stops[0], ConfigError), "the runtime is told at once, not at the next batch"
    assert committed == [], "no offset may move past output that was not published"
    assert broken.calls == 1, "nothing after the failed batch is attempted (order is kept)"
    assert await infra.pool.fetchval("SELECT coalesce(sum(messages), 0) FROM outbox_batch") == 5

    # The restart: a working publisher relays both batches, in order.
    assert await relay_outbox(infra.pool, infra.publisher, "relay-hop1") == 5
    out = await read_topic(infra.bootstrap, infra.settings.topic(MID_TOPIC), 5, timeout=10)
    assert sorted(json.loads(r.value)["source_id"] for r in out) == [e.source_id for e in events]



async def test_the_next_batch_is_decoded_during_the_transaction_and_committed_after_it(infra: Infra) -> None:
    """handle_batch returns while its transaction runs; the next call decodes its batch at once but
    returns only after that transaction committed, and the effects land in stream order."""
    from servicekit.consumer import Delivery, PipeConsumer, UnitOfWork

    await migrate(infra.pool, [MIGRATIONS])
    release = asyncio.Event()
    log: list[str] = []

    async def handler(batch: Sequence[Delivery[ProductUpserted]], uow: UnitOfWork) -> None:
        first = batch[0].event.source_id
        log.append(f"start {first}")
        if first == "p0":
            await release.wait()
        await uow.conn.copy_records_to_table(
            "relay_effects", records=[("hop1", d.event.tenant_id, d.event.source_id) for d in batch],
            columns=["hop", "tenant_id", "source_id"],
        )
        log.append(f"commit {first}")

    decoded: list[str] = []

    def decoder(raw: bytes) -> ProductUpserted:
        event = ProductUpserted.model_validate_json(raw)
        decoded.append(event.source_id)
        return event

    consumer = PipeConsumer("relay-hop1", [IN_TOPIC], handler, settings=infra.settings, pool=infra.pool,
                            publisher=infra.publisher, decoder=decoder)
    topic = infra.settings.topic(IN_TOPIC)
    recs = [Rec(encode(product(i)), i, topic=topic) for i in range(4)]
    await asyncio.wait_for(consumer.handle_batch(recs[:2]), 5)  # returns with its transaction still open
    await wait_for(lambda: _true(log == ["start p0"]), 5, "the first transaction to start")
    second = asyncio.create_task(consumer.handle_batch(recs[2:]))
    await wait_for(lambda: _true(decoded == ["p0", "p1", "p2", "p3"]), 5, "the second batch to be decoded")
    await asyncio.sleep(0.2)
    assert not second.done(), "the next transaction waits for the previous one"
    assert log == ["start p0"]
    release.set()
    await asyncio.wait_for(second, 10)
    await consumer.drain()
    assert log == ["start p0", "commit p0", "start p2", "commit p2"]
    rows = await infra.pool.fetch("SELECT source_id FROM relay_effects ORDER BY applied_at, source_id")
    assert [r["source_id"] for r in rows] == ["p0", "p1", "p2", "p3"]


async def test_a_failed_transaction_stops_the_service_even_when_no_batch_follows(infra: Infra) -> None:
    from servicekit.consumer import Delivery, PipeConsumer, UnitOfWork
    from servicekit.errors import ConfigError

    await migrate(infra.pool, [MIGRATIONS])

    async def handler(batch: Sequence[Delivery[ProductUpserted]], uow: UnitOfWork) -> None:
        raise ConfigError("no program configured for tenant acme; set one and restart")

    consumer = PipeConsumer("relay-hop1", [IN_TOPIC], handler, settings=infra.settings, pool=infra.pool,
                            publisher=infra.publisher)
    stops: list[BaseException] = []
    consumer.on_fatal = stops.append
    await consumer.handle_batch([Rec(encode(product(0)), 0, topic=infra.settings.topic(IN_TOPIC))])
    await wait_for(lambda: _true(len(stops) == 1), 10, "the stop to be reported")
    assert isinstance(stops[0], ConfigError) and "set one and restart" in str(stops[0])
    with pytest.raises(ConfigError):
        await consumer.drain()
    assert await infra.pool.fetchval("SELECT count(*) FROM processed") == 0, "nothing of the batch committed"
