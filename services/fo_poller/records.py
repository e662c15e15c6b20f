"""What the fo-poller publishes: raw records assembled from data entities, versioned by content.

* Source ids carry the company: ``<dataAreaId>/<key>`` (``usmf/SO-000123``); ``dataAreaId`` is lower-cased,
  as the service compares it case-insensitively.
* An order travels with its lines (``"SalesOrderLines": [...]``); a return with its lines, its credit note
  (``"@flash.creditNote"``) and the original order of each line (``"@flash.originalOrders"``). The
  normalizer's ``dynamics_fo`` mapper reads these names.
* Each assembled record has a **content version**, a hash of its content (``@odata.etag`` excluded): a scan
  that meets an unchanged order produces the same hash, which the kit's published-versions ledger filters
  out, so unchanged rows publish nothing; a changed line changes its order's hash.
* The published ``source_version`` must sort chronologically (consumers never let an older version replace a
  newer one, and the header has no modified date or row version to use), so it is the UTC time the poller
  first saw that content, fixed width, with the content hash appended: ``2026-12-05T17:47:08.838550Z#<hash>``
  (:func:`source_version`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from decimal import Decimal
from typing import Any, Literal

from canonical.envelope import make_event_id
from canonical.events import RawRecord
from canonical.topics import raw
from servicekit.kafka import OutMessage
from servicekit.outbox import message_headers
from servicekit.settings import FlashSettings

__all__ = [
    "CREDIT_NOTE",
    "LINES",
    "ORIGINAL_ORDERS",
    "PRODUCER",
    "RETURN_LINES",
    "SOURCE",
    "TOPIC_ENTITY",
    "content_version",
    "dumps",
    "raw_message",
    "raw_record",
    "source_id",
    "source_version",
]

SOURCE: Literal["dynamics-fo"] = "dynamics-fo"
PRODUCER = "fo-poller"
LINES = "SalesOrderLines"
RETURN_LINES = "ReturnOrderLines"
CREDIT_NOTE = "@flash.creditNote"
ORIGINAL_ORDERS = "@flash.originalOrders"

TOPIC_ENTITY: dict[str, str] = {
    "orders": "SalesOrderHeadersV2",
    "customers": "CustomersV3",
    "products": "ReleasedProductsV2",
    "returns": "ReturnOrderHeaders",
}
"""Stream -> the raw topic's entity (``raw.dynamics-fo.<entity>.v1``) and the mapper's entity name."""


def _num(v: Any) -> Any:
    if isinstance(v, Decimal):
        f = float(v)
        # A number the float keeps exactly is written as a number (as the service sent it), else as text.
        return f if Decimal(repr(f)) == v else format(v, "f")
    raise TypeError(type(v).__name__)


def dumps(record: Any) -> str:
    """JSON text of a record; Decimal amounts keep their digits."""
    return json.dumps(record, default=_num, separators=(",", ":"))


def source_id(company: Any, key: Any) -> str:
    return f"{str(company).lower()}/{key}"


def _strip(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _strip(x) for k, x in v.items() if k != "@odata.etag"}
    if isinstance(v, list):
        return [_strip(x) for x in v]
    return v


def content_version(record: dict[str, Any]) -> str:
    blob = json.dumps(_strip(record), sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def source_version(observed: dt.datetime, content: str) -> str:
    """``<UTC observation time, microseconds, fixed width>#<content hash>``: sorts by time (see above)."""
    return observed.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ") + "#" + content[:16]


def raw_record(*, tenant_id: str, connection_id: str, stream: str, sid: str, version: str, payload: str,
               url: str, order_source_id: str | None, observed_at: dt.datetime,
               op: Literal["upsert", "delete"] = "upsert") -> RawRecord:
    """The raw record of one assembled record; its event id is stable for one content version."""
    entity = TOPIC_ENTITY[stream]
    eid = make_event_id("raw.record", tenant_id, connection_id, SOURCE, entity, sid, version)
    return RawRecord.model_construct(
        event_type="raw.record", version=1, tenant_id=tenant_id, connection_id=connection_id, source=SOURCE,
        entity=entity, source_id=sid, source_version=version, event_id=eid, correlation_id=eid,
        observed_at=observed_at, op=op, payload=payload, request_url=url, order_source_id=order_source_id,
    )


def raw_message(settings: FlashSettings, **kw: Any) -> OutMessage:
    """:func:`raw_record` as the ``raw.dynamics-fo.<entity>.v1`` message."""
    rec = raw_record(**kw)
    return OutMessage(settings.topic(raw(SOURCE, rec.entity)), rec.model_dump_json().encode(), rec.key,
                      message_headers(rec))
