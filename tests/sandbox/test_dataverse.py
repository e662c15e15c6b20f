"""The Dataverse/Entra simulator over real HTTPS, driven the way a connector drives the real service."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx
import msal
import pytest

from sandbox.dataverse import DataverseState, build_app, ground_truth, seed_org, verify_consistency
from sandbox.dataverse import mutations as mut
from sandbox.server import RunningSandbox, serve

pytestmark = pytest.mark.integration

ORG = "contoso"


@dataclass
class Env:
    state: DataverseState
    running: RunningSandbox
    client: httpx.AsyncClient
    token: str

    @property
    def org(self):
        return self.state.orgs[ORG]

    @property
    def org_url(self) -> str:
        return f"{self.running.base_url}/orgs/{ORG}"

    @property
    def api(self) -> str:
        return f"{self.org_url}/api/data/v9.2/"

    def headers(self, prefer: str | None = None, token: str | None = None) -> dict[str, str]:
        h = {
            "Authorization": f"Bearer {token or self.token}",
            "Accept": "application/json",
            "OData-MaxVersion": "4.0",
            "OData-Version": "4.0",
        }
        if prefer:
            h["Prefer"] = prefer
        return h

    async def get(self, url: str, prefer: str | None = None, **kw: Any) -> httpx.Response:
        if not url.startswith("https://"):
            url = self.api + url
        return await self.client.get(url, headers=self.headers(prefer), **kw)

    async def get_json(self, url: str, prefer: str | None = None) -> dict[str, Any]:
        resp = await self.get(url, prefer)
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = json.loads(resp.text, parse_float=Decimal)
        return body


async def _token(client: httpx.AsyncClient, base: str, state: DataverseState, org: str = ORG) -> str:
    o = state.orgs[org]
    app = state.credentials(org)[0]
    resp = await client.post(
        f"{base}/{o.tenant_id}/oauth2/v2.0/token",
        data={
            "grant_type": "client_credentials",
            "client_id": app.client_id,
            "client_secret": app.client_secret,
            "scope": f"{base}/orgs/{org}/.default",
        },
    )
    assert resp.status_code == 200, resp.text
    return str(resp.json()["access_token"])


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    async with running_env() as e:
        yield e


@asynccontextmanager
async def running_env() -> AsyncIterator[Env]:
    """A seeded simulator over HTTPS with a client and a token (the ``env`` fixture; other modules reuse it)."""
    state = DataverseState()
    state.add_org(ORG)
    seed_org(state, ORG, customers=60, products=20, orders=120, seed=7)
    async with (
        serve(build_app(state)) as running,
        httpx.AsyncClient(verify=running.tls.client_context(), timeout=10) as client,
    ):
        yield Env(state, running, client, await _token(client, running.base_url, state))


# -- Entra ID ---------------------------------------------------------------------------------------------


async def test_msal_client_credentials_end_to_end(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    # requests lets REQUESTS_CA_BUNDLE override a session's verify=; connectors must not rely on that env.
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    app = env.state.credentials(ORG)[0]
    authority = f"{env.running.base_url}/{env.org.tenant_id}"

    def acquire(secret: str, scope: str) -> dict[str, Any]:
        cca = msal.ConfidentialClientApplication(
            app.client_id,
            client_credential=secret,
            authority=authority,
            instance_discovery=False,
            verify=str(env.running.tls.ca_path),
        )
        result: dict[str, Any] = cca.acquire_token_for_client(scopes=[scope])
        return result

    ok = await asyncio.to_thread(acquire, app.client_secret, f"{env.org_url}/.default")
    assert ok["token_type"] == "Bearer"
    assert ok["expires_in"] > 3000, ok
    who = await env.client.get(env.api + "WhoAmI", headers=env.headers(token=ok["access_token"]))
    assert who.status_code == 200
    assert who.json()["OrganizationId"] == env.org.organization_id

    bad = await asyncio.to_thread(acquire, "wrong", f"{env.org_url}/.default")
    assert bad["error"] == "invalid_client"
    assert 7000215 in bad["error_codes"]
    assert bad["error_description"].startswith("AADSTS7000215: Invalid client secret provided.")

    other = await asyncio.to_thread(acquire, app.client_secret, f"{env.running.base_url}/orgs/nope/.default")
    assert 500011 in other["error_codes"]

    disc = await env.client.get(
        f"{env.running.base_url}/{env.org.tenant_id}/v2.0/.well-known/openid-configuration"
    )
    doc = disc.json()
    assert doc["token_endpoint"] == f"{authority}/oauth2/v2.0/token"
    assert doc["issuer"] == f"{authority}/v2.0"
    unknown = await env.client.get(
        f"{env.running.base_url}/00000000-0000-0000-0000-000000000000/v2.0/.well-known/openid-configuration"
    )
    assert unknown.status_code == 400
    assert unknown.json()["error_codes"] == [90002]


async def test_expired_token_gets_401_then_new_token_works(env: Env) -> None:
    assert (await env.get("accounts?$select=name")).status_code == 200
    env.state.expire_tokens()
    resp = await env.get("accounts?$select=name")
    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
    assert resp.json()["error"]["code"] == "0x8004a102"
    env.token = await _token(env.client, env.running.base_url, env.state)
    assert (await env.get("accounts?$select=name")).status_code == 200
    missing = await env.client.get(env.api + "accounts")
    assert missing.status_code == 401


# -- reads, paging -------------------------------------------------------------------------------------


async def test_record_shapes_select_and_errors(env: Env) -> None:
    body = await env.get_json("salesorders?$select=ordernumber,totalamount&$top=3")
    assert body["@odata.context"] == f"{env.api}$metadata#salesorders(ordernumber,totalamount)"
    row = body["value"][0]
    assert set(row) == {
        "@odata.etag",
        "ordernumber",
        "totalamount",
        "salesorderid",
        "_transactioncurrencyid_value",
    }
    assert row["@odata.etag"].startswith('W/"')
    raw = (await env.get("salesorders?$select=totalamount,modifiedon&$top=1")).text
    assert '"totalamount":' in raw
    assert raw.split('"totalamount":')[1].split(",")[0].split(".")[1].__len__() == 4
    assert raw.split('"modifiedon":"')[1][19] == "Z"

    oid = row["salesorderid"]
    one = await env.get_json(f"salesorders({oid})?$select=ordernumber")
    assert one["@odata.context"].endswith("#salesorders(ordernumber)/$entity")
    assert one["salesorderid"] == oid
    full = await env.get_json(f"salesorders({oid})")
    assert full["totalamount_base"] is not None
    assert full["exchangerate"] is not None

    nf = await env.get("salesorders(00000000-0000-0000-0000-000000000001)")
    assert nf.status_code == 404
    assert nf.json()["error"]["code"] == "0x80040217"
    skip = await env.get("salesorders?$skip=10")
    assert skip.status_code == 400
    assert skip.json()["error"]["code"] == "0x0"
    bad = await env.get("salesorders?$select=nosuchcolumn")
    assert bad.status_code == 400
    assert "nosuchcolumn" in bad.json()["error"]["message"]
    seg = await env.get("nosuchthings")
    assert seg.status_code == 404
    org = await env.get_json("organizations?$select=expirechangetrackingindays")
    assert org["value"][0]["expirechangetrackingindays"] == 7


async def test_paging_is_consistent_under_concurrent_mutation(env: Env) -> None:
    so = env.org.tables["salesorders"]
    before = set(so.rows)
    url: str | None = "salesorders?$select=ordernumber,name"
    seen: dict[str, dict[str, Any]] = {}
    pages = 0
    touched: dict[str, str] = {}
    deleted: set[str] = set()
    while url:
        resp = await env.get(url, "odata.maxpagesize=25")
        assert resp.headers["Preference-Applied"] == "odata.maxpagesize=25"
        body = json.loads(resp.text)
        assert len(body["value"]) <= 25
        for r in body["value"]:
            assert r["salesorderid"] not in seen, "row returned twice"
            seen[r["salesorderid"]] = r
        url = body.get("@odata.nextLink")
        pages += 1
        if pages == 2:  # mid-sync: rename rows not yet read, delete one, create more
            unread = [k for k in so.sorted_keys() if k not in seen]
            for k in unread[:3]:
                touched[k] = f"renamed {k[:8]}"
                mut.update(env.org, "salesorders", k, {"name": touched[k]})
            mut.delete(env.org, "salesorders", unread[5])
            deleted.add(unread[5])
            customer = env.org.tables["accounts"].sorted_keys()[0]
            product = next(
                k
                for k, r in env.org.tables["products"].rows.items()
                if r[env.org.tables["products"].pos["productstructure"]] == 1
            )
            for _ in range(3):
                mut.create_order(env.org, customer, [(product, 2)])
    assert pages >= 5
    assert before - deleted <= set(seen), "a row that existed throughout was skipped"
    assert not deleted & set(seen)
    for k, name in touched.items():
        assert seen[k]["name"] == name


async def test_filter_orderby_count_and_top(env: Env) -> None:
    org = env.org
    so = org.tables["salesorders"]
    times = sorted(r[so.pos["modifiedon"]] for r in so.rows.values())
    cut = times[len(times) // 2]
    from sandbox.dataverse.store import iso

    q = (
        f"salesorders?$select=modifiedon,salesorderid&$filter=modifiedon gt {iso(cut)} and statecode ne 2"
        "&$orderby=modifiedon,salesorderid&$count=true"
    )
    url: str | None = q
    got: list[dict[str, Any]] = []
    while url:
        body = await env.get_json(url, "odata.maxpagesize=7")
        got.extend(body["value"])
        url = body.get("@odata.nextLink")
    expect = sorted(
        (
            (r[so.pos["modifiedon"]], r[0])
            for r in so.rows.values()
            if r[so.pos["modifiedon"]] > cut and r[so.pos["statecode"]] != 2
        ),
    )
    assert [g["salesorderid"] for g in got] == [k for _, k in expect]
    first = await env.get_json(q)
    assert first["@odata.count"] == len(expect)
    top = await env.get_json("accounts?$select=name&$top=4")
    assert len(top["value"]) == 4
    assert "@odata.nextLink" not in top
    eq = await env.get_json("salesorders?$select=statuscode&$filter=statuscode eq 100000001")
    assert eq["value"]
    assert all(v["statuscode"] == 100000001 for v in eq["value"])


async def test_annotations_only_when_requested(env: Env) -> None:
    plain = await env.get_json("salesorders?$select=statuscode,_customerid_value,totalamount&$top=5")
    assert not any("@" in k for v in plain["value"] for k in v if k != "@odata.etag")
    resp = await env.get(
        "salesorders?$select=statuscode,_customerid_value,totalamount&$filter=statuscode eq 100000001",
        'odata.include-annotations="*"',
    )
    assert resp.headers["Preference-Applied"] == 'odata.include-annotations="*"'
    row = resp.json()["value"][0]
    assert row["statuscode@OData.Community.Display.V1.FormattedValue"] == "Delivered"
    logical = row["_customerid_value@Microsoft.Dynamics.CRM.lookuplogicalname"]
    assert logical in {"account", "contact"}
    assert (
        row["_customerid_value@Microsoft.Dynamics.CRM.associatednavigationproperty"]
        == f"customerid_{logical}"
    )
    assert row["totalamount@OData.Community.Display.V1.FormattedValue"][0] in "$€£"
    only = await env.get_json(
        "salesorders?$select=statuscode,_customerid_value&$top=1",
        'odata.include-annotations="Microsoft.Dynamics.CRM.lookuplogicalname"',
    )
    keys = set(only["value"][0])
    assert "_customerid_value@Microsoft.Dynamics.CRM.lookuplogicalname" in keys
    assert not any("FormattedValue" in k for k in keys)


# -- change tracking ----------------------------------------------------------------------------------------


async def _initial_sync(env: Env, entity: str, page: int) -> tuple[dict[str, Any], str, int]:
    url: str | None = f"{entity}?$select=name"
    rows: dict[str, Any] = {}
    pages = 0
    delta = ""
    while url:
        resp = await env.get(url, f"odata.track-changes,odata.maxpagesize={page}")
        assert resp.status_code == 200, resp.text
        assert resp.headers["Preference-Applied"].startswith("odata.track-changes")
        body = resp.json()
        pages += 1
        for r in body["value"]:
            rows[r[entity[:-1] + "id"]] = r
        url = body.get("@odata.nextLink")
        if url:
            assert "@odata.deltaLink" not in body
        else:
            delta = body["@odata.deltaLink"]
    return rows, delta, pages


def test_sorted_keys_is_a_snapshot_that_later_writes_leave_alone() -> None:
    # It used to hand out the live index: a key created later (random, so ~3% of the time sorting first)
    # shifted a caller's keys[0] under it, which made the change-tracking test below fail now and then.
    state = DataverseState()
    state.add_org("snap")
    seed_org(state, "snap", customers=10, products=2, orders=2, seed=3)
    org = state.orgs["snap"]
    snapshot = org.tables["accounts"].sorted_keys()
    before = list(snapshot)
    created = [mut.create(org, "accounts", {"name": f"New {i}"})[0] for i in range(20)]
    org.tables["accounts"].delete(before[0])
    assert snapshot == before
    assert org.tables["accounts"].sorted_keys() == sorted(set(before[1:]) | set(created))


async def test_change_tracking_initial_delta_deletes_and_expiry(env: Env) -> None:
    org = env.org
    rows, delta, pages = await _initial_sync(env, "accounts", 10)
    assert pages > 1
    assert set(rows) == set(org.tables["accounts"].rows)
    assert "$deltatoken=" in delta
    assert "%21" in delta

    empty = await env.get_json(delta, "odata.track-changes")
    assert empty["value"] == []
    assert empty["@odata.context"].endswith("#accounts(name)/$delta")
    assert "@odata.deltaLink" in empty

    keys = org.tables["accounts"].sorted_keys()
    mut.update(org, "accounts", keys[0], {"name": "Renamed Ltd"})
    mut.update(org, "accounts", keys[0], {"name": "Renamed Twice Ltd"})
    gone = keys[1]
    for c in list(org.tables["contacts"].rows):
        if org.tables["contacts"].rows[c][org.tables["contacts"].pos["_parentcustomerid_value"]] == gone:
            pass
    org.tables["accounts"].delete(gone)
    new = mut.create(org, "accounts", {"name": "Brand New", "accountnumber": "NEW-1"})
    flash = mut.create(org, "accounts", {"name": "Short Lived"})
    org.tables["accounts"].delete(flash[0])

    body = await env.get_json(delta, "odata.track-changes")
    assert body["@odata.context"] == f"{env.api}$metadata#accounts(name)/$delta"
    vals = body["value"]
    upserts = [v for v in vals if "reason" not in v]
    deletes = [v for v in vals if "reason" in v]
    assert vals == upserts + deletes, "new/updated rows come before deletions"
    assert {v["accountid"]: v["name"] for v in upserts} == {keys[0]: "Renamed Twice Ltd", new[0]: "Brand New"}
    assert deletes == [
        {"@odata.context": f"{env.api}$metadata#accounts/$deletedEntity", "id": gone, "reason": "deleted"},
        {
            "@odata.context": f"{env.api}$metadata#accounts/$deletedEntity",
            "id": flash[0],
            "reason": "deleted",
        },
    ]
    next_delta = body["@odata.deltaLink"]
    assert next_delta != delta
    assert (await env.get_json(next_delta, "odata.track-changes"))["value"] == []

    # many changes: the delta is paged by maxpagesize with the deltaLink on the last page only
    for k in keys[2:25]:
        mut.update(org, "accounts", k, {"telephone1": "+1-555-0000"})
    url: str | None = next_delta
    seen: list[str] = []
    last: dict[str, Any] = {}
    while url:
        last = await env.get_json(url, "odata.track-changes,odata.maxpagesize=10")
        seen += [v["accountid"] for v in last["value"]]
        url = last.get("@odata.nextLink")
    assert sorted(seen) == sorted(keys[2:25])
    assert "@odata.deltaLink" in last

    # a token older than organization.expirechangetrackingindays
    env.state.advance_clock(8 * 86400)
    expired = await env.get(delta, "odata.track-changes")
    assert expired.status_code == 400
    assert expired.json() == {
        "error": {
            "code": "0x80044352",
            "message": "Version stamp associated with the client has expired. Please perform a full sync.",
        }
    }


async def test_change_tracking_rejects_filter(env: Env) -> None:
    for q in ("$filter=statecode eq 0", "$orderby=name", "$top=5"):
        resp = await env.get(f"accounts?$select=name&{q}", "odata.track-changes")
        opt = q.split("=")[0]
        assert resp.status_code == 400
        assert resp.json()["error"]["message"] == (
            f'The "{opt}" query parameter isn\'t supported when Change Tracking is enabled.'
        )


async def test_midsync_changes_show_up_in_next_delta(env: Env) -> None:
    org = env.org
    acc = org.tables["accounts"]
    first = await env.get_json("accounts?$select=name", "odata.track-changes,odata.maxpagesize=5")
    read = {r["accountid"] for r in first["value"]}
    early = next(k for k in acc.sorted_keys() if k in read)
    mut.update(org, "accounts", early, {"name": "Changed After Read"})
    url = first["@odata.nextLink"]
    body: dict[str, Any] = {}
    while url:
        body = await env.get_json(url, "odata.track-changes,odata.maxpagesize=5")
        url = body.get("@odata.nextLink")
    delta = await env.get_json(body["@odata.deltaLink"], "odata.track-changes")
    assert [v["name"] for v in delta["value"] if v["accountid"] == early] == ["Changed After Read"]


# -- service protection and faults ---------------------------------------------------------------------------


async def test_service_protection_429_with_retry_after(env: Env) -> None:
    env.state.limits.requests_per_window = 3
    env.state.limits.window_seconds = 1.0
    statuses = []
    for _ in range(4):
        resp = await env.get("accounts?$select=name&$top=1")
        statuses.append(resp.status_code)
        assert "x-ms-ratelimit-burst-remaining-xrm-requests" in resp.headers
        assert "x-ms-ratelimit-time-remaining-xrm-requests" in resp.headers
    assert statuses == [200, 200, 200, 429]
    assert int(resp.headers["Retry-After"]) >= 1
    assert resp.json()["error"]["code"] == "0x80072322"
    await asyncio.sleep(1.05)
    assert (await env.get("accounts?$select=name&$top=1")).status_code == 200


async def test_concurrency_limit(env: Env) -> None:
    env.state.limits.concurrent = 2
    env.state.faults.delay_next(3, 0.3, match="accounts")
    results = await asyncio.gather(*(env.get("accounts?$select=name&$top=1") for _ in range(3)))
    codes = sorted(r.status_code for r in results)
    assert codes == [200, 200, 429]
    throttled = next(r for r in results if r.status_code == 429)
    assert throttled.json()["error"]["code"] == "0x80072326"


async def test_injected_faults_and_control_api(env: Env) -> None:
    base = env.running.base_url
    r = await env.client.post(
        f"{base}/_sandbox/faults", json={"status": 503, "count": 2, "match": "salesorders", "retry_after": 3}
    )
    assert r.status_code == 200
    assert len(r.json()["faults"]) == 1
    assert (await env.get("accounts?$top=1")).status_code == 200  # does not match
    first = await env.get("salesorders?$top=1")
    assert first.status_code == 503
    assert first.headers["Retry-After"] == "3"
    assert (await env.get("salesorders?$top=1")).status_code == 503
    assert (await env.get("salesorders?$top=1")).status_code == 200

    env.state.faults.fail_next(1, 429, retry_after=5)
    throttled = await env.get("accounts?$top=1")
    assert throttled.status_code == 429
    assert throttled.headers["Retry-After"] == "5"
    env.state.faults.fail_next(1, 401)
    assert (await env.get("accounts?$top=1")).status_code == 401
    env.state.faults.fail_next(1, 500)
    assert (await env.get("accounts?$top=1")).json()["error"]["code"] == "0x80040216"

    env.state.faults.storm(1.0, 502)
    assert {(await env.get("accounts?$top=1")).status_code for _ in range(3)} == {502}
    await env.client.delete(f"{base}/_sandbox/faults")
    assert (await env.get("accounts?$top=1")).status_code == 200

    stats = (await env.client.get(f"{base}/_sandbox/stats")).json()
    assert stats["status.503"] == 2
    assert stats["status.502"] == 3
    assert stats["status.429"] == 1

    orgs = (await env.client.get(f"{base}/_sandbox/orgs")).json()["orgs"]
    assert orgs[0]["scope"] == f"{env.org_url}/.default"
    assert orgs[0]["credentials"][0]["client_secret"]
    so = env.org.tables["salesorders"]
    active = next(k for k, v in so.rows.items() if v[so.pos["statecode"]] == 0)
    resp = await env.client.post(
        f"{base}/_sandbox/orgs/{ORG}/mutate", json={"op": "cancel_order", "id": active}
    )
    assert resp.json()["result"]["statecode"] == 2
    assert resp.json()["result"]["statuscode"] == 4
    resp = await env.client.post(f"{base}/_sandbox/orgs/{ORG}/mutate", json={"op": "random", "count": 20})
    assert len(resp.json()["result"]) == 20
    await env.client.post(f"{base}/_sandbox/tokens/expire")
    assert (await env.get("accounts?$top=1")).status_code == 401


async def test_privilege_denied(env: Env) -> None:
    st = env.state
    org = st.add_org("limited", readable={"account", "contact"})
    base = env.running.base_url
    token = await _token(env.client, base, st, "limited")
    ok = await env.client.get(f"{base}/orgs/limited/api/data/v9.2/accounts", headers=env.headers(token=token))
    assert ok.status_code == 200
    denied = await env.client.get(
        f"{base}/orgs/limited/api/data/v9.2/salesorders", headers=env.headers(token=token)
    )
    assert denied.status_code == 403
    assert denied.json()["error"]["code"] == "0x80040220"
    assert "prvReadSalesOrder" in denied.json()["error"]["message"]
    wrong_org = await env.client.get(env.api + "accounts", headers=env.headers(token=token))
    assert wrong_org.status_code == 401
    assert org.tenant_id != env.org.tenant_id


# -- seed data and writes -----------------------------------------------------------------------------------


async def test_seed_is_consistent_and_deterministic(env: Env) -> None:
    assert verify_consistency(env.org) == []
    other = DataverseState()
    seed_org(other, ORG, customers=60, products=20, orders=120, seed=7)
    a = [(o.salesorderid, o.totalamount, o.statuscode) for o in ground_truth(env.org)]
    b = [(o.salesorderid, o.totalamount, o.statuscode) for o in ground_truth(other.orgs[ORG])]
    assert a == b
    statuses = {o.statuscode for o in ground_truth(env.org)}
    assert {100001, 100003, 4} <= statuses
    assert any(o.returns for o in ground_truth(env.org))
    assert {o.currency for o in ground_truth(env.org)} == {"USD", "EUR", "GBP"}

    # over HTTP: lines sum to totallineitemamount, totals add up, _base = amount / exchangerate
    orders = (
        await env.get_json(
            "salesorders?$select=totallineitemamount,discountamount,freightamount,totaltax,totalamount,"
            "totalamount_base,exchangerate"
        )
    )["value"]
    lines: dict[str, Decimal] = {}
    url: str | None = "salesorderdetails?$select=_salesorderid_value,extendedamount"
    while url:
        body = await env.get_json(url, "odata.maxpagesize=100")
        for ln in body["value"]:
            lines[ln["_salesorderid_value"]] = (
                lines.get(ln["_salesorderid_value"], Decimal(0)) + ln["extendedamount"]
            )
        url = body.get("@odata.nextLink")
    for o in orders:
        assert lines[o["salesorderid"]] == o["totallineitemamount"]
        assert (
            o["totallineitemamount"] - o["discountamount"] + o["freightamount"] + o["totaltax"]
            == o["totalamount"]
        )
        assert abs(o["totalamount"] / o["exchangerate"] - o["totalamount_base"]) < Decimal("0.0001")

    rmas = (await env.get_json("msdyn_rmas?$select=msdyn_name,msdyn_referenceno"))["value"]
    numbers = {o.ordernumber: o for o in ground_truth(env.org)}
    assert rmas
    assert all(numbers[r["msdyn_referenceno"]].statecode in (3, 4) for r in rmas)


async def test_amend_recomputes_and_http_writes(env: Env) -> None:
    org = env.org
    so = org.tables["salesorders"]
    oid = next(k for k, v in so.rows.items() if v[so.pos["statecode"]] == 0)
    before = so.rows[oid][so.pos["totalamount"]]
    mut.amend_order(org, oid, quantity=7)
    assert so.rows[oid][so.pos["totalamount"]] != before
    assert verify_consistency(org) == []

    acc = org.tables["accounts"].sorted_keys()[0]
    resp = await env.client.post(
        env.api + "contacts",
        headers={**env.headers("return=representation"), "Content-Type": "application/json"},
        json={
            "firstname": "New",
            "lastname": "Person",
            "emailaddress1": "new.person@example.com",
            "parentcustomerid_account@odata.bind": f"/accounts({acc})",
        },
    )
    assert resp.status_code == 201, resp.text
    created = resp.json()
    assert created["_parentcustomerid_value"] == acc
    assert resp.headers["OData-EntityId"].endswith(f"contacts({created['contactid']})")
    patch = await env.client.patch(
        env.api + f"contacts({created['contactid']})",
        headers=env.headers(),
        json={"emailaddress1": "x@example.com"},
    )
    assert patch.status_code == 204
    delete = await env.client.delete(env.api + f"contacts({created['contactid']})", headers=env.headers())
    assert delete.status_code == 204
