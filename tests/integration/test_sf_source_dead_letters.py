"""Issue 10: Salesforce source dead letters and their replay. A credit memo whose OrderSummary this
connection cannot read (a wrong reference) is dead-lettered by the poller (``dlq.sf-poller.v1`` and
``dead_letters``, saying what to fix) instead of going out unanchored; re-reading the overlap window does
not dead-letter it again; after the fix, the replay re-reads the record from Salesforce and the fixed
record lands exactly once."""

from __future__ import annotations

import pytest
from test_sf_support import add_connection, read_raw

from normalizer.mappers.salesforce import map_record
from sandbox.salesforce import SalesforceState, build_app, create_credit_memo, seed_org
from sandbox.server import serve
from servicekit.connections import PgCursorStore
from servicekit.db import migrate
from servicekit.runtime import Infra
from sf_poller.sync import ConnectionSync
from sfconnect import deadletters
from sfconnect.client import build_client, http_client
from sfconnect.config import parse_connection
from sfconnect.deadletters import PgDeadLetters
from sfconnect.published import MIGRATIONS, PgPublishedStore

pytestmark = pytest.mark.integration


@pytest.mark.timeout(120)
async def test_unanchored_credit_memo_is_dead_lettered_and_replayed_once(infra: Infra) -> None:
    await migrate(infra.pool, [MIGRATIONS])
    state = SalesforceState(cometd_timeout_s=1.0)
    org = state.add_org("om")
    seed_org(state, org, orders=20, seed=61, mode="order_management")
    summary = next(s for s in org.records("OrderSummary"))
    item = next(iter(org.children("OrderItemSummary", "OrderSummaryId", summary["Id"])))
    memo = create_credit_memo(org, summary["Id"], [(item, 5.0)])
    # the memo names an OrderSummary this connection cannot read (another org's id pasted by an admin)
    org.update("CreditMemo", memo, {"ReferenceEntityId": "1Os000000000001AAA"})
    async with serve(build_app(state)) as sb:
        settings = {"ca_bundle": str(sb.tls.ca_path), "objects": ["CreditMemo"], "mode": "order_management",
                    "cdc": False, "bulk_threshold": 0}
        conn = await add_connection(infra, "om", "sf-om", sb.base_url, org.client_id, org.client_secret, settings)
        cc = parse_connection(conn)
        async with http_client(cc) as http:
            sync = ConnectionSync(cc, build_client(cc, http, infra), infra.publisher, PgCursorStore(infra.pool),
                                  infra.settings, store=PgPublishedStore(infra.pool),
                                  dead_letters=PgDeadLetters(infra.pool, infra.publisher, infra.settings))
            await sync.run_cycle()
            await sync.run_cycle()  # the overlap window reads it again: no second dead letter
            rows = await infra.pool.fetch("SELECT * FROM dead_letters WHERE consumer = 'sf-poller'")
            assert len([r for r in rows if memo.encode() in bytes(r["value"])]) == 1
            letter = next(r for r in rows if memo.encode() in bytes(r["value"]))
            assert "OrderSummary" in letter["error_message"] and "replay" in letter["error_message"]
            assert memo not in {r.source_id for r in await read_raw(infra, ("CreditMemo",))}

            org.update("CreditMemo", memo, {"ReferenceEntityId": summary["Id"]})  # fixed at the source
            assert await deadletters.replay(infra.pool, sync, "om", "sf-om") == 1
            assert await deadletters.replay(infra.pool, sync, "om", "sf-om") == 0  # nothing left to replay
            await sync.run_cycle()  # the poll sees the fixed version too: already published, not sent again
        landed = [r for r in await read_raw(infra, ("CreditMemo",)) if r.source_id == memo]
        assert len(landed) == 1, "the fixed record lands exactly once"
        (_, ev), = map_record(landed[0], settings).events
        assert ev.return_.original_order_source_id == summary["OriginalOrderId"]
