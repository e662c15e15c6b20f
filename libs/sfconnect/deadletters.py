"""Source dead letters of the Salesforce poller (``sf-poller``) and CDC listener (``cdc-listener``).

A record or change event the connector cannot publish (a CDC message without a readable
``ChangeEventHeader``, a record without ``Id``) goes to ``dlq.<consumer>.v1`` with the ``x-flash-*`` headers
consumers use, and is indexed in ``dead_letters`` so ``flash dlq list|show`` find it. It is written BEFORE
the cursor or replay id that covers it moves, so nothing is skipped silently.

The value is a JSON descriptor (not a raw record): ``{tenant_id, connection_id, entity, source_id, channel,
replay_id, since_ms, reason, body}``. A replay re-reads from Salesforce (:func:`replay`): the record by id,
or, for a change event that named no record, the object by SOQL since ``since_ms`` (the channel's last
commit time when the message arrived) -- and publishes what it finds as fresh raw records.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import asyncpg

from canonical.topics import dlq, raw
from servicekit.db import db_errors
from servicekit.kafka import OutMessage
from servicekit.logging import get_logger
from servicekit.settings import FlashSettings

__all__ = ["CONSUMERS", "DeadLetterSink", "FakeDeadLetters", "PgDeadLetters", "SourceLetter", "letter_message",
           "replay"]

log = get_logger(__name__)

CONSUMERS = ("sf-poller", "cdc-listener")


@dataclass(frozen=True)
class SourceLetter:
    consumer: str
    tenant_id: str
    connection_id: str
    entity: str
    reason: str
    error_class: str = "Unreadable"
    source_id: str | None = None
    channel: str | None = None
    replay_id: int | None = None
    since_ms: int | None = None
    body: str = ""

    def descriptor(self) -> dict[str, Any]:
        return {"tenant_id": self.tenant_id, "connection_id": self.connection_id, "entity": self.entity,
                "source_id": self.source_id, "channel": self.channel, "replay_id": self.replay_id,
                "since_ms": self.since_ms, "reason": self.reason, "body": self.body[:8000]}


class DeadLetterSink(Protocol):
    async def write(self, letters: Sequence[SourceLetter]) -> None: ...


@dataclass
class FakeDeadLetters:
    letters: list[SourceLetter] = field(default_factory=list)

    async def write(self, letters: Sequence[SourceLetter]) -> None:
        self.letters.extend(letters)


def letter_message(settings: FlashSettings, letter: SourceLetter) -> tuple[OutMessage, tuple[object, ...]]:
    """The message for ``dlq.<consumer>.v1`` and its ``dead_letters`` row."""
    now = dt.datetime.now(dt.UTC)
    topic = settings.topic(raw("salesforce", letter.entity or "unknown"))
    value = json.dumps(letter.descriptor()).encode()
    headers = [
        ("tenant_id", letter.tenant_id), ("x-flash-consumer", letter.consumer),
        ("x-flash-error-class", letter.error_class), ("x-flash-error-message", letter.reason[:2000]),
        ("x-flash-stage", "source"), ("x-flash-original-topic", topic), ("x-flash-attempts", "1"),
        ("x-flash-first-failure-at", now.isoformat()), ("x-flash-last-failure-at", now.isoformat()),
        ("x-flash-connection-id", letter.connection_id),
    ]
    if letter.replay_id is not None:
        headers.append(("x-flash-source-replay-id", str(letter.replay_id)))
    if letter.channel:
        headers.append(("x-flash-source-channel", letter.channel))
    hb = [(k, v.encode()) for k, v in headers]
    key = f"{letter.tenant_id}:{letter.source_id or letter.channel or letter.entity}".encode()
    dlq_topic = settings.topic(dlq(letter.consumer))
    row = (letter.consumer, letter.tenant_id, None, letter.entity, letter.error_class, letter.reason[:2000],
           "source", topic, None, letter.replay_id, 1, now, now, dlq_topic, key, value,
           json.dumps([[k, v] for k, v in headers]))
    return OutMessage(dlq_topic, value, key, hb), row


class _Publisher(Protocol):
    async def send_all(self, messages: Sequence[OutMessage]) -> Any: ...


class PgDeadLetters:
    """Publishes to the DLQ topic (waiting for the ack), then indexes in ``dead_letters``."""

    def __init__(self, pool: asyncpg.Pool, publisher: _Publisher, settings: FlashSettings) -> None:
        self.pool, self.publisher, self.settings = pool, publisher, settings

    async def write(self, letters: Sequence[SourceLetter]) -> None:
        if not letters:
            return
        built = [letter_message(self.settings, letter) for letter in letters]
        await self.publisher.send_all([m for m, _ in built])
        async with db_errors("dead_letters insert"):
            await self.pool.executemany(
                """INSERT INTO dead_letters (consumer, tenant_id, event_id, entity, error_class, error_message,
                       stage, source_topic, source_partition, source_offset, attempts, first_failed_at,
                       last_failed_at, dlq_topic, key, value, headers)
                   VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17::jsonb)""",
                [row for _, row in built])
        for letter in letters:
            log.warning("source record dead-lettered", consumer=letter.consumer, entity=letter.entity,
                        source_id=letter.source_id, replay_id=letter.replay_id, reason=letter.reason[:300])


class _Rereader(Protocol):
    async def fetch_by_ids(self, obj: str, ids: Sequence[str]) -> tuple[list[dict[str, Any]], str | None]: ...

    async def send(self, obj: str, records: Sequence[dict[str, Any]], url: str | None) -> Any: ...

    async def reconcile(self, obj: str, since: str) -> int: ...


async def replay(pool: asyncpg.Pool, reader: _Rereader, tenant_id: str, connection_id: str,
                 *, letter_ids: Sequence[int] | None = None, who: str = "flash") -> int:
    """Re-read every unreplayed Salesforce source dead letter of this connection from the vendor and
    publish the fresh records (module docstring); marks each replayed. Returns the letters replayed."""
    from sfconnect.records import ts_of_ms

    async with db_errors("dead_letters select"):
        rows = await pool.fetch(
            """SELECT id, entity, value FROM dead_letters
               WHERE consumer = ANY($1::text[]) AND tenant_id = $2 AND replayed_at IS NULL
                 AND ($3::bigint[] IS NULL OR id = ANY($3::bigint[])) ORDER BY id""",
            list(CONSUMERS), tenant_id, list(letter_ids) if letter_ids is not None else None)
    done = 0
    for r in rows:
        desc = json.loads(bytes(r["value"]))
        if desc.get("connection_id") != connection_id:
            continue
        obj = str(desc.get("entity") or "")
        if desc.get("source_id"):
            records, url = await reader.fetch_by_ids(obj, [str(desc["source_id"])])
            await reader.send(obj, records, url)  # fresh, whatever was published before
        elif obj:
            since = ts_of_ms(int(desc["since_ms"])) if desc.get("since_ms") else "1970-01-01T00:00:00.000Z"
            await reader.reconcile(obj, since)
        else:
            continue
        async with db_errors("dead_letters replayed"):
            await pool.execute("UPDATE dead_letters SET replayed_at = now() WHERE id = $1", r["id"])
        log.info("source dead letter replayed", letter_id=r["id"], entity=obj, by=who)
        done += 1
    return done
