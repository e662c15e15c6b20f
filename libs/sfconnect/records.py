"""Vendor records -> RawRecord messages, shared by the poller, the Bulk backfill and the CDC listener.

Every path that reads a record (REST page, Bulk CSV row, CDC fetch-back) publishes the same shape: the
record's JSON text as received (a CSV row as a JSON object of strings, columns named ``Parent.Field``),
``source_version`` = ``SystemModstamp`` normalised to ``YYYY-MM-DDTHH:MM:SS.mmmZ`` (so a row read by REST
and by Bulk gets the same event id), ``op = delete`` when ``IsDeleted`` is true, and ``order_source_id``
for order-scoped objects (:data:`sfconnect.config.ORDER_PARENT`).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from canonical.events import RawRecord
from canonical.topics import raw
from servicekit.consumer import message_headers
from servicekit.kafka import OutMessage
from servicekit.settings import FlashSettings
from sfconnect.config import FIELDS, ORDER_PARENT
from sfconnect.shape import OrgShape

__all__ = ["SOURCE", "field_value", "norm_ts", "out_message", "raw_record", "select_fields", "select_soql", "soql_ts",
           "version_of"]

SOURCE: Literal["salesforce"] = "salesforce"


def field_value(rec: Mapping[str, Any], path: str) -> Any:
    """``A.B`` from a REST record (nested ``{"A": {"B": ..}}``) or a Bulk row (column ``"A.B"``)."""
    if path in rec:
        v = rec[path]
        return None if v == "" else v
    cur: Any = rec
    for part in path.split("."):
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(part)
    return None if cur == "" else cur


def norm_ts(value: Any) -> str | None:
    """``2024-05-01T10:00:00.000+0000`` / ``...Z`` -> ``2024-05-01T10:00:00.000Z``."""
    if value in (None, ""):
        return None
    s = str(value)
    if s.endswith("+0000"):
        s = s[:-5] + "Z"
    elif s.endswith("+00:00"):
        s = s[:-6] + "Z"
    if "." not in s and s.endswith("Z"):
        s = s[:-1] + ".000Z"
    return s


def soql_ts(value: str) -> str:
    """A SOQL datetime literal (unquoted ISO 8601, ``Z``)."""
    return norm_ts(value) or value


def ts_of_ms(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def select_fields(obj: str, shape: OrgShape | None = None, own_ids: Sequence[str] = ()) -> list[str]:
    """The select list of ``obj``: :data:`sfconnect.config.FIELDS` without what the org lacks, plus the
    connection's own-ID field(s) (``own_ids``) when the object has them."""
    out = [f for f in FIELDS[obj] if shape is None or shape.has_field(obj, f)]
    for f in own_ids:
        if f not in out and (shape is None or shape.has_field(obj, f)):
            out.append(f)
    return out


def select_soql(obj: str, shape: OrgShape | None = None, own_ids: Sequence[str] = ()) -> str:
    """``SELECT <fields> FROM obj`` built from the org's shape (docs/vendor-facts.md, Salesforce)."""
    return f"SELECT {', '.join(select_fields(obj, shape, own_ids))} FROM {obj}"


def _truthy(v: Any) -> bool:
    return v is True or (isinstance(v, str) and v.lower() == "true")


def order_of(obj: str, rec: Mapping[str, Any]) -> str | None:
    spec = ORDER_PARENT.get(obj)
    if not spec:
        return None
    for path in spec.split("|"):
        v = field_value(rec, path)
        if v:
            return str(v)
    return None


def version_of(rec: Mapping[str, Any]) -> str:
    """A record's version: ``SystemModstamp`` (else ``LastModifiedDate``) as ``YYYY-MM-DDTHH:MM:SS.mmmZ``."""
    return norm_ts(field_value(rec, "SystemModstamp")) or norm_ts(field_value(rec, "LastModifiedDate")) or "0"


def raw_record(
    tenant_id: str, connection_id: str, obj: str, rec: Mapping[str, Any], *, text: str | None = None,
    request_url: str | None = None, order_source_id: str | None = None,
) -> RawRecord:
    payload = text if text is not None else json.dumps(rec, separators=(",", ":"))
    version = version_of(rec)
    return RawRecord(
        tenant_id=tenant_id, connection_id=connection_id, source=SOURCE, entity=obj,
        source_id=str(field_value(rec, "Id")), source_version=version,
        op="delete" if _truthy(field_value(rec, "IsDeleted")) else "upsert",
        payload=payload, request_url=request_url,
        order_source_id=order_source_id or order_of(obj, rec),
    )


def out_message(settings: FlashSettings, rec: RawRecord) -> OutMessage:
    return OutMessage(settings.topic(raw(SOURCE, rec.entity)), rec.model_dump_json().encode(), rec.key,
                      message_headers(rec))
