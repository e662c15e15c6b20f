"""Issue 10: PostgreSQL goes away while the CDC listener streams. Its database traffic (replay ids, the
published-version store) runs through a TCP proxy this test cuts while changes keep coming: the listener
waits it out (Transient: reconnect and replay from the last saved replay id), and every change reaches the
broker once the database is back; the listener never stops."""

from __future__ import annotations

import asyncio
import dataclasses
from urllib.parse import urlparse, urlunparse

import pytest
from test_sf_pg_outage import CuttableProxy
from test_sf_support import add_connection, read_raw, wait_for

from cdc_listener.app import run_listener
from sandbox.salesforce import SalesforceState, build_app, seed_org
from sandbox.server import serve
from servicekit.connections import PgCursorStore
from servicekit.db import create_pool, migrate
from servicekit.runtime import Infra
from sfconnect.config import CDC_SUBSCRIBED
from sfconnect.published import MIGRATIONS

pytestmark = pytest.mark.integration


@pytest.mark.timeout(180)
async def test_listener_waits_out_a_postgres_outage_and_loses_nothing(infra: Infra) -> None:
    await migrate(infra.pool, [MIGRATIONS])
    url = urlparse(infra.settings.database_url or "")
    proxy = CuttableProxy(url.hostname or "127.0.0.1", url.port or 5432)
    port = await proxy.start()
    user = url.netloc.rsplit("@", 1)
    dsn = urlunparse(url._replace(netloc=(f"{user[0]}@" if len(user) == 2 else "") + f"127.0.0.1:{port}"))
    pool = await create_pool(dsn, schema=infra.settings.db_schema, max_size=4)
    pinfra = dataclasses.replace(infra, pool=pool)
    state = SalesforceState(cometd_timeout_s=0.3)
    org = state.add_org("cdcdb")
    seed_org(state, org, accounts=30, person_accounts=0, contacts=0, products=1, orders=0, seed=91)
    stop = asyncio.Event()
    accounts = sorted(org.tables["Account"])
    try:
        async with serve(build_app(state)) as sb:
            conn = await add_connection(infra, "x", "cdcdb", sb.base_url, org.client_id, org.client_secret,
                                        {"ca_bundle": str(sb.tls.ca_path), "objects": ["Account"],
                                         "quota": {"limit_backoff_s": 0.05}})
            cursors = PgCursorStore(infra.pool)
            task = asyncio.create_task(run_listener(conn, pinfra, stop))

            async def subscribed() -> bool:
                return await cursors.load("x", "cdcdb", CDC_SUBSCRIBED) is not None

            await wait_for(subscribed, 20, "the first subscription")
            for rid in accounts[:10]:
                org.update("Account", rid, {"Name": f"before {rid}"})
            await asyncio.sleep(0.5)
            proxy.cut()
            for rid in accounts[10:20]:  # changes while our database is down
                org.update("Account", rid, {"Name": f"during {rid}"})
            await asyncio.sleep(1.5)
            assert not task.done(), "the listener waits; it does not stop"
            proxy.restore()
            for rid in accounts[20:]:
                org.update("Account", rid, {"Name": f"after {rid}"})

            async def all_landed() -> bool:
                names = {r.source_id for r in await read_raw(infra, ("Account",))}
                return set(accounts) <= names

            await wait_for(all_landed, 60, "every change on the broker after the outage", step=0.5)
            stop.set()
            await asyncio.wait_for(task, 15)
        assert proxy.refused > 0, "the listener tried the database during the outage"
    finally:
        stop.set()
        await pool.close()
        await proxy.close()
