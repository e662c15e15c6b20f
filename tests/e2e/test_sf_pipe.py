"""Salesforce end to end on the real broker and PostgreSQL: sandbox orgs -> CDC listener + poller -> normalizer
-> resolver -> points engine -> ledger, checked against the sandbox's ground truth.

Three orgs: ``calm`` and ``storm`` (core Order mode, identical seed and identical later mutations) and ``omco``
(Order Management). ``storm`` runs through a stuck bulk job, a REQUEST_LIMIT_EXCEEDED storm, session expiry, a
QUERY_TIMEOUT, a dropped stream, a gap and an overflow; the connectors of every org are killed mid-stream and
restarted. Both core ledgers must equal the ground truth and each other (by order number).
"""

from __future__ import annotations

import asyncio
import math
import sys
from decimal import Decimal
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))

from test_sf_support import add_connection, wait_for

from canonical.events import MemberData
from cdc_listener.app import run_listener
from normalizer.app import SERVICE as NORMALIZER
from points.app import MIGRATIONS as POINTS_MIGRATIONS
from points.app import build_service
from points.cli import set_program
from points.rules import Program
from resolver.app import MIGRATIONS as RESOLVER_MIGRATIONS
from resolver.app import SERVICE as RESOLVER
from resolver.cli import import_members
from sandbox.salesforce import (
    Org,
    SalesforceState,
    amend_quantity,
    build_app,
    cancel_order,
    close_return,
    create_order,
    create_reduction_order,
    create_return,
    ground_truth,
    seed_org,
    set_order_status,
)
from sandbox.server import serve
from servicekit.db import migrate
from servicekit.kafka import ensure_topics
from servicekit.runtime import Infra, run_services
from sf_poller.app import supervise

STATUS_MAP = {"Draft": "pending", "Activated": "pending", "Fulfilled": "awardable", "Cancelled": "cancelled"}


def expected_points(org: Org) -> dict[str, int]:
    """Per original order number: floor(net amount) for awardable, live orders (rates are 1), else 0."""
    out: dict[str, int] = {}
    for truth in ground_truth(org).values():
        awardable = STATUS_MAP.get(truth.status) == "awardable" and not truth.is_deleted
        out[truth.order_number] = math.floor(Decimal(str(truth.net_amount))) if awardable else 0
    return out


async def ledger_by_number(infra: Infra, tenant: str, org: Org) -> dict[str, int]:
    rows = await infra.pool.fetch(
        "SELECT order_source_id, sum(points)::bigint AS n FROM ledger WHERE tenant_id = $1 GROUP BY 1", tenant)
    numbers = {o["Id"]: o["OrderNumber"] for o in org.tables["Order"].values()}
    return {numbers[r["order_source_id"]]: int(r["n"]) for r in rows if r["order_source_id"] in numbers}


async def kinds_of(infra: Infra, tenant: str, org: Org) -> dict[str, set[str]]:
    numbers = {o["Id"]: o["OrderNumber"] for o in org.tables["Order"].values()}
    out: dict[str, set[str]] = {}
    for r in await infra.pool.fetch("SELECT order_source_id, kind FROM ledger WHERE tenant_id = $1", tenant):
        out.setdefault(numbers.get(r["order_source_id"], "?"), set()).add(r["kind"])
    return out


def mismatches(org: Org, ledger: dict[str, int]) -> dict[str, tuple[int, int]]:
    """Orders whose ledger differs from the ground truth by more than per-step rounding (1 point a return)."""
    bad = {}
    truth = ground_truth(org)
    by_number = {t.order_number: t for t in truth.values()}
    for number, want in expected_points(org).items():
        got = ledger.get(number, 0)
        t = by_number[number]
        slack = 0 if want == 0 else 1 + (1 if t.returned_amount else 0) + (1 if t.cancelled_amount else 0)
        if abs(got - want) > slack:
            bad[number] = (got, want)
    return bad


