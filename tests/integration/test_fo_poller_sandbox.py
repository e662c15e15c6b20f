"""The fo-poller against the F&O simulator over real HTTPS: verify, initial load, incremental reads, Business
Events (authenticated, deduplicated, forged and replayed ones refused). The broker and database sides are
the kit's fakes here; tests/e2e/test_fo_pipeline.py runs the whole pipe."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import socket
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

import httpx
import pytest

from connectorkit.cursors import FakePublishedVersions
from fo_poller.client import FoClient
from fo_poller.config import FoConnection, parse_connection
from fo_poller.control import FoConnector, http_client
from fo_poller.events import EventInbox, EventReceiver, FakeEventStore
from fo_poller.metadata import ROLES_BY_STREAM
from fo_poller.streams import FoSync
from sandbox.fo import BusinessEventSubscription, Environment, FOState, Variant, build_app, seed_environment
from sandbox.fo.state import AppRegistration
from sandbox.server import RunningSandbox, serve
from sandbox.tls import SandboxTLS, make_tls
from servicekit.connections import Connection, FakeCursorStore
from servicekit.errors import ConfigError
from servicekit.kafka import OutMessage
from servicekit.runtime import Infra
from servicekit.settings import FlashSettings

pytestmark = pytest.mark.integration

SETTINGS = FlashSettings(backoff_base_s=0.01, backoff_max_s=0.1)
VARIANT = Variant(renames={"SalesOrderHeadersV2": {"SalesOrderStatus": "ZZOrderState"}},
                  extensions={"SalesOrderHeadersV2": {"ZZModifiedDateTime": "Edm.DateTimeOffset"}})


@dataclass
class Collect:
    messages: list[OutMessage] = field(default_factory=list)

    async def send_all(self, messages: Sequence[OutMessage]) -> None:
        self.messages.extend(messages)

    def records(self, entity: str | None = None) -> list[dict[str, Any]]:
        out = [json.loads(m.value) for m in self.messages]
        return [r for r in out if entity is None or r["entity"] == entity]


@dataclass
class World:
    state: FOState
    running: RunningSandbox
    tls: SandboxTLS

    def connection(self, env: Environment, app: AppRegistration, *, cid: str = "fo-1", **settings: Any) -> Connection:
        base = self.running.base_url
        creds = {"tenant_id": app.tenant_id, "client_id": app.client_id, "client_secret": app.client_secret}
        if settings.get("business_events", {}).get("enabled"):
            creds["business_events_secret"] = "s3cret-code"
        return Connection("acme", cid, "dynamics-fo", f"{base}/envs/{env.name}", creds,
                          {"authority": f"{base}/{app.tenant_id}", "ca_bundle": str(self.tls.ca_path),
                           "scan_interval_s": 3600, "overlap_s": 0, "page_size": 10, **settings})


@pytest.fixture
async def world(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[World]:
    monkeypatch.setenv("FLASH_ALLOW_SANDBOX_ENDPOINTS", "1")
    state = FOState()
    tls = make_tls()
    async with serve(build_app(state), tls=tls) as running:
        yield World(state, running, tls)


async def _sync(cc: FoConnection, http: httpx.AsyncClient, pub: Collect, cursors: FakeCursorStore,
                versions: FakePublishedVersions, inbox: EventInbox | None = None) -> FoSync:
    client = FoClient(cc, http, max_attempts=3, backoff_base_s=0.01)
    roles = sorted({r for s in cc.streams for r in ROLES_BY_STREAM[s]})
    meta = await client.metadata([cc.entity_sets[r] for r in roles])
    return FoSync(cc, client, pub, cursors, versions, SETTINGS, meta, inbox=inbox)


async def test_verify_confirms_fields_and_names_what_the_environment_offers(world: World) -> None:
    std, app = world.state.add_environment("contoso")
    seed_environment(std, orders=4)
    var, vapp = world.state.add_environment("fabrikam", variant=VARIANT, stamp_field="ZZModifiedDateTime")
    seed_environment(var, orders=4)
    conn = FoConnector()
    ok = await conn.verify(conn.parse(world.connection(std, app)), SETTINGS)
    assert ok.ok, ok.lines()
    assert any("field_map.status = SalesOrderHeadersV2.SalesOrderStatus: present, SalesStatus" in ln
               for ln in ok.lines())
    assert {f["name"] for f in ok.info["fields"]} >= {"order_total", "currency", "status", "line_quantity"}
    bad = await conn.verify(conn.parse(world.connection(var, vapp)), SETTINGS)
    assert not bad.ok
    (fail,) = bad.failures()
    assert fail.name == "field status" and "SalesOrderStatus: MISSING" in fail.detail
    assert "offers ZZOrderState (SalesStatus)" in fail.detail and "settings.field_map.status" in fail.fix
    fixed = await conn.verify(conn.parse(world.connection(var, vapp, field_map={
        "status": "ZZOrderState", "change_date": "ZZModifiedDateTime"})), SETTINGS)
    assert fixed.ok, fixed.lines()
    wrong_secret = world.connection(std, AppRegistration(app.tenant_id, app.client_id, "nope"))
    auth = await conn.verify(conn.parse(wrong_secret), SETTINGS)
    assert [c.name for c in auth.failures()] == ["auth"] and "client secret is wrong" in auth.failures()[0].detail
    assert "nope" not in " ".join(auth.lines())


async def test_initial_load_then_unchanged_rows_publish_nothing(world: World) -> None:
    env, app = world.state.add_environment("contoso", companies=("usmf", "demf"))
    truth = seed_environment(env, orders=30, customers=6, products=5)
    cc = parse_connection(world.connection(env, app))
    pub, cursors, versions = Collect(), FakeCursorStore(), FakePublishedVersions()
    async with http_client(cc) as http:
        sync = await _sync(cc, http, pub, cursors, versions)
        first = await sync.run_cycle()
        assert first.published["orders"] == len(truth) == 30
        assert first.published["customers"] == 12 and first.published["products"] == 10
        orders = {r["source_id"]: json.loads(r["payload"]) for r in pub.records("SalesOrderHeadersV2")}
        assert set(orders) == {f"{t.company}/{t.number}" for t in truth}
        for t in truth:
            o = orders[f"{t.company}/{t.number}"]
            assert o["dataAreaId"] == t.company
            assert sum(Decimal(str(ln["LineAmount"])) for ln in o["SalesOrderLines"]) == t.net
        pub.messages.clear()
        cc2 = parse_connection(world.connection(env, app, scan_interval_s=0))
        again = await (await _sync(cc2, http, pub, cursors, versions)).run_cycle()
        assert sum(again.published.values()) == 0 and again.read["orders"] >= 30  # read, but nothing new


async def test_changed_order_is_found_by_scan_and_by_a_mapped_change_date(world: World) -> None:
    env, app = world.state.add_environment("fabrikam", variant=VARIANT, stamp_field="ZZModifiedDateTime")
    seed_environment(env, orders=12)
    cc = parse_connection(world.connection(env, app, field_map={"status": "ZZOrderState",
                                                                "change_date": "ZZModifiedDateTime"}))
    pub, cursors, versions = Collect(), FakeCursorStore(), FakePublishedVersions()
    async with http_client(cc) as http:
        sync = await _sync(cc, http, pub, cursors, versions)
        await sync.run_cycle()
        pub.messages.clear()
        lot = next(k[1] for k, r in env.rows["SalesOrderLines"].items() if r["SalesOrderNumber"] == "SO-000003")
        env.set_line_quantity("usmf", lot, Decimal(9))
        res = await sync.run_cycle()  # no scan due: the change-date window finds it
        assert res.published == {"orders": 1}
        (rec,) = pub.records()
        assert rec["source_id"] == "usmf/SO-000003"
        lines = json.loads(rec["payload"])["SalesOrderLines"]
        assert any(Decimal(str(ln["OrderedSalesQuantity"])) == 9 for ln in lines)
    std, sapp = world.state.add_environment("contoso")
    seed_environment(std, orders=12)
    cc = parse_connection(world.connection(std, sapp, scan_interval_s=0))
    pub, cursors, versions = Collect(), FakeCursorStore(), FakePublishedVersions()
    async with http_client(cc) as http:
        sync = await _sync(cc, http, pub, cursors, versions)
        await sync.run_cycle()
        pub.messages.clear()
        std.set_status("usmf", "SO-000004", "Canceled")  # no change date: the hash scan finds it
        res = await sync.run_cycle()
        assert res.published == {"orders": 1} and pub.records()[0]["source_id"] == "usmf/SO-000004"


async def test_business_events_call_back_and_refuse_forged_or_replayed(world: World) -> None:
    env, app = world.state.add_environment("contoso")
    seed_environment(env, orders=10)
    cc = parse_connection(world.connection(env, app, business_events={"enabled": True}))
    pub, cursors, versions = Collect(), FakeCursorStore(), FakePublishedVersions()
    store = FakeEventStore()
    inbox = EventInbox(cc, store)
    receiver = EventReceiver()
    receiver.register(inbox)
    rtls = make_tls()
    ctx = ssl.create_default_context(cafile=str(rtls.ca_path))
    async with receiver.serve("127.0.0.1", 0, rtls.server_context()) as port, http_client(cc) as http:
        url = f"https://127.0.0.1:{port}/fo/business-events/acme/fo-1"
        env.subscriptions.append(BusinessEventSubscription(
            f"{url}?code=s3cret-code", frozenset({"SalesInvoicePostedBusinessEvent"}), ctx))
        sync = await _sync(cc, http, pub, cursors, versions, inbox)
        await sync.run_cycle()
        pub.messages.clear()
        number = next(n for (c, n), h in env.rows["SalesOrderHeadersV2"].items() if h["SalesOrderStatus"] != "Invoiced")
        env.invoice_order("usmf", number)
        assert await world.state.deliver_events(interval_s=0.01) == 1
        delivered = env.control_number
        res = await sync.run_cycle()
        assert res.published == {"orders": 1} and pub.records()[0]["source_id"] == f"usmf/{number}"
        assert inbox.stats["accepted"] == 1 and await store.pending("acme", "fo-1") == []
        async with httpx.AsyncClient(verify=ctx) as peer:
            body = {"BusinessEventId": "SalesInvoicePostedBusinessEvent", "ControlNumber": delivered,
                    "EventTime": f"/Date({int(dt.datetime.now(dt.UTC).timestamp() * 1000)})/",
                    "LegalEntity": "usmf", "SalesOrderId": number}
            assert (await peer.post(f"{url}?code=guess", json=body)).status_code == 401
            assert (await peer.post(url, json=body)).status_code == 401
            assert (await peer.post(f"{url}?code=s3cret-code", json=body)).status_code == 409
            old = {**body, "ControlNumber": delivered + 100, "EventTime": "/Date(1000000000000)/"}
            assert (await peer.post(f"{url}?code=s3cret-code", json=old)).status_code == 422
            assert (await peer.post(f"{url}?code=s3cret-code", json={"hello": 1})).status_code == 400
        assert inbox.stats["forged"] == 2 and inbox.stats["replayed"] == 1 and inbox.stats["stale"] == 1
        pub.messages.clear()
        assert (await sync.run_cycle()).published == {}


async def test_credit_note_reaches_its_return_anchored_to_the_original_order(world: World) -> None:
    env, app = world.state.add_environment("contoso")
    seed_environment(env, orders=6)
    cc = parse_connection(world.connection(env, app))
    pub, cursors, versions = Collect(), FakeCursorStore(), FakePublishedVersions()
    async with http_client(cc) as http:
        sync = await _sync(cc, http, pub, cursors, versions)
        await sync.run_cycle()
        pub.messages.clear()
        lot, line = next((k[1], r) for k, r in env.rows["SalesOrderLines"].items()
                         if r["SalesOrderNumber"] == "SO-000002")
        env.create_return("usmf", "0007", "USMF-C00001", "USD", [(lot, Decimal(1))], status="Received")
        env.credit_return("usmf", "RET-0007")
        res = await sync.run_cycle()  # the credit note's invoice date window refreshes the return
        assert res.published.get("returns") == 1
        (rec,) = pub.records("ReturnOrderHeaders")
        assert rec["source_id"] == "usmf/RET-0007" and rec["order_source_id"] == "usmf/SO-000002"
        payload = json.loads(rec["payload"])
        assert payload["@flash.originalOrders"] == {lot: "SO-000002"}
        assert Decimal(str(payload["@flash.creditNote"]["TotalInvoiceAmount"])) == -Decimal(str(line["SalesPrice"]))


async def test_sample_moves_nothing_and_refuses_an_unconfirmed_mapping(world: World) -> None:
    env, app = world.state.add_environment("contoso")
    seed_environment(env, orders=8)
    var, vapp = world.state.add_environment("fabrikam", variant=VARIANT)
    seed_environment(var, orders=2)
    conn = FoConnector()
    got = await conn.sample(conn.parse(world.connection(env, app)), SETTINGS, limit=3)
    assert {k: len(v) for k, v in got.items()} == {"orders": 3, "customers": 3, "products": 3, "returns": 0}
    assert all("SalesOrderLines" in json.loads(r.payload) for r in got["orders"])
    with pytest.raises(Exception, match="ZZOrderState"):
        await conn.sample(conn.parse(world.connection(var, vapp)), SETTINGS, limit=3)



async def test_a_row_without_its_key_goes_to_a_source_dead_letter(world: World) -> None:
    env, app = world.state.add_environment("contoso")
    seed_environment(env, orders=3)
    broken = dict(env.header("usmf", "SO-000001"), SalesOrderNumber="")
    env.rows["SalesOrderHeadersV2"][("usmf", "")] = broken
    cc = parse_connection(world.connection(env, app))
    pub, cursors, versions = Collect(), FakeCursorStore(), FakePublishedVersions()
    async with http_client(cc) as http:
        sync = await _sync(cc, http, pub, cursors, versions)
        res = await sync.run_cycle()
    assert res.published["orders"] == 3
    letters = sync.dead_letters.letters  # type: ignore[attr-defined]
    assert len(letters) == 1 and "without SalesOrderNumber" in str(letters[0].error)
    assert letters[0].raw_topic.endswith("raw.dynamics-fo.SalesOrderHeadersV2.v1")
    assert json.loads(letters[0].body)["dataAreaId"] == "usmf"


async def test_service_starts_the_https_receiver_from_its_settings(infra: Infra) -> None:
    from fo_poller.app import SERVICE, receiver_tls

    with pytest.raises(ConfigError, match="FLASH_FO_EVENTS_CERT"):
        receiver_tls(infra.settings.model_copy(update={"fo_events_port": 1}))
    tls = make_tls()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = FlashSettings.model_validate({**infra.settings.model_dump(), "fo_events_port": port,
                                             "fo_events_host": "127.0.0.1", "fo_events_cert": tls.cert_path,
                                             "fo_events_key": tls.key_path})
    stop = asyncio.Event()
    (task,) = [asyncio.ensure_future(t) for t in SERVICE.tasks(replace(infra, settings=settings), stop)]
    try:
        async with httpx.AsyncClient(verify=tls.client_context()) as client:
            for _ in range(50):
                try:
                    r = await client.post(f"https://127.0.0.1:{port}/fo/business-events/acme/fo-9?code=x", json={})
                    break
                except httpx.ConnectError:
                    await asyncio.sleep(0.1)
            assert r.status_code == 404 and "no live connection" in r.text
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_throttling_and_expired_tokens_are_waited_out(world: World) -> None:
    env, app = world.state.add_environment("contoso")
    seed_environment(env, orders=20)
    cc = parse_connection(world.connection(env, app, page_size=5))
    pub, cursors, versions = Collect(), FakeCursorStore(), FakePublishedVersions()
    async with http_client(cc) as http:
        sync = await _sync(cc, http, pub, cursors, versions)
        world.state.throttle_next.extend([1, 1])  # resource-based throttling: 429 with Retry-After: 1
        world.state.expire_tokens()
        started = asyncio.get_running_loop().time()
        res = await sync.run_cycle()
        waited = asyncio.get_running_loop().time() - started
    assert res.published["orders"] == 20
    assert world.state.stats["throttled"] == 2 and waited >= 2.0  # Retry-After honoured, not hammered
    assert world.state.stats["token.requests"] >= 2  # the expired token was renewed


async def test_initial_load_resumes_after_a_crash_at_the_last_acknowledged_page(world: World) -> None:
    env, app = world.state.add_environment("contoso")
    seed_environment(env, orders=40)
    cc = parse_connection(world.connection(env, app, page_size=5))

    class Crashing(Collect):
        async def send_all(self, messages: Sequence[OutMessage]) -> None:
            if len(self.records("SalesOrderHeadersV2")) >= 15:
                raise ConnectionError("broker gone")
            await super().send_all(messages)

    pub, cursors, versions = Crashing(), FakeCursorStore(), FakePublishedVersions()
    async with http_client(cc) as http:
        sync = await _sync(cc, http, pub, cursors, versions)
        with pytest.raises(ConnectionError):
            await sync.run_cycle()
        saved = cursors.cursors[("acme", "fo-1", "orders")]
        assert saved["phase"] == "initial" and "$skip=15" in saved["next_link"]
        reads_before = world.state.stats["get.SalesOrderHeadersV2"]
        rest = Collect()
        res = await (await _sync(cc, http, rest, cursors, versions)).run_cycle()
    orders = [r["source_id"] for r in pub.records("SalesOrderHeadersV2") + rest.records("SalesOrderHeadersV2")]
    assert sorted(orders) == sorted(set(orders)) and len(orders) == 40  # every order once, none skipped
    assert res.published["orders"] == 25
    assert world.state.stats["get.SalesOrderHeadersV2"] - reads_before <= 6  # resumed, did not start over


async def test_an_event_during_the_initial_load_is_called_back_after_it(world: World) -> None:
    env, app = world.state.add_environment("contoso")
    seed_environment(env, orders=10)
    cc = parse_connection(world.connection(env, app, business_events={"enabled": True}))
    store = FakeEventStore()
    inbox = EventInbox(cc, store)
    pub, cursors, versions = Collect(), FakeCursorStore(), FakePublishedVersions()
    async with http_client(cc) as http:
        sync = await _sync(cc, http, pub, cursors, versions, inbox)
        number = next(n for (c, n), h in env.rows["SalesOrderHeadersV2"].items() if h["SalesOrderStatus"] != "Invoiced")
        now_ms = int(dt.datetime.now(dt.UTC).timestamp() * 1000)
        status, _ = await inbox.receive({"BusinessEventId": "SalesInvoicePostedBusinessEvent", "ControlNumber": 7,
                                         "EventTime": f"/Date({now_ms})/", "LegalEntity": "usmf",
                                         "SalesOrderId": number})
        assert status == 202
        await sync.run_cycle()  # the initial load; the event stays pending
        assert [a.control_number for a in await store.pending("acme", "fo-1")] == [7]
        env.set_status("usmf", number, "Delivered")  # changed after the load read it
        pub.messages.clear()
        res = await sync.run_cycle()
    assert res.published == {"orders": 1} and pub.records()[0]["source_id"] == f"usmf/{number}"
    assert await store.pending("acme", "fo-1") == []
