"""Dead-letter operations: list, show, depth and idempotent replay.

Every dead letter is on its ``dlq.<consumer>`` topic (for tooling that subscribes) and indexed with its
bytes in ``dead_letters``; these operations read the index. A replay publishes each matching, not yet
replayed message unchanged onto the topic it came from (with an ``x-flash-replay-of`` header), marks it
replayed and leaves an audit row in ``dlq_replays``. Replaying again finds nothing left to replay; and
since consumers deduplicate on event ids, even a forced replay lands each message at most once.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from servicekit.kafka import KafkaPublisher, OutMessage
from servicekit.outbox import headers_from_json as _headers_from_json

__all__ = ["REFETCH_HEADER", "DlqFilter", "Rewrite", "depth", "list_letters", "replay", "show_letter"]

REFETCH_HEADER = "x-flash-refetch"
"""Marks a source dead letter: its body describes where to re-fetch the record (connectorkit.deadletters)."""
LEGACY_SOURCE_HEADER = "x-flash-source-url"
"""Marked source dead letters written before the connector kit (CE poller): also never re-sent as they are."""

Rewrite = Callable[[Mapping[str, Any]], Awaitable[Sequence[OutMessage] | None]]
"""Replaces what a replay publishes for one letter row (None: the letter unchanged)."""


@dataclass(frozen=True)
class DlqFilter:
    consumer: str | None = None
    tenant_id: str | None = None
    error_class: str | None = None
    entity: str | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    include_replayed: bool = False
    ids: tuple[int, ...] | None = None

    def where(self) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        args: list[Any] = []

        def add(sql: str, value: Any) -> None:
            args.append(value)
            clauses.append(sql.format(f"${len(args)}"))

        if self.consumer:
            add("consumer = {}", self.consumer)
        if self.tenant_id:
            add("tenant_id = {}", self.tenant_id)
        if self.error_class:
            add("error_class = {}", self.error_class)
        if self.entity:
            add("entity = {}", self.entity)
        if self.since:
            add("first_failed_at >= {}", self.since)
        if self.until:
            add("first_failed_at < {}", self.until)
        if self.ids is not None:
            add("id = ANY({}::bigint[])", list(self.ids))
        if not self.include_replayed:
            clauses.append("replayed_at IS NULL")
        return (" AND ".join(clauses) or "TRUE"), args

    def as_json(self) -> dict[str, Any]:
        return {k: (v.isoformat() if isinstance(v, dt.datetime) else list(v) if isinstance(v, tuple) else v)
                for k, v in self.__dict__.items()}


_COLUMNS = """id, consumer, tenant_id, event_id, entity, error_class, error_message, stage, source_topic,
    source_partition, source_offset, attempts, first_failed_at, last_failed_at, dlq_topic, replayed_at"""


async def list_letters(pool: asyncpg.Pool, flt: DlqFilter, *, limit: int = 100) -> list[dict[str, Any]]:
    where, args = flt.where()
    rows = await pool.fetch(
        f"SELECT {_COLUMNS} FROM dead_letters WHERE {where} ORDER BY id LIMIT {int(limit)}", *args
    )
    return [dict(r) for r in rows]


async def show_letter(pool: asyncpg.Pool, letter_id: int) -> dict[str, Any] | None:
    row = await pool.fetchrow(f"SELECT {_COLUMNS}, key, value, headers FROM dead_letters WHERE id = $1", letter_id)
    if row is None:
        return None
    out = dict(row)
    out["key"] = row["key"].decode("utf-8", "replace") if row["key"] is not None else None
    out["value"] = row["value"].decode("utf-8", "replace")
    out["headers"] = json.loads(row["headers"]) if isinstance(row["headers"], str) else row["headers"]
    return out


async def depth(pool: asyncpg.Pool) -> list[dict[str, Any]]:
    """Pending dead letters per consumer and tenant, with the age of the oldest."""
    rows = await pool.fetch(
        """SELECT consumer, tenant_id, count(*) AS depth, min(first_failed_at) AS oldest,
                  extract(epoch FROM now() - min(first_failed_at))::float8 AS oldest_age_s
           FROM dead_letters WHERE replayed_at IS NULL
           GROUP BY consumer, tenant_id ORDER BY consumer, tenant_id"""
    )
    return [dict(r) for r in rows]


async def replay(
    pool: asyncpg.Pool,
    publisher: KafkaPublisher | None,
    flt: DlqFilter,
    *,
    dry_run: bool = False,
    requested_by: str | None = None,
    batch: int = 500,
    rewrite: Rewrite | None = None,
) -> dict[str, Any]:
    """Replay matching dead letters onto their original topics; returns the audit row.

    ``rewrite`` (see the module docstring) may replace the messages published for a letter; letters it
    fails on, and source letters when it is None, stay pending and are not counted as replayed.
    """
    who = requested_by or _whoami()
    failed = 0
    errors: list[str] = []
    async with pool.acquire() as conn:
        replay_id = await conn.fetchval(
            "INSERT INTO dlq_replays (requested_by, filter, dry_run) VALUES ($1, $2::jsonb, $3) RETURNING id",
            who, json.dumps(flt.as_json()), dry_run,
        )
        where, args = DlqFilter(**{**flt.__dict__, "include_replayed": False}).where()
        total = 0
        if dry_run:
            total = int(await conn.fetchval(f"SELECT count(*) FROM dead_letters WHERE {where}", *args))
        if not dry_run and publisher is None:
            raise ValueError("a replay that is not a dry run needs a publisher")
        skipped: list[int] = []
        while publisher is not None and not dry_run:
            async with conn.transaction():
                # Lock the rows so two concurrent replays cannot both publish them.
                rows = await conn.fetch(
                    f"""SELECT id, consumer, tenant_id, entity, source_topic, key, value, headers FROM dead_letters
                        WHERE {where} AND NOT (id = ANY(${len(args) + 1}::bigint[]))
                        ORDER BY id LIMIT {int(batch)} FOR UPDATE SKIP LOCKED""",
                    *args, skipped,
                )
                if not rows:
                    break
                msgs: list[OutMessage] = []
                done: list[int] = []
                for r in rows:
                    headers = _headers_from_json(r["headers"])
                    marks = [("x-flash-replay-of", str(r["id"]).encode()),
                             ("x-flash-replay-id", str(replay_id).encode())]
                    is_source = any(k in (REFETCH_HEADER, LEGACY_SOURCE_HEADER) for k, _ in headers)
                    fresh: Sequence[OutMessage] | None = None
                    if rewrite is not None:
                        try:
                            fresh = await rewrite({**dict(r), "headers": headers})
                        except Exception as exc:  # noqa: BLE001 - any failure leaves the letter pending, with why
                            failed += 1
                            skipped.append(r["id"])
                            errors.append(f"letter {r['id']}: {type(exc).__name__}: {str(exc)[:300]}")
                            continue
                    if fresh is None and is_source:
                        failed += 1
                        skipped.append(r["id"])
                        errors.append(f"letter {r['id']}: a source dead letter needs a re-fetch from the vendor "
                                      "(replay it with `flash dlq replay`)")
                        continue
                    if fresh is None:
                        msgs.append(OutMessage(
                            r["source_topic"], r["value"], r["key"],
                            [(k, v) for k, v in headers if not k.startswith("x-flash-")] + marks,
                        ))
                    else:
                        msgs.extend(OutMessage(m.topic, m.value, m.key, [*m.headers, *marks]) for m in fresh)
                    done.append(r["id"])
                if msgs:
                    await publisher.send_all(msgs)
                if done:
                    await conn.execute(
                        "UPDATE dead_letters SET replayed_at = now(), replay_id = $2 WHERE id = ANY($1::bigint[])",
                        done, replay_id,
                    )
                total += len(done)
        row = await conn.fetchrow(
            "UPDATE dlq_replays SET replayed = $2, finished_at = now() WHERE id = $1 RETURNING *",
            replay_id, total,
        )
    out = dict(row) if row else {}
    out["filter"] = flt.as_json()
    out["failed"] = failed
    out["errors"] = errors
    return out


def _whoami() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