def mutate_core(org: Org) -> dict[str, str]:
    """The same business changes in any core org seeded alike; returns what happened by order number."""
    orders = sorted((o for o in org.records("Order") if not o["IsReductionOrder"]), key=lambda o: o["OrderNumber"])
    fulfilled = [o for o in orders if o["Status"] == "Fulfilled"]
    accounts = sorted(org.records("Account"), key=lambda a: a["AccountNumber"])
    products = sorted((p for p in org.records("Product2") if p["IsActive"]), key=lambda p: p["ProductCode"])
    done: dict[str, str] = {}
    new = create_order(org, accounts[0]["Id"], [(products[0]["Id"], 2.0), (products[1]["Id"], 1.0)])
    set_order_status(org, new, "Fulfilled")
    done[org.tables["Order"][new]["OrderNumber"]] = "created+fulfilled"
    draft = create_order(org, accounts[1]["Id"], [(products[2]["Id"], 1.0)], status="Draft")
    amend_quantity(org, next(iter(org.children("OrderItem", "OrderId", draft))), 4.0)
    set_order_status(org, draft, "Fulfilled")
    done[org.tables["Order"][draft]["OrderNumber"]] = "amended+fulfilled"
    cancel_order(org, fulfilled[0]["Id"])
    done[fulfilled[0]["OrderNumber"]] = "cancelled"
    items = sorted(org.children("OrderItem", "OrderId", fulfilled[1]["Id"]))
    create_return(org, fulfilled[1]["Id"], [(items[0], 1.0, "Damaged")], status="Closed")
    done[fulfilled[1]["OrderNumber"]] = "returned"
    items = sorted(org.children("OrderItem", "OrderId", fulfilled[2]["Id"]))
    create_reduction_order(org, fulfilled[2]["Id"], [(items[0], 1.0)])
    done[fulfilled[2]["OrderNumber"]] = "reduced"
    return done


def mutate_om(org: Org) -> None:
    orders = sorted((o for o in org.records("Order") if not o["IsReductionOrder"]), key=lambda o: o["OrderNumber"])
    fulfilled = [o for o in orders if o["Status"] == "Fulfilled"]
    accounts = sorted(org.records("Account"), key=lambda a: a["AccountNumber"])
    products = sorted((p for p in org.records("Product2") if p["IsActive"]), key=lambda p: p["ProductCode"])
    new = create_order(org, accounts[2]["Id"], [(products[0]["Id"], 3.0)])
    set_order_status(org, new, "Fulfilled")
    cancel_order(org, fulfilled[0]["Id"])  # OM: submit-cancel of every open quantity
    items = sorted(org.children("OrderItem", "OrderId", fulfilled[1]["Id"]))
    ret = create_return(org, fulfilled[1]["Id"], [(items[0], 1.0, "Damaged")])
    close_return(org, ret)  # received: change order + credit memo


async def start_connectors(infra: Infra) -> list[asyncio.Task[None]]:
    """The poller and the listener as their services run them (killed by cancellation, as by a crash)."""
    stop = asyncio.Event()
    return [asyncio.create_task(supervise(infra, stop, relist_s=1.0)),
                  asyncio.create_task(supervise(infra, stop, run_listener, relist_s=1.0))]


