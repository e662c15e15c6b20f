"""F&O simulator -> fo-poller -> normalizer -> resolver -> points, on the real broker and PostgreSQL.

Two environments with different field names (one standard; one whose status field is the extension
``ZZOrderState`` and which adds a modified date-time) land the same orders with the same points once their
mappings are confirmed; an unconfirmed mapping is refused at verify and, if set live anyway, stops the
connection with the fields named. Then: a changed order found by the incremental read and one announced by a
Business Event each reach the ledger once; a credit note claws back against its original order; a forged and
a replayed Business Event are refused and change nothing.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import ssl
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import httpx
import pytest

from canonical.events import MemberData
from fo_poller.app import MIGRATIONS as FO_MIGRATIONS
from fo_poller.app import SERVICE as FO_SERVICE
from fo_poller.app import supervise
from fo_poller.control import FoConnector
from fo_poller.events import EventReceiver
from normalizer.app import SERVICE as NORMALIZER
from points import app as points_app
from points.app import build_service
from points.cli import set_program
from points.rules import Program
from resolver import app as resolver_app
from resolver.app import SERVICE as RESOLVER
from resolver.cli import import_members
from sandbox.fo import BusinessEventSubscription, Environment, FOState, Variant, build_app, seed_environment
from sandbox.fo.seed import OrderTruth
from sandbox.fo.state import AppRegistration
from sandbox.server import serve
from sandbox.tls import make_tls
from servicekit.connections import Connection, CredentialCipher, PgConnectionStore
from servicekit.db import migrate
from servicekit.runtime import Infra, Service, run_services

VARIANT = Variant(renames={"SalesOrderHeadersV2": {"SalesOrderStatus": "ZZOrderState"}},
                  extensions={"SalesOrderHeadersV2": {"ZZModifiedDateTime": "Edm.DateTimeOffset"}})
SECRET = "fo-events-secret-0123456789"
ORDERS = 120
COMPANIES = ("usmf", "demf")


def reference(truth: list[OrderTruth], env: Environment) -> dict[str, int]:
    """Net points per order from the simulator's own facts (1 point per USD of the lines' net, floor; earned at
    Invoiced/Delivered; an effective return claws back its credited share of the order's gross total)."""
    out: dict[str, int] = {}
    st = env.f("SalesOrderHeadersV2", "SalesOrderStatus")
    for t in truth:
        head = env.header(t.company, t.number)
        if head[st] not in ("Invoiced", "Delivered"):
            continue
        net = env.net_of_lines(t.company, t.number)
        pts = math.floor(net)
        calculated = head[env.f("SalesOrderHeadersV2", "AreTotalsCalculated")] == "Yes"
        gross = Decimal(str(head[env.f("SalesOrderHeadersV2", "OrderTotalAmount")])) if calculated else net
        credited = Decimal(0)
        for (c, rnum), rh in env.rows["ReturnOrderHeaders"].items():
            lines = [r for r in env.rows["ReturnOrderLines"].values()
                     if r["dataAreaId"] == c and r["ReturnOrderNumber"] == rnum]
            anchors = {env.rows["SalesOrderLines"][(c, r["ReturnInventoryLotId"])]["SalesOrderNumber"] for r in lines}
            if c != t.company or anchors != {t.number}:
                continue
            note = env.rows["SalesInvoiceHeadersV2"].get((c, f"CCN-{rnum}"))
            if note is not None:
                credited += abs(Decimal(str(note["TotalInvoiceAmount"])))
            elif rh["ReturnOrderStatus"] in ("Received", "Invoiced"):
                credited += sum((abs(Decimal(str(r["LineAmount"]))) for r in lines), Decimal(0))
        claw = 0
        if pts > 0 and credited > 0:
            share = min(Decimal(1), credited / gross) if gross > 0 else Decimal(1)
            claw = min(pts, max(0, math.floor(Decimal(pts) * share)))
        if pts - claw:
            out[f"{t.company}/{t.number}"] = pts - claw
    return out


async def ledger(infra: Infra, tenant: str) -> dict[str, int]:
    rows = await infra.pool.fetch(
        "SELECT order_source_id, sum(points)::bigint AS n FROM ledger WHERE tenant_id = $1 GROUP BY 1", tenant)
    return {r["order_source_id"]: int(r["n"]) for r in rows if r["n"]}


