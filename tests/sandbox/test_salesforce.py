"""The Salesforce simulator over real HTTPS: OAuth, REST query/composite, limits, Bulk 2.0, CometD CDC."""

from __future__ import annotations

import base64
import csv
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx
import pytest
import pytest_asyncio

from sandbox.salesforce import SalesforceState, build_app, ground_truth, seed_org
from sandbox.server import RunningSandbox, serve

pytestmark = pytest.mark.integration

V = "v66.0"


@dataclass
class Env:
    state: SalesforceState
    sb: RunningSandbox
    http: httpx.AsyncClient

    async def token(self, org: str) -> dict[str, Any]:
        o = self.state.orgs[org]
        resp = await self.http.post(
            f"{self.sb.base_url}/services/oauth2/token",
            data={
                "grant_type": "client_credentials",
                "client_id": o.client_id,
                "client_secret": o.client_secret,
            },
        )
        assert resp.status_code == 200, resp.text
        return dict(resp.json())

    async def client(self, org: str) -> httpx.AsyncClient:
        tok = await self.token(org)
        return httpx.AsyncClient(
            base_url=tok["instance_url"],
            verify=self.sb.tls.client_context(),
            headers={"Authorization": f"Bearer {tok['access_token']}"},
            timeout=10,
        )


@pytest_asyncio.fixture(scope="module")
async def env() -> AsyncIterator[Env]:
    state = SalesforceState(cometd_timeout_s=2.0)
    seed_org(state, "acme", orders=600, seed=11)
    seed_org(state, "omco", orders=150, seed=12, mode="order_management")
    state.add_org("tiny")
    seed_org(state, "tiny", orders=20, seed=13)
    async with serve(build_app(state)) as sb:
        async with httpx.AsyncClient(verify=sb.tls.client_context(), timeout=10) as http:
            yield Env(state, sb, http)


@pytest_asyncio.fixture
async def acme(env: Env) -> AsyncIterator[httpx.AsyncClient]:
    async with await env.client("acme") as c:
        yield c


async def _query_all_pages(c: httpx.AsyncClient, soql: str, kind: str = "query", batch: int | None = None):
    headers = {"Sforce-Query-Options": f"batchSize={batch}"} if batch else {}
    resp = await c.get(f"/services/data/{V}/{kind}", params={"q": soql}, headers=headers)
    assert resp.status_code == 200, resp.text
    pages = [resp.json()]
    while not pages[-1]["done"]:
        resp = await c.get(pages[-1]["nextRecordsUrl"], headers=headers)  # joined to instance_url
        assert resp.status_code == 200, resp.text
        pages.append(resp.json())
    return pages


# ---------------------------------------------------------------------------------------------- OAuth
async def test_token_on_my_domain_has_exactly_the_reference_fields(env: Env) -> None:
    tok = await env.token("acme")
    assert set(tok) == {
        "access_token",
        "signature",
        "scope",
        "instance_url",
        "id",
        "token_type",
        "issued_at",
        "token_format",
    }
    org = env.state.orgs["acme"]
    assert tok["instance_url"] == f"{env.sb.base_url}/orgs/acme"
    assert tok["id"].endswith(f"/id/{org.org_id}/{org.user_id}")
    assert tok["issued_at"].isdigit()
    assert tok["token_type"] == "Bearer"
    basic = base64.b64encode(f"{org.client_id}:{org.client_secret}".encode()).decode()
    resp = await env.http.post(
        f"{env.sb.base_url}/services/oauth2/token",
        data={"grant_type": "client_credentials"},
        headers={"Authorization": f"Basic {basic}"},
    )
    assert resp.status_code == 200
    assert resp.json()["instance_url"].endswith("/orgs/acme")


async def test_token_errors_and_login_domain(env: Env) -> None:
    org = env.state.orgs["acme"]
    form = {
        "grant_type": "client_credentials",
        "client_id": org.client_id,
        "client_secret": org.client_secret,
    }
    resp = await env.http.post(f"{env.sb.url_for_host('localhost')}/services/oauth2/token", data=form)
    assert resp.status_code == 400
    assert resp.json() == {
        "error": "invalid_grant",
        "error_description": "request not supported on this domain",
    }
    resp = await env.http.post(f"{env.sb.base_url}/services/oauth2/token", data={**form, "client_secret": "x"})
    assert resp.status_code == 400
    assert resp.json()["error"] == "invalid_client"
    resp = await env.http.post(f"{env.sb.base_url}/services/oauth2/token", data={**form, "grant_type": "password"})
    assert resp.status_code == 400
    assert resp.json()["error"] == "unsupported_grant_type"


