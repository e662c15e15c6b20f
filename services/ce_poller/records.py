"""What the CE poller publishes: raw records (one per Dataverse row, payload as received) and source letters.

A raw record's event id is ``make_event_id("raw.record", tenant, connection, "dynamics-ce", entity, id,
version)``: a re-read of an unchanged row gives the same id, and downstream deduplicates it. A row the poller
cannot deliver becomes a :class:`connectorkit.deadletters.SourceLetter` whose :class:`Refetch` locator is
``{"entity_set": ..., "key": ..., "entity": ...}`` (``key`` absent for a row that came without one), so a
replay can GET ``<entity_set>(<key>)`` again.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

from canonical.envelope import make_event_id
from canonical.events import RawRecord
from canonical.topics import raw
from connectorkit.deadletters import Refetch, SourceLetter
from servicekit.errors import FlashError
from servicekit.kafka import OutMessage
from servicekit.outbox import message_headers
from servicekit.settings import FlashSettings

__all__ = ["PRODUCER", "SOURCE", "raw_message", "source_letter"]

SOURCE: Literal["dynamics-ce"] = "dynamics-ce"
PRODUCER = "ce-poller"


def raw_message(
    settings: FlashSettings, *, tenant_id: str, connection_id: str, entity: str, source_id: str, version: str,
    payload: str, url: str, op: Literal["upsert", "delete"], order_source_id: str | None, observed_at: dt.datetime,
    topic_entity: str | None = None,
) -> OutMessage:
    """The ``raw.dynamics-ce.<topic_entity or entity>.v1`` message of one row (payload text untouched)."""
    eid = make_event_id("raw.record", tenant_id, connection_id, SOURCE, entity, source_id, version)
    rec = RawRecord.model_construct(
        event_type="raw.record", version=1, tenant_id=tenant_id, connection_id=connection_id, source=SOURCE,
        entity=entity, source_id=source_id, source_version=version, event_id=eid, correlation_id=eid,
        observed_at=observed_at, op=op, payload=payload, request_url=url, order_source_id=order_source_id,
    )
    return OutMessage(settings.topic(raw(SOURCE, topic_entity or entity)), rec.model_dump_json().encode(), rec.key,
                      message_headers(rec))


def source_letter(
    settings: FlashSettings, *, tenant_id: str, connection_id: str, entity: str, entity_set: str, key: str | None,
    error: FlashError, body: str, topic_entity: str | None = None,
) -> SourceLetter:
    """A row the poller could not deliver, with where to re-fetch it."""
    locator = {"entity_set": entity_set, "entity": entity}
    if key:
        locator["key"] = key
    ref = Refetch(SOURCE, tenant_id, connection_id, entity, key or "?", locator)
    return SourceLetter(ref, settings.topic(raw(SOURCE, topic_entity or entity)), error, body)
