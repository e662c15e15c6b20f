"""The envelope every message carries, and the deterministic event id."""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

__all__ = [
    "TENANT_ID_PATTERN",
    "Envelope",
    "Source",
    "TenantId",
    "entity_key",
    "make_event_id",
    "order_key",
    "source_sequence",
]

Source = Literal["dynamics-ce", "dynamics-fo", "salesforce", "loyalty-core", "flash"]

TENANT_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
TenantId = Annotated[str, StringConstraints(pattern=TENANT_ID_PATTERN)]
NonEmpty = Annotated[str, StringConstraints(min_length=1, max_length=512)]

_EVENT_NAMESPACE = uuid.UUID("6f1d3c52-94a4-4b8e-9f1e-2c0e7f0a5b11")
_NAMESPACE_BYTES = _EVENT_NAMESPACE.bytes


def make_event_id(
    event_type: str,
    tenant_id: str,
    connection_id: str,
    source: str,
    entity: str,
    source_id: str,
    source_version: str,
) -> str:
    """A UUIDv5 over the identifying fields: re-reading the same record version yields the same id."""
    name = "\x1f".join((event_type, tenant_id, connection_id, source, entity, source_id, source_version))
    # uuid.uuid5 computed inline (same value, ~8x cheaper): this runs for every emitted event.
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + name.encode(), usedforsecurity=False).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50
    digest[8] = (digest[8] & 0x3F) | 0x80
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def order_key(tenant_id: str, order_source_id: str) -> bytes:
    """Kafka key shared by an order, its lines and its returns, so they stay in one partition."""
    return f"{tenant_id}:{order_source_id}".encode()


def entity_key(tenant_id: str, source_id: str) -> bytes:
    """Kafka key of customers, products and members."""
    return f"{tenant_id}:{source_id}".encode()


_SEQ_WIDTH = 20
_UNORDERED_SOURCES = frozenset({"dynamics-fo", "flash"})


def source_sequence(source: str, source_version: str) -> str | None:
    """A string that sorts (bytewise) in the order the source changed the record, or ``None`` where the source
    gives no order (docs/events.md, "Versions"):

    * digit-only versions (Dataverse ``versionnumber``, a row version that grows with every change) are
      zero-padded to 20 digits, so ``"10" > "9"``;
    * Salesforce ``SystemModstamp`` as the connectors write it (``YYYY-MM-DDTHH:MM:SS.mmmZ``, always UTC and
      fixed width) is already sortable and is taken as it is;
    * Finance & Operations (``RecVersion`` is a change token, not a counter) and the platform's own events
      (``flash``: ledger entries carry ``member_sequence`` instead) have none.
    """
    if source in _UNORDERED_SOURCES:
        return None
    v = source_version
    if v.isdigit() and v.isascii():
        return v.rjust(_SEQ_WIDTH, "0") if len(v) <= _SEQ_WIDTH else None
    if len(v) == 24 and v[4] == "-" and v[10] == "T" and v[19] == "." and v[23] == "Z" and v[:4].isdigit():
        return v
    return None


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Envelope(BaseModel):
    """Fields every message carries (docs/events.md, "Envelope").

    ``event_id`` is always derived from the fields before it (a given one is ignored: ids are never
    trusted from the producer), so a record read twice produces the same id and every consumer can
    deduplicate on it. Unknown fields are ignored, so producers may add optional fields within a version.
    ``source_sequence`` is derived from ``source`` and ``source_version`` when not given
    (:func:`source_sequence`).
    """

    # Every field is always serialised, so the published (serialization-mode) schemas mark them required.
    model_config = ConfigDict(
        frozen=True, extra="ignore", ser_json_timedelta="float", json_schema_serialization_defaults_required=True,
        use_attribute_docstrings=True,
    )

    event_type: str
    version: Literal[1] = 1
    tenant_id: TenantId
    connection_id: NonEmpty
    source: Source
    entity: NonEmpty
    source_id: NonEmpty
    source_version: NonEmpty
    """The source's version of the record: Dataverse ``versionnumber``, Salesforce ``SystemModstamp``
    (``YYYY-MM-DDTHH:MM:SS.mmmZ``), F&O ``RecVersion``; for ledger entries ``<kind>:<trigger>``."""
    source_sequence: str | None = None
    """Sortable form of ``source_version`` where the source orders its changes, else ``None``."""
    event_id: str = ""
    correlation_id: str = ""
    observed_at: dt.datetime = Field(default_factory=_utcnow)

    @model_validator(mode="after")
    def _derive_ids(self) -> Envelope:
        # An "after" validator keeps pydantic-core on its JSON fast path (a "before" one makes it build a
        # dict per message first): decoding costs ~7 us instead of ~15 us. The model is frozen, so the
        # derived ids are set the way pydantic itself sets fields, once, during validation.
        # Always derived, never taken from the producer: a producer that copied another record's id would
        # otherwise have its record taken for that one (and the other never land). A body's own id is ignored.
        object.__setattr__(self, "event_id", make_event_id(
            self.event_type, self.tenant_id, self.connection_id, self.source, self.entity, self.source_id,
            self.source_version,
        ))
        if not self.correlation_id:
            object.__setattr__(self, "correlation_id", self.event_id)
        if self.source_sequence is None:
            seq = source_sequence(self.source, self.source_version)
            if seq is not None:
                object.__setattr__(self, "source_sequence", seq)
        return self

    @property
    def key(self) -> bytes:
        """The Kafka key of this event (overridden by order-scoped events)."""
        return entity_key(self.tenant_id, self.source_id)
