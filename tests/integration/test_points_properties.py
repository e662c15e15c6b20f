"""Property: over random sequences of order versions (status changes, amendments, cancellations) and
returns, delivered shuffled, duplicated and in random batches through resolver + points on PostgreSQL,
the ledger equals a small reference model, no order goes below zero, and replaying changes nothing."""

from __future__ import annotations

import itertools
from decimal import ROUND_FLOOR, Decimal
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_points_engine import Pipe, customer, member, order, prepare, program, ret

from points.cli import set_program
from servicekit.runtime import Infra

_tenants = itertools.count()

LIFECYCLES = ("pending", "awardable", "cancelled")
PPU = Decimal("1.5")


@st.composite
def histories(draw: Any) -> dict[str, Any]:
    orders = {}
    for i in range(draw(st.integers(1, 3))):
        n = draw(st.integers(1, 4))
        start = draw(st.integers(0, 1))  # lifecycle only moves forward: pending -> awardable -> cancelled
        stages, stage = [], start
        for _ in range(n):
            stage = min(2, stage + draw(st.integers(0, 1)))
            stages.append(stage)
        totals = [draw(st.integers(0, 400)) for _ in range(n)]
        returns = {}
        for j in range(draw(st.integers(0, 2))):
            rv = draw(st.integers(1, 2))
            returns[f"r{i}{j}"] = [
                (draw(st.integers(0, 300)), draw(st.sampled_from(("pending", "effective", "cancelled"))))
                for _ in range(rv)
            ]
        orders[f"o{i}"] = {"versions": list(zip(stages, totals, strict=True)), "returns": returns}
    return orders


def reference(orders: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """order -> (earned part, clawed part) from the latest facts only."""
    out = {}
    for oid, h in orders.items():
        stage, total = h["versions"][-1]
        if LIFECYCLES[stage] != "awardable" or total == 0:
            out[oid] = (0, 0)
            continue
        target = int((Decimal(total) * PPU).quantize(Decimal(1), rounding=ROUND_FLOOR))
        returned = sum(amount for amount, lc in (r[-1] for r in h["returns"].values()) if lc == "effective")
        # multiply before dividing: 435 x 40 / 290 is exactly 60 (dividing first gives 59.999...)
        claw_exact = Decimal(target) * returned / Decimal(total)
        claw = min(target, int(claw_exact.quantize(Decimal(1), rounding=ROUND_FLOOR)))
        out[oid] = (target, -claw)
    return out


def events_of(tenant: str, orders: dict[str, Any]) -> list[Any]:
    evs: list[Any] = []
    for oid, h in orders.items():
        for v, (stage, total) in enumerate(h["versions"], 1):
            evs.append(
                order(tenant, oid, "k1", v=v, status=LIFECYCLES[stage], lifecycle=LIFECYCLES[stage], total=str(total))
            )
        for rid, versions in h["returns"].items():
            for v, (amount, lc) in enumerate(versions, 1):
                evs.append(ret(tenant, rid, order_id=oid, amount=str(amount), v=v, lifecycle=lc))
    return evs


async def components(infra: Infra, tenant: str) -> dict[str, tuple[int, int]]:
    rows = await infra.pool.fetch(
        """SELECT order_source_id,
                  coalesce(sum(points) FILTER (WHERE kind <> 'clawback'), 0)::int AS e,
                  coalesce(sum(points) FILTER (WHERE kind = 'clawback'), 0)::int AS c
           FROM ledger WHERE tenant_id = $1 GROUP BY 1""",
        tenant,
    )
    return {r["order_source_id"]: (r["e"], r["c"]) for r in rows}


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(orders=histories(), data=st.data())
async def test_ledger_matches_reference_under_shuffles_duplicates_and_replays(
    infra: Infra, orders: dict[str, Any], data: Any
) -> None:
    await prepare(infra)
    tenant = f"p{next(_tenants)}"
    await set_program(infra.pool, program(tenant, awardable_statuses={}, basis="total", points_per_unit=PPU))
    pipe = Pipe(infra)
    await pipe.feed([member(tenant, "m1", ext="K1"), customer(tenant, "k1", ext="K1")])

    evs = events_of(tenant, orders)
    dups = data.draw(st.lists(st.sampled_from(evs), max_size=4))
    stream = data.draw(st.permutations(evs + dups))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=4)))
    for a, b in itertools.pairwise([0, *cuts, len(stream)]):
        if a < b:
            await pipe.feed(stream[a:b])
            for e, c in (await components(infra, tenant)).values():
                assert e + c >= 0, "an order went below zero"
                assert -c <= max(e, 0), "clawed back more than the order earned"

    want = {oid: v for oid, v in reference(orders).items() if v != (0, 0)}
    got = {oid: v for oid, v in (await components(infra, tenant)).items() if v != (0, 0)}
    assert got == want

    ledger_before = await infra.pool.fetchval("SELECT count(*) FROM ledger WHERE tenant_id = $1", tenant)
    await pipe.feed(evs)  # replay everything again
    assert await infra.pool.fetchval("SELECT count(*) FROM ledger WHERE tenant_id = $1", tenant) == ledger_before
    assert {k: v for k, v in (await components(infra, tenant)).items() if v != (0, 0)} == want
