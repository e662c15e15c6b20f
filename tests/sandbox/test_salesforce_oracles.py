"""Clients nobody here wrote, pointed at the Salesforce simulator as a user points them at a real org:
``simple-salesforce`` (REST query, paging, Describe Global, sObject describe, limits) and ``aiosfstream-ng``
(OAuth refresh-token flow, CometD CDC subscribe, replay of retained events). Where the simulator differs from
the documented API these clients stop, so these tests catch a simulator drifting from the documentation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp.connector
import pytest
import pytest_asyncio
import requests
from aiosfstream_ng import Client as StreamClient
from aiosfstream_ng import RefreshTokenAuthenticator, ReplayOption
from simple_salesforce import Salesforce

from sandbox.salesforce import SalesforceState, build_app, seed_org
from sandbox.server import RunningSandbox, serve
from sfconnect.cdc import read_event

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture(scope="module")
async def sim() -> AsyncIterator[tuple[SalesforceState, RunningSandbox]]:
    state = SalesforceState(cometd_timeout_s=1.0)
    seed_org(state, "oracle", orders=30, accounts=300, person_accounts=5, seed=17)
    async with serve(build_app(state)) as sb:
        yield state, sb


def _simple(state: SalesforceState, sb: RunningSandbox) -> Salesforce:
    org = state.orgs["oracle"]
    session = requests.Session()
    session.trust_env = False  # REQUESTS_CA_BUNDLE would override the CA below
    session.verify = str(sb.tls.ca_path)
    tok = session.post(f"{sb.base_url}/services/oauth2/token", data={
        "grant_type": "client_credentials", "client_id": org.client_id, "client_secret": org.client_secret}).json()
    return Salesforce(instance_url=tok["instance_url"], session_id=tok["access_token"], version="66.0",
                      session=session)


async def test_simple_salesforce_query_paging_describe_and_limits(sim: Any) -> None:
    state, sb = sim
    org = state.orgs["oracle"]

    def run() -> dict[str, Any]:
        sf = _simple(state, sb)
        sf.headers["Sforce-Query-Options"] = "batchSize=200"
        first = sf.query("SELECT Id, Name FROM Account")
        every = sf.query_all("SELECT Id, Name FROM Account")
        deleted = sf.query_all("SELECT Id FROM Order", include_deleted=True)
        return {"first": first, "every": every, "deleted": deleted, "describe": sf.describe(),
                "account": sf.Account.describe(), "limits": sf.limits()}

    got = await asyncio.to_thread(run)
    live = list(org.records("Account"))
    assert got["first"]["done"] is False and len(got["first"]["records"]) == 200
    assert got["every"]["totalSize"] == len(live) == len(got["every"]["records"])
    assert {r["Id"] for r in got["every"]["records"]} == {a["Id"] for a in live}
    assert got["deleted"]["totalSize"] == len(org.tables["Order"])
    assert "Account" in {o["name"] for o in got["describe"]["sobjects"]}
    assert "AccountNumber" in {f["name"] for f in got["account"]["fields"]}
    assert "DailyBulkApiBatches" in got["limits"] and "DailyApiRequests" in got["limits"]


class _MyDomainAuthenticator(RefreshTokenAuthenticator):
    """aiosfstream-ng only knows login/test.salesforce.com; a My Domain org is reached by its own URL."""

    def __init__(self, base_url: str, *args: Any) -> None:
        super().__init__(*args)
        self._base = base_url

    @property
    def _token_url(self) -> str:
        return f"{self._base}/services/oauth2/token"


async def _collect(client: StreamClient, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    async def run() -> None:
        async for message in client:
            out.append(message)
            if len(out) >= n:
                return

    await asyncio.wait_for(run(), timeout)
    return out


async def test_aiosfstream_subscribes_to_cdc_and_replays_retained_events(sim: Any) -> None:
    state, sb = sim
    org = state.orgs["oracle"]
    # trust the simulator's CA the way a user trusts a TLS-inspecting proxy's: in the default context aiohttp
    # (under both oracle clients) verifies with; their own code is left as it is
    aiohttp.connector._SSL_CONTEXT_VERIFIED.load_verify_locations(str(sb.tls.ca_path))
    auth = _MyDomainAuthenticator(sb.base_url, org.client_id, org.client_secret, org.refresh_token)
    account = next(iter(org.records("Account")))["Id"]
    async with StreamClient(auth, replay=ReplayOption.NEW_EVENTS) as client:
        await client.subscribe("/data/AccountChangeEvent")
        org.update("Account", account, {"Name": "Renamed by the oracle test"})
        (live,) = await _collect(client, 1)
    read = read_event(live)
    assert not isinstance(read, str), read
    header, body = read
    assert header["changeType"] == "UPDATE" and header["recordIds"] == [account]
    assert body["Name"] == "Renamed by the oracle test" and "Name" in header["changedFields"]
    # replay: a new client asking for everything retained gets that event again, same replay id
    async with StreamClient(auth, replay=ReplayOption.ALL_EVENTS) as client:
        await client.subscribe("/data/AccountChangeEvent")
        replayed = await _collect(client, 1)
    assert replayed[0]["data"]["event"]["replayId"] <= live["data"]["event"]["replayId"]
