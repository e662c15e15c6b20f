"""Issue 10: every Salesforce verify failure says what to fix, one line per check (kit ``VerifyReport``):
wrong consumer secret, the login host instead of My Domain, a host that does not answer, Order Management
objects in an org without it, a single-currency org without ``default_currency``, an own-ID field the org
lacks. No secret appears in any line."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from sandbox.salesforce import SalesforceState, build_app, seed_org
from sandbox.server import RunningSandbox, serve
from servicekit.connections import Connection
from servicekit.runtime import Infra
from sf_poller.control import SfConnector

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture
async def sim() -> AsyncIterator[tuple[SalesforceState, RunningSandbox]]:
    state = SalesforceState(cometd_timeout_s=1.0)
    state.add_org("plain", multi_currency=False, person_accounts=False)
    seed_org(state, "plain", orders=5, person_accounts=0, seed=81)
    async with serve(build_app(state)) as sb:
        yield state, sb


def _conn(sb: RunningSandbox, org: Any, endpoint: str | None = None, secret: str | None = None,
          **settings: Any) -> Connection:
    return Connection("t", "v", "salesforce", endpoint or sb.base_url,
                      {"client_id": org.client_id, "client_secret": secret or org.client_secret},
                      {"ca_bundle": str(sb.tls.ca_path), "cdc": False, **settings})


async def _failures(conn: Connection, infra: Infra) -> dict[str, str]:
    connector = SfConnector()
    report = await connector.verify(connector.parse(conn), infra.settings, save=False)
    assert not report.ok
    text = "\n".join(report.lines())
    assert "s3cret-wrong" not in text and conn.credentials["client_secret"] not in text
    return {c.name: f"{c.detail} -> {c.fix}" for c in report.failures()}


async def test_each_verify_failure_says_what_to_fix(sim: Any, infra: Infra) -> None:
    state, sb = sim
    org = state.orgs["plain"]
    ok = {"default_currency": "EUR"}
    assert "consumer key and secret" in (await _failures(_conn(sb, org, secret="s3cret-wrong", **ok), infra))["auth"]
    assert "My Domain" in (await _failures(_conn(sb, org, endpoint=sb.url_for_host("localhost"), **ok), infra))["auth"]
    gone = "https://127.0.0.1:9"  # nothing listens there
    assert "My Domain URL" in (await _failures(_conn(sb, org, endpoint=gone, **ok), infra))["host"]
    om = await _failures(_conn(sb, org, mode="order_management", **ok), infra)
    assert "no Order Management" in om["objects"] and "settings.mode 'order'" in om["objects"]
    assert "settings.default_currency" in (await _failures(_conn(sb, org), infra))["currency"]
    own = await _failures(_conn(sb, org, external_id_field="Loyalty_Id__c", **ok), infra)
    assert "Account.Loyalty_Id__c" in own["own-ID field"] and "field-level read access" in own["own-ID field"]
