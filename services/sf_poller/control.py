"""Control-plane hooks (``flash connections verify|dry-run``): check a connection, preview its mapping.

Neither writes anything: no cursor, no message, no connection state (the CLI records the outcome).
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from servicekit.connections import Connection
from servicekit.errors import ConfigError, FlashError
from servicekit.settings import FlashSettings
from sfconnect.client import build_client, http_client
from sfconnect.config import FIELDS, parse_connection
from sfconnect.records import raw_record, select_soql

__all__ = ["dry_run", "verify"]


async def verify(conn: Connection, settings: FlashSettings) -> dict[str, Any]:
    """Token on My Domain, then one cheap query per synced object with the connector's own field list.

    Raises ConfigError (saying what to fix) when anything is wrong; returns a report otherwise.
    """
    cc = parse_connection(conn)
    async with http_client(cc) as http:
        client = build_client(cc, http)
        token = await client.authenticate()
        objects: dict[str, str] = {}
        problems: list[str] = []
        for obj in cc.objects:
            try:
                body, _ = await client.query_page(f"{select_soql(obj)} LIMIT 1")
                objects[obj] = f"ok ({body['totalSize']} row sample)"
            except FlashError as exc:
                objects[obj] = f"failed: {exc}"
                problems.append(f"{obj}: {exc}")
        if problems:
            raise ConfigError("; ".join(problems) + " -- grant the Run As user read access (object and field "
                              f"level) on these objects, or remove them from settings.objects; fields read: "
                              f"{ {o: list(FIELDS[o]) for o in cc.objects if o in str(problems)} }")
        gov = client.governor
        return {
            "ok": True, "org_id": token.org_id, "instance_url": token.instance_url, "api_version": cc.api_version,
            "mode": cc.mode, "objects": objects,
            "api_usage": f"{gov.used}/{gov.maximum}" if gov.maximum else None,
        }


MAPPERS = "flash.mappers"
"""Entry-point group naming each source's mapper (``salesforce = normalizer.mappers.salesforce:map_record``):
found at run time, so this service never imports the normalizer and runs without it."""


def _mapper() -> Any:
    found = [ep for ep in entry_points(group=MAPPERS) if ep.name == "salesforce"]
    return found[0].load() if found else None


async def dry_run(conn: Connection, settings: FlashSettings, limit: int = 5) -> dict[str, Any]:
    """Fetch up to ``limit`` recent records per object and show what the normalizer would emit."""
    cc = parse_connection(conn)
    mapper = _mapper()
    preview: dict[str, Any] = {}
    async with http_client(cc) as http:
        client = build_client(cc, http)
        await client.authenticate()
        for obj in cc.objects:
            body, url = await client.query_page(
                f"{select_soql(obj)} ORDER BY SystemModstamp DESC, Id DESC LIMIT {max(1, int(limit))}")
            items = []
            for rec in body["records"]:
                raw = raw_record(cc.tenant_id, cc.connection_id, obj, rec, request_url=url)
                item: dict[str, Any] = {"source_id": raw.source_id, "op": raw.op, "version": raw.source_version}
                if mapper is not None:
                    result = mapper(raw, cc.raw_settings)
                    item["events"] = [{"topic": t, **e.model_dump(mode="json", by_alias=True)}
                                      for t, e in result.events]
                    if result.dead:
                        item["dead"] = result.dead
                items.append(item)
            preview[obj] = items
    return {"connection_id": cc.connection_id, "mode": cc.mode, "mapper": mapper is not None, "preview": preview}
