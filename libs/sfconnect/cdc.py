"""Change Data Capture messages as Salesforce documents them (docs/vendor-facts.md, ``## Salesforce``,
Change Data Capture): reading a CometD message, and building the record an event describes. Shared by the
CDC listener and ``flash normalize`` (which derives ids the way the listener does)."""

from __future__ import annotations

from typing import Any

from sfconnect.records import ts_of_ms

__all__ = ["apply_event", "commit_of", "read_event", "replay_of", "tombstone"]


def replay_of(ev: Any) -> int | None:
    try:
        return int(ev["data"]["event"]["replayId"])
    except (KeyError, TypeError, ValueError):
        return None


def commit_of(ev: Any) -> int | None:
    try:
        return int(ev["data"]["payload"]["ChangeEventHeader"]["commitTimestamp"])
    except (KeyError, TypeError, ValueError):
        return None


def read_event(ev: Any) -> tuple[dict[str, Any], dict[str, Any]] | str:
    """(header, body) of a change event message, or why it cannot be read."""
    if not isinstance(ev, dict) or not isinstance(ev.get("data"), dict):
        return "not a CometD data message"
    payload = ev["data"].get("payload")
    if not isinstance(payload, dict):
        return "data.payload is missing or not an object"
    header = payload.get("ChangeEventHeader")
    if not isinstance(header, dict):
        return "no ChangeEventHeader in data.payload"
    if not header.get("entityName") or not header.get("changeType"):
        return "ChangeEventHeader without entityName or changeType"
    if not isinstance(header.get("recordIds"), list):
        return "ChangeEventHeader.recordIds is not a list"
    if replay_of(ev) is None:
        return "data.event.replayId is missing"
    return header, {k: v for k, v in payload.items() if k != "ChangeEventHeader"}


def apply_event(base: dict[str, Any], rid: str, header: dict[str, Any], body: dict[str, Any], *,
           created: bool = False) -> dict[str, Any]:
    """``base`` with the event's fields applied (compound ``Name`` flattened as REST returns it) and its
    ``nulledFields`` set to null; the version is the body's ``SystemModstamp``, else ``LastModifiedDate``,
    else the commit time."""
    rec = dict(base)
    for k, v in body.items():
        if k == "Name" and isinstance(v, dict):
            for part, pv in v.items():
                rec[part] = pv
            full = " ".join(str(v[x]) for x in ("FirstName", "LastName") if v.get(x))
            if full:
                rec["Name"] = full
            continue
        rec[k] = v
    for f in header.get("nulledFields") or []:
        rec[str(f)] = None
    rec["Id"] = rid
    if created:
        rec["IsDeleted"] = False
    stamp = body.get("SystemModstamp") or body.get("LastModifiedDate")
    rec["SystemModstamp"] = stamp or ts_of_ms(int(header.get("commitTimestamp") or 0))
    return rec


def tombstone(rid: str, header: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A deleted record at the commit time of ``header`` (its last known fields kept when given)."""
    return {**(base or {}), "Id": rid, "IsDeleted": True,
            "SystemModstamp": ts_of_ms(int(header.get("commitTimestamp") or 0))}


def records_of_message(message: Any) -> list[tuple[str, dict[str, Any]]]:
    """(object, record) for every record id of one change event message (or of its ``data.payload``),
    built as the listener builds them from the event alone: CREATE/UNDELETE/UPDATE from the body (an UPDATE
    carries only its changed fields), DELETE as a tombstone. Gap and overflow events carry no record: they
    yield nothing (the listener reads those from Salesforce)."""
    ev = message if "data" in message else {"channel": "", "data": {"payload": message, "event": {"replayId": 0}}}
    read = read_event(ev)
    if isinstance(read, str):
        raise ValueError(read)  # noqa: TRY004 - an unreadable message, not a wrong argument type
    header, body = read
    ct = str(header.get("changeType"))
    obj = str(header["entityName"])
    out: list[tuple[str, dict[str, Any]]] = []
    for rid in (str(x) for x in header.get("recordIds") or []):
        if ct in ("CREATE", "UNDELETE", "UPDATE"):
            out.append((obj, apply_event({}, rid, header, body, created=ct != "UPDATE")))
        elif ct == "DELETE":
            out.append((obj, tombstone(rid, header)))
    return out
