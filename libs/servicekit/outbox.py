"""The transactional outbox shared by consumers and background tasks.

Messages are written to ``outbox`` in the same transaction as the effect that caused them, published after
the commit, then deleted. Whatever a crash leaves behind is published by :func:`relay_outbox` (at the next
start or flush); consumers deduplicate by event id, so a message published twice lands once.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import asyncpg

from canonical.envelope import Envelope
from canonical.events import encode
from servicekit.db import DbConnection, db_errors
from servicekit.kafka import Headers, KafkaPublisher, OutMessage
from servicekit.settings import FlashSettings

__all__ = [
    "TaskOutbox", "UnitOfWork", "headers_from_json", "headers_json", "message_headers", "relay_outbox", "write_outbox",
]


def message_headers(event: Envelope) -> Headers:
    """Headers repeating tenant and correlation ids for tooling (DESIGN.md, Contracts)."""
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


async def write_outbox(conn: DbConnection, owner: str, messages: Sequence[OutMessage]) -> list[int]:
    """Insert ``messages`` for ``owner`` in the caller's transaction; returns their ids."""
    if not messages:
        return []
    rows = await conn.fetch(
        """INSERT INTO outbox (consumer, topic, key, value, headers)
           SELECT $1, t, k, v, h::jsonb FROM unnest($2::text[], $3::bytea[], $4::bytea[], $5::text[])
               AS u(t, k, v, h)
           RETURNING id""",
        owner,
        [m.topic for m in messages],
        [m.key for m in messages],
        [m.value for m in messages],
        [headers_json(m.headers) for m in messages],
    )
    return [r["id"] for r in rows]


async def relay_outbox(pool: asyncpg.Pool, publisher: KafkaPublisher, owner: str) -> int:
    """Publish every committed, unpublished message of ``owner`` in order, then delete them."""
    async with db_errors(f"{owner} outbox relay"), pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT id, topic, key, value, headers FROM outbox WHERE consumer = $1 ORDER BY id", owner
        )
        if not rows:
            return 0
        await publisher.send_all(
            [OutMessage(r["topic"], r["value"], r["key"], headers_from_json(r["headers"])) for r in rows]
        )
        await conn.execute("DELETE FROM outbox WHERE id = ANY($1::bigint[])", [r["id"] for r in rows])
        return len(rows)


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