async def wait_for(cond: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await cond():
            return
        await asyncio.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


async def wait_ledger(infra: Infra, tenant: str, want: Callable[[], dict[str, int]], timeout: float,
                      what: str) -> None:
    async def same() -> bool:
        return await ledger(infra, tenant) == want()

    try:
        await wait_for(same, timeout, what)
    except AssertionError:
        got, ref = await ledger(infra, tenant), want()
        diff = {k: (got.get(k), ref.get(k)) for k in set(got) | set(ref) if got.get(k) != ref.get(k)}
        raise AssertionError(f"{what}: {len(diff)} orders differ, e.g. {list(diff.items())[:5]}") from None


def _conn(base: str, ca: str, tenant: str, env: Environment, app: AppRegistration, **settings: Any) -> Connection:
    creds = {"tenant_id": app.tenant_id, "client_id": app.client_id, "client_secret": app.client_secret,
             "business_events_secret": SECRET}
    return Connection(tenant, f"fo-{tenant}", "dynamics-fo", f"{base}/envs/{env.name}", creds,
                      {"authority": f"{base}/{app.tenant_id}", "ca_bundle": ca, "page_size": 50,
                       "poll_interval_s": 0.3, "scan_interval_s": 2, "overlap_s": 5,
                       "business_events": {"enabled": True}, **settings})


async def _save(store: PgConnectionStore, c: Connection, state: str) -> None:
    await store.upsert(c.tenant_id, c.connection_id, c.source, c.endpoint, c.credentials, c.settings)
    await store.set_state(c.tenant_id, c.connection_id, state)  # type: ignore[arg-type]


async def _members_and_program(infra: Infra, tenant: str, env: Environment) -> None:
    await set_program(infra.pool, Program.model_validate(
        {"tenant_id": tenant, "base_currency": "USD", "points_per_unit": "1", "basis": "total_ex_tax_shipping",
         "rounding": "floor"}))
    members = [MemberData(member_id=f"m-{r['CustomerAccount']}", external_id=r["CustomerAccount"])
               for r in env.rows["CustomersV3"].values()]
    await import_members(infra.pool, tenant, members)


@pytest.mark.timeout(170)
async def test_two_environments_same_points_events_credit_notes_and_refusals(
        infra: Infra, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASH_ALLOW_SANDBOX_ENDPOINTS", "1")
    await migrate(infra.pool, [*FO_SERVICE.migrations, resolver_app.MIGRATIONS, points_app.MIGRATIONS, FO_MIGRATIONS])
    state = FOState()
    std, std_app = state.add_environment("contoso", companies=COMPANIES)
    var, var_app = state.add_environment("fabrikam", companies=COMPANIES, variant=VARIANT,
                                         stamp_field="ZZModifiedDateTime")
    truth_std = seed_environment(std, orders=ORDERS, seed=5)
    truth_var = seed_environment(var, orders=ORDERS, seed=5)
    sim_tls = make_tls()
    rtls = make_tls()
    receiver = EventReceiver()
    store = PgConnectionStore(infra.pool, CredentialCipher.from_settings(infra.settings))
    connector = FoConnector()
    async with serve(build_app(state), tls=sim_tls) as running, \
            receiver.serve("127.0.0.1", 0, rtls.server_context()) as port:
        base, ca = running.base_url, str(sim_tls.ca_path)
        acme = _conn(base, ca, "acme", std, std_app)
        globex_default = _conn(base, ca, "globex", var, var_app)
        # The variant environment with the default mapping: verify names the field and the offer.
        report = await connector.verify(connector.parse(globex_default), infra.settings)
        assert not report.ok
        assert "field_map.status = SalesOrderHeadersV2.SalesOrderStatus: MISSING" in report.summary()
        assert "ZZOrderState (SalesStatus)" in report.summary()
        globex = _conn(base, ca, "globex", var, var_app,
                       field_map={"status": "ZZOrderState", "change_date": "ZZModifiedDateTime"})
        for c in (acme, globex):
            rep = await connector.verify(connector.parse(c), infra.settings)
            assert rep.ok, rep.lines()
            await _save(store, c, "live")
        # An unconfirmed connection set live anyway (a third tenant): the poller refuses it, naming the field.
        initech = Connection("initech", "fo-initech", "dynamics-fo", globex_default.endpoint,
                             globex_default.credentials, globex_default.settings)
        await _save(store, initech, "live")
        for tenant, env in (("acme", std), ("globex", var), ("initech", var)):
            await _members_and_program(infra, tenant, env)
        ctx = ssl.create_default_context(cafile=str(rtls.ca_path))
        hook = f"https://127.0.0.1:{port}/fo/business-events/acme/fo-acme"
        std.subscriptions.append(BusinessEventSubscription(f"{hook}?code={SECRET}",
                                                           frozenset({"SalesInvoicePostedBusinessEvent"}), ctx))

        poller = Service("fo-poller", migrations=FO_SERVICE.migrations,
                         tasks=lambda inf, stop: [supervise(inf, stop, receiver=receiver, relist_s=0.5)])
        stop = asyncio.Event()
        runner = asyncio.create_task(run_services(
            [poller, NORMALIZER, RESOLVER, build_service(mature_interval_s=0.5)], infra.settings, stop=stop))
        try:
            await wait_ledger(infra, "acme", lambda: reference(truth_std, std), 90, "acme initial load")
            await wait_ledger(infra, "globex", lambda: reference(truth_var, var), 60, "globex initial load")
            # Same orders, same points, whatever the environment calls its fields.
            assert await ledger(infra, "acme") == await ledger(infra, "globex")
            assert len(await ledger(infra, "acme")) > 20
            assert {k.split("/")[0] for k in await ledger(infra, "acme")} == set(COMPANIES)
            refused = await store.get("initech", "fo-initech")
            assert refused is not None and refused.state == "failed"
            assert "ZZOrderState" in (refused.last_error or "") and "field_map.status" in (refused.last_error or "")
            assert await ledger(infra, "initech") == {}

            # A change only the scan sees (no change date in contoso) and an order announced by an event.
            pending = [t for t in truth_std if t.status == "Backorder"]
            scanned, announced = pending[0], pending[1]
            std.set_status(scanned.company, scanned.number, "Delivered")
            std.invoice_order(announced.company, announced.number)
            assert await state.deliver_events(interval_s=0.05) == 1
            await wait_ledger(infra, "acme", lambda: reference(truth_std, std), 40, "scan + event changes")
            for t in (scanned, announced):
                n = await infra.pool.fetchval(
                    "SELECT count(*) FROM ledger WHERE tenant_id = 'acme' AND order_source_id = $1 AND kind = 'earn'",
                    f"{t.company}/{t.number}")
                assert n == 1, f"{t.number} earned {n} times"
            events = await infra.pool.fetch("SELECT control_number, handled_at FROM fo_business_events")
            assert len(events) == 1 and events[0]["handled_at"] is not None

            # A credit note claws back against its original order.
            invoiced = next(t for t in truth_std if t.status == "Invoiced" and t.company == "usmf")
            lot = next(k[1] for k, r in std.rows["SalesOrderLines"].items()
                       if k[0] == "usmf" and r["SalesOrderNumber"] == invoiced.number)
            std.create_return("usmf", "R-1", invoiced.customer, "USD", [(lot, Decimal(1))], status="Received")
            std.credit_return("usmf", "RET-R-1")
            await wait_ledger(infra, "acme", lambda: reference(truth_std, std), 40, "credit note clawback")
            claw = await infra.pool.fetchval(
                "SELECT sum(points) FROM ledger WHERE tenant_id = 'acme' AND order_source_id = $1 "
                "AND kind = 'clawback'",
                f"usmf/{invoiced.number}")
            assert claw is not None and claw < 0

            # Forged and replayed events are refused and change nothing.
            before = await infra.pool.fetchval("SELECT count(*) FROM ledger")
            delivered = events[0]["control_number"]
            now_ms = int(dt.datetime.now(dt.UTC).timestamp() * 1000)
            body = {"BusinessEventId": "SalesInvoicePostedBusinessEvent", "ControlNumber": delivered,
                    "EventTime": f"/Date({now_ms})/", "LegalEntity": pending[2].company,
                    "SalesOrderId": pending[2].number}
            async with httpx.AsyncClient(verify=ctx) as peer:
                assert (await peer.post(f"{hook}?code=forged", json={**body, "ControlNumber": delivered + 1})
                        ).status_code == 401
                assert (await peer.post(f"{hook}?code={SECRET}", json=body)).status_code == 409
            await asyncio.sleep(1.5)
            assert await infra.pool.fetchval("SELECT count(*) FROM ledger") == before
            assert len(await infra.pool.fetch("SELECT 1 FROM fo_business_events")) == 1
        finally:
            stop.set()
            assert await asyncio.wait_for(runner, 30) == 0
