"""The F&O simulator over real HTTPS, driven the way a client follows the published documentation."""

from __future__ import annotations

import json
import ssl
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx
import pytest
from aiohttp import web

from sandbox.fo import ENTITIES, BusinessEventSubscription, Environment, FOState, Variant, build_app, seed_environment
from sandbox.fo.state import AppRegistration
from sandbox.server import RunningSandbox, serve
from sandbox.tls import make_tls

pytestmark = pytest.mark.integration

EDM = "{http://docs.oasis-open.org/odata/ns/edm}"


@dataclass
class Sim:
    state: FOState
    env: Environment
    app: AppRegistration
    running: RunningSandbox
    client: httpx.AsyncClient
    token: str

    @property
    def data(self) -> str:
        return f"{self.running.base_url}/envs/{self.env.name}/data/"

    async def get(self, path: str, **headers: str) -> httpx.Response:
        url = path if path.startswith("https://") else self.data + path
        return await self.client.get(url, headers={"Authorization": f"Bearer {self.token}", **headers})

    async def get_json(self, path: str, **headers: str) -> dict[str, Any]:
        r = await self.get(path, **headers)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = json.loads(r.text, parse_float=Decimal)
        return body


async def _token(client: httpx.AsyncClient, base: str, app: AppRegistration, scope: str) -> httpx.Response:
    return await client.post(f"{base}/{app.tenant_id}/oauth2/v2.0/token", data={
        "grant_type": "client_credentials", "client_id": app.client_id, "client_secret": app.client_secret,
        "scope": scope})


@pytest.fixture
async def sim() -> AsyncIterator[Sim]:
    state = FOState()
    env, app = state.add_environment("contoso", companies=("usmf", "demf"), page_size=7)
    seed_environment(env, customers=5, products=4, orders=20)
    async with serve(build_app(state)) as running:
        async with httpx.AsyncClient(verify=running.tls.client_context()) as client:
            r = await _token(client, running.base_url, app, f"{running.base_url}/envs/contoso/.default")
            assert r.status_code == 200, r.text
            yield Sim(state, env, app, running, client, r.json()["access_token"])


