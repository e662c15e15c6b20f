"""Shared helpers for the Salesforce connector tests (no tests here): a connection row for a sandbox org,
and a reader of raw topics that needs no consumer group (no 5 s join)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from canonical.events import RawRecord, decode_event, decode_raw
from canonical.topics import RAW_ENTITIES, raw
from servicekit.connections import Connection, CredentialCipher, PgConnectionStore
from servicekit.runtime import Infra

__all__ = ["add_connection", "read_raw", "read_topic", "wait_for"]


async def add_connection(infra: Infra, tenant: str, cid: str, endpoint: str, client_id: str, secret: str,
                         settings: dict[str, Any], *, state: str = "live") -> Connection:
    store = PgConnectionStore(infra.pool, CredentialCipher.from_settings(infra.settings))
    await store.upsert(tenant, cid, "salesforce", endpoint, {"client_id": client_id, "client_secret": secret},
                              settings)
    if state != "draft":
        await store.set_state(tenant, cid, state)  # type: ignore[arg-type]
    return await store.get(tenant, cid)


async def read_topic(infra: Infra, topic: str) -> list[bytes]:
    """Every message currently on ``topic`` (all partitions), without joining a group."""
    consumer = AIOKafkaConsumer(bootstrap_servers=infra.bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        name = infra.settings.topic(topic)
        if name not in await consumer.topics():  # refreshes the metadata
            return []
        tps = [TopicPartition(name, p) for p in (consumer.partitions_for_topic(name) or set())]
        if not tps:
            return []
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: list[bytes] = []
        async def behind() -> bool:
            return any([await consumer.position(tp) < ends[tp] for tp in tps])

        while await behind():
            batch = await consumer.getmany(*tps, timeout_ms=500, max_records=10_000)
            for msgs in batch.values():
                out.extend(m.value for m in msgs if m.value is not None)
        return out
    finally:
        await consumer.stop()


async def read_raw(infra: Infra, entities: tuple[str, ...] = RAW_ENTITIES["salesforce"]) -> list[RawRecord]:
    out: list[RawRecord] = []
    for ent in entities:
        out.extend(decode_raw(v) for v in await read_topic(infra, raw("salesforce", ent)))
    return out


async def read_events(infra: Infra, topic: str) -> list[Any]:
    return [decode_event(v) for v in await read_topic(infra, topic)]


async def wait_for(cond: Callable[[], Awaitable[bool]], timeout: float, what: str, step: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await cond():
            return
        await asyncio.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")
