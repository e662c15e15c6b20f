"""Ports of the poller and their adapters: the known-key set (PostgreSQL / fake) and source dead letters."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import asyncpg

from canonical.topics import dlq
from servicekit.kafka import OutMessage
from servicekit.settings import FlashSettings

__all__ = ["FakeKnownKeys", "KnownKey", "KnownKeys", "PgKnownKeys", "source_dead_letter"]

POLLER = "ce-poller"


@dataclass(frozen=True, slots=True)
class KnownKey:
    source_id: str
    parent_id: str | None
    version: str


class KnownKeys(Protocol):
    """Keys published per (tenant, connection, entity), with the generation of the sync that last saw them.

    Contract: ``record`` is called after the records it names were acknowledged by the broker; a full
    resync bumps the generation, and keys left on an older generation afterwards were deleted at the source.
    """

    async def record(self, tenant: str, conn: str, entity: str, keys: Sequence[KnownKey], generation: int) -> None: ...

    async def lookup(self, tenant: str, conn: str, entity: str, ids: Sequence[str]) -> dict[str, KnownKey]: ...

    async def forget(self, tenant: str, conn: str, entity: str, ids: Sequence[str]) -> None: ...

    async def stale(self, tenant: str, conn: str, entity: str, generation: int, limit: int) -> list[KnownKey]: ...

    async def orders_by_number(self, tenant: str, conn: str, numbers: Sequence[str]) -> dict[str, str]:
        """salesorderid per order number among published orders (their ``parent_id`` is the number)."""
        ...


class PgKnownKeys:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def record(self, tenant: str, conn: str, entity: str, keys: Sequence[KnownKey], generation: int) -> None:
        if not keys:
            return
        await self.pool.execute(
            """INSERT INTO ce_known_keys (tenant_id, connection_id, entity, source_id, parent_id, version, generation)
               SELECT $1, $2, $3, s, p, v, $7 FROM unnest($4::text[], $5::text[], $6::text[]) AS u(s, p, v)
               ON CONFLICT (tenant_id, connection_id, entity, source_id) DO UPDATE SET
                   parent_id = COALESCE(EXCLUDED.parent_id, ce_known_keys.parent_id),
                   version = EXCLUDED.version, generation = EXCLUDED.generation""",
            tenant, conn, entity, [k.source_id for k in keys], [k.parent_id for k in keys],
            [k.version for k in keys], generation,
        )

    async def lookup(self, tenant: str, conn: str, entity: str, ids: Sequence[str]) -> dict[str, KnownKey]:
        rows = await self.pool.fetch(
            """SELECT source_id, parent_id, version FROM ce_known_keys
               WHERE tenant_id = $1 AND connection_id = $2 AND entity = $3 AND source_id = ANY($4::text[])""",
            tenant, conn, entity, list(ids),
        )
        return {r["source_id"]: KnownKey(r["source_id"], r["parent_id"], r["version"]) for r in rows}

    async def forget(self, tenant: str, conn: str, entity: str, ids: Sequence[str]) -> None:
        await self.pool.execute(
            """DELETE FROM ce_known_keys WHERE tenant_id = $1 AND connection_id = $2 AND entity = $3
               AND source_id = ANY($4::text[])""",
            tenant, conn, entity, list(ids),
        )

    async def stale(self, tenant: str, conn: str, entity: str, generation: int, limit: int) -> list[KnownKey]:
        rows = await self.pool.fetch(
            """SELECT source_id, parent_id, version FROM ce_known_keys
               WHERE tenant_id = $1 AND connection_id = $2 AND entity = $3 AND generation < $4
               ORDER BY source_id LIMIT $5""",
            tenant, conn, entity, generation, limit,
        )
        return [KnownKey(r["source_id"], r["parent_id"], r["version"]) for r in rows]

    async def orders_by_number(self, tenant: str, conn: str, numbers: Sequence[str]) -> dict[str, str]:
        rows = await self.pool.fetch(
            """SELECT parent_id, source_id FROM ce_known_keys WHERE tenant_id = $1 AND connection_id = $2
               AND entity = 'salesorder' AND parent_id = ANY($3::text[])""",
            tenant, conn, list(numbers),
        )
        return {r["parent_id"]: r["source_id"] for r in rows}


@dataclass
class FakeKnownKeys:
    rows: dict[tuple[str, str, str, str], tuple[KnownKey, int]] = field(default_factory=dict)

    async def record(self, tenant: str, conn: str, entity: str, keys: Sequence[KnownKey], generation: int) -> None:
        for k in keys:
            old = self.rows.get((tenant, conn, entity, k.source_id))
            parent = k.parent_id or (old[0].parent_id if old else None)
            self.rows[(tenant, conn, entity, k.source_id)] = (KnownKey(k.source_id, parent, k.version), generation)

    async def lookup(self, tenant: str, conn: str, entity: str, ids: Sequence[str]) -> dict[str, KnownKey]:
        out = {}
        for i in ids:
            hit = self.rows.get((tenant, conn, entity, i))
            if hit:
                out[i] = hit[0]
        return out

    async def forget(self, tenant: str, conn: str, entity: str, ids: Sequence[str]) -> None:
        for i in ids:
            self.rows.pop((tenant, conn, entity, i), None)

    async def stale(self, tenant: str, conn: str, entity: str, generation: int, limit: int) -> list[KnownKey]:
        found = sorted(
            (k for (t, c, e, _), (k, g) in self.rows.items() if (t, c, e) == (tenant, conn, entity) and g < generation),
            key=lambda k: k.source_id,
        )
        return found[:limit]

    async def orders_by_number(self, tenant: str, conn: str, numbers: Sequence[str]) -> dict[str, str]:
        want = set(numbers)
        return {
            k.parent_id: k.source_id
            for (t, c, e, _), (k, _g) in self.rows.items()
            if (t, c, e) == (tenant, conn, "salesorder") and k.parent_id is not None and k.parent_id in want
        }


def source_dead_letter(
    settings: FlashSettings, *, tenant_id: str, connection_id: str, entity: str, source_id: str, url: str,
    error: BaseException, body: str = "",
) -> tuple[OutMessage, tuple[object, ...]]:
    """A record the source could not deliver: the message for ``dlq.ce-poller`` and its ``dead_letters`` row.

    Headers follow servicekit's DeadLetter (``x-flash-*``); the original topic is the raw topic the record
    would have gone to, so ``flash dlq`` lists it with the rest (replay needs a re-fetch, not a re-send).
    """
    now = dt.datetime.now(dt.UTC)
    topic = settings.topic(f"raw.dynamics-ce.{entity}.v1")
    value = json.dumps({"tenant_id": tenant_id, "connection_id": connection_id, "entity": entity,
                        "source_id": source_id, "url": url, "body": body[:4000]}).encode()
    headers = [
        ("tenant_id", tenant_id), ("x-flash-consumer", POLLER), ("x-flash-error-class", type(error).__name__),
        ("x-flash-error-message", str(error)[:2000]), ("x-flash-stage", "fetch"),
        ("x-flash-original-topic", topic), ("x-flash-attempts", "1"),
        ("x-flash-first-failure-at", now.isoformat()), ("x-flash-last-failure-at", now.isoformat()),
        ("x-flash-source-url", url),
    ]
    hb = [(k, v.encode()) for k, v in headers]
    key = f"{tenant_id}:{source_id}".encode()
    msg = OutMessage(settings.topic(dlq(POLLER)), value, key, hb)
    row = (POLLER, tenant_id, None, entity, type(error).__name__, str(error)[:2000], "fetch", topic, None, None, 1,
           now, now, settings.topic(dlq(POLLER)), key, value, json.dumps([[k, v] for k, v in headers]))
    return msg, row


async def index_dead_letters(pool: asyncpg.Pool, rows: Iterable[tuple[object, ...]]) -> None:
    await pool.executemany(
        """INSERT INTO dead_letters (consumer, tenant_id, event_id, entity, error_class, error_message, stage,
               source_topic, source_partition, source_offset, attempts, first_failed_at, last_failed_at,
               dlq_topic, key, value, headers)
           VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17::jsonb)""",
        list(rows),
    )