async def test_token_errors_use_entra_codes(sim: Sim) -> None:
    base = sim.running.base_url
    bad = AppRegistration(sim.app.tenant_id, sim.app.client_id, "wrong")
    r = await _token(sim.client, base, bad, f"{base}/envs/contoso/.default")
    assert r.status_code == 401 and "AADSTS7000215" in r.json()["error_description"]
    r = await _token(sim.client, base, sim.app, f"{base}/envs/other/.default")
    assert r.status_code == 400 and "AADSTS500011" in r.json()["error_description"]
    r = await _token(sim.client, base, sim.app, f"{base}/envs/contoso")
    assert r.status_code == 400 and r.json()["error"] == "invalid_scope"
    r = await sim.client.get(sim.data + "CustomersV3", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401


async def test_default_company_unless_cross_company(sim: Sim) -> None:
    own = await sim.get_json("CustomersV3?$count=true")
    assert {c["dataAreaId"] for c in own["value"]} == {"usmf"}
    everyone = await sim.get_json("CustomersV3?cross-company=true&$count=true")
    assert everyone["@odata.count"] == 10
    one = await sim.get_json("CustomersV3?$filter=dataAreaId eq 'demf'&cross-company=true")
    assert {c["dataAreaId"] for c in one["value"]} == {"demf"}


async def test_composite_key_must_be_complete(sim: Sim) -> None:
    number = next(n for (c, n) in sim.env.rows["SalesOrderHeadersV2"] if c == "demf")
    ok = await sim.get_json(f"SalesOrderHeadersV2(dataAreaId='demf',SalesOrderNumber='{number}')?cross-company=true")
    assert ok["SalesOrderNumber"] == number and ok["dataAreaId"] == "demf"
    hidden = await sim.get(f"SalesOrderHeadersV2(dataAreaId='demf',SalesOrderNumber='{number}')")
    assert hidden.status_code == 404  # another company without cross-company=true
    partial = await sim.get(f"SalesOrderHeadersV2('{number}')?cross-company=true")
    assert partial.status_code == 400 and "key" in partial.json()["error"]["innererror"]["message"]


async def test_enums_are_strings_and_unsupported_things_are_refused(sim: Sim) -> None:
    body = await sim.get_json("SalesOrderHeadersV2?cross-company=true&$filter=SalesOrderStatus eq "
                              "Microsoft.Dynamics.DataEntities.SalesStatus'Invoiced'")
    assert body["value"] and {o["SalesOrderStatus"] for o in body["value"]} == {"Invoiced"}
    assert {o["AreTotalsCalculated"] for o in body["value"]} == {"Yes"}
    for query, status in [
        ("SalesOrderStatus gt Microsoft.Dynamics.DataEntities.SalesStatus'None'", 400),
        ("SalesOrderNumber in ('SO-000001')", 501),
        ("contains(SalesOrderNumber,'1')", 400),
        ("NoSuchField eq 'x'", 400),
    ]:
        r = await sim.get(f"SalesOrderHeadersV2?$filter={query}")
        assert r.status_code == status, (query, r.text)
        assert r.json()["error"]["innererror"]["message"]
    r = await sim.get("SalesOrderHeadersV2?$apply=aggregate(OrderTotalAmount with sum as t)")
    assert r.status_code == 501


async def test_header_totals_stay_zero_until_calculated(sim: Sim) -> None:
    env = sim.env
    env.create_order("usmf", "SO-NEW", "USMF-C00001", "USD", [("I0001", Decimal(2), Decimal("10.50"), Decimal(1))])
    head = await sim.get_json("SalesOrderHeadersV2(dataAreaId='usmf',SalesOrderNumber='SO-NEW')?cross-company=true")
    assert head["AreTotalsCalculated"] == "No" and head["OrderTotalAmount"] == 0
    lines = await sim.get_json("SalesOrderLines?cross-company=true&$filter=SalesOrderNumber eq 'SO-NEW'")
    assert [ln["LineAmount"] for ln in lines["value"]] == [Decimal("20")]
    env.calculate_totals("usmf", "SO-NEW")
    head = await sim.get_json("SalesOrderHeadersV2(dataAreaId='usmf',SalesOrderNumber='SO-NEW')?cross-company=true")
    assert head["AreTotalsCalculated"] == "Yes" and head["OrderTotalAmount"] == Decimal("20")


async def test_server_driven_paging_returns_every_row_once(sim: Sim) -> None:
    url = "SalesOrderLines?cross-company=true"
    seen: list[tuple[str, str]] = []
    pages = 0
    while url:
        body = await sim.get_json(url)
        pages += 1
        assert len(body["value"]) <= 7
        seen += [(r["dataAreaId"], r["InventoryLotId"]) for r in body["value"]]
        url = body.get("@odata.nextLink", "")
    assert pages > 1 and len(seen) == len(set(seen)) == len(sim.env.rows["SalesOrderLines"])
    small = await sim.get_json("SalesOrderLines?cross-company=true", Prefer="odata.maxpagesize=2")
    assert len(small["value"]) == 2 and "@odata.nextLink" in small


async def test_date_window_filter(sim: Sim) -> None:
    body = await sim.get_json("SalesOrderHeadersV2?cross-company=true&$filter=OrderCreationDateTime ge "
                              "2026-11-01T00:05:00Z and OrderCreationDateTime lt 2026-11-01T00:08:00Z")
    assert sorted(o["SalesOrderNumber"] for o in body["value"]) == ["SO-000005", "SO-000006", "SO-000007"]


async def test_metadata_describes_keys_enums_and_environment_variants() -> None:
    state = FOState()
    variant = Variant(renames={"SalesOrderHeadersV2": {"SalesOrderStatus": "ZZOrderState"}},
                      extensions={"SalesOrderHeadersV2": {"ZZModifiedDateTime": "Edm.DateTimeOffset"}})
    env, app = state.add_environment("fabrikam", variant=variant, stamp_field="ZZModifiedDateTime")
    seed_environment(env, orders=3)
    async with serve(build_app(state)) as running, httpx.AsyncClient(verify=running.tls.client_context()) as client:
        tok = (await _token(client, running.base_url, app, f"{running.base_url}/envs/fabrikam/.default")).json()
        r = await client.get(f"{running.base_url}/envs/fabrikam/data/$metadata",
                             headers={"Authorization": f"Bearer {tok['access_token']}"})
        assert r.status_code == 200
        root = ET.fromstring(r.text)
        types = {t.get("Name"): t for t in root.iter(f"{EDM}EntityType")}
        head = types["SalesOrderHeaderV2"]
        props = {p.get("Name"): p.get("Type") for p in head.iter(f"{EDM}Property")}
        assert props["ZZOrderState"] == "Microsoft.Dynamics.DataEntities.SalesStatus"
        assert "SalesOrderStatus" not in props and props["ZZModifiedDateTime"] == "Edm.DateTimeOffset"
        assert [k.get("Name") for k in head.iter(f"{EDM}PropertyRef")] == ["dataAreaId", "SalesOrderNumber"]
        enums = {e.get("Name") for e in root.iter(f"{EDM}EnumType")}
        assert {"SalesStatus", "NoYes"} <= enums
        sets = {s.get("Name") for s in root.iter(f"{EDM}EntitySet")}
        assert {"SalesOrderHeadersV2", "SalesOrderLines", "CustomersV3", "ReleasedProductsV2"} <= sets
        rows = (await client.get(f"{running.base_url}/envs/fabrikam/data/SalesOrderHeadersV2",
                                 headers={"Authorization": f"Bearer {tok['access_token']}"})).json()["value"]
        assert all(o["ZZModifiedDateTime"] for o in rows) and all("ZZOrderState" in o for o in rows)


async def test_throttling_answers_429_with_retry_after(sim: Sim) -> None:
    sim.state.throttle_next.extend([7])
    r = await sim.get("CustomersV3")
    assert r.status_code == 429 and r.headers["Retry-After"] == "7"
    assert (await sim.get("CustomersV3")).status_code == 200
    sim.state.user_limit = (2, 60.0)
    codes = [(await sim.get("CustomersV3")).status_code for _ in range(3)]
    assert codes == [200, 200, 429]


async def test_business_events_reach_a_registered_https_endpoint(sim: Sim) -> None:
    received: list[dict[str, Any]] = []
    fail_first = [True]

    async def receive(request: web.Request) -> web.Response:
        if fail_first[0]:
            fail_first[0] = False
            return web.Response(status=503)
        assert request.query["code"] == "s3cret"
        received.append(await request.json())
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/events", receive)
    tls = make_tls()
    async with serve(app, tls=tls) as endpoint:
        ctx = ssl.create_default_context(cafile=str(tls.ca_path))
        sim.env.subscriptions.append(BusinessEventSubscription(
            f"{endpoint.base_url}/events?code=s3cret", frozenset({"SalesInvoicePostedBusinessEvent"}), ctx))
        pending = [n for (c, n), h in sim.env.rows["SalesOrderHeadersV2"].items()
                   if c == "usmf" and h["SalesOrderStatus"] != "Invoiced"][:3]
        for n in pending:
            sim.env.invoice_order("usmf", n)
        assert await sim.state.deliver_events(interval_s=0.01) == 3
    assert [e["SalesOrderId"] for e in received] == pending
    for e in received:
        assert e["BusinessEventId"] == "SalesInvoicePostedBusinessEvent" and e["LegalEntity"] == "usmf"
        assert {"ControlNumber", "EventId", "EventTime", "MajorVersion", "MinorVersion", "InvoiceId"} <= set(e)
    numbers = [e["ControlNumber"] for e in received]
    assert numbers == sorted(numbers) and len(set(numbers)) == 3
    statuses = [s for (_, _, s) in sim.state.delivery_log]
    assert statuses[0] == 503 and statuses.count(200) == 3  # retried after the failure, as documented


def test_every_field_and_enum_the_simulator_serves_is_in_the_vendor_facts() -> None:
    from pathlib import Path

    from sandbox.fo.schema import ENUMS

    facts = (Path(__file__).parents[2] / "docs" / "vendor-facts.md").read_text()
    section = facts.split("## Finance & Operations", 1)[1].split("\n## ", 1)[0]
    names = {f for e in ENTITIES.values() for f in e.fields} | {e.entity_set for e in ENTITIES.values()}
    names |= set(ENUMS) | {"BusinessEventId", "ControlNumber", "EventTime", "SalesOrderId", "LegalEntity"}
    missing = sorted(n for n in names if f"`{n}`" not in section)
    assert not missing, f"the F&O simulator serves names docs/vendor-facts.md does not list: {missing}"
