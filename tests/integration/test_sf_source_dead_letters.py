"""Issue 10: Salesforce source dead letters and their replay. A credit memo whose OrderSummary this
connection cannot read (a wrong reference) is dead-lettered by the poller (``dlq.sf-poller.v1`` and
``dead_letters`` with ``x-flash-refetch``, saying what to fix) instead of going out unanchored; re-reading the
overlap window does not dead-letter it again; ``flash dlq replay`` re-reads it from Salesforce through the
connector: still broken, it stays pending; fixed, the fresh record lands exactly once (one event id)."""

from __future__ import annotations

import asyncio
import json

import pytest
from test_sf_support import add_connection, read_raw

from connectorkit import MIGRATIONS as KIT_MIGRATIONS
from controlplane.cli import main
from normalizer.mappers.salesforce import map_record
from sandbox.salesforce import SalesforceState, build_app, create_credit_memo, seed_org
from sandbox.server import serve
from servicekit.connections import PgCursorStore
from servicekit.db import migrate
from servicekit.kafka import ensure_topics
from servicekit.runtime import Infra
from sf_poller.sync import ConnectionSync
from sfconnect.client import build_client, http_client
from sfconnect.config import parse_connection
from sfconnect.deadletters import KitDeadLetters
from sfconnect.published import MIGRATIONS, PgPublishedStore

pytestmark = pytest.mark.integration


async def flash(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


@pytest.mark.timeout(120)
async def test_unanchored_credit_memo_is_dead_lettered_and_replayed_once(
        infra: Infra, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for k, v in {"FLASH_DATABASE_URL": str(infra.settings.database_url), "FLASH_DB_SCHEMA": infra.settings.db_schema,
                 "FLASH_TOPIC_PREFIX": infra.settings.topic_prefix, "FLASH_KAFKA_BOOTSTRAP": infra.bootstrap,
                 "FLASH_STATE_DIR": str(infra.settings.state_dir)}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("FLASH_SECRET_KEY", raising=False)
    await migrate(infra.pool, [KIT_MIGRATIONS, MIGRATIONS])
    await ensure_topics(infra.bootstrap, infra.settings)
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
                                  dead_letters=KitDeadLetters(infra.pool, infra.publisher, infra.settings, "sf-poller"))
            await sync.run_cycle()
            await sync.run_cycle()  # the overlap window reads it again: no second dead letter
        rows = await infra.pool.fetch("SELECT * FROM dead_letters WHERE consumer = 'sf-poller'")
        assert len(rows) == 1
        letter = rows[0]
        assert letter["entity"] == "CreditMemo" and letter["error_class"] == "SourceUnreadable"
        assert "OrderSummary" in letter["error_message"] and "replay" in letter["error_message"]
        headers = dict(json.loads(letter["headers"]))
        assert json.loads(headers["x-flash-refetch"])["locator"] == {"object": "CreditMemo", "id": memo}
        assert memo not in {r.source_id for r in await read_raw(infra, ("CreditMemo",))}

        capsys.readouterr()
        assert await flash("dlq", "replay", "--consumer", "sf-poller") == 1  # not fixed yet: stays pending
        assert memo not in {r.source_id for r in await read_raw(infra, ("CreditMemo",))}

        org.update("CreditMemo", memo, {"ReferenceEntityId": summary["Id"]})  # fixed at the source
        assert await flash("dlq", "replay", "--consumer", "sf-poller") == 0
        assert "replayed 1 dead letter(s)" in capsys.readouterr().out
        assert await flash("dlq", "replay", "--consumer", "sf-poller") == 0
        assert "replayed 0 dead letter(s)" in capsys.readouterr().out
        landed = [r for r in await read_raw(infra, ("CreditMemo",)) if r.source_id == memo]
        assert len({r.event_id for r in landed}) == 1, "the fixed record lands once (one event id)"
        (_, ev), = map_record(landed[0], settings).events
        assert ev.return_.original_order_source_id == summary["OriginalOrderId"]
