"""The Salesforce poller against the sandbox over HTTPS, publishing to the real broker, cursors in PostgreSQL:
Bulk backfill resumed after an interruption (same job, no restart), a stuck job falling back to REST, the
incremental compound cursor through a fault storm (limits, session expiry, QUERY_TIMEOUT), verify/dry-run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from test_sf_support import add_connection, read_raw

from sandbox.salesforce import SalesforceState, build_app, create_order, seed_org
from sandbox.salesforce.clock import rest_datetime
from sandbox.server import serve
from servicekit.connections import PgCursorStore
from servicekit.errors import ConfigError, Transient
from servicekit.kafka import OutMessage
from servicekit.runtime import Infra
from sf_poller import control
from sf_poller.sync import ConnectionSync
from sfconnect.client import build_client, http_client
from sfconnect.config import parse_connection
from sfconnect.records import norm_ts


class FlakyPublisher:
    """Delegates to the real publisher; fails the ``fail_at``-th send (the broker going away mid-backfill)."""

    def __init__(self, inner: Any, fail_at: int | None) -> None:
        self.inner = inner
        self.fail_at = fail_at
        self.sends = 0

    async def send_all(self, messages: Sequence[OutMessage]) -> Any:
        self.sends += 1
        if self.fail_at is not None and self.sends == self.fail_at:
            raise Transient("broker unavailable")
        return await self.inner.send_all(messages)


async def _cycle_until_done(sync: ConnectionSync, attempts: int = 12) -> list[str]:
    errors: list[str] = []
    for _ in range(attempts):
        try:
            await sync.run_cycle()
            return errors
        except Transient as exc:
            errors.append(str(exc))
    raise AssertionError(f"no successful cycle: {errors}")


@pytest.mark.timeout(120)
async def test_backfill_resume_stuck_fallback_and_faults(infra: Infra) -> None:
    state = SalesforceState(cometd_timeout_s=1.0)
    org = state.add_org("acme")
    seed_org(state, org, orders=700, seed=21)
    tenant = "acme"
    async with serve(build_app(state)) as sb:
        settings = {
            "ca_bundle": str(sb.tls.ca_path), "objects": ["Account", "Contact", "Order", "OrderItem"],
            "bulk_threshold": 300, "bulk_max_records": 150, "bulk_poll_s": 0.05, "bulk_timeout_s": 1.0,
            "cdc": False, "quota": {"limit_backoff_s": 0.05, "pause_s": 0.1},
        }
        conn = await add_connection(infra, tenant, "sf1", sb.base_url, org.client_id, org.client_secret, settings)
        cc = parse_connection(conn)
        cursors = PgCursorStore(infra.pool)
        async with http_client(cc) as http:
            # 1. Bulk backfill of Orders interrupted after the 3rd publish: the job id and locator are saved
            state.stick_bulk_jobs("acme", 0)
            flaky = FlakyPublisher(infra.publisher, fail_at=3)
            sync = ConnectionSync(cc, build_client(cc, http, infra), flaky, cursors, infra.settings)
            with pytest.raises(Transient, match="broker unavailable"):
                await sync.sync_entity("Order")
            cur = await cursors.load(tenant, "sf1", "Order")
            assert cur is not None and cur["phase"] == "bulk" and cur["bulk"]["locator"]
            jobs_before = org.stats["bulk_jobs_created"]
            # 2. restart: the same job resumes at the saved locator
            sync2 = ConnectionSync(cc, build_client(cc, http, infra), infra.publisher, cursors, infra.settings)
            await sync2.sync_entity("Order")
            assert org.stats["bulk_jobs_created"] == jobs_before, "resumed, not restarted"
            cur = await cursors.load(tenant, "sf1", "Order")
            assert cur is not None and cur["phase"] == "incremental" and cur["ts"]
            # 3. a stuck job for OrderItem times out and falls back to the REST query
            state.stick_bulk_jobs("acme", 1)
            res = await sync2.sync_entity("OrderItem")  # polled past bulk_timeout_s: aborted, REST fallback
            item_cur = await cursors.load(tenant, "sf1", "OrderItem")
            assert item_cur is not None and item_cur["phase"] == "incremental" and item_cur["ts"], (item_cur, res)
            assert any(j.state == "Aborted" for j in org.bulk_jobs.values())
            await _cycle_until_done(sync2)

            # 4. new rows in one transaction (shared SystemModstamp) under a fault storm
            accounts = [a["Id"] for a in org.records("Account")][:3]
            products = [p["Id"] for p in org.records("Product2") if p["IsActive"]][:2]
            with org.transaction():
                new_orders = [create_order(org, a, [(products[0], 1.0), (products[1], 2.0)]) for a in accounts]
            state.inject_fault("request_limit", 2)
            state.inject_fault("query_timeout", 1, path="/queryAll")
            state.inject_fault("server_error", 1)
            state.expire_sessions("acme")
            errors = await _cycle_until_done(sync2)
            assert any("QUERY_TIMEOUT" in e for e in errors)
            assert sync2.client.reauths >= 1
            # the window narrowed after the timeout; a later run widens it again and finishes
            await _cycle_until_done(sync2)

            # 5. a long transaction commits an order stamped 20 s back, behind the cursor: the overlap
            #    window re-reads it once, and the cursor stays where it was
            passed = await cursors.load(tenant, "sf1", "Order")
            with org.transaction(started_s_ago=20):
                late_order = create_order(org, accounts[0], [(products[0], 1.0)])
            stamp = norm_ts(rest_datetime(org.lookup(late_order)["SystemModstamp"]))  # type: ignore[index]
            assert passed is not None and stamp is not None and stamp < passed["ts"]
            await _cycle_until_done(sync2)
            assert sync2.late >= 1
            assert await cursors.load(tenant, "sf1", "Order") == passed

        records = await read_raw(infra, ("Account", "Contact", "Order", "OrderItem"))
        for obj in ("Account", "Contact", "Order", "OrderItem"):
            got = {r.source_id for r in records if r.entity == obj}
            # Bulk backfills and REST reads both use queryAll: deleted rows are published too (as deletes)
            assert got == set(org.tables[obj]), f"{obj}: every row published, deleted ones included"
        assert set(new_orders) | {late_order} <= {r.source_id for r in records if r.entity == "Order"}
        deleted = {r.source_id for r in records if r.op == "delete"}
        assert deleted and all(org.lookup(rid)["IsDeleted"] for rid in deleted)  # type: ignore[index]
        lines = [r for r in records if r.entity == "OrderItem"]
        assert all(r.order_source_id for r in lines)
        bulk_rows = [r for r in records if r.entity == "Order" and r.request_url and "/results" in r.request_url]
        assert bulk_rows and all(r.source_version.endswith("Z") for r in bulk_rows)
        assert any(r.op == "delete" for r in bulk_rows), "the Bulk backfill (queryAll) carries deleted orders"

        # verify and dry-run against the same org; a login.salesforce.com-style host says what to fix
        connector = control.connector()
        report = await connector.verify(cc, infra.settings)
        assert report.ok and report.info["org_id"] == org.org_id, report.lines()
        assert {c.name for c in report.checks} >= {f"read {o}" for o in cc.objects}
        sample = await connector.sample(cc, infra.settings, limit=2)
        assert set(sample) == set(cc.objects) and len(sample["Order"]) == 2
        assert all(r.source_id and r.source_version.endswith("Z") for r in sample["Order"])
        bad = await add_connection(infra, tenant, "sf-login", sb.url_for_host("localhost"), org.client_id,
                                   org.client_secret, settings, state="draft")
        with pytest.raises(ConfigError, match="My Domain"):
            await control.verify(bad, infra.settings)
        assert await infra.pool.fetchval("SELECT count(*) FROM cursors WHERE connection_id = 'sf-login'") == 0
