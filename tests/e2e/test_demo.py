"""The README's main command, end to end: `flash demo` seeds the Dataverse and Salesforce sandboxes, runs
every service on the real broker and PostgreSQL, and every order placed by a member lands on the ledger
(`--until-landed` exits 1 otherwise)."""

from __future__ import annotations

import argparse

import pytest

from controlplane.demo import run_demo
from servicekit.runtime import Infra


@pytest.mark.timeout(240)
async def test_demo_lands_every_member_order(infra: Infra, capsys: pytest.CaptureFixture[str]) -> None:
    args = argparse.Namespace(orders=120, mutate_every=0, duration=150, until_landed=True, api_port=0)
    code = await run_demo(infra.settings, args)
    out = capsys.readouterr().out
    assert "5. What landed" in out
    assert code == 0, out[-3000:]
    pool = infra.pool
    orders = await pool.fetchval("SELECT count(*) FROM orders WHERE tenant_id = 'acme' AND known")
    parked = await pool.fetchval("SELECT count(DISTINCT order_source_id) FROM parked WHERE tenant_id = 'acme'")
    assert orders + parked == 120, "every seeded order either landed on a member or is parked for a non-member"
    assert parked > 0, "the demo leaves some customers out of the members import on purpose"
    for tenant in ("acme", "globex", "initech"):  # Dynamics 365 CE, Salesforce, Dynamics 365 F&O
        earned = await pool.fetchval("SELECT coalesce(sum(points), 0) FROM ledger WHERE tenant_id = $1", tenant)
        assert earned > 0, f"{tenant} earned nothing"
        landed = await pool.fetchval("SELECT count(*) FROM orders WHERE tenant_id = $1 AND known", tenant)
        assert landed > 0
    for tenant in ("acme", "globex", "initech"):
        members = {r["member_id"] for r in await pool.fetch(
            "SELECT member_id FROM members WHERE tenant_id = $1", tenant)}
        ledger_members = {r["member_id"] for r in await pool.fetch(
            "SELECT DISTINCT member_id FROM ledger WHERE tenant_id = $1", tenant)}
        assert ledger_members <= members, "points only ever land on existing members of the same tenant"
    assert await pool.fetchval("SELECT count(*) FROM dead_letters") == 0
    # The demo serves the API and the page, with an operator token it prints once.
    from controlplane.tokens import authenticate

    assert "Control plane  http://127.0.0.1:" in out
    token = out.split("operator token for this demo (every tenant): ", 1)[1].split()[0]
    actor = await authenticate(pool, token)
    assert actor is not None and actor.is_operator
