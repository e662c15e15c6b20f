"""Source dead letters: what a connector could not deliver, on the same path as consumers' dead letters.

A source letter goes to ``dlq.<connector>.v1`` (e.g. ``dlq.ce-poller.v1``) and into the ``dead_letters``
index, with the headers of ``servicekit.consumer.DeadLetter`` (``x-flash-consumer``,
``x-flash-error-class``, ``-error-message``, ``-stage`` = ``fetch``, ``-original-topic`` = the raw topic
the record would have gone to, ``-attempts``, ``-first-failure-at``, ``-last-failure-at``) plus
``x-flash-refetch``: a JSON :class:`Refetch` naming the connector, connection, stream and record, and the
vendor locator needed to fetch the record again.

Its body is a JSON descriptor (tenant, connection, stream, source id, the refetch locator and the scrubbed,
trimmed vendor body as seen), never a raw record. ``flash dlq replay`` therefore never re-sends it: for a
letter carrying ``x-flash-refetch`` it asks the connector (found through the registry) to fetch the record
again and publishes the FRESH raw record onto the raw topic (:mod:`connectorkit.replay`). A record still
broken stays dead-lettered; one gone at the vendor is marked replayed with nothing to publish.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import asyncpg

from canonical.topics import dlq
from connectorkit.http import scrub
from servicekit.db import db_errors
from servicekit.dlq import REFETCH_HEADER
from servicekit.errors import FlashError
from servicekit.kafka import OutMessage
from servicekit.outbox import headers_json
from servicekit.settings import FlashSettings

__all__ = [
    "REFETCH_HEADER",
    "FakeSourceDeadLetters",
    "PgSourceDeadLetters",
    "Refetch",
    "SourceDeadLetters",
    "SourceLetter",
    "refetch_of",
]

@dataclass(frozen=True)
class Refetch:
    """Everything needed to fetch one record again from the vendor.

    ``locator`` is the connector's own (e.g. ``{"entity_set": "salesorders", "key": "<guid>"}`` for
    Dataverse, ``{"object": "Order", "id": "801..."}`` for Salesforce); the connector's ``refetch`` reads it.
    """

    source: str
    tenant_id: str
    connection_id: str
    stream: str
    source_id: str
    locator: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"source": self.source, "tenant_id": self.tenant_id, "connection_id": self.connection_id,
                           "stream": self.stream, "source_id": self.source_id, "locator": dict(self.locator)},
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Refetch:
        d = json.loads(text)
        return cls(str(d["source"]), str(d["tenant_id"]), str(d["connection_id"]), str(d["stream"]),
                   str(d["source_id"]), {str(k): str(v) for k, v in (d.get("locator") or {}).items()})


@dataclass(frozen=True)
class SourceLetter:
    """One record a connector could not deliver: where to re-fetch it and why it failed."""

    refetch: Refetch
    raw_topic: str
    error: FlashError | BaseException
    body: str = ""
    attempts: int = 1
    first_failed_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))

    @property
    def error_class(self) -> str:
        e = self.error
        return type(e).__name__ if isinstance(e, FlashError) else f"Transient:{type(e).__name__}"

    @property
    def stage(self) -> str:
        return self.error.stage if isinstance(self.error, FlashError) and self.error.stage != "handle" else "fetch"


def refetch_of(headers: Sequence[Sequence[Any]] | Mapping[str, Any] | None) -> Refetch | None:
    """The :class:`Refetch` of a dead letter's headers (list of pairs or JSON-decoded), or None."""
    if not headers:
        return None
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    for pair in pairs:
        k, v = pair[0], pair[1]
        if k == REFETCH_HEADER:
            try:
                return Refetch.from_json(v.encode() if isinstance(v, str) else v)
            except (ValueError, KeyError):
                return None
    return None


