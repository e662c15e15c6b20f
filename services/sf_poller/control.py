"""The Salesforce connector as the control plane sees it (entry point ``flash_connect.connectors``:
``salesforce = sf_poller.control:connector``): parse, streams, verify, sample, refetch.

``verify`` checks, in order (stopping where the rest would be meaningless):

1. ``auth``: the client-credentials token on the org's My Domain -- else the wrong consumer key / secret,
   the login host instead of My Domain, or the flow not enabled, each with what to fix; ``host`` when the
   My Domain host does not answer;
2. ``org shape``: Describe Global + one describe per synced object (multicurrency, person accounts, Order
   Management objects, the own-ID field; :mod:`sfconnect.shape`);
3. ``objects`` / ``own-ID field`` / ``currency``: what the connection needs that the org lacks;
4. ``read <Object>``: one row of each synced object with the SOQL built from the shape.

When every check passes the shape is saved with the connection (``cursors`` entity ``org:shape``): the
poller and the CDC listener build every SOQL from it (and learn it again on INVALID_FIELD). ``sample`` and
``refetch`` read Salesforce and write nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from canonical.events import RawRecord
from connectorkit.deadletters import Refetch
from connectorkit.http import scrub
from connectorkit.protocol import Stream, VerifyReport
from servicekit.connections import Connection, FakeCursorStore, PgCursorStore
from servicekit.db import create_pool
from servicekit.errors import ConfigError, FlashError, Poison, Transient
from servicekit.kafka import OutMessage
from servicekit.settings import FlashSettings
from sfconnect.client import build_client, http_client
from sfconnect.config import SfConnection, parse_connection
from sfconnect.published import FakePublishedStore
from sfconnect.reader import RecordReader
from sfconnect.records import out_message, select_fields, ts_of_ms
from sfconnect.shape import OM_OBJECTS, OrgShape, learn_shape, load_shape, save_shape

__all__ = ["PRODUCER", "SfConnector", "check_shape", "connector", "dry_run", "verify"]

PRODUCER = "sf-poller"


class _Collect:
    """A publisher that keeps what would be published (sample and refetch publish nothing themselves)."""

    def __init__(self) -> None:
        self.messages: list[OutMessage] = []

    async def send_all(self, messages: Sequence[OutMessage]) -> None:
        self.messages.extend(messages)


def check_shape(cc: SfConnection, shape: OrgShape) -> list[tuple[str, str, str]]:
    """(check, what the org lacks, what to do) for everything the connection needs that the org lacks."""
    problems: list[tuple[str, str, str]] = []
    for obj in (o for o in cc.objects if not shape.has_object(o)):
        if obj in OM_OBJECTS:
            problems.append(("objects", f"{obj} does not exist in this org (no Order Management)",
                             "use settings.mode 'order', or enable Order Management"))
        else:
            problems.append(("objects", f"{obj} is not visible to the Run As user",
                             "grant read access on it, or remove it from settings.objects"))
    for obj, fld in cc.own_id_fields.items():
        if obj in shape.fields and fld not in shape.fields[obj]:
            problems.append(("own-ID field", f"{obj}.{fld} (settings.external_id_field) does not exist or is not "
                             "readable", f"name an existing field of {obj}, or grant field-level read access"))
    if not shape.multi_currency and not cc.raw_settings.get("default_currency"):
        problems.append(("currency", "this org has no multicurrency (no CurrencyIsoCode)",
                         "set settings.default_currency to the org's corporate currency (ISO code, e.g. EUR)"))
    return problems


async def _pool(settings: FlashSettings) -> Any:
    from servicekit.embedded import resolve_database_url

    return await create_pool(await resolve_database_url(settings.database_url, settings.state_dir),
                             schema=settings.db_schema, max_size=1)


class SfConnector:
    """Salesforce (Order or OrderSummary, REST/Bulk and CDC); see the module docstring."""

    source = "salesforce"
    producer = PRODUCER

    def parse(self, conn: Connection) -> SfConnection:
        return parse_connection(conn)

    def streams(self, config: SfConnection) -> list[Stream]:
        return [Stream(obj, description=f"Salesforce object {obj}") for obj in config.objects]

    async def verify(self, config: SfConnection, settings: FlashSettings, *, save: bool = True) -> VerifyReport:
        cc = config
        report = VerifyReport(cc.connection_id, info={"my_domain": cc.my_domain, "api_version": cc.api_version,
                                                      "mode": cc.mode})
        async with http_client(cc) as http:
            client = build_client(cc, http)
            try:
                token = await client.authenticate()
                report.info.update(org_id=token.org_id, instance_url=token.instance_url)
                report.add("auth", True, f"token issued on {cc.my_domain} (org {token.org_id})")
            except ConfigError as exc:
                report.add("auth", False, scrub(str(exc), secrets=[cc.client_secret], limit=600))
                return report
            except Transient as exc:
                report.add("host", False, f"{cc.my_domain} did not answer: {scrub(str(exc))}",
                           "check the endpoint (the org's My Domain URL) and that this service can reach it")
                return report
            try:
                shape = await learn_shape(client, cc.objects)
            except FlashError as exc:
                report.add("org shape", False, scrub(str(exc), limit=600),
                           "grant the Run As user the API Enabled and View Setup permissions (describe)")
                return report
            report.info["org_shape"] = shape.summary()
            report.add("org shape", True, ", ".join(f"{k}={v}" for k, v in shape.summary().items()))
            problems = check_shape(cc, shape)
            for name, what, fix in problems:
                report.add(name, False, what, fix)
            for obj in cc.objects:
                if not shape.has_object(obj):
                    continue
                fields = select_fields(obj, shape, cc.own_ids(obj))
                try:
                    body, _ = await client.query_page(f"SELECT {', '.join(fields)} FROM {obj} LIMIT 1")
                    report.add(f"read {obj}", True, f"{body['totalSize']} row sample, {len(fields)} fields")
                except FlashError as exc:
                    report.add(f"read {obj}", False, scrub(str(exc), limit=600),
                               "grant the Run As user read access (object and field level) on these fields: "
                               + ", ".join(fields))
            if report.ok and save:
                pool = await _pool(settings)
                try:
                    await save_shape(PgCursorStore(pool), cc.tenant_id, cc.connection_id, shape)
                finally:
                    await pool.close()
        return report

    def _scratch(self, cc: SfConnection, http: Any, settings: FlashSettings,
                 shape: OrgShape | None) -> tuple[RecordReader, _Collect]:
        pub = _Collect()
        reader = RecordReader(cc, build_client(cc, http), pub, FakeCursorStore(), settings, shape=shape,
                              store=FakePublishedStore())
        return reader, pub

    async def sample(self, config: SfConnection, settings: FlashSettings, *,
                     limit: int) -> Mapping[str, list[RawRecord]]:
        """Up to ``limit`` recent records per object, built exactly as the poller builds them; no cursor."""
        cc = config
        n = max(1, min(int(limit), 2000))
        out: dict[str, list[RawRecord]] = {}
        async with http_client(cc) as http:
            shape = await _saved_shape(settings, cc)
            reader, _ = self._scratch(cc, http, settings, shape)
            if reader.shape is None:
                reader.shape = await learn_shape(reader.client, cc.objects)
            for obj in cc.objects:
                if not reader.shape.has_object(obj):
                    continue
                body, url = await reader.query_shaped(obj, f" ORDER BY SystemModstamp DESC, Id DESC LIMIT {n}")
                raws, _ = await reader.to_raw_checked(obj, body["records"], url)
                out[obj] = raws
        return out

    async def refetch(self, config: SfConnection, settings: FlashSettings, ref: Refetch) -> list[OutMessage]:
        """The fresh raw record(s) of a dead letter: the record by id (``{"object", "id"}``), or the object
        by SOQL since a commit time (``{"object", "since_ms"}``, a change event that named no record).
        Raises Poison (the letter stays pending) while the record still cannot be delivered."""
        cc = config
        obj = ref.locator.get("object") or ref.stream
        if obj not in cc.objects:
            raise ConfigError(f"{obj} is no longer synced by connection {cc.connection_id}; add it back to "
                              "settings.objects to replay this letter")
        async with http_client(cc) as http:
            reader, pub = self._scratch(cc, http, settings, await _saved_shape(settings, cc))
            rid = ref.locator.get("id") or (ref.source_id if ref.source_id not in ("", "?") else "")
            if rid:
                records, url = await reader.fetch_by_ids(obj, [rid])
                if not records:
                    return []  # gone for good: its delete arrives through the poll / CDC
                raws, letters = await reader.to_raw_checked(obj, records, url)
                if letters:
                    raise Poison(letters[0].reason)
                return [out_message(settings, r) for r in raws]
            since = ref.locator.get("since_ms")
            await reader.reconcile(obj, ts_of_ms(int(since)) if since else "1970-01-01T00:00:00.000Z")
            return pub.messages


def connector() -> SfConnector:
    return SfConnector()


async def _saved_shape(settings: FlashSettings, cc: SfConnection) -> OrgShape | None:
    try:
        pool = await _pool(settings)
    except FlashError:
        return None
    try:
        return await load_shape(PgCursorStore(pool), cc.tenant_id, cc.connection_id)
    finally:
        await pool.close()


# legacy hooks (``<module>.control.verify`` / ``dry_run``), kept for callers that do not use the registry
async def verify(conn: Connection, settings: FlashSettings, *, save: bool = True) -> dict[str, Any]:
    report = await SfConnector().verify(parse_connection(conn), settings, save=save)
    if not report.ok:
        raise ConfigError(report.summary())
    return report.as_json()


async def dry_run(conn: Connection, settings: FlashSettings, limit: int = 5) -> dict[str, Any]:
    cc = parse_connection(conn)
    records = await SfConnector().sample(cc, settings, limit=limit)
    return {"connection_id": cc.connection_id, "mode": cc.mode,
            "preview": {obj: [{"source_id": r.source_id, "op": r.op, "version": r.source_version} for r in rs]
                        for obj, rs in records.items()}}
