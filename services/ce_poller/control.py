"""The Dynamics 365 CE connector as the control plane sees it (entry point ``flash_connect.connectors``:
``dynamics-ce = ce_poller.control:connector``): parse, verify, sample, refetch. None of them writes anything.

``verify`` runs, in order, and stops at the first failure that makes the rest meaningless:

1. ``host``: the org host passes the endpoint policy, resolves to a public address and answers HTTPS
   (an unauthenticated request; no credential is sent) -- else "host unreachable";
2. ``auth``: Microsoft Entra ID issues a client-credentials token for ``{org}/.default`` -- else the wrong
   secret (AADSTS7000215), expired secret (7000222), wrong tenant (90002), unknown app (700016), or no API
   access to this environment (500011), each with what to fix;
3. ``application user``: ``WhoAmI`` answers -- else no application user for the app in this environment
   (403 0x80072560), or API access blocked for the app id (403 0x80095ffc);
4. ``read <table>``: the currency and organization tables every cycle reads, then one row of each synced
   table with the connector's own column list -- else the missing privilege (``prvRead<Table>``) or a column
   this environment lacks;
5. ``change tracking``: every synced table has change tracking enabled (``EntityDefinitions``).
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Sequence
from typing import Any

import httpx

from canonical.events import RawRecord
from ce_poller.app import build_client, http_client
from ce_poller.client import Page, RecordNotFound, iter_values
from ce_poller.config import CeConnection, parse_connection
from ce_poller.records import PRODUCER, SOURCE
from ce_poller.stores import FakeKnownKeys
from ce_poller.streams import RETURNS_TOPIC_ENTITY, ConnectionSync, EntityResult
from connectorkit.deadletters import FakeSourceDeadLetters, Refetch
from connectorkit.endpoints import EndpointRefused, HostPin, check_resolved
from connectorkit.http import scrub
from connectorkit.protocol import Sample, Stream, VerifyReport
from servicekit.connections import Connection, FakeCursorStore
from servicekit.errors import ConfigError, FlashError, Poison, Transient
from servicekit.kafka import OutMessage
from servicekit.settings import FlashSettings

__all__ = ["CeConnector", "connector"]

_CONTEXT = re.compile(r'^\{\s*"@odata\.context"\s*:\s*"(?:[^"\\]|\\.)*"\s*,')


class _Collect:
    """A publisher that keeps what would be published (sample and refetch publish nothing themselves)."""

    def __init__(self) -> None:
        self.messages: list[OutMessage] = []

    async def send_all(self, messages: Sequence[OutMessage]) -> None:
        self.messages.extend(messages)


class CeConnector:
    """Dynamics 365 Sales / CE on Dataverse (see the module docstring)."""

    source = SOURCE
    producer = PRODUCER

    def parse(self, conn: Connection) -> CeConnection:
        return parse_connection(conn)

    def streams(self, config: CeConnection) -> list[Stream]:
        out = []
        for s in config.entities:
            custom = config.return_source.get("kind") == "custom" and s.entity_set == config.return_source.get(
                "entity_set")
            out.append(Stream(s.logical, RETURNS_TOPIC_ENTITY if custom else None, s.publish,
                              f"Dataverse table {s.entity_set}"))
        return out

    # ------------------------------------------------------------------------------------------ verify

    async def verify(self, config: CeConnection, settings: FlashSettings) -> VerifyReport:
        cc = config
        report = VerifyReport(cc.connection_id, info={"org_url": cc.org_url, "authority": cc.authority})
        host = urllib.parse.urlsplit(cc.org_url).hostname or cc.org_url
        try:
            await check_resolved(host, setting="endpoint")
        except EndpointRefused as exc:
            report.add("host", False, str(exc), "put the environment URL of the Dataverse org")
            return report
        async with http_client(cc) as http:
            try:
                HostPin.for_urls([cc.org_url]).check(cc.api, what="host check")
                resp = await http.get(cc.api, headers={"Accept": "application/json"})  # no credential sent
                report.add("host", True, f"{host} answers HTTPS ({resp.status_code} without a token, as expected)")
            except (httpx.TransportError, EndpointRefused) as exc:
                report.add("host", False, f"cannot reach {host}: {type(exc).__name__}: {scrub(str(exc))}",
                           "check the endpoint URL (the environment URL, e.g. https://contoso.crm.dynamics.com) and "
                           "that this service can reach it (DNS, firewall, proxy)")
                return report
            client = build_client(cc, http, settings, max_attempts=2)
            try:
                await client.tokens.token()
                report.add("auth", True, f"token issued by {cc.authority} for {cc.scope}")
            except ConfigError as exc:
                report.add("auth", False, scrub(str(exc), secrets=[cc.client_secret], limit=600))
                return report
            except Transient as exc:
                report.add("auth", False, f"the Entra authority did not answer: {scrub(str(exc))}",
                           "check settings.authority and that this service can reach it")
                return report
            try:
                who = (await client.get("WhoAmI", what="WhoAmI")).text
                user = json.loads(who).get("UserId")
                report.info["application_user_id"] = user
                report.add("application user", True, f"WhoAmI answered (UserId {user})")
            except FlashError as exc:
                report.add("application user", False, scrub(str(exc), limit=600))
                return report
            # What every poll cycle reads besides the synced tables: currencies (ISO codes) and the org's
            # change-tracking retention.
            for logical, url in (("transactioncurrency", "transactioncurrencies?$select=isocurrencycode&$top=1"),
                                 ("organization", "organizations?$select=expirechangetrackingindays")):
                try:
                    await client.get(url, prefer="odata.maxpagesize=1", what=f"read {logical}")
                    report.add(f"read {logical}", True, "readable (the poller reads it every cycle)")
                except FlashError as exc:
                    report.add(f"read {logical}", False, scrub(str(exc), limit=600))
            for spec in cc.entities:
                url = f"{spec.entity_set}?$select={','.join(spec.select)}&$top=1"
                try:
                    page = await client.get(url, prefer="odata.maxpagesize=1", what=f"read {spec.entity_set}")
                    n = sum(1 for _ in iter_values(page.text))
                    report.add(f"read {spec.logical}", True, f"{spec.entity_set}: {n} row sample, "
                               f"{len(spec.select)} columns")
                except FlashError as exc:
                    report.add(f"read {spec.logical}", False, scrub(str(exc), limit=600))
            if report.ok:
                await self._check_tracking(client, cc, report)
        return report

    async def _check_tracking(self, client: Any, cc: CeConnection, report: VerifyReport) -> None:
        try:
            page = await client.get("EntityDefinitions?$select=LogicalName,ChangeTrackingEnabled",
                                    what="EntityDefinitions")
        except FlashError as exc:
            report.add("change tracking", False, scrub(str(exc)),
                       "grant the application user Read on Entity (metadata) to let verify check change tracking")
            return
        enabled = {str(o.get("LogicalName")): bool(o.get("ChangeTrackingEnabled")) for _, o in iter_values(page.text)}
        off = [s.logical for s in cc.entities if enabled.get(s.logical) is False]
        if off:
            report.add("change tracking", False, f"change tracking is off for {', '.join(off)}",
                       "enable it per table: Power Apps > Tables > <table> > Properties > Advanced options > "
                       "Track changes")
        else:
            report.add("change tracking", True, f"enabled on {len(cc.entities)} tables")

    # ------------------------------------------------------------------------------------------ sample

    async def sample(self, config: CeConnection, settings: FlashSettings, *, limit: int) -> Sample:
        """Up to ``limit`` rows per published table, built exactly as the poller builds them (rows it would
        dead-letter in ``Sample.letters``); no cursor moves, nothing is published."""
        cc = config
        limit = max(1, min(int(limit), 5000))
        out = Sample()
        async with http_client(cc) as http:
            sync, pub = self._scratch_sync(cc, http, settings)
            await sync.load_currencies()
            for spec in cc.entities:
                if not spec.publish:
                    continue
                url = f"{spec.entity_set}?$select={','.join(spec.select)}&$top={limit}"
                page = await sync.client.get(url, prefer=f"odata.maxpagesize={limit},{sync._ann()}",
                                             what=f"sample {spec.entity_set}")
                one_page = Page(page.url, page.text, None, None, page.headers)  # bounded: never follow nextLink
                await sync._publish_page(spec, one_page, 1, EntityResult(spec.logical))
                out[spec.logical] = [RawRecord.model_validate_json(m.value) for m in pub.messages]
                pub.messages.clear()
            letters = sync.dead_letters
            if isinstance(letters, FakeSourceDeadLetters):
                out.letters = list(letters.letters)
        return out

    def _scratch_sync(self, cc: CeConnection, http: httpx.AsyncClient,
                      settings: FlashSettings) -> tuple[ConnectionSync, _Collect]:
        pub = _Collect()
        sync = ConnectionSync(cc, build_client(cc, http, settings, max_attempts=3), pub, FakeCursorStore(),
                              FakeKnownKeys(), settings, dead_letters=FakeSourceDeadLetters(settings, PRODUCER))
        return sync, pub

    # ----------------------------------------------------------------------------------------- refetch

    async def refetch(self, config: CeConnection, settings: FlashSettings, ref: Refetch) -> list[OutMessage]:
        """The fresh raw record(s) of a dead-lettered row: GET ``<entity_set>(<key>)`` again.

        Raises Poison (the letter stays pending) when the row is still undeliverable or has no key;
        returns [] when the row no longer exists (its delete arrives through change tracking). The fix at the
        source is itself a change, so the next poll delivers the same version again (same event id, landing
        once) and records the row in ``ce_known_keys``; the replay writes no poller state.
        """
        cc = config
        key = ref.locator.get("key")
        try:
            spec = next(s for s in cc.entities if s.entity_set == ref.locator.get("entity_set"))
        except StopIteration:
            raise ConfigError(f"table {ref.locator.get('entity_set')} is no longer synced by connection "
                              f"{cc.connection_id}; add it back to settings.entities to replay this letter") from None
        if not key:
            raise Poison(f"{spec.entity_set}: the dead-lettered row came without its key, so it cannot be fetched "
                         "again; fix the row in Dynamics (change tracking then delivers it) and drop this letter")
        async with http_client(cc) as http:
            sync, pub = self._scratch_sync(cc, http, settings)
            await sync.load_currencies()
            try:
                one = await sync.client.get(f"{spec.entity_set}({key})?$select={','.join(spec.select)}",
                                            prefer=sync._ann(), what=f"refetch {spec.entity_set}({key})")
            except RecordNotFound:
                return []
            # A single-entity response carries its own @odata.context; a row of a collection does not. Drop it,
            # so the record is byte for byte what a poll delivers (and is checked the same way).
            text = _CONTEXT.sub("{", one.decoded().strip(), count=1)
            obj = json.loads(text)
            problem = sync._undeliverable(spec, obj, text)
            if problem is not None:
                raise Poison(f"still undeliverable: {problem}")
            rows = Page(one.url, '{"value":[' + text + "]}", None, None, one.headers)
            await sync._publish_page(spec, rows, 1, EntityResult(spec.logical))
            return list(pub.messages)


def connector() -> CeConnector:
    """Entry point factory (``flash_connect.connectors``: ``dynamics-ce``)."""
    return CeConnector()