class SourceDeadLetters(Protocol):
    """Where a connector dead-letters records. Contract: returns once the letters are on the DLQ topic
    (acknowledged) and indexed in ``dead_letters``; only then may the cursor move past them."""

    async def send(self, letters: Sequence[SourceLetter]) -> None: ...


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _build(settings: FlashSettings, producer: str, letter: SourceLetter) -> tuple[OutMessage, tuple[Any, ...]]:
    now = _now()
    r = letter.refetch
    message = scrub(str(letter.error), limit=2000)
    value = json.dumps({"tenant_id": r.tenant_id, "connection_id": r.connection_id, "source": r.source,
                        "entity": r.stream, "source_id": r.source_id, "refetch": dict(r.locator),
                        "body": scrub(letter.body, limit=4000)}).encode()
    headers = [
        ("tenant_id", r.tenant_id),
        ("x-flash-consumer", producer),
        ("x-flash-error-class", letter.error_class),
        ("x-flash-error-message", message),
        ("x-flash-stage", letter.stage),
        ("x-flash-original-topic", letter.raw_topic),
        ("x-flash-attempts", str(letter.attempts)),
        ("x-flash-first-failure-at", letter.first_failed_at.isoformat()),
        ("x-flash-last-failure-at", now.isoformat()),
        (REFETCH_HEADER, r.to_json()),
    ]
    hb = [(k, v.encode()) for k, v in headers]
    key = f"{r.tenant_id}:{r.source_id}".encode()
    dlq_topic = settings.topic(dlq(producer))
    # A record seen again while its letter is pending (a re-read, the next poll) updates that letter.
    event_id = f"{r.connection_id}:{r.stream}:{r.source_id}" if r.source_id != "?" else None
    row = (producer, r.tenant_id, event_id, r.stream, letter.error_class, message, letter.stage, letter.raw_topic,
           None, None, letter.attempts, letter.first_failed_at, now, dlq_topic, key, value, headers_json(hb))
    return OutMessage(dlq_topic, value, key, hb), row


class PgSourceDeadLetters:
    """Publishes letters to ``dlq.<producer>`` and indexes them in ``dead_letters`` (database errors become
    InfrastructureUnavailable, waited out by the runner). The index keeps one pending letter per record
    (``event_id`` = ``<connection>:<stream>:<source id>``): seen again, its attempts and last failure move."""

    def __init__(self, pool: asyncpg.Pool, publisher: Any, settings: FlashSettings, producer: str) -> None:
        self.pool = pool
        self.publisher = publisher
        self.settings = settings
        self.producer = producer

    async def send(self, letters: Sequence[SourceLetter]) -> None:
        if not letters:
            return
        built = [_build(self.settings, self.producer, letter) for letter in letters]
        await self.publisher.send_all([m for m, _ in built])
        async with db_errors("dead-letter index"), self.pool.acquire() as conn, conn.transaction():
            for _, row in built:
                if row[2] is not None and await conn.fetchval(
                    """UPDATE dead_letters SET attempts = attempts + 1, last_failed_at = $4, error_class = $5,
                           error_message = $6, value = $7, headers = $8::jsonb
                       WHERE consumer = $1 AND tenant_id = $2 AND event_id = $3 AND replayed_at IS NULL
                       RETURNING id""",
                    row[0], row[1], row[2], row[12], row[4], row[5], row[15], row[16],
                ):
                    continue
                await conn.execute(
                    """INSERT INTO dead_letters (consumer, tenant_id, event_id, entity, error_class, error_message,
                           stage, source_topic, source_partition, source_offset, attempts, first_failed_at,
                           last_failed_at, dlq_topic, key, value, headers)
                       VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17::jsonb)""",
                    *row,
                )


@dataclass
class FakeSourceDeadLetters:
    """Records the letters (and the messages that would be published) for unit tests."""

    settings: FlashSettings
    producer: str
    letters: list[SourceLetter] = field(default_factory=list)
    messages: list[OutMessage] = field(default_factory=list)

    async def send(self, letters: Sequence[SourceLetter]) -> None:
        for letter in letters:
            self.letters.append(letter)
            self.messages.append(_build(self.settings, self.producer, letter)[0])
