"""The Finance & Operations connector as the control plane sees it (entry point ``flash_connect.connectors``:
``dynamics-fo = fo_poller.control:connector``): parse, verify, sample, refetch. None of them writes anything.

``verify`` runs, in order, stopping where the rest would be meaningless:

1. ``host``: the environment host passes the endpoint policy and answers HTTPS without a credential;
2. ``auth``: Microsoft Entra ID issues a client-credentials token for ``<env>/.default``;
3. ``metadata``: ``$metadata`` lists the entity sets of the synced streams (with their keys);
4. ``field <name>``: one line per mapped field -- present or missing, with its type; a missing or mistyped
   field fails and names what the environment offers instead (fields of a fitting type, most similar first).
   This is the onboarding confirmation of the money, status and inventory fields: a connection whose mapping
   does not check out cannot pass verify, so it cannot go live, and the poller re-checks at start;
5. ``read <entity>``: one cross-company row of each entity;
6. ``business events``: when enabled, where to register the HTTPS endpoint.
"""

from __future__ import annotations

import datetime as dt
import ssl
import urllib.parse
from collections.abc import Mapping, Sequence

import httpx

from canonical.events import RawRecord
from connectorkit.deadletters import Refetch
from connectorkit.endpoints import EndpointRefused, check_resolved
from connectorkit.http import scrub
from connectorkit.protocol import Stream, VerifyReport
from fo_poller.client import FoClient
from fo_poller.config import FoConnection, parse_connection
from fo_poller.metadata import ROLES_BY_STREAM, FieldCheck, check_fields, check_statuses
from fo_poller.records import (
    PRODUCER,
    SOURCE,
    TOPIC_ENTITY,
    content_version,
    dumps,
    raw_message,
    raw_record,
    source_version,
)
from fo_poller.streams import Assembled, FoSync
from servicekit.connections import Connection, FakeCursorStore
from servicekit.errors import ConfigError, FlashError, Transient
from servicekit.kafka import OutMessage
from servicekit.settings import FlashSettings

__all__ = ["FoConnector", "connector", "http_client", "unconfirmed_message"]


def http_client(cc: FoConnection) -> httpx.AsyncClient:
    """The connection's HTTP pool: its CA bundle, no proxy from the environment, no automatic redirects."""
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=cc.ca_bundle) if cc.ca_bundle else True
    return httpx.AsyncClient(verify=verify, timeout=httpx.Timeout(120.0, connect=15.0), trust_env=False,
                             follow_redirects=False)


def unconfirmed_message(cc: FoConnection, failing: Sequence[FieldCheck]) -> str:
    """One message naming every unconfirmed field and what the environment offers instead."""
    parts = [f"{c.line()}; {c.offer()}" for c in failing]
    return (f"connection {cc.connection_id}: the field mapping is not confirmed against the environment's "
            f"$metadata: " + " | ".join(parts) + " -> set settings.field_map.<name> to the environment's field and "
            "verify again")


class _Nowhere:
    async def send_all(self, messages: Sequence[OutMessage]) -> None:  # sample publishes nothing
        raise AssertionError("sample must not publish")


class _NoVersions:
    async def unseen(self, tenant_id: str, connection_id: str, stream: str,
                     items: Sequence[tuple[str, str]]) -> set[str]:
        return {i for i, _ in items}

    async def record(self, tenant_id: str, connection_id: str, stream: str, items: Sequence[tuple[str, str]]) -> None:
        return None


