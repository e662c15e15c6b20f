"""Issue 2 must-shows: exactly-once through a two-hop pipe with poison messages, DLQ headers, replay
after the fix, a SIGKILL mid-stream, and clear reasons for undecodable input. Real broker, real
PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal

import pytest
from aiokafka import AIOKafkaConsumer

from canonical.events import ProductData, ProductUpserted, encode
from canonical.topics import dlq
from servicekit import dlq as dlq_ops
from servicekit.db import migrate
from servicekit.kafka import OutMessage, ensure_topics
from servicekit.runtime import Infra, run_services
from servicekit.settings import FlashSettings
from servicekit.testing.infra import service_env
from servicekit.testing.relay import IN_TOPIC, MID_TOPIC, MIGRATIONS, RELAY

N = 10_000
TENANT = "acme"


def product(i: int, tenant: str = TENANT) -> ProductUpserted:
    sku = f"POISON-{i}" if i % 1000 == 500 else f"SKU-{i}"
    return ProductUpserted(
        tenant_id=tenant, connection_id="relay", source="flash", entity="relay-in", source_id=f"p{i}",
        source_version="1", product=ProductData(sku=sku, name=f"Product {i}", price=Decimal("9.99")),
    )


async def prepare(infra: Infra) -> None:
    await migrate(infra.pool, [MIGRATIONS])
    await ensure_topics(
        infra.bootstrap, infra.settings, (), extra=[IN_TOPIC, MID_TOPIC, dlq("relay-hop1"), dlq("relay-hop2")]
    )


async def produce(infra: Infra, events: list[ProductUpserted]) -> None:
    topic = infra.settings.topic(IN_TOPIC)
    for start in range(0, len(events), 2000):
        await infra.publisher.send_all([OutMessage(topic, encode(e), e.key) for e in events[start:start + 2000]])


async def wait_for(cond: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await cond():
            return
        await asyncio.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def effect_counts(infra: Infra, hop: str) -> tuple[int, int]:
    row = await infra.pool.fetchrow(
        "SELECT count(*) AS n, count(DISTINCT (tenant_id, source_id)) AS d FROM relay_effects WHERE hop = $1", hop
    )
    assert row is not None
    return int(row["n"]), int(row["d"])


async def read_topic(bootstrap: str, topic: str, expect: int, timeout: float = 20) -> list:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None)
    await consumer.start()
    out: list = []
    try:
        deadline = time.monotonic() + timeout
        while len(out) < expect and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                out.extend(records)
    finally:
        await consumer.stop()
    return out


@pytest.mark.timeout(240)
async def test_two_hop_pipe_exactly_once_with_poison_and_replay(infra: Infra) -> None:
    await prepare(infra)
    events = [product(i) for i in range(N)]
    poison_ids = {e.source_id for e in events if e.product.sku and e.product.sku.startswith("POISON")}
    assert len(poison_ids) == 10
    await produce(infra, events)
    # Duplicates on the wire change nothing: re-send 500 good ones.
    await produce(infra, [e for e in events[:500] if e.source_id not in poison_ids])

    stop = asyncio.Event()
    runner = asyncio.create_task(run_services([RELAY], infra.settings, stop=stop))
    try:
        await wait_for(lambda: _hop_done(infra, "hop2", N - 10), 120, "9,990 good messages through both hops")
        await wait_for(lambda: _dead_count(infra, 10), 30, "10 dead letters")
        for hop in ("hop1", "hop2"):
            assert await effect_counts(infra, hop) == (N - 10, N - 10), f"{hop} effects not exactly once"

        letters = await dlq_ops.list_letters(infra.pool, dlq_ops.DlqFilter(consumer="relay-hop1"))
        assert {row["event_id"] for row in letters} == {e.event_id for e in events if e.source_id in poison_ids}
        assert all(row["error_class"] == "Poison" and "not sellable" in row["error_message"] for row in letters)
        assert all(row["tenant_id"] == TENANT and row["attempts"] >= 1 for row in letters)

        # The DLQ topic itself holds the unchanged messages with the headers docs/events.md lists.
        on_topic = await read_topic(infra.bootstrap, infra.settings.topic(dlq("relay-hop1")), 10)
        assert len(on_topic) == 10
        by_value = {e.event_id: encode(e) for e in events}
        for rec in on_topic:
            headers = dict(rec.headers)
            body = json.loads(rec.value)
            assert rec.value == by_value[body["event_id"]], "dead letter body must be unchanged"
            for name in ("x-flash-error-class", "x-flash-error-message", "x-flash-stage", "x-flash-original-topic",
                         "x-flash-original-partition", "x-flash-original-offset", "x-flash-attempts",
                         "x-flash-first-failure-at", "x-flash-last-failure-at", "tenant_id"):
                assert name in headers, name
            assert headers["x-flash-original-topic"] == infra.settings.topic(IN_TOPIC).encode()
            assert headers["x-flash-error-class"] == b"Poison"

        depth = await dlq_ops.depth(infra.pool)
        assert [(d["consumer"], d["tenant_id"], d["depth"]) for d in depth] == [("relay-hop1", TENANT, 10)]

        # The fix, then a replay: each lands exactly once.
        await infra.pool.executemany(
            "INSERT INTO relay_fixes (tenant_id, source_id) VALUES ($1, $2)", [(TENANT, s) for s in poison_ids]
        )
        audit = await dlq_ops.replay(infra.pool, infra.publisher, dlq_ops.DlqFilter(consumer="relay-hop1"),
                                     requested_by="test")
        assert audit["replayed"] == 10
        await wait_for(lambda: _hop_done(infra, "hop2", N), 60, "replayed messages through both hops")
        again = await dlq_ops.replay(infra.pool, infra.publisher, dlq_ops.DlqFilter(consumer="relay-hop1"))
        assert again["replayed"] == 0, "a replay is idempotent: nothing is left to replay"
        await asyncio.sleep(1.0)
        for hop in ("hop1", "hop2"):
            assert await effect_counts(infra, hop) == (N, N), f"{hop} effects not exactly once after replay"
        assert await infra.pool.fetchval("SELECT count(*) FROM dlq_replays") == 2
        assert await dlq_ops.depth(infra.pool) == []
    finally:
        stop.set()
        assert await asyncio.wait_for(runner, 30) == 0


@pytest.mark.timeout(240)
async def test_sigkill_mid_stream_still_exactly_once(infra: Infra, settings: FlashSettings) -> None:
    await prepare(infra)
    events = [product(i, "globex") for i in range(N)]
    await produce(infra, events)
    env = service_env(infra.bootstrap, infra.database_url, settings,
                      FLASH_BATCH_MAX_RECORDS="200", FLASH_BACKOFF_BASE_S="0.01", FLASH_MAX_ATTEMPTS="2")

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "servicekit.testing.relay"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    proc = start()
    try:
        await wait_for(lambda: _hop_at_least(infra, "hop2", 1500), 90, "the pipe to be mid-stream")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        killed_at = (await effect_counts(infra, "hop2"))[0]
        assert killed_at < N - 10, "the kill must land mid-stream for this test to mean anything"
        proc = start()
        await wait_for(lambda: _hop_done(infra, "hop2", N - 10), 150, "the restarted pipe to finish")
        await wait_for(lambda: _dead_count(infra, 10), 30, "10 dead letters")
        await asyncio.sleep(1.0)
        for hop in ("hop1", "hop2"):
            assert await effect_counts(infra, hop) == (N - 10, N - 10), f"{hop} effects not exactly once"
        assert await infra.pool.fetchval("SELECT count(*) FROM dead_letters") == 10
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


async def _hop_done(infra: Infra, hop: str, n: int) -> bool:
    return (await effect_counts(infra, hop))[1] >= n


async def _hop_at_least(infra: Infra, hop: str, n: int) -> bool:
    return (await effect_counts(infra, hop))[0] >= n


async def _dead_count(infra: Infra, n: int) -> bool:
    return int(await infra.pool.fetchval("SELECT count(*) FROM dead_letters")) >= n
