"""The Salesforce simulator against the documented API (docs/vendor-facts.md, ``## Salesforce``): Describe
Global, the refresh-token grant, ``/limits`` names, Bulk API 1.0 answered with the vendor's error (never 200),
SOQL datetime literals with more than 3 fractional digits, and orgs without multicurrency, person accounts or
Order Management answering INVALID_FIELD / INVALID_TYPE as Salesforce does."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio

from sandbox.salesforce import SalesforceState, build_app, seed_org
from sandbox.server import RunningSandbox, serve

pytestmark = pytest.mark.integration

V = "v66.0"


@pytest_asyncio.fixture(scope="module")
async def sim() -> AsyncIterator[tuple[SalesforceState, RunningSandbox, httpx.AsyncClient]]:
    state = SalesforceState(cometd_timeout_s=2.0)
    state.add_org("plain", multi_currency=False, person_accounts=False)
    seed_org(state, "plain", orders=10, person_accounts=0, seed=3)
    seed_org(state, "full", orders=10, seed=4, mode="order_management")
    async with serve(build_app(state)) as sb:
        async with httpx.AsyncClient(verify=sb.tls.client_context(), timeout=10) as http:
            yield state, sb, http


async def _client(sim: Any, org: str, **form: str) -> tuple[httpx.AsyncClient, httpx.Response]:
    state, sb, http = sim
    o = state.orgs[org]
    data = {"grant_type": "client_credentials", "client_id": o.client_id, "client_secret": o.client_secret, **form}
    resp = await http.post(f"{sb.base_url}/services/oauth2/token", data=data)
    assert resp.status_code == 200, resp.text
    tok = resp.json()
    c = httpx.AsyncClient(base_url=tok["instance_url"], verify=sb.tls.client_context(), timeout=10,
                          headers={"Authorization": f"Bearer {tok['access_token']}"})
    return c, resp


async def test_describe_global_lists_the_orgs_objects(sim: Any) -> None:
    c, _ = await _client(sim, "plain")
    async with c:
        resp = await c.get(f"/services/data/{V}/sobjects")
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["encoding"] == "UTF-8" and body["maxBatchSize"] == 200
        names = {o["name"]: o for o in body["sobjects"]}
        assert names["Account"]["keyPrefix"] == "001"
        assert names["Order"]["urls"]["describe"] == f"/services/data/{V}/sobjects/Order/describe"
        assert "OrderSummary" not in names  # no Order Management in this org
    c, _ = await _client(sim, "full")
    async with c:
        names = {o["name"] for o in (await c.get(f"/services/data/{V}/sobjects/")).json()["sobjects"]}
        assert {"OrderSummary", "OrderItemSummary", "CreditMemo"} <= names


async def test_refresh_token_grant(sim: Any) -> None:
    state, sb, http = sim
    o = state.orgs["plain"]
    resp = await http.post(f"{sb.base_url}/services/oauth2/token", data={
        "grant_type": "refresh_token", "client_id": o.client_id, "refresh_token": o.refresh_token})
    assert resp.status_code == 200, resp.text
    assert resp.json()["access_token"] and resp.json()["instance_url"].endswith("/orgs/plain")
    bad = await http.post(f"{sb.base_url}/services/oauth2/token", data={
        "grant_type": "refresh_token", "client_id": o.client_id, "refresh_token": "nope"})
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_grant"
    other = await http.post(f"{sb.base_url}/services/oauth2/token", data={
        "grant_type": "password", "client_id": o.client_id})
    assert other.status_code == 400 and other.json()["error"] == "unsupported_grant_type"


async def test_limits_name_daily_bulk_api_batches(sim: Any) -> None:
    c, _ = await _client(sim, "plain")
    async with c:
        body = (await c.get(f"/services/data/{V}/limits/")).json()
        assert set(body["DailyBulkApiBatches"]) == {"Max", "Remaining"}
        assert "DailyApiRequests" in body


async def test_bulk_api_1_is_refused_with_the_vendor_error_never_200(sim: Any) -> None:
    c, _ = await _client(sim, "plain")
    async with c:
        resp = await c.post("/services/async/66.0/job", content=b"<jobInfo/>",
                            headers={"Content-Type": "application/xml"})
        assert resp.status_code == 400
        assert "<exceptionCode>FeatureNotEnabled</exceptionCode>" in resp.text
        assert (await c.get("/services/data/v66.0/no-such-resource")).status_code == 404


async def test_soql_datetime_with_microseconds_is_accepted(sim: Any) -> None:
    c, _ = await _client(sim, "plain")
    async with c:
        for lit in ("2020-01-01T00:00:00.123456Z", "2020-01-01T00:00:00.1+00:00", "2020-01-01T00:00:00Z"):
            resp = await c.get(f"/services/data/{V}/query",
                               params={"q": f"SELECT Id FROM Order WHERE SystemModstamp > {lit}"})
            assert resp.status_code == 200, (lit, resp.text)
            assert resp.json()["totalSize"] == 10


async def test_an_org_without_multicurrency_or_person_accounts_rejects_their_fields(sim: Any) -> None:
    c, _ = await _client(sim, "plain")
    async with c:
        for soql, code in {
            "SELECT Id, CurrencyIsoCode FROM Order": "INVALID_FIELD",
            "SELECT Id, Account.PersonEmail FROM Order": "INVALID_FIELD",
            "SELECT Id, IsPersonAccount FROM Account": "INVALID_FIELD",
            "SELECT Id FROM OrderSummary": "INVALID_TYPE",
        }.items():
            resp = await c.get(f"/services/data/{V}/query", params={"q": soql})
            assert resp.status_code == 400, soql
            assert resp.json()[0]["errorCode"] == code, soql
        fields = {f["name"] for f in (await c.get(f"/services/data/{V}/sobjects/Account/describe")).json()["fields"]}
        assert "AccountNumber" in fields and "CurrencyIsoCode" not in fields and "IsPersonAccount" not in fields
        job = await c.post(f"/services/data/{V}/jobs/query",
                           json={"operation": "query", "query": "SELECT Id, CurrencyIsoCode FROM Order"})
        assert job.status_code == 400 and job.json()[0]["errorCode"] == "INVALID_FIELD"
    c, _ = await _client(sim, "full")
    async with c:
        resp = await c.get(f"/services/data/{V}/query", params={"q": "SELECT Id, CurrencyIsoCode FROM Order"})
        assert resp.status_code == 200
