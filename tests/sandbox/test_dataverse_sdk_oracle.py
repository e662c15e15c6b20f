"""Oracle: Microsoft's Dataverse SDK for Python (``PowerPlatform-Dataverse-Client``) against the simulator.

Nobody here wrote this client, so whatever it needs from a real org the simulator must serve the same way:
table resolution through ``EntityDefinitions`` (it resolved every table to ``salesorders`` while the simulator
ignored ``$filter`` there), listing with paging, filters, annotations, single retrieves and metadata. The SDK is
synchronous (``requests``), so each call runs in a worker thread while the simulator serves on the loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import pytest
import requests
from test_dataverse import ORG, Env, running_env

pytestmark = pytest.mark.integration

T = TypeVar("T")
FORMATTED = "OData.Community.Display.V1.FormattedValue"


class SimulatorCredential:
    """An azure-core ``TokenCredential`` that asks the simulator's Entra token endpoint for the SDK's scope."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.scopes: list[str] = []

    def get_token(self, *scopes: str, **_: Any) -> Any:
        from azure.core.credentials import AccessToken

        self.scopes += scopes
        org = self.env.state.orgs[ORG]
        app = self.env.state.credentials(ORG)[0]
        resp = requests.post(
            f"{self.env.running.base_url}/{org.tenant_id}/oauth2/v2.0/token",
            data={"grant_type": "client_credentials", "client_id": app.client_id,
                  "client_secret": app.client_secret, "scope": " ".join(scopes)},
            verify=str(self.env.running.tls.ca_path), timeout=10,
        )
        resp.raise_for_status()
        body = resp.json()
        return AccessToken(body["access_token"], int(time.time()) + int(body["expires_in"]))


@pytest.fixture
async def sdk(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Env, Any, SimulatorCredential]]:
    from PowerPlatform.Dataverse.client import DataverseClient

    async with running_env() as env:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(env.running.tls.ca_path))
        cred = SimulatorCredential(env)
        client = DataverseClient(env.org_url, cred)
        try:
            yield env, client, cred
        finally:
            client.close()


async def call(fn: Callable[[], T]) -> T:
    return await asyncio.to_thread(fn)


async def test_sdk_resolves_each_table_to_its_own_entity_set(sdk: tuple[Env, Any, SimulatorCredential]) -> None:
    env, client, cred = sdk
    for logical, entity_set in (("account", "accounts"), ("contact", "contacts"), ("msdyn_rma", "msdyn_rmas"),
                                ("salesorderdetail", "salesorderdetails")):
        info = await call(lambda lg=logical: client.tables.get(lg))  # type: ignore[misc]
        assert info is not None and info["entity_set_name"] == entity_set, (logical, info)
    assert await call(lambda: client.tables.get("nosuchtable")) is None
    assert cred.scopes and all(s == f"{env.org_url}/.default" for s in cred.scopes)


async def test_sdk_lists_every_row_across_pages(sdk: tuple[Env, Any, SimulatorCredential]) -> None:
    env, client, _ = sdk
    result = await call(lambda: client.records.list("contact", select=["fullname"], page_size=7))
    rows = list(result)
    contacts = env.state.orgs[ORG].tables["contacts"]
    assert len(rows) == len(contacts) > 7
    assert {r["contactid"] for r in rows} == set(contacts.rows)


async def test_sdk_filters_and_reads_formatted_values(sdk: tuple[Env, Any, SimulatorCredential]) -> None:
    env, client, _ = sdk
    result = await call(lambda: client.records.list(
        "salesorder", filter="statecode eq 3", select=["ordernumber", "statecode", "statuscode"],
        include_annotations=FORMATTED))
    rows = list(result)
    orders = env.state.orgs[ORG].tables["salesorders"]
    fulfilled = [k for k, r in orders.rows.items() if r[orders.pos["statecode"]] == 3]
    assert len(rows) == len(fulfilled) > 0
    assert all(r["statecode"] == 3 and r[f"statecode@{FORMATTED}"] == "Fulfilled" for r in rows)
    one = await call(lambda: client.records.retrieve("salesorder", fulfilled[0], select=["ordernumber"]))
    assert one["ordernumber"] == orders.rows[fulfilled[0]][orders.pos["ordernumber"]]


async def test_sdk_reads_table_and_column_metadata(sdk: tuple[Env, Any, SimulatorCredential]) -> None:
    _, client, _ = sdk
    tables = await call(lambda: client.tables.list(select=["LogicalName", "EntitySetName"]))
    assert {"account", "salesorder", "msdyn_rma"} <= {t["LogicalName"] for t in tables}
    columns = await call(lambda: client.tables.list_columns("account", select=["LogicalName", "AttributeType"]))
    by_name = {c["LogicalName"]: c["AttributeType"] for c in columns}
    assert by_name["accountnumber"] == "String" and by_name["statecode"] == "State"
