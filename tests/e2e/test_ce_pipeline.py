"""Dataverse sandbox -> CE poller -> normalizer -> resolver -> points, on the real broker and PostgreSQL.

Two tenants, 5,000 sandbox orders in all; the ledger must hold exactly the points an independent reference
calculation gives from the sandbox's ground truth, first after the initial load, then after a status change,
a cancellation, an amendment and a return made in the sandbox (through change tracking). The second test
runs the same with the poller killed mid initial load, a 429 storm, tokens expiring mid-sync, edits during
the initial load, and an expired delta token (with an order deleted during the gap).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pytest
from aiohttp import web

from canonical.events import MemberData
from ce_poller.app import MIGRATIONS as CE_MIGRATIONS
from ce_poller.app import SERVICE as CE_POLLER
from ce_poller.limiter import reset_budgets
from normalizer.app import SERVICE as NORMALIZER
from points import app as points_app
from points.app import build_service
from points.cli import set_program
from points.rules import Program
from resolver import app as resolver_app
from resolver.app import SERVICE as RESOLVER
from resolver.cli import import_members
from sandbox.dataverse import DataverseState, Fault, build_app, ground_truth, seed_org
from sandbox.dataverse import mutations as mut
from sandbox.server import RunningSandbox, serve
from servicekit.connections import CredentialCipher, PgConnectionStore
from servicekit.db import migrate
from servicekit.runtime import Infra, run_services

TENANTS = {"acme": ("contoso", 1), "globex": ("fabrikam", 2)}
ORDERS_PER_TENANT = 2500
RECEIVED = 690970002  # msdyn_rma.msdyn_systemstatus Products Received (docs/vendor-facts.md)


@dataclass
class Sandbox:
    state: DataverseState
    running: RunningSandbox
    requests: list[str] = field(default_factory=list)


def reference(state: DataverseState) -> dict[tuple[str, str], int]:
    """Net points per order, computed from the sandbox's ground truth (program: 1 point per USD, ex tax and
    shipping, floor; earn on Fulfilled/Invoiced; returns claw back their share of what a return can carry:
    the total without freight)."""
    out: dict[tuple[str, str], int] = {}
    for tenant, (org_name, _) in TENANTS.items():
        org = state.orgs[org_name]
        rmas = org.tables["msdyn_rmas"]
        for o in ground_truth(org):
            if o.statecode not in (3, 4):
                continue
            usd = o.currency == "USD"

            def base(x: Decimal, usd: bool = usd, rate: Decimal = o.exchangerate) -> Decimal:
                return x if usd else x / rate

            b = base(o.totalamount - o.totaltax - o.freightamount)
            pts = math.floor(b) if b > 0 else 0
            returned = sum(
                (r["totalamount"] for r in o.returns if r["credittoaccount"]
                 and rmas.rows[r["msdyn_rmaid"]][rmas.pos["msdyn_systemstatus"]] == RECEIVED),
                Decimal(0),
            )
            claw = 0
            if pts > 0 and returned > 0:
                # The share of what a return can carry, in the order's own currency (no rate is involved).
                returnable = o.totalamount - o.freightamount
                raw = Decimal(pts) * min(returned, returnable) / returnable if returnable > 0 else Decimal(pts)
                claw = min(pts, max(0, math.floor(raw.quantize(Decimal("1e-9")))))
            if pts - claw:
                out[(tenant, o.salesorderid)] = pts - claw
    return out


async def ledger(infra: Infra) -> dict[tuple[str, str], int]:
    rows = await infra.pool.fetch(
        "SELECT tenant_id, order_source_id, sum(points)::bigint AS n FROM ledger GROUP BY 1, 2")
    return {(r["tenant_id"], r["order_source_id"]): int(r["n"]) for r in rows if r["n"]}


async def wait_for(cond: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await cond():
            return
        await asyncio.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


async def wait_ledger(infra: Infra, sb: Sandbox, timeout: float, what: str) -> None:
    async def same() -> bool:
        return await ledger(infra) == reference(sb.state)

    try:
        await wait_for(same, timeout, what)
    except AssertionError:
        got, want = await ledger(infra), reference(sb.state)
        diff = {k: (got.get(k), want.get(k)) for k in set(got) | set(want) if got.get(k) != want.get(k)}
        raise AssertionError(f"{what}: {len(diff)} orders differ, e.g. {list(diff.items())[:5]}") from None


async def setup(infra: Infra, sb: Sandbox, *, page_size: int) -> None:
    await migrate(infra.pool, [resolver_app.MIGRATIONS, points_app.MIGRATIONS, CE_MIGRATIONS])
    store = PgConnectionStore(infra.pool, CredentialCipher.from_settings(infra.settings))
    for tenant, (org_name, _) in TENANTS.items():
        org = sb.state.orgs[org_name]
        app = sb.state.credentials(org_name)[0]
        await store.upsert(
            tenant, f"ce-{tenant}", "dynamics-ce", f"{sb.running.base_url}/orgs/{org_name}",
            {"tenant_id": org.tenant_id, "client_id": app.client_id, "client_secret": app.client_secret},
            {"authority": f"{sb.running.base_url}/{org.tenant_id}", "ca_bundle": str(sb.running.tls.ca_path),
             "page_size": page_size, "poll_interval_s": 0.5},
        )
        await store.set_state(tenant, f"ce-{tenant}", "live")
        await set_program(infra.pool, Program.model_validate(
            {"tenant_id": tenant, "base_currency": "USD", "points_per_unit": "1", "basis": "total_ex_tax_shipping",
             "rounding": "floor"}))
        acc, con = org.tables["accounts"], org.tables["contacts"]
        members = [MemberData(member_id=f"m-{r[acc.pos['accountnumber']]}", external_id=r[acc.pos["accountnumber"]])
                   for r in acc.rows.values()]
        members += [MemberData(member_id=f"m-{r[0][:13]}", email=r[con.pos["emailaddress1"]])
                    for r in con.rows.values()]
        await import_members(infra.pool, tenant, members)


def new_sandbox_state() -> DataverseState:
    state = DataverseState()
    for org_name, seed in TENANTS.values():
        state.add_org(org_name)
        seed_org(state, org_name, customers=200, products=40, orders=ORDERS_PER_TENANT, seed=seed)
    return state


async def serve_sandbox(state: DataverseState) -> Any:
    app = build_app(state)
    sb_requests: list[str] = []

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        sb_requests.append(request.path_qs)
        return await handler(request)  # type: ignore[no-any-return]

    app.middlewares.append(record)
    return serve(app), sb_requests


def later_changes(state: DataverseState) -> list[str]:
    """A status change, a cancellation, an amendment and a return, in each tenant."""
    done = []
    for org_name, _ in TENANTS.values():
        org = state.orgs[org_name]
        so = org.tables["salesorders"]
        keys = so.sorted_keys()
        by_state = {s: [k for k in keys if so.rows[k][so.pos["statecode"]] == s] for s in range(5)}
        mut.set_order_status(org, by_state[1][0], 4)                    # submitted -> invoiced: earns
        mut.cancel_order(org, by_state[4][0])                           # invoiced -> cancelled: voids
        mut.amend_order(org, by_state[3][1], quantity=7)                # fulfilled order amended: adjusts
        mut.add_rma(org, by_state[4][2], credit_to_account=True)        # a received return: claws back
        done += [by_state[1][0], by_state[4][0], by_state[3][1], by_state[4][2]]
    return done


def _consumers() -> list[Any]:
    return [NORMALIZER, RESOLVER, build_service(mature_interval_s=0.5)]


@pytest.mark.timeout(170)
async def test_sandbox_orders_reach_the_ledger_exactly(infra: Infra) -> None:
    reset_budgets()
    state = new_sandbox_state()
    ctx, reqs = await serve_sandbox(state)
    async with ctx as running:
        sb = Sandbox(state, running, reqs)
        await setup(infra, sb, page_size=1000)
        stop = asyncio.Event()
        started = time.monotonic()
        runner = asyncio.create_task(run_services([CE_POLLER, *_consumers()], infra.settings, stop=stop))
        try:
            await wait_ledger(infra, sb, 120, "initial load in the ledger")
            initial_s = time.monotonic() - started
            ref = reference(state)
            assert len({t for t, _ in ref}) == 2 and len(ref) > 2000
            changed = later_changes(state)
            await wait_ledger(infra, sb, 40, "changes through change tracking")
            after = await ledger(infra)
            assert sum(1 for t, o in ref if o in changed and after.get((t, o)) != ref[(t, o)]) >= 6
            # every ledger row belongs to a member of its own tenant
            cross = await infra.pool.fetchval(
                """SELECT count(*) FROM ledger l WHERE NOT EXISTS (SELECT 1 FROM members m
                   WHERE m.tenant_id = l.tenant_id AND m.member_id = l.member_id)""")
            assert cross == 0
            print(f"initial load of {2 * ORDERS_PER_TENANT} orders to the ledger in {initial_s:.1f}s")
        finally:
            stop.set()
            assert await asyncio.wait_for(runner, 30) == 0


async def _cursor(infra: Infra, tenant: str, entity: str) -> dict[str, Any] | None:
    import json

    raw = await infra.pool.fetchval(
        "SELECT cursor FROM cursors WHERE tenant_id = $1 AND entity = $2", tenant, entity)
    return None if raw is None else dict(json.loads(raw) if isinstance(raw, str) else raw)


@pytest.mark.timeout(170)
async def test_same_ledger_through_kill_throttling_token_expiry_edits_and_expired_delta(infra: Infra) -> None:
    reset_budgets()
    state = new_sandbox_state()
    contoso = state.orgs["contoso"]
    ctx, reqs = await serve_sandbox(state)
    async with ctx as running:
        sb = Sandbox(state, running, reqs)
        await setup(infra, sb, page_size=200)
        state.faults.storm(0.04, 429, match="/api/data/", retry_after=1)
        state.faults.add(Fault("delay", 200, None, "salesorderdetails", None, 0.05))  # a slow, long initial load
        stop = asyncio.Event()
        consumers = asyncio.create_task(run_services(_consumers(), infra.settings, stop=stop))
        stop_p = asyncio.Event()
        poller = asyncio.create_task(run_services([CE_POLLER], infra.settings, stop=stop_p))
        try:
            # edits during the initial load, on rows before and after the page position
            so = contoso.tables["salesorders"]
            keys = so.sorted_keys()
            await wait_for(lambda: _has_next(infra, "acme", "salesorderdetail"), 60, "a checkpointed page")
            pending = [k for k in keys if so.rows[k][so.pos["statecode"]] == 1]
            for k in (pending[0], pending[-1]):
                mut.set_order_status(contoso, k, 3)
            # kill the poller mid initial load
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)
            cur = await _cursor(infra, "acme", "salesorderdetail")
            assert cur is not None and cur["phase"] == "initial" and cur["next"]
            first_listings = _listings(sb, "salesorderdetails")
            state.expire_tokens()                                     # the restarted poller's tokens die mid-sync
            stop_p = asyncio.Event()
            poller = asyncio.create_task(run_services([CE_POLLER], infra.settings, stop=stop_p))
            await asyncio.sleep(1.0)
            state.expire_tokens()
            await wait_ledger(infra, sb, 120, "initial load in the ledger despite the faults")
            assert _listings(sb, "salesorderdetails") == first_listings, "initial load started over"
            assert state.stats["status.429"] > 0 and state.stats["status.401"] > 0
            state.faults.clear()
            # an expired delta token, with an order deleted during the gap, then the usual changes
            state.advance_clock(8 * 86400)
            gone = so.sorted_keys()[5]
            mut.delete(contoso, "salesorders", gone)
            later_changes(state)
            await wait_ledger(infra, sb, 60, "ledger after resync and changes")
            cur = await _cursor(infra, "acme", "salesorder")
            assert cur is not None and cur["generation"] >= 2
            assert ("acme", gone) not in await ledger(infra)
        finally:
            stop_p.set()
            stop.set()
            await asyncio.gather(poller, return_exceptions=True)
            assert await asyncio.wait_for(consumers, 30) == 0


async def _has_next(infra: Infra, tenant: str, entity: str) -> bool:
    cur = await _cursor(infra, tenant, entity)
    return bool(cur and cur.get("phase") == "initial" and cur.get("next"))


def _listings(sb: Sandbox, entity_set: str) -> int:
    """Initial-load first pages requested (no skiptoken, no filter, no delta token)."""
    return sum(1 for p in sb.requests if f"/{entity_set}?" in p and "skiptoken" not in p and "filter" not in p
               and "deltatoken" not in p and "orgs/contoso/" in p)
