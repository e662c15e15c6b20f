"""The transactional outbox shared by consumers and background tasks.

Messages are written to ``outbox_batch`` in the same transaction as the effect that caused them (one row per
batch, the messages packed with msgpack), published after the commit, then deleted. Whatever a crash leaves
behind is published by :func:`relay_outbox` (at the next start or flush); consumers deduplicate by event id,
so a message published twice lands once.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import asyncpg
import msgpack

from canonical.envelope import Envelope
from canonical.events import encode
from servicekit.db import DbConnection, db_errors
from servicekit.kafka import Headers, KafkaPublisher, OutMessage
from servicekit.settings import FlashSettings

__all__ = [
    "TaskOutbox", "UnitOfWork", "delete_published", "headers_from_json", "headers_json", "message_headers",
    "pack_messages", "relay_outbox", "unpack_messages", "write_outbox",
]


def message_headers(event: Envelope) -> Headers:
    """Headers on every message (docs/events.md, "Headers"): tenant, correlation, event type and event ids."""
    return [
        ("tenant_id", event.tenant_id.encode()),
        ("correlation_id", event.correlation_id.encode()),
        ("event_type", event.event_type.encode()),
        ("event_id", event.event_id.encode()),
    ]


class UnitOfWork:
    """What a handler gets: the open transaction and a way to emit messages with the effect."""

    def __init__(self, conn: DbConnection, consumer: str, settings: FlashSettings) -> None:
        self.conn = conn
        self.consumer = consumer
        self.settings = settings
        self.outbox: list[OutMessage] = []

    def emit(self, topic: str, event: Envelope, *, key: bytes | None = None) -> None:
        """Queue ``event`` on the logical ``topic``; it is published only if the transaction commits."""
        self.outbox.append(
            OutMessage(self.settings.topic(topic), encode(event), key or event.key, message_headers(event))
        )


def headers_json(headers: Headers) -> str:
    return json.dumps([[k, v.decode("utf-8", "replace")] for k, v in headers])


def headers_from_json(raw: str | list[Any]) -> Headers:
    items = json.loads(raw) if isinstance(raw, str) else raw
    return [(str(k), str(v).encode()) for k, v in items]


def pack_messages(messages: Sequence[OutMessage]) -> bytes:
    """Pack messages (topic, key, value, headers) into one msgpack document."""
    return msgpack.packb([(m.topic, m.key, m.value, m.headers) for m in messages], use_bin_type=True)  # type: ignore[no-any-return]


def unpack_messages(payload: bytes) -> list[OutMessage]:
    """The inverse of :func:`pack_messages`."""
    return [
        OutMessage(topic, value, key, [(str(k), bytes(v)) for k, v in headers])
        for topic, key, value, headers in msgpack.unpackb(payload, raw=False, use_list=False)
    ]


async def write_outbox(conn: DbConnection, owner: str, messages: Sequence[OutMessage]) -> list[int]:
    """Insert ``messages`` for ``owner`` in the caller's transaction (one row); returns the row ids."""
    if not messages:
        return []
    row_id = await conn.fetchval(
        "INSERT INTO outbox_batch (consumer, messages, payload) VALUES ($1, $2, $3) RETURNING id",
        owner, len(messages), pack_messages(messages),
    )
    return [row_id]


async def delete_published(conn: DbConnection, ids: Sequence[int]) -> None:
    """Forget outbox rows whose messages the broker acknowledged."""
    if ids:
        await conn.execute("DELETE FROM outbox_batch WHERE id = ANY($1::bigint[])", list(ids))


async def relay_outbox(pool: asyncpg.Pool, publisher: KafkaPublisher, owner: str) -> int:
    """Publish every committed, unpublished message of ``owner`` in order, then delete them."""
    relayed = 0
    async with db_errors(f"{owner} outbox relay"), pool.acquire() as conn:
        # Rows left in the per-message table by a version before 0002 go first: they are older.
        legacy = await conn.fetch(
            "SELECT id, topic, key, value, headers FROM outbox WHERE consumer = $1 ORDER BY id", owner
        )
        if legacy:
            await publisher.send_all(
                [OutMessage(r["topic"], r["value"], r["key"], headers_from_json(r["headers"])) for r in legacy]
            )
            await conn.execute("DELETE FROM outbox WHERE id = ANY($1::bigint[])", [r["id"] for r in legacy])
            relayed += len(legacy)
        while True:  # a batch at a time, so a long backlog is never held in memory at once
            rows = await conn.fetch(
                "SELECT id, payload FROM outbox_batch WHERE consumer = $1 ORDER BY id LIMIT 20", owner
            )
            if not rows:
                return relayed
            for r in rows:
                messages = unpack_messages(r["payload"])
                await publisher.send_all(messages)
                relayed += len(messages)
            await delete_published(conn, [r["id"] for r in rows])


class TaskOutbox:
    """Exactly-once emits for a background task (re-link, maturing): the contract PipeConsumer gives
    handlers. Open a transaction, get a :meth:`unit_of_work`, emit, :meth:`write` before commit, then
    :meth:`flush` after it."""

    def __init__(self, name: str, pool: asyncpg.Pool, publisher: KafkaPublisher, settings: FlashSettings) -> None:
        self.name = name
        self.pool = pool
        self.publisher = publisher
        self.settings = settings

    def unit_of_work(self, conn: DbConnection) -> UnitOfWork:
        return UnitOfWork(conn, self.name, self.settings)

    async def write(self, conn: DbConnection, uow: UnitOfWork) -> None:
        await write_outbox(conn, self.name, uow.outbox)

    async def flush(self) -> int:
        """Publish whatever this task committed and has not published yet; returns how many."""
        return await relay_outbox(self.pool, self.publisher, self.name)
