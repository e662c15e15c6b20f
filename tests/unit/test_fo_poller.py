"""fo-poller units: settings, the $metadata field confirmation, Business Event checks, records."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from typing import Any

import pytest

from fo_poller.config import FIELD_DEFAULTS, RETURN_STATUS_DEFAULTS, STATUS_DEFAULTS, parse_connection
from fo_poller.events import EVENTS, Announcement, EventInbox, FakeEventStore, event_time
from fo_poller.metadata import check_fields, check_statuses, parse_csdl
from fo_poller.records import content_version, dumps, source_version
from normalizer.mappers import dynamics_fo
from sandbox.fo import Variant, csdl
from servicekit.connections import Connection
from servicekit.errors import ConfigError

NOW = dt.datetime(2026, 12, 5, 12, 0, tzinfo=dt.UTC)


def _conn(settings: dict[str, Any] | None = None, **creds: str) -> Connection:
    c = {"tenant_id": "t", "client_id": "c", "client_secret": "s", **creds}
    return Connection("acme", "fo-1", "dynamics-fo", "https://contoso.operations.dynamics.com", c, settings or {})


def test_defaults_are_the_mappers_defaults() -> None:
    # Services share no code: the poller and the normalizer each hold the table; they must agree.
    assert FIELD_DEFAULTS == dynamics_fo.FIELD_DEFAULTS
    assert STATUS_DEFAULTS == dynamics_fo.STATUS_DEFAULTS
    assert RETURN_STATUS_DEFAULTS == dynamics_fo.RETURN_STATUS_DEFAULTS


def test_parse_connection_defaults_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASH_ALLOW_SANDBOX_ENDPOINTS", "0")
    cc = parse_connection(_conn())
    assert cc.data_url == "https://contoso.operations.dynamics.com/data/"
    assert cc.scope == "https://contoso.operations.dynamics.com/.default"
    assert cc.token_url == "https://login.microsoftonline.com/t/oauth2/v2.0/token"
    assert cc.f("status") == "SalesOrderStatus" and cc.field_map["change_date"] is None
    assert (cc.page_size, cc.batch_size, cc.concurrency, cc.scan_interval_s) == (5000, 25, 4, 3600)
    for settings, creds, words in [
        ({"field_map": {"colour": "X"}}, {}, "settings.field_map"),
        ({"page_size": 20000}, {}, "settings.page_size"),
        ({"concurrency": 0}, {}, "settings.concurrency"),
        ({"streams": ["orders", "invoices"]}, {}, "settings.streams"),
        ({"status_lifecycle": {"Backorder": "maybe"}}, {}, "settings.status_lifecycle.Backorder"),
        ({"business_events": {"enabled": True}}, {}, "credentials.business_events_secret"),
    ]:
        with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
            parse_connection(_conn(settings, **creds))
    with pytest.raises(ConfigError, match=r"credentials\.client_secret"):
        parse_connection(Connection("acme", "fo-1", "dynamics-fo", "https://contoso.operations.dynamics.com",
                                    {"tenant_id": "t", "client_id": "c"}, {}))
    with pytest.raises(ConfigError):
        parse_connection(Connection("acme", "fo-1", "dynamics-fo", "https://evil.example.com", {
            "tenant_id": "t", "client_id": "c", "client_secret": "s"}, {}))


def test_field_check_reports_present_missing_and_what_is_offered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASH_ALLOW_SANDBOX_ENDPOINTS", "0")
    variant = Variant(renames={"SalesOrderHeadersV2": {"SalesOrderStatus": "ZZOrderState", "Email": None}},
                      extensions={"SalesOrderHeadersV2": {"ZZModifiedDateTime": "Edm.DateTimeOffset"}})
    meta = parse_csdl(csdl(variant), ["SalesOrderHeadersV2", "SalesOrderLines", "SalesInvoiceHeadersV2"])
    assert meta["SalesOrderHeadersV2"].key == ("dataAreaId", "SalesOrderNumber")
    cc = parse_connection(_conn({"streams": ["orders"]}))
    checks = {c.name: c for c in check_fields(cc, meta)}
    assert checks["order_total"].ok and checks["order_total"].line().endswith("present, Edm.Decimal")
    status = checks["status"]
    assert not status.ok and "MISSING" in status.line()
    assert status.alternatives[0] == ("ZZOrderState", "Microsoft.Dynamics.DataEntities.SalesStatus")
    assert checks["email"].ok and "optional" in checks["email"].line()  # an absent optional default
    assert "return_status" not in checks  # returns are not synced by this connection
    cc = parse_connection(_conn({"streams": ["orders"], "field_map": {
        "status": "ZZOrderState", "email": "ZZMail", "order_total": "CurrencyCode"}}))
    checks = {c.name: c for c in check_fields(cc, meta)}
    assert checks["status"].ok
    assert not checks["email"].ok  # named explicitly by the operator: it must exist
    assert not checks["order_total"].ok and "not a money field" in checks["order_total"].line()
    assert "OrderTotalAmount (Edm.Decimal)" in checks["order_total"].offer()


async def test_inbox_checks_events() -> None:
    store = FakeEventStore()
    cc = parse_connection(_conn({"business_events": {"enabled": True, "max_age_s": 3600}},
                                business_events_secret="right"))
    inbox = EventInbox(cc, store, now=lambda: NOW)
    assert inbox.authentic("right") and not inbox.authentic("wrong") and not inbox.authentic(None)
    ms = int(NOW.timestamp() * 1000)
    ev = {"BusinessEventId": "SalesInvoicePostedBusinessEvent", "ControlNumber": 10, "EventTime": f"/Date({ms})/",
          "LegalEntity": "USMF", "SalesOrderId": "SO-1"}
    assert (await inbox.receive(ev))[0] == 202
    assert (await inbox.receive(ev))[0] == 409                               # replay
    assert (await inbox.receive({**ev, "ControlNumber": 17}))[0] == 202     # a gap is fine
    assert (await inbox.receive({**ev, "ControlNumber": 12}))[0] == 202     # so is out-of-order delivery
    old = {**ev, "ControlNumber": 30, "EventTime": f"/Date({ms - 7200 * 1000})/"}
    assert (await inbox.receive(old))[0] == 422
    assert (await inbox.receive({**ev, "ControlNumber": 31, "BusinessEventId": "VendorInvoicePostedBusinessEvent"}
                                ))[0] == 200
    assert (await inbox.receive({"ControlNumber": 40}))[0] == 400
    drained = inbox.drain()
    assert drained == [Announcement(10, "SalesInvoicePostedBusinessEvent", "usmf", "SO-1")]  # one per record
    inbox.requeue()
    assert inbox.drain() == drained
    await inbox.handled()
    assert await store.pending("acme", "fo-1") == []
    assert inbox.stats["replayed"] == 1 and inbox.stats["stale"] == 1 and inbox.stats["ignored"] == 1
    assert EVENTS.labels("replayed")._value.get() >= 1  # exposed as flash_fo_business_events_total


async def test_inbox_restores_pending_events_after_a_restart() -> None:
    store = FakeEventStore()
    cc = parse_connection(_conn({"business_events": {"enabled": True}}, business_events_secret="x"))
    first = EventInbox(cc, store, now=lambda: NOW)
    await first.receive({"BusinessEventId": "SalesInvoicePostedBusinessEvent", "ControlNumber": 5,
                         "EventTimeIso8601": "2026-12-05T11:59:00.1234567Z", "LegalEntity": "demf",
                         "SalesOrderId": "SO-9"})
    second = EventInbox(cc, store, now=lambda: NOW)
    await second.restore()
    assert [(a.company, a.number) for a in second.drain()] == [("demf", "SO-9")]


def test_event_time_formats() -> None:
    assert event_time({"EventTime": "/Date(1764936000000)/"}) == dt.datetime(2025, 12, 5, 12, 0, tzinfo=dt.UTC)
    assert event_time({"EventTimeIso8601": "2026-12-05T11:59:00.1234567Z"}) == dt.datetime(
        2026, 12, 5, 11, 59, 0, 123456, tzinfo=dt.UTC)
    assert event_time({"EventTime": "yesterday"}) is None


def test_versions_sort_by_time_and_ignore_etags() -> None:
    a = {"@odata.etag": 'W/"1"', "X": Decimal("1.10"), "L": [{"@odata.etag": 'W/"2"', "Y": 1}]}
    b = {"@odata.etag": 'W/"9"', "X": Decimal("1.10"), "L": [{"@odata.etag": 'W/"8"', "Y": 1}]}
    assert content_version(a) == content_version(b)
    assert content_version(a) != content_version({**a, "X": Decimal("1.2")})
    early = source_version(dt.datetime(2026, 12, 5, 9, 0, 0, 5, tzinfo=dt.UTC), "ffff")
    late = source_version(dt.datetime(2026, 12, 5, 10, 0, tzinfo=dt.UTC), "0000")
    assert early < late and early.startswith("2026-12-05T09:00:00.000005Z#")
    assert json.loads(dumps({"a": Decimal("12.34"), "b": Decimal("0.1000000000000000055511151231257827")})) == {
        "a": 12.34, "b": "0.1000000000000000055511151231257827"}


def test_help_explains_and_starts_nothing() -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "fo_poller", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "FLASH_FO_EVENTS_PORT" in out.stdout and "field_map" in out.stdout
    assert "services started" not in out.stdout + out.stderr


def test_status_values_are_confirmed_against_the_enum(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASH_ALLOW_SANDBOX_ENDPOINTS", "0")
    meta = parse_csdl(csdl(Variant()), ["SalesOrderHeadersV2", "SalesOrderLines", "SalesInvoiceHeadersV2",
                                        "ReturnOrderHeaders", "ReturnOrderLines"])
    assert meta["SalesOrderHeadersV2"].enums["SalesOrderStatus"] == (
        "None", "Backorder", "Delivered", "Invoiced", "Canceled")
    cc = parse_connection(_conn({"streams": ["orders", "returns"]}))
    checks = {c.name: c for c in check_statuses(cc, meta)}
    assert checks["status"].ok and "awardable: Delivered, Invoiced; cancelled: Canceled" in checks["status"].detail
    assert checks["return_status"].ok and "effective: Received, Invoiced" in checks["return_status"].detail
    typo = parse_connection(_conn({"streams": ["orders"], "status_lifecycle": {"Invoced": "awardable"}}))
    (bad,) = check_statuses(typo, meta)
    assert not bad.ok and "names Invoced, which SalesStatus does not have" in bad.detail
    nothing = parse_connection(_conn({"streams": ["orders"], "status_lifecycle": {
        "Invoiced": "pending", "Delivered": "pending"}}))
    (none,) = check_statuses(nothing, meta)
    assert not none.ok and "no value of SalesStatus is awardable" in none.detail
