"""Issue 10: PostgreSQL goes away in the middle of a Salesforce poll. The poller's database traffic runs
through a TCP proxy that this test cuts (every connection dropped, new ones refused) for a while: the poller
waits it out (the outage is a Transient, retried), resumes from its last saved cursor, and every record
reaches the broker; the connection is not marked failed."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from urllib.parse import urlparse, urlunparse

import pytest
from test_sf_support import add_connection, read_raw

from sandbox.salesforce import SalesforceState, build_app, seed_org
from sandbox.server import serve
from servicekit.connections import CredentialCipher, PgConnectionStore, PgCursorStore
from servicekit.db import create_pool, migrate
from servicekit.runtime import Infra
from sf_poller.app import run_connection
from sfconnect.published import MIGRATIONS

pytestmark = pytest.mark.integration


class CuttableProxy:
    """Forwards TCP to PostgreSQL; :meth:`cut` drops every connection and refuses new ones until
    :meth:`restore`."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.down = False
        self.pipes: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None
        self.refused = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            self.refused += 1
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        self.pipes.update((writer, up_writer))

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self.pipes.difference_update((writer, up_writer))

    def cut(self) -> None:
        self.down = True
        for w in list(self.pipes):
            w.close()

    def restore(self) -> None:
        self.down = False

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()


@pytest.mark.timeout(180)
async def test_postgres_outage_mid_poll_is_waited_out_and_nothing_is_lost(infra: Infra) -> None:
    await migrate(infra.pool, [MIGRATIONS])
    url = urlparse(infra.settings.database_url or "")
    proxy = CuttableProxy(url.hostname or "127.0.0.1", url.port or 5432)
    port = await proxy.start()
    netloc = url.netloc.rsplit("@", 1)
    host_part = f"127.0.0.1:{port}"
    proxied_dsn = urlunparse(url._replace(netloc=f"{netloc[0]}@{host_part}" if len(netloc) == 2 else host_part))
    pool = await create_pool(proxied_dsn, schema=infra.settings.db_schema, max_size=4)
    pinfra = dataclasses.replace(infra, pool=pool)
    state = SalesforceState(cometd_timeout_s=1.0)
    org = state.add_org("flaky")
    seed_org(state, org, accounts=3000, person_accounts=0, contacts=0, products=1, orders=0, seed=8)
    stop = asyncio.Event()
    try:
        async with serve(build_app(state)) as sb:
            settings = {"ca_bundle": str(sb.tls.ca_path), "objects": ["Account"], "cdc": False,
                        "bulk_threshold": 0, "page_size": 200, "poll_interval_s": 0.2}
            conn = await add_connection(infra, "o", "flaky", sb.base_url, org.client_id, org.client_secret, settings)
            cursors = PgCursorStore(infra.pool)  # the test's own view, not through the proxy
            task = asyncio.create_task(run_connection(conn, pinfra, stop))
            for _ in range(600):  # mid-poll: some pages saved, not all
                if await cursors.load("o", "flaky", "Account"):
                    break
                await asyncio.sleep(0.01)
            proxy.cut()
            at_cut = await cursors.load("o", "flaky", "Account")
            await asyncio.sleep(1.5)
            assert proxy.refused > 0, "the poller tried the database during the outage"
            assert not task.done(), "the poller waits; it does not stop"
            proxy.restore()
            newest = max(a["SystemModstamp"] for a in org.tables["Account"].values())
            from sandbox.salesforce.clock import rest_datetime
            from sfconnect.records import norm_ts
            want = norm_ts(rest_datetime(newest))
            for _ in range(1500):
                cur = await cursors.load("o", "flaky", "Account")
                if cur and cur.get("ts") == want:
                    break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError(f"the poll never finished after the outage: {cur}")
            assert at_cut is not None and at_cut.get("ts") != want, "the outage hit the middle of the poll"
            stop.set()
            await asyncio.wait_for(task, 10)
        records = await read_raw(infra, ("Account",))
        assert {r.source_id for r in records} == set(org.tables["Account"]), "nothing lost"
        store = PgConnectionStore(infra.pool, CredentialCipher.from_settings(infra.settings))
        assert (await store.get("o", "flaky")).state != "failed"
    finally:
        stop.set()
        await pool.close()
        await proxy.close()
