"""Issue 11, end to end on the real broker and PostgreSQL: two Salesforce sandbox orgs as they differ in the
field -- ``plain`` without multicurrency and without person accounts (Order mode), and ``omsum`` with Order
Management read in OrderSummary mode -- each verified (the org's shape learned and saved), backfilled, then
changed through CDC, landing every order with the right points. The fixed field lists of the old connector
failed ``plain`` at its first query (INVALID_FIELD on CurrencyIsoCode), and OrderSummary mapped to nothing."""

from __future__ import annotations

import asyncio
import math
import sys
from decimal import Decimal
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))
sys.path.insert(0, str(Path(__file__).parent))

from test_sf_pipe import STATUS_MAP, kill, ledger_by_number, mismatches, mutate_core, mutate_om, start_connectors
from test_sf_support import add_connection, wait_for

from canonical.events import MemberData
from normalizer.app import SERVICE as NORMALIZER
from points.app import MIGRATIONS as POINTS_MIGRATIONS
from points.app import build_service
from points.cli import set_program
from points.rules import Program
from resolver.app import MIGRATIONS as RESOLVER_MIGRATIONS
from resolver.app import SERVICE as RESOLVER
from resolver.cli import import_members
from sandbox.salesforce import Org, SalesforceState, build_app, ground_truth, seed_org
from sandbox.server import serve
from servicekit.db import migrate
from servicekit.kafka import ensure_topics
from servicekit.runtime import Infra, run_services
from sf_poller import control

SUMMARY_MAP = {"Created": "awardable", "Canceled": "cancelled"}
"""This tenant's OrderSummary statuses: 'Created' is a placed, paid order (its own mapping, per connection)."""


def summary_expected(org: Org) -> dict[str, int]:
    """OrderSummary mode: an order earns floor(net) once it has a summary that is not canceled."""
    summaries = org.tables["OrderSummary"]
    out = {}
    for t in ground_truth(org).values():
        s = summaries.get(t.order_summary_id or "")
        ok = s is not None and not s.get("IsDeleted") and SUMMARY_MAP.get(s["Status"]) == "awardable"
        out[t.order_number] = math.floor(Decimal(str(t.net_amount))) if ok and not t.is_deleted else 0
    return out


def summary_mismatches(org: Org, ledger: dict[str, int]) -> dict[str, tuple[int, int]]:
    truth = {t.order_number: t for t in ground_truth(org).values()}
    bad = {}
    for number, want in summary_expected(org).items():
        got = ledger.get(number, 0)
        t = truth[number]
        slack = 0 if want == 0 else 1 + (1 if t.returned_amount else 0) + (1 if t.cancelled_amount else 0)
        if abs(got - want) > slack:
            bad[number] = (got, want)
    return bad


@pytest.mark.timeout(170)
async def test_plain_and_order_summary_orgs_land_their_points(infra: Infra) -> None:
    await migrate(infra.pool, [RESOLVER_MIGRATIONS, POINTS_MIGRATIONS])
    await ensure_topics(infra.bootstrap, infra.settings)
    state = SalesforceState(cometd_timeout_s=0.5)
    plain = state.add_org("plain", multi_currency=False, person_accounts=False)
    omsum = state.add_org("omsum")
    seed_org(state, plain, orders=40, person_accounts=0, seed=51)
    seed_org(state, omsum, orders=30, seed=52, mode="order_management")
    orgs = {"plain": plain, "omsum": omsum}
    async with serve(build_app(state)) as sb:
        common = {"ca_bundle": str(sb.tls.ca_path), "bulk_threshold": 30, "bulk_poll_s": 0.05,
                  "poll_interval_s": 1, "reconcile_interval_s": 600, "price_currency": "EUR",
                  "quota": {"limit_backoff_s": 0.05, "pause_s": 0.2}}
        settings = {
            "plain": {**common, "mode": "order", "status_map": STATUS_MAP, "default_currency": "EUR"},
            "omsum": {**common, "mode": "order_summary", "summary_status_map": SUMMARY_MAP},
        }
        for name, org in orgs.items():
            await set_program(infra.pool, Program.model_validate({
                "tenant_id": name, "base_currency": "EUR", "points_per_unit": "1", "basis": "total",
                "rounding": "floor", "exchange_rates": {"USD": "1", "GBP": "1", "CHF": "1"}}))
            await import_members(infra.pool, name, [
                MemberData(member_id=f"m-{a['AccountNumber']}", external_id=a["AccountNumber"])
                for a in org.records("Account")])
            conn = await add_connection(infra, name, f"sf-{name}", sb.base_url, org.client_id, org.client_secret,
                                        settings[name])
            report = await control.verify(conn, infra.settings)  # learns and saves the org's shape
            assert report["org_shape"]["multi_currency"] is (name == "omsum")
            assert report["org_shape"]["order_management"] is (name == "omsum")

        async def settled(name: str) -> bool:
            org = orgs[name]
            ledger = await ledger_by_number(infra, name, org)
            return not (mismatches(org, ledger) if name == "plain" else summary_mismatches(org, ledger))

        stop_pipe = asyncio.Event()
        pipe = asyncio.create_task(run_services([NORMALIZER, RESOLVER, build_service(mature_interval_s=0.5)],
                                                infra.settings, stop=stop_pipe))
        connectors = await start_connectors(infra)
        try:
            for name in orgs:
                await wait_for(lambda n=name: settled(n), 90, f"{name} backfill in the ledger", step=0.5)
            earned = await ledger_by_number(infra, "omsum", omsum)
            assert sum(earned.values()) > 0, "OrderSummary mode earns points"
            mutate_core(plain)
            mutate_om(omsum)
            for name in orgs:
                await wait_for(lambda n=name: settled(n), 60, f"{name} changes in the ledger", step=0.5)
            dups = await infra.pool.fetchval(
                "SELECT count(*) FROM (SELECT event_id FROM ledger GROUP BY 1 HAVING count(*) > 1) d")
            assert dups == 0
        finally:
            await kill(connectors)
            stop_pipe.set()
            assert await asyncio.wait_for(pipe, 30) == 0
