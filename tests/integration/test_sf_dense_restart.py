"""Issue 10: on a dense org (tens of thousands of rows inside the re-read window), a poller restarted in a
fresh process publishes, in one incremental poll, only the records that changed. The in-memory dedupe it
replaces (capped at 10,000 rows, per process) re-published the whole window: here every one of the rows."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import pytest
from test_sf_support import add_connection

from sandbox.salesforce import SalesforceState, build_app, seed_org
from sandbox.server import serve
from servicekit.connections import PgCursorStore
from servicekit.db import migrate
from servicekit.kafka import OutMessage
from servicekit.runtime import Infra
from sf_poller.sync import ConnectionSync
from sfconnect.client import build_client, http_client
from sfconnect.config import parse_connection
from sfconnect.published import MIGRATIONS, PgPublishedStore

pytestmark = pytest.mark.integration

ROWS = 20_000


class Counting:
    def __init__(self, inner: Any) -> None:
        self.inner, self.sent = inner, 0

    async def send_all(self, messages: Sequence[OutMessage]) -> Any:
        self.sent += len(messages)
        return await self.inner.send_all(messages)


@pytest.mark.timeout(300)
async def test_restart_on_a_dense_org_publishes_only_the_changes(infra: Infra) -> None:
    await migrate(infra.pool, [MIGRATIONS])
    state = SalesforceState(cometd_timeout_s=1.0)
    org = state.add_org("dense")
    seed_org(state, org, accounts=ROWS, person_accounts=0, contacts=0, products=1, orders=0, seed=9)
    assert sum(1 for _ in org.records("Account", include_deleted=True)) >= ROWS
    async with serve(build_app(state)) as sb:
        settings = {"ca_bundle": str(sb.tls.ca_path), "objects": ["Account"], "cdc": False, "bulk_threshold": 0,
                    # every row is inside the re-read window (a dense org / long overlap)
                    "overlap_s": 10 * 365 * 86400}
        conn = await add_connection(infra, "d", "dense", sb.base_url, org.client_id, org.client_secret, settings)
        cc = parse_connection(conn)
        cursors = PgCursorStore(infra.pool)
        async with http_client(cc) as http:
            first = Counting(infra.publisher)
            sync = ConnectionSync(cc, build_client(cc, http, infra), first, cursors, infra.settings,
                                  store=PgPublishedStore(infra.pool))
            await sync.run_cycle()
            assert first.sent == len(org.tables["Account"])
            changed = [a["Id"] for a in org.records("Account")][:300:10]
            for rid in changed:
                org.update("Account", rid, {"Name": f"changed {rid}"})
            # a fresh process: nothing in memory, the same database
            second = Counting(infra.publisher)
            restarted = ConnectionSync(cc, build_client(cc, http, infra), second, cursors, infra.settings,
                                       store=PgPublishedStore(infra.pool))
            started = time.monotonic()
            await restarted.run_cycle()
            seconds = time.monotonic() - started
        assert second.sent == len(changed), f"published {second.sent} for {len(changed)} changes"
        assert restarted.skipped >= ROWS - len(changed)
        print(f"dense restart: {len(org.tables['Account'])} rows re-read, {second.sent} published, {seconds:.2f}s")
