"""Control-plane hooks (``flash connections verify|dry-run``): check a connection, preview its mapping.

``verify`` learns the org's shape (Describe Global + one describe per object: multicurrency, person accounts,
Order Management objects, the own-ID field; :mod:`sfconnect.shape`), checks that everything the connection
needs exists, runs one cheap query per object with the SOQL built from that shape, and saves the shape with
the connection (``cursors`` entity ``org:shape``) so the poller and the listener query exactly those fields.
``dry_run`` writes nothing: no cursor, no message, no connection state (the CLI records the outcome).
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from servicekit.connections import Connection, PgCursorStore
from servicekit.db import create_pool
from servicekit.errors import ConfigError, FlashError
from servicekit.settings import FlashSettings
from sfconnect.client import build_client, http_client
from sfconnect.config import SfConnection, parse_connection
from sfconnect.records import raw_record, select_fields, select_soql
from sfconnect.shape import OM_OBJECTS, OrgShape, learn_shape, load_shape, save_shape

__all__ = ["check_shape", "dry_run", "verify"]


def check_shape(cc: SfConnection, shape: OrgShape) -> list[str]:
    """What the connection needs that the org lacks, each with what to do about it."""
    problems: list[str] = []
    missing = [o for o in cc.objects if not shape.has_object(o)]
    for obj in missing:
        if obj in OM_OBJECTS:
            problems.append(f"{obj} does not exist in this org (no Order Management): use settings.mode 'order' "
                            "or enable Order Management")
        else:
            problems.append(f"{obj} is not visible to the Run As user: grant read access or remove it from "
                            "settings.objects")
    for obj, fld in cc.own_id_fields.items():
        if obj in shape.fields and fld not in shape.fields[obj]:
            problems.append(f"own-ID field {obj}.{fld} (settings.external_id_field) does not exist or is not "
                            f"readable: name an existing field of {obj} or grant field-level read access")
    if not shape.multi_currency and not cc.raw_settings.get("default_currency"):
        problems.append("this org has no multicurrency (no CurrencyIsoCode): set settings.default_currency to the "
                        "org's corporate currency (ISO code, e.g. EUR)")
    return problems


async def _save(settings: FlashSettings, cc: SfConnection, shape: OrgShape) -> None:
    from servicekit.embedded import resolve_database_url

    pool = await create_pool(await resolve_database_url(settings.database_url, settings.state_dir),
                             schema=settings.db_schema, max_size=1)
    try:
        await save_shape(PgCursorStore(pool), cc.tenant_id, cc.connection_id, shape)
    finally:
        await pool.close()


async def verify(conn: Connection, settings: FlashSettings, *, save: bool = True) -> dict[str, Any]:
    """Token on My Domain, the org's shape, then one cheap query per synced object with the connector's
    own field list. Raises ConfigError (saying what to fix) when anything is wrong; returns a report."""
    cc = parse_connection(conn)
    async with http_client(cc) as http:
        client = build_client(cc, http)
        token = await client.authenticate()
        shape = await learn_shape(client, cc.objects)
        problems = check_shape(cc, shape)
        objects: dict[str, str] = {}
        for obj in cc.objects:
            if not shape.has_object(obj):
                continue
            try:
                body, _ = await client.query_page(f"{select_soql(obj, shape, cc.own_ids(obj))} LIMIT 1")
                objects[obj] = f"ok ({body['totalSize']} row sample)"
            except FlashError as exc:
                objects[obj] = f"failed: {exc}"
                problems.append(f"{obj}: {exc} -- grant the Run As user read access (object and field level); "
                                f"fields read: {select_fields(obj, shape, cc.own_ids(obj))}")
        if problems:
            raise ConfigError("; ".join(problems))
        if save:
            await _save(settings, cc, shape)
        gov = client.governor
        return {
            "ok": True, "org_id": token.org_id, "instance_url": token.instance_url, "api_version": cc.api_version,
            "mode": cc.mode, "objects": objects, "org_shape": shape.summary(),
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
        shape = await _saved_shape(settings, cc) or await learn_shape(client, cc.objects)
        for obj in cc.objects:
            if not shape.has_object(obj):
                continue
            body, url = await client.query_page(
                f"{select_soql(obj, shape, cc.own_ids(obj))} ORDER BY SystemModstamp DESC, Id DESC "
                f"LIMIT {max(1, int(limit))}")
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


async def _saved_shape(settings: FlashSettings, cc: SfConnection) -> OrgShape | None:
    from servicekit.embedded import resolve_database_url

    try:
        pool = await create_pool(await resolve_database_url(settings.database_url, settings.state_dir),
                                 schema=settings.db_schema, max_size=1)
    except FlashError:
        return None
    try:
        return await load_shape(PgCursorStore(pool), cc.tenant_id, cc.connection_id)
    finally:
        await pool.close()