async def kill(tasks: list[asyncio.Task[None]]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.timeout(170)
async def test_salesforce_to_ledger_with_faults_and_restarts(infra: Infra) -> None:
    await migrate(infra.pool, [RESOLVER_MIGRATIONS, POINTS_MIGRATIONS])
    await ensure_topics(infra.bootstrap, infra.settings)
    state = SalesforceState(cometd_timeout_s=0.5)
    orgs = {"calm": state.add_org("calm"), "storm": state.add_org("storm"), "omco": state.add_org("omco")}
    seed_org(state, orgs["calm"], orders=60, seed=41)
    seed_org(state, orgs["storm"], orders=60, seed=41)
    seed_org(state, orgs["omco"], orders=40, seed=42, mode="order_management")
    state.stick_bulk_jobs("storm", 1)
    async with serve(build_app(state)) as sb:
        for name, org in orgs.items():
            await set_program(infra.pool, Program.model_validate({
                "tenant_id": name, "base_currency": "EUR", "points_per_unit": "1", "basis": "total",
                "rounding": "floor", "exchange_rates": {"USD": "1", "GBP": "1", "CHF": "1"}}))
            await import_members(infra.pool, name, [
                MemberData(member_id=f"m-{a['AccountNumber']}", external_id=a["AccountNumber"])
                for a in org.records("Account")])
            await add_connection(infra, name, f"sf-{name}", sb.base_url, org.client_id, org.client_secret, {
                "ca_bundle": str(sb.tls.ca_path), "mode": org.mode, "status_map": STATUS_MAP,
                "price_currency": "EUR", "bulk_threshold": 30, "bulk_timeout_s": 1.0, "bulk_poll_s": 0.05,
                "poll_interval_s": 1, "reconcile_interval_s": 600,
                "quota": {"limit_backoff_s": 0.05, "pause_s": 0.2}})
        stop_pipe = asyncio.Event()
        pipe = asyncio.create_task(run_services([NORMALIZER, RESOLVER, build_service(mature_interval_s=0.5)],
                                                infra.settings, stop=stop_pipe))
        connectors = await start_connectors(infra)
        try:
            async def settled(name: str) -> bool:
                org = orgs[name]
                return not mismatches(org, await ledger_by_number(infra, name, org))

            for name in orgs:  # the backfill (Bulk, or REST after the stuck job) reaches the ledger
                await wait_for(lambda n=name: settled(n), 90, f"{name} backfill in the ledger", step=0.5)

            # changes after the backfill arrive through CDC; the storm org gets every fault at once
            state.inject_fault("request_limit", 3, org="storm")
            state.inject_fault("query_timeout", 1, path="/queryAll", org="storm")
            state.expire_sessions("storm")
            changes = {name: mutate_core(orgs[name]) for name in ("calm", "storm")}
            mutate_om(orgs["omco"])
            state.drop_streams("storm")
            first = next(iter(orgs["storm"].tables["Order"]))
            orgs["storm"].emit_gap("Order", [first])
            orgs["storm"].emit_overflow("Order")
            await asyncio.sleep(0.3)
            await kill(connectors)  # mid-stream: replay ids / cursors of unacknowledged work are not saved
            extra = {name: mutate_core(orgs[name]) for name in ("calm", "storm")}
            connectors = await start_connectors(infra)
            for name in orgs:
                await wait_for(lambda n=name: settled(n), 60, f"{name} changes in the ledger", step=0.5)
            calm = await ledger_by_number(infra, "calm", orgs["calm"])
            storm = await ledger_by_number(infra, "storm", orgs["storm"])
            assert calm == storm, "the same final ledger with and without faults"
            assert changes["calm"] == changes["storm"] and extra["calm"] == extra["storm"]
            kinds_by_number = await kinds_of(infra, "calm", orgs["calm"])
            for number, what in changes["calm"].items():
                if what == "cancelled":
                    assert calm.get(number, 0) == 0 and "void" in kinds_by_number[number]
                elif what in ("returned", "reduced"):
                    assert "clawback" in kinds_by_number[number], (number, what)
                else:
                    assert calm.get(number, 0) > 0 and "earn" in kinds_by_number[number], (number, what)
            kinds = {r["kind"] for r in await infra.pool.fetch("SELECT DISTINCT kind FROM ledger")}
            assert {"earn", "void", "clawback"} <= kinds
            dups = await infra.pool.fetchval(
                "SELECT count(*) FROM (SELECT event_id FROM ledger GROUP BY 1 HAVING count(*) > 1) d")
            assert dups == 0
            assert state.counters.get("fault:request_limit", 0) == 3
            assert state.counters.get("fault:query_timeout", 0) == 1
            assert any(j.state == "Aborted" for j in orgs["storm"].bulk_jobs.values())
        finally:
            await kill(connectors)
            stop_pipe.set()
            assert await asyncio.wait_for(pipe, 30) == 0


