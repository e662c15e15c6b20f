"""CE poller against the Dataverse sandbox over real HTTPS (MSAL, TLS) with the real broker and PostgreSQL
stores: raw records on their topics (payloads as served), cursors and known keys in PostgreSQL, a 403 marking
the connection failed with the privilege to grant, and the supervisor starting only live connections."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import pytest
from aiokafka import AIOKafkaConsumer

from canonical.topics import raw
from ce_poller.app import MIGRATIONS, run_connection, supervise
from ce_poller.limiter import reset_budgets
from sandbox.dataverse import DataverseState, build_app, seed_org
from sandbox.server import serve
from servicekit.connections import CredentialCipher, PgConnectionStore
from servicekit.db import migrate
from servicekit.kafka import ensure_topics
from servicekit.runtime import Infra


async def _drain(infra: Infra, topics: list[str], want: int) -> list[dict[str, object]]:
    consumer = AIOKafkaConsumer(*[infra.settings.topic(t) for t in topics], bootstrap_servers=infra.bootstrap,
                                auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    got: list[dict[str, object]] = []
    try:
        for _ in range(60):
            for recs in (await consumer.getmany(timeout_ms=300)).values():
                got += [json.loads(r.value) for r in recs]
            if len(got) >= want:
                break
    finally:
        await consumer.stop()
    return got


@pytest.mark.timeout(120)
async def test_poller_publishes_raw_records_and_keeps_cursors_in_postgres(infra: Infra) -> None:
    reset_budgets()
    await migrate(infra.pool, [MIGRATIONS])
    await ensure_topics(infra.bootstrap, infra.settings)
    state = DataverseState()
    org = state.add_org("contoso")
    state.add_org("locked", readable={"account", "contact", "product", "salesorder", "transactioncurrency",
                                      "organization", "msdyn_rma", "msdyn_rmaproduct"})
    summary = seed_org(state, "contoso", customers=40, products=15, orders=150, seed=5)
    store = PgConnectionStore(infra.pool, CredentialCipher.from_settings(infra.settings))
    async with serve(build_app(state)) as running:
        for name, cid in (("contoso", "ce-1"), ("locked", "ce-2")):
            o = state.orgs[name]
            app = state.credentials(name)[0]
            await store.upsert("acme", cid, "dynamics-ce", f"{running.base_url}/orgs/{name}",
                               {"tenant_id": o.tenant_id, "client_id": app.client_id,
                                "client_secret": app.client_secret},
                               {"authority": f"{running.base_url}/{o.tenant_id}", "ca_bundle": str(running.tls.ca_path),
                                "page_size": 40})
        conn = await store.get("acme", "ce-1")
        await run_connection(conn, infra, asyncio.Event(), once=True)

        counts = {r["entity"]: r["n"] for r in await infra.pool.fetch(
            "SELECT entity, count(*) AS n FROM ce_known_keys WHERE connection_id = 'ce-1' GROUP BY 1")}
        assert counts["salesorder"] == summary.orders and counts["salesorderdetail"] == summary.lines
        assert counts["msdyn_rma"] == summary.rmas
        phases = {r["entity"]: json.loads(r["cursor"])["phase"] for r in await infra.pool.fetch(
            "SELECT entity, cursor FROM cursors WHERE connection_id = 'ce-1'")}
        assert set(phases.values()) == {"delta"} and len(phases) == 7

        topics = [raw("dynamics-ce", e) for e in ("salesorder", "salesorderdetail", "msdyn_rma")]
        got = await _drain(infra, topics, summary.orders + summary.lines + summary.rmas)
        by_entity = Counter(str(m["entity"]) for m in got)
        assert by_entity["salesorder"] >= summary.orders and by_entity["salesorderdetail"] >= summary.lines
        order = next(m for m in got if m["entity"] == "salesorder")
        payload = json.loads(str(order["payload"]))
        assert payload["salesorderid"] == order["source_id"]
        assert payload["_customerid_value@Microsoft.Dynamics.CRM.lookuplogicalname"] in ("account", "contact")
        assert payload["_transactioncurrencyid_value@flash.isocurrencycode"] in ("USD", "EUR", "GBP")
        rma = next(m for m in got if m["entity"] == "msdyn_rma")
        rma_payload = json.loads(str(rma["payload"]))
        assert rma_payload["msdyn_rmaproducts"] and rma["order_source_id"] in org.tables["salesorders"].rows

        # a role without read on order products: the connection is marked failed, saying what to grant
        await store.set_state("acme", "ce-2", "live")
        stop = asyncio.Event()
        sup = asyncio.create_task(supervise(infra, stop, relist_s=0.2))
        try:
            for _ in range(100):
                locked = await store.get("acme", "ce-2")
                if locked.state == "failed":
                    break
                await asyncio.sleep(0.1)
        finally:
            stop.set()
            await asyncio.wait_for(sup, 10)
        assert locked.state == "failed"
        assert locked.last_error and "prvReadSalesOrder" in locked.last_error
        assert (await store.get("acme", "ce-1")).state == "draft"   # not live: the supervisor left it alone