class FoConnector:
    """Dynamics 365 Finance & Operations data entities (see the module docstring)."""

    source = SOURCE
    producer = PRODUCER

    def parse(self, conn: Connection) -> FoConnection:
        return parse_connection(conn)

    def streams(self, config: FoConnection) -> list[Stream]:
        return [Stream(s, TOPIC_ENTITY[s], True, f"F&O data entity {config.entity_sets[s]}") for s in config.streams]

    async def verify(self, config: FoConnection, settings: FlashSettings) -> VerifyReport:
        cc = config
        report = VerifyReport(cc.connection_id, info={"env_url": cc.env_url, "authority": cc.authority})
        host = urllib.parse.urlsplit(cc.env_url).hostname or cc.env_url
        try:
            await check_resolved(host, setting="endpoint")
        except EndpointRefused as exc:
            report.add("host", False, str(exc), "put the environment URL, https://<env>.operations.dynamics.com")
            return report
        async with http_client(cc) as http:
            try:
                resp = await http.get(cc.data_url)  # no credential sent
                report.add("host", True, f"{host} answers HTTPS ({resp.status_code} without a token, as expected)")
            except httpx.TransportError as exc:
                report.add("host", False, f"cannot reach {host}: {type(exc).__name__}: {scrub(str(exc))}",
                           "check the endpoint (https://<env>.operations.dynamics.com) and that this service can "
                           "reach it (DNS, firewall, proxy)")
                return report
            client = FoClient(cc, http, max_attempts=2, backoff_base_s=settings.backoff_base_s)
            try:
                await client.tokens.token()
                report.add("auth", True, f"token issued by {cc.authority} for {cc.scope}")
            except (ConfigError, Transient) as exc:
                report.add("auth", False, scrub(str(exc), secrets=[cc.client_secret], limit=600))
                return report
            roles = sorted({r for s in cc.streams for r in ROLES_BY_STREAM[s]})
            try:
                meta = await client.metadata([cc.entity_sets[r] for r in roles])
            except FlashError as exc:
                report.add("metadata", False, scrub(str(exc), limit=600),
                           "the app's user needs access to the OData service ($metadata)")
                return report
            absent = [cc.entity_sets[r] for r in roles if cc.entity_sets[r] not in meta]
            if absent:
                report.add("metadata", False, f"$metadata has no entity set {', '.join(absent)}",
                           "name the environment's sets in settings.entity_sets, or drop the stream from "
                           "settings.streams")
                return report
            report.add("metadata", True, "; ".join(f"{es} key ({', '.join(i.key)})" for es, i in sorted(meta.items())))
            checks = check_fields(cc, meta)
            report.info["fields"] = [
                {"name": c.name, "entity_set": c.entity_set, "field": c.field, "present": c.present,
                 "type": c.type, "ok": c.ok} for c in checks]
            for c in checks:
                if c.ok:
                    report.add(f"field {c.name}", True, c.line())
                else:
                    report.add(f"field {c.name}", False, f"{c.line()}; {c.offer()}",
                               f"set settings.field_map.{c.name} to the field that holds it in {c.entity_set}")
            for sc in check_statuses(cc, meta):
                report.add(f"{sc.name} values", sc.ok, sc.detail, sc.fix)
            if not report.ok:
                return report
            for role in roles:
                es = cc.entity_sets[role]
                try:
                    rows = await client.rows(es, None, page_size=1, extra={"$top": "1"})
                    report.add(f"read {es}", True, f"{len(rows)} row sample (cross-company)")
                except FlashError as exc:
                    report.add(f"read {es}", False, scrub(str(exc), limit=600))
            if cc.events_enabled:
                base = settings.fo_events_public_url or "https://<fo-poller host>:<FLASH_FO_EVENTS_PORT>"
                url = f"{base.rstrip('/')}/fo/business-events/{cc.tenant_id}/{cc.connection_id}?code=<secret>"
                report.info["business_events_endpoint"] = url
                report.add("business events", True, f"register an HTTPS endpoint with URL {url} (the secret is "
                           "credentials.business_events_secret) and activate "
                           + ", ".join(sorted(cc.events)))
        return report

    async def sample(self, config: FoConnection, settings: FlashSettings, *,
                     limit: int) -> Mapping[str, list[RawRecord]]:
        """Up to ``limit`` records per stream, assembled exactly as the poller does; moves no cursor."""
        cc = config
        limit = max(1, min(int(limit), 1000))
        async with http_client(cc) as http:
            client = FoClient(cc, http, max_attempts=3, backoff_base_s=settings.backoff_base_s)
            roles = sorted({r for s in cc.streams for r in ROLES_BY_STREAM[s]})
            meta = await client.metadata([cc.entity_sets[r] for r in roles])
            failing = [c for c in check_fields(cc, meta) if not c.ok]
            if failing:
                raise ConfigError(unconfirmed_message(cc, failing))
            sync = FoSync(cc, client, _Nowhere(), FakeCursorStore(), _NoVersions(), settings, meta)
            got = await sync.sample(limit)
        now = dt.datetime.now(dt.UTC)
        return {stream: [self._record(cc, a, now) for a in items] for stream, items in got.items()}

    def _record(self, cc: FoConnection, a: Assembled, now: dt.datetime) -> RawRecord:
        return raw_record(tenant_id=cc.tenant_id, connection_id=cc.connection_id, stream=a.stream, sid=a.sid,
                          version=source_version(now, content_version(a.payload)), payload=dumps(a.payload),
                          url=cc.data_url + a.url,
                          order_source_id=a.order_source_id, observed_at=now)

    async def refetch(self, config: FoConnection, settings: FlashSettings, ref: Refetch) -> Sequence[OutMessage]:
        """The fresh raw record of ``ref`` (source id ``<dataAreaId>/<key>``), or nothing when it is gone."""
        cc = config
        stream = ref.locator.get("stream") or ref.stream
        company, _, key = ref.source_id.partition("/")
        async with http_client(cc) as http:
            client = FoClient(cc, http, max_attempts=3, backoff_base_s=settings.backoff_base_s)
            roles = sorted({r for s in cc.streams for r in ROLES_BY_STREAM[s]})
            meta = await client.metadata([cc.entity_sets[r] for r in roles])
            sync = FoSync(cc, client, _Nowhere(), FakeCursorStore(), _NoVersions(), settings, meta)
            field = {"orders": "order_number", "returns": "return_number", "customers": "customer_account",
                     "products": "product_item"}[stream]
            rows = await sync._by_numbers(stream, cc.f(field), [(company, key)])
            items = await sync.assemble(stream, rows)
        now = dt.datetime.now(dt.UTC)
        return [raw_message(settings, tenant_id=cc.tenant_id, connection_id=cc.connection_id, stream=a.stream,
                            sid=a.sid, version=source_version(now, content_version(a.payload)),
                            payload=dumps(a.payload), url=cc.data_url + a.url, order_source_id=a.order_source_id,
                            observed_at=now)
                for a in items]


def connector() -> FoConnector:
    """Entry point factory (``flash_connect.connectors``)."""
    return FoConnector()