# ---------------------------------------------------------------------------------------------- REST
async def test_query_paging_batch_size_and_limit_header(env: Env, acme: httpx.AsyncClient) -> None:
    soql = "SELECT Id, OrderNumber, Status, Account.Name, SystemModstamp FROM Order ORDER BY SystemModstamp, Id"
    pages = await _query_all_pages(acme, soql, batch=200)
    live = [o for o in env.state.orgs["acme"].tables["Order"].values() if not o["IsDeleted"]]
    assert pages[0]["totalSize"] == len(live)
    assert len(pages) == -(-len(live) // 200)
    assert pages[0]["nextRecordsUrl"].startswith(f"/services/data/{V}/query/01g")
    assert pages[0]["nextRecordsUrl"].endswith("-200")
    records = [r for p in pages for r in p["records"]]
    assert len({r["Id"] for r in records}) == len(live)
    assert records[0]["attributes"] == {
        "type": "Order",
        "url": f"/services/data/{V}/sobjects/Order/{records[0]['Id']}",
    }
    assert records[0]["Account"]["attributes"]["type"] == "Account"
    assert "Name" in records[0]["Account"]
    keys = [(r["SystemModstamp"], r["Id"]) for r in records]
    assert keys == sorted(keys)
    assert keys[0][0].endswith("+0000")
    # several rows share a SystemModstamp: a (SystemModstamp, Id) cursor is required
    stamps = [k[0] for k in keys]
    assert len(stamps) - len(set(stamps)) >= 5
    resp = await acme.get(f"/services/data/{V}/limits")
    assert resp.headers["Sforce-Limit-Info"].startswith("api-usage=")
    assert set(resp.json()) >= {"DailyApiRequests", "DailyBulkV2QueryJobs", "DailyBulkV2QueryFileStorageMB"}


async def test_compound_cursor_resumes_exactly_after_a_colliding_row(acme: httpx.AsyncClient) -> None:
    soql = "SELECT Id, SystemModstamp FROM Order ORDER BY SystemModstamp, Id"
    records = [r for p in await _query_all_pages(acme, soql) for r in p["records"]]
    i = next(i for i in range(1, len(records) - 1) if records[i]["SystemModstamp"] == records[i + 1]["SystemModstamp"])
    stamp = records[i]["SystemModstamp"].replace("+0000", "Z")
    resume = (
        f"SELECT Id, SystemModstamp FROM Order WHERE SystemModstamp > {stamp} OR "
        f"(SystemModstamp = {stamp} AND Id > '{records[i]['Id']}') ORDER BY SystemModstamp, Id"
    )
    rest = [r for p in await _query_all_pages(acme, resume) for r in p["records"]]
    assert [r["Id"] for r in rest] == [r["Id"] for r in records[i + 1 :]]


async def test_soql_errors(acme: httpx.AsyncClient) -> None:
    cases = {
        "SELECT Id, Bogus FROM Order": "INVALID_FIELD",
        "SELECT Id FROM Nope": "INVALID_TYPE",
        "SELECT Id FROM Order WHERE": "MALFORMED_QUERY",
        "SELECT Id FROM Order WHERE Status = 'A' AND Status = 'B' OR Status = 'C'": "MALFORMED_QUERY",
        "SELECT Id FROM Order WHERE SystemModstamp > '2024-01-01T00:00:00Z'": "MALFORMED_QUERY",
    }
    for soql, code in cases.items():
        resp = await acme.get(f"/services/data/{V}/query", params={"q": soql})
        assert resp.status_code == 400, soql
        assert resp.json()[0]["errorCode"] == code, soql


async def test_query_all_returns_deleted_rows_and_sobject_reads(env: Env) -> None:
    async with await env.client("tiny") as c:
        order = next(o for o in env.state.orgs["tiny"].records("Order"))
        assert (await c.get(f"/services/data/{V}/sobjects/Order/{order['Id']}")).json()["Id"] == order["Id"]
        assert (await c.delete(f"/services/data/{V}/sobjects/Order/{order['Id']}")).status_code == 204
        soql = f"SELECT Id, IsDeleted FROM Order WHERE Id = '{order['Id']}'"
        assert (await c.get(f"/services/data/{V}/query", params={"q": soql})).json()["totalSize"] == 0
        body = (await c.get(f"/services/data/{V}/queryAll", params={"q": soql})).json()
        assert body["records"][0]["IsDeleted"] is True
        items = (
            await c.get(
                f"/services/data/{V}/queryAll",
                params={"q": f"SELECT Id, IsDeleted FROM OrderItem WHERE OrderId = '{order['Id']}'"},
            )
        ).json()["records"]
        assert items
        assert all(i["IsDeleted"] for i in items)
        resp = await c.get(f"/services/data/{V}/sobjects/Order/{order['Id']}")
        assert resp.status_code == 404
        assert resp.json()[0]["errorCode"] == "NOT_FOUND"


async def test_composite_reads(env: Env, acme: httpx.AsyncClient) -> None:
    ids = [o["Id"] for o in list(env.state.orgs["acme"].records("Order"))[:3]]
    unknown = "801" + ids[0][3:14] + "ZZZZ"
    resp = await acme.get(
        f"/services/data/{V}/composite/sobjects/Order",
        params={"ids": ",".join([*ids, unknown]), "fields": "Id,TotalAmount,CurrencyIsoCode"},
    )
    body = resp.json()
    assert [r["Id"] for r in body[:3]] == ids
    assert body[3] is None
    resp = await acme.post(
        f"/services/data/{V}/composite/sobjects/Order",
        json={"ids": [*ids, unknown], "fields": ["Id", "Status", "Account.Name"]},
    )
    body = resp.json()
    assert len(body) == 4
    assert body[3] is None
    assert "Account" in body[0]
    resp = await acme.post(f"/services/data/{V}/composite/sobjects/Order", json={"ids": ids, "fields": ["Nope"]})
    assert resp.status_code == 400
    assert resp.json()[0]["errorCode"] == "INVALID_FIELD"


async def test_request_limit_exceeded_and_injected_faults(env: Env) -> None:
    async with await env.client("tiny") as c:
        env.state.set_api_limit("tiny", maximum=50, used=49)
        resp = await c.get(f"/services/data/{V}/limits")
        assert resp.headers["Sforce-Limit-Info"] == "api-usage=50/50"
        assert resp.json()["DailyApiRequests"] == {"Max": 50, "Remaining": 0}
        resp = await c.get(f"/services/data/{V}/limits")
        assert resp.status_code == 403
        assert resp.json()[0]["errorCode"] == "REQUEST_LIMIT_EXCEEDED"
        env.state.set_api_limit("tiny", maximum=100_000, used=0)
        r = await env.http.post(
            f"{env.sb.base_url}/_sandbox/faults",
            json={"kind": "query_timeout", "count": 1, "path": "/query", "org": "tiny"},
        )
        assert r.status_code == 201
        assert (await c.get(f"/services/data/{V}/limits")).status_code == 200  # path does not match
        resp = await c.get(f"/services/data/{V}/query", params={"q": "SELECT Id FROM Account"})
        assert resp.status_code == 400
        assert resp.json() == [
            {"message": "Your query request was running for too long.", "errorCode": "QUERY_TIMEOUT"}
        ]
        assert (await c.get(f"/services/data/{V}/query", params={"q": "SELECT Id FROM Account"})).status_code == 200
        env.state.inject_fault("server_error", 1, org="tiny")
        resp = await c.get(f"/services/data/{V}/limits")
        assert resp.status_code == 500
        assert resp.json()[0]["errorCode"] == "UNKNOWN_EXCEPTION"


# ---------------------------------------------------------------------------------------------- Bulk 2.0
async def _poll(c: httpx.AsyncClient, job_id: str, until: str, tries: int = 5) -> dict[str, Any]:
    for _ in range(tries):
        info = (await c.get(f"/services/data/{V}/jobs/query/{job_id}")).json()
        if info["state"] == until:
            return dict(info)
    return dict(info)


async def test_bulk_query_lifecycle_locators_and_version_rule(env: Env, acme: httpx.AsyncClient) -> None:
    soql = "SELECT Id, OrderNumber, Account.Name, TotalAmount, SystemModstamp FROM Order ORDER BY SystemModstamp, Id"
    job = (
        await acme.post(
            f"/services/data/{V}/jobs/query",
            json={
                "operation": "queryAll",
                "query": soql,
                "contentType": "CSV",
                "columnDelimiter": "COMMA",
                "lineEnding": "LF",
            },
        )
    ).json()
    assert job["state"] == "UploadComplete"
    assert job["id"].startswith("750")
    assert job["object"] == "Order"
    early = await acme.get(f"/services/data/{V}/jobs/query/{job['id']}/results")
    assert early.status_code == 400
    assert early.json()[0]["errorCode"] == "JOB_NOT_COMPLETE"
    assert (await _poll(acme, job["id"], "JobComplete"))["state"] == "JobComplete"
    wrong = await acme.get(f"/services/data/v65.0/jobs/query/{job['id']}/results")
    assert wrong.status_code == 409
    rows: list[list[str]] = []
    locator: str | None = None
    chunks = 0
    while True:
        params: dict[str, Any] = {"maxRecords": 250}
        if locator:
            params["locator"] = locator
        resp = await acme.get(f"/services/data/{V}/jobs/query/{job['id']}/results", params=params)
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/csv")
        parsed = list(csv.reader(io.StringIO(resp.text)))
        assert parsed[0] == ["Id", "OrderNumber", "Account.Name", "TotalAmount", "SystemModstamp"]
        assert int(resp.headers["Sforce-NumberOfRecords"]) == len(parsed) - 1
        rows.extend(parsed[1:])
        chunks += 1
        locator = resp.headers["Sforce-Locator"]
        if locator == "null":
            break
    assert len(rows) == len(env.state.orgs["acme"].tables["Order"])
    assert chunks > 1
    assert '"' in resp.text
    assert "\r" not in resp.text
    assert rows[0][4].endswith("Z")
    assert (await acme.delete(f"/services/data/{V}/jobs/query/{job['id']}")).status_code == 204


async def test_bulk_stuck_job_and_abort(env: Env, acme: httpx.AsyncClient) -> None:
    env.state.stick_bulk_jobs("acme", 1)
    job = (
        await acme.post(
            f"/services/data/{V}/jobs/query", json={"operation": "query", "query": "SELECT Id FROM Account"}
        )
    ).json()
    assert (await _poll(acme, job["id"], "JobComplete", tries=6))["state"] == "InProgress"
    aborted = (await acme.patch(f"/services/data/{V}/jobs/query/{job['id']}", json={"state": "Aborted"})).json()
    assert aborted["state"] == "Aborted"
    bad = await acme.post(
        f"/services/data/{V}/jobs/query", json={"operation": "query", "query": "SELECT Nope FROM Account"}
    )
    assert bad.status_code == 400
    assert bad.json()[0]["errorCode"] == "INVALID_FIELD"


# ---------------------------------------------------------------------------------------------- CometD
class Bayeux:
    def __init__(self, env: Env, tok: dict[str, Any]) -> None:
        self.url = f"{tok['instance_url']}/cometd/66.0"
        self.headers = {"Authorization": f"Bearer {tok['access_token']}"}
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=env.sb.tls.client_context()))
        self.client_id: str | None = None
        self.n = 0

    async def send(self, *messages: dict[str, Any]) -> list[dict[str, Any]]:
        out = []
        for m in messages:
            self.n += 1
            out.append({"id": str(self.n), **({"clientId": self.client_id} if self.client_id else {}), **m})
        async with self.session.post(self.url, json=out, headers=self.headers) as resp:
            return list(await resp.json())

    async def handshake(self) -> dict[str, Any]:
        reply = (
            await self.send(
                {"channel": "/meta/handshake", "version": "1.0", "supportedConnectionTypes": ["long-polling"]}
            )
        )[0]
        self.client_id = reply.get("clientId")
        return reply

    async def subscribe(self, channel: str, replay: int) -> dict[str, Any]:
        return (
            await self.send(
                {"channel": "/meta/subscribe", "subscription": channel, "ext": {"replay": {channel: replay}}}
            )
        )[0]

    async def connect(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        replies = await self.send({"channel": "/meta/connect", "connectionType": "long-polling"})
        meta = next(r for r in replies if r["channel"] == "/meta/connect")
        return [r for r in replies if r["channel"] != "/meta/connect"], meta

    async def events(self, n: int, tries: int = 6) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        for _ in range(tries):
            events, meta = await self.connect()
            assert meta["successful"], meta
            got.extend(events)
            if len(got) >= n:
                break
        return got

    async def close(self) -> None:
        await self.session.close()


async def test_cometd_create_and_update_events_and_replay(env: Env, acme: httpx.AsyncClient) -> None:
    bx = Bayeux(env, await env.token("acme"))
    try:
        hs = await bx.handshake()
        assert hs["successful"]
        assert hs["supportedConnectionTypes"] == ["long-polling"]
        assert "advice" in hs
        assert (await bx.subscribe("/data/ChangeEvents", -1))["successful"]
        await bx.connect()  # the first connect answers at once
        account = next(a for a in env.state.orgs["acme"].records("Account") if not a["IsPersonAccount"])
        created = (
            await acme.post(
                f"/services/data/{V}/sobjects/Contact",
                json={
                    "FirstName": "Ada",
                    "LastName": "Lovelace",
                    "Email": "ada@example.com",
                    "AccountId": account["Id"],
                },
            )
        ).json()
        order = next(o for o in env.state.orgs["acme"].records("Order") if o["Status"] == "Activated")
        patched = await acme.patch(f"/services/data/{V}/sobjects/Order/{order['Id']}", json={"Status": "Fulfilled"})
        assert patched.status_code == 204
        events = await bx.events(2)
        create, update = events[0]["data"], events[1]["data"]
        assert events[0]["channel"] == "/data/ChangeEvents"
        assert "schema" in create
        h = create["payload"]["ChangeEventHeader"]
        assert h["changeType"] == "CREATE"
        assert h["entityName"] == "Contact"
        assert h["recordIds"] == [created["id"]]
        assert create["payload"]["Email"] == "ada@example.com"
        assert "SystemModstamp" not in create["payload"]
        assert {
            "transactionKey",
            "sequenceNumber",
            "commitTimestamp",
            "commitNumber",
            "commitUser",
            "changeOrigin",
        } <= set(h)
        u = update["payload"]
        assert u["ChangeEventHeader"]["changeType"] == "UPDATE"
        assert u["ChangeEventHeader"]["recordIds"] == [order["Id"]]
        assert set(u) == {"ChangeEventHeader", "LastModifiedDate", "Status"}  # StatusCode stays Activated
        assert u["ChangeEventHeader"]["changedFields"] == ["LastModifiedDate", "Status"]
        assert u["Status"] == "Fulfilled"
        assert u["LastModifiedDate"].endswith("Z")
        assert update["event"]["replayId"] > create["event"]["replayId"]
        # a fresh client replaying from the first event's id gets only what came after it
        bx2 = Bayeux(env, await env.token("acme"))
        try:
            await bx2.handshake()
            assert (await bx2.subscribe("/data/OrderChangeEvent", create["event"]["replayId"]))["successful"]
            replayed = await bx2.events(1)
            assert [e["data"]["event"]["replayId"] for e in replayed] == [update["event"]["replayId"]]
            assert replayed[0]["channel"] == "/data/OrderChangeEvent"
        finally:
            await bx2.close()
    finally:
        await bx.close()


async def test_cometd_gap_overflow_and_dropped_stream(env: Env) -> None:
    bx = Bayeux(env, await env.token("omco"))
    try:
        await bx.handshake()
        assert (await bx.subscribe("/data/OrderChangeEvent", -1))["successful"]
        await bx.connect()
        oid = next(iter(env.state.orgs["omco"].tables["Order"]))
        r = await env.http.post(
            f"{env.sb.base_url}/_sandbox/orgs/omco/cdc/gap", json={"entity": "Order", "recordIds": [oid]}
        )
        assert r.status_code == 200
        await env.http.post(f"{env.sb.base_url}/_sandbox/orgs/omco/cdc/overflow", json={"entity": "Order"})
        events = await bx.events(2)
        gap, overflow = (e["data"]["payload"] for e in events[:2])
        assert set(gap) == {"ChangeEventHeader"}
        assert gap["ChangeEventHeader"]["changeType"] == "GAP_UPDATE"
        assert gap["ChangeEventHeader"]["recordIds"] == [oid]
        assert overflow["ChangeEventHeader"]["changeType"] == "GAP_OVERFLOW"
        assert overflow["ChangeEventHeader"]["recordIds"] == ["000000000000000AAA"]
        assert env.state.drop_streams("omco") == 1
        _, meta = await bx.connect()
        assert meta["successful"] is False
        assert meta["error"] == "403::Unknown client"
        assert meta["advice"]["reconnect"] == "handshake"
    finally:
        await bx.close()


async def test_om_submit_cancel_emits_change_records(env: Env) -> None:
    org = env.state.orgs["omco"]
    summary = next(s for s in org.records("OrderSummary") if s["Status"] == "Created")
    ois = next(i for i in org.records("OrderItemSummary") if i["OrderSummaryId"] == summary["Id"])
    before = ground_truth(org)[summary["OriginalOrderId"]]
    async with await env.client("omco") as c:
        resp = await c.post(
            f"/services/data/{V}/commerce/order-management/order-summaries/{summary['Id']}/actions/submit-cancel",
            json={"changeItems": [{"orderItemSummaryId": ois["Id"], "quantity": 1.0, "reason": "Wrong Item"}]},
        )
        assert resp.status_code == 201
        q = (
            "SELECT Id, ChangeType, ChangeOrderItem.Quantity FROM OrderItemSummaryChange "
            f"WHERE OrderItemSummaryId = '{ois['Id']}'"
        )
        changes = (await c.get(f"/services/data/{V}/query", params={"q": q})).json()["records"]
    assert changes[-1]["ChangeType"] == "Cancel"
    assert changes[-1]["ChangeOrderItem"]["Quantity"] == -1.0
    after = ground_truth(org)[summary["OriginalOrderId"]]
    assert after.cancelled_amount == pytest.approx(before.cancelled_amount + ois["UnitPrice"])


# ---------------------------------------------------------------------------------------------- clock
async def test_session_expiry_and_replay_past_retention() -> None:
    state = SalesforceState(cometd_timeout_s=1.0, session_timeout_s=3600)
    org = state.add_org("old")
    seed_org(state, org, orders=5, seed=2)
    async with serve(build_app(state)) as sb, httpx.AsyncClient(verify=sb.tls.client_context()) as http:
        env = Env(state, sb, http)
        async with await env.client("old") as c:
            acc = next(iter(org.records("Account")))
            await c.patch(f"/services/data/{V}/sobjects/Account/{acc['Id']}", json={"Phone": "+1 555 0100"})
            old_replay = org.latest_replay_id()
            state.advance_clock(2 * 3600)  # idle beyond the session timeout
            resp = await c.get(f"/services/data/{V}/limits")
            assert resp.status_code == 401
            assert resp.json() == [{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}]
        state.advance_clock(72 * 3600)
        async with await env.client("old") as c:
            resp = await c.patch(f"/services/data/{V}/sobjects/Account/{acc['Id']}", json={"Phone": "+1 555 0101"})
            assert resp.status_code == 204
            state.expire_sessions("old")
            assert (await c.get(f"/services/data/{V}/limits")).json()[0]["errorCode"] == "INVALID_SESSION_ID"
        bx = Bayeux(env, await env.token("old"))
        try:
            await bx.handshake()
            reply = await bx.subscribe("/data/AccountChangeEvent", old_replay)
            assert reply["successful"] is False
            assert reply["error"] == (
                f"400::The replayId {{{old_replay}}} you provided was invalid. Please provide a valid ID, "
                "-2 to replay all events, or -1 to replay only new events."
            )
            assert (await bx.subscribe("/data/AccountChangeEvent", -2))["successful"]
            events = await bx.events(1)
            assert [e["data"]["payload"]["Phone"] for e in events] == ["+1 555 0101"]  # the purged one is gone
        finally:
            await bx.close()


async def test_a_long_transaction_commits_rows_stamped_with_its_start_behind_newer_rows(
    env: Env, acme: httpx.AsyncClient
) -> None:
    org = env.state.orgs["acme"]
    account = next(a["Id"] for a in org.records("Account"))
    newer = await env.http.post(f"{env.sb.base_url}/_sandbox/orgs/acme/transaction", json={
        "ops": [{"op": "update", "object": "Account", "id": account, "fields": {"Phone": "+49 30 1"}}]})
    assert newer.status_code == 200, newer.text
    resp = await env.http.post(f"{env.sb.base_url}/_sandbox/orgs/acme/transaction", json={
        "startedSecondsAgo": 5,
        "ops": [{"op": "create", "object": "Account", "fields": {"Name": "Late GmbH", "AccountNumber": "B-LATE"}}]})
    assert resp.status_code == 200, resp.text
    late_id = resp.json()["ids"][0]
    soql = f"SELECT Id, SystemModstamp FROM Account WHERE Id IN ('{account}', '{late_id}')"
    body = (await acme.get(f"/services/data/{V}/query", params={"q": soql})).json()
    rows = {r["Id"]: r["SystemModstamp"] for r in body["records"]}
    assert rows[late_id] < rows[account]  # visible now, stamped before a row committed earlier
    event = next(e for e in reversed(org.events) if late_id in e.header["recordIds"])
    assert event.header["commitTimestamp"] >= org.lookup(account)["SystemModstamp"]  # committed last
