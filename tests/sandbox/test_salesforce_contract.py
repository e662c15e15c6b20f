"""Contract: the Salesforce simulator's responses have the documented shape, compared with the payloads
written from Salesforce's documentation (tests/fixtures/vendor-docs/salesforce). Fails when the simulator
drifts: a key renamed, missing or added at the levels a client reads."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from sandbox.salesforce import SalesforceState, build_app, seed_org
from sandbox.server import RunningSandbox, serve

pytestmark = pytest.mark.integration

DOCS = Path(__file__).parents[1] / "fixtures" / "vendor-docs" / "salesforce"
V = "v66.0"


def _doc(name: str) -> Any:
    return json.loads((DOCS / name).read_text())


@pytest_asyncio.fixture(scope="module")
async def client() -> AsyncIterator[tuple[SalesforceState, httpx.AsyncClient]]:
    state = SalesforceState(cometd_timeout_s=1.0)
    seed_org(state, "shape", orders=5, seed=71)
    async with serve(build_app(state)) as sb:
        yield state, await _login(state, sb)


async def _login(state: SalesforceState, sb: RunningSandbox) -> httpx.AsyncClient:
    org = state.orgs["shape"]
    async with httpx.AsyncClient(verify=sb.tls.client_context()) as h:
        tok = (await h.post(f"{sb.base_url}/services/oauth2/token", data={
            "grant_type": "client_credentials", "client_id": org.client_id,
            "client_secret": org.client_secret})).json()
    return httpx.AsyncClient(base_url=tok["instance_url"], verify=sb.tls.client_context(),
                             headers={"Authorization": f"Bearer {tok['access_token']}"})


async def test_query_response_has_the_documented_shape(client: Any) -> None:
    _, c = client
    doc = _doc("query_orders.json")
    fields = [k for k in doc["records"][0] if k not in ("attributes", "Account", "BillToContact")]
    soql = f"SELECT {', '.join(fields)}, Account.PersonEmail, Account.IsPersonAccount, BillToContact.Email FROM Order"
    body = (await c.get(f"/services/data/{V}/query", params={"q": soql})).json()
    assert set(doc) <= set(body) <= set(doc) | {"nextRecordsUrl"}
    rec, want = body["records"][0], doc["records"][0]
    assert set(rec) == set(want)
    assert set(rec["attributes"]) == set(want["attributes"]) == {"type", "url"}
    assert rec["attributes"]["url"] == f"/services/data/{V}/sobjects/Order/{rec['Id']}"
    assert set(rec["Account"]) == set(want["Account"])  # a parent comes nested, with its own attributes
    assert rec["SystemModstamp"].endswith("+0000") and "T" in rec["SystemModstamp"]  # REST datetime format


async def test_cdc_message_has_the_documented_shape(client: Any) -> None:
    state, c = client
    org = state.orgs["shape"]
    account = next(iter(org.records("Account")))["Id"]
    org.update("Account", account, {"Name": "Shape Check"})
    handshake = (await c.post("/cometd/66.0", json=[{
        "channel": "/meta/handshake", "version": "1.0", "supportedConnectionTypes": ["long-polling"]}])).json()
    cid = handshake[0]["clientId"]
    await c.post("/cometd/66.0", json=[{"channel": "/meta/subscribe", "clientId": cid,
                                        "subscription": "/data/AccountChangeEvent",
                                        "ext": {"replay": {"/data/AccountChangeEvent": -2}}}])
    got = (await c.post("/cometd/66.0", json=[{"channel": "/meta/connect", "clientId": cid,
                                               "connectionType": "long-polling"}])).json()
    events = [m for m in got if m.get("channel") == "/data/AccountChangeEvent"]
    assert events
    msg, doc = events[-1], _doc("cdc_account_update.json")
    assert set(msg) >= {"channel", "data"} and set(msg["data"]) >= set(doc["data"])
    assert set(msg["data"]["event"]) >= {"replayId"}
    header, want = msg["data"]["payload"]["ChangeEventHeader"], doc["data"]["payload"]["ChangeEventHeader"]
    assert set(header) == set(want), set(header) ^ set(want)
