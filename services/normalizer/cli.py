"""``flash normalize FILE --source dynamics-ce --entity salesorder [--settings JSON]``.

FILE holds a saved payload: a RawRecord message, one vendor record, or a collection response
(``{"value": [...]}``, each row mapped). With ``--source salesforce`` FILE may also be a SOQL query
response (``{"records": [...]}``), one REST record, or a CDC message (or a list of them) as Salesforce sent
it; ids, versions, ops and order keys are derived as the poller and CDC listener derive them
(:func:`sfconnect.records.raw_record`, :func:`sfconnect.cdc.records_of_message`).
Prints one JSON line per canonical event (``{"topic", "event"}``) and
per dead-letter reason (``{"dead_letter": ...}``); exits 1 when any record would be dead-lettered.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from canonical.events import RawRecord, decode_raw
from normalizer.handlers import map_raw

__all__ = ["cmd_normalize", "records_from_file", "register"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("normalize", help="run the normalizer on a saved vendor payload")
    p.add_argument("file", type=Path)
    p.add_argument("--source", default="dynamics-ce", help="dynamics-ce (default) or salesforce: how ids, "
                   "versions and ops are derived from a vendor payload (as the source's poller derives them)")
    p.add_argument("--entity", default=None, help="vendor entity (required unless FILE is a RawRecord, or a "
                   "Salesforce query response / record with attributes.type / CDC message, which name their object)")
    p.add_argument("--settings", default="{}", help="connection settings as JSON (or @file.json)")
    p.add_argument("--tenant", default="cli")
    p.add_argument("--op", choices=("upsert", "delete"), default=None)
    p.add_argument("--order-source-id", default=None)
    p.set_defaults(func=cmd_normalize)


def _key_of(entity: str, rec: dict[str, Any]) -> str:
    for k in (f"{entity}id", "id"):
        if rec.get(k):
            return str(rec[k]).lower()
    return "unknown"


def _split_values(text: str) -> list[str]:
    """Each row of a collection response as its text exactly as saved (numbers untouched)."""
    decoder = json.JSONDecoder()
    i = text.index("[", text.index('"value"')) + 1
    out: list[str] = []
    while True:
        while text[i] in " \t\r\n,":
            i += 1
        if text[i] == "]":
            return out
        _, end = decoder.raw_decode(text, i)
        out.append(text[i:end])
        i = end


def records_from_file(path: Path, *, source: str, entity: str | None, tenant: str = "cli", op: str | None = None,
                      order_source_id: str | None = None) -> list[RawRecord]:
    text = path.read_text()
    try:
        return [decode_raw(text)]
    except ValidationError:
        pass
    if source == "salesforce":
        return _salesforce_records(json.loads(text), entity=entity, tenant=tenant, order_source_id=order_source_id)
    if not entity:
        raise SystemExit("--entity is required when FILE is a vendor record")
    obj = json.loads(text)
    items: list[str] = []
    if isinstance(obj, dict) and isinstance(obj.get("value"), list):
        items = _split_values(text)
    else:
        items = [text.strip()]
    out = []
    for t in items:
        rec = json.loads(t)
        deleted = rec.get("reason") == "deleted"
        out.append(RawRecord(
            tenant_id=tenant, connection_id="cli", source=source, entity=entity, source_id=_key_of(entity, rec),
            source_version=str(rec.get("versionnumber") or rec.get("modifiedon") or "0"),
            op=op or ("delete" if deleted else "upsert"), payload=t, order_source_id=order_source_id,
        ))
    return out


def _salesforce_records(obj: Any, *, entity: str | None, tenant: str,
                        order_source_id: str | None) -> list[RawRecord]:
    from sfconnect.cdc import records_of_message
    from sfconnect.records import raw_record

    pairs: list[tuple[str, dict[str, Any]]] = []
    messages = obj if isinstance(obj, list) else [obj]
    for m in messages:
        if isinstance(m, dict) and ("ChangeEventHeader" in m or "ChangeEventHeader" in (m.get("data") or {}).get(
                "payload", {})):
            pairs.extend(records_of_message(m))
        elif isinstance(m, dict) and isinstance(m.get("records"), list):
            pairs.extend((str((r.get("attributes") or {}).get("type") or entity or ""), r) for r in m["records"])
        elif isinstance(m, dict):
            pairs.append((str((m.get("attributes") or {}).get("type") or entity or ""), m))
    missing = [r.get("Id") for o, r in pairs if not o]
    if missing:
        raise SystemExit(f"--entity is required: records {missing[:3]} carry no attributes.type")
    return [raw_record(tenant, "cli", o, r, order_source_id=order_source_id) for o, r in pairs]


def cmd_normalize(args: argparse.Namespace) -> int:
    raw_settings = args.settings
    if raw_settings.startswith("@"):
        raw_settings = Path(raw_settings[1:]).read_text()
    settings = json.loads(raw_settings)
    bad = 0
    for rec in records_from_file(args.file, source=args.source, entity=args.entity, tenant=args.tenant, op=args.op,
                                 order_source_id=args.order_source_id):
        result = map_raw(rec, settings)
        for topic, event in result.events:
            sys.stdout.write(json.dumps({"topic": topic, "event": json.loads(event.model_dump_json(by_alias=True))})
                             + "\n")
        for reason in result.dead:
            bad += 1
            sys.stdout.write(json.dumps({"dead_letter": reason, "source_id": rec.source_id,
                                         "actions": result.actions}) + "\n")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flash")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
