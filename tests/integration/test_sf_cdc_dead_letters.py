"""Issue 10/11: the CDC listener dead-letters a message it cannot read (no ``ChangeEventHeader``) on the kit's
path (``dlq.cdc-listener.v1`` + ``dead_letters``, ``x-flash-refetch`` naming the object and the channel's
last commit time) before its replay id moves; ``flash dlq replay`` re-reads the object from Salesforce
since that time, publishes the fresh records and marks the letter replayed."""

from __future__ import annotations

import asyncio
import json

import pytest
from test_sf_support import add_connection, read_raw

from cdc_listener.app import aiohttp_session, listener_for
from connectorkit import MIGRATIONS as KIT_MIGRATIONS
from controlplane.cli import main
from sandbox.salesforce import SalesforceState, build_app, seed_org
from sandbox.server import serve
from servicekit.connections import PgCursorStore
from servicekit.db import migrate
from servicekit.kafka import ensure_topics
from servicekit.runtime import Infra
from sfconnect.client import build_client, http_client
from sfconnect.config import parse_connection
from sfconnect.published import MIGRATIONS

pytestmark = pytest.mark.integration


@pytest.mark.timeout(120)
async def test_unreadable_change_event_is_dead_lettered_then_replayed_by_reading_the_object(
        infra: Infra, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for k, v in {"FLASH_DATABASE_URL": str(infra.settings.database_url), "FLASH_DB_SCHEMA": infra.settings.db_schema,
                 "FLASH_TOPIC_PREFIX": infra.settings.topic_prefix, "FLASH_KAFKA_BOOTSTRAP": infra.bootstrap,
                 "FLASH_STATE_DIR": str(infra.settings.state_dir)}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("FLASH_SECRET_KEY", raising=False)
    await migrate(infra.pool, [KIT_MIGRATIONS, MIGRATIONS])
    await ensure_topics(infra.bootstrap, infra.settings)
    state = SalesforceState(cometd_timeout_s=0.5)
    org = state.add_org("cdcdl")
    seed_org(state, org, accounts=6, person_accounts=0, contacts=0, products=1, orders=0, seed=93)
    async with serve(build_app(state)) as sb:
        conn = await add_connection(infra, "d", "cdcdl", sb.base_url, org.client_id, org.client_secret,
                                    {"ca_bundle": str(sb.tls.ca_path), "objects": ["Account"]})
        cc = parse_connection(conn)
        async with http_client(cc) as http, aiohttp_session(cc) as session:
            listener = listener_for(cc, build_client(cc, http, infra), infra, session)
            broken = {"channel": "/data/AccountChangeEvent", "data": {"payload": {"Name": "?"},
                                                                      "event": {"replayId": 4242}}}
            await listener.handle([broken])
        rows = await infra.pool.fetch("SELECT * FROM dead_letters WHERE consumer = 'cdc-listener'")
        assert len(rows) == 1 and rows[0]["entity"] == "Account"
        assert rows[0]["error_class"] == "UnreadableChangeEvent" and "ChangeEventHeader" in rows[0]["error_message"]
        locator = json.loads(dict(json.loads(rows[0]["headers"]))["x-flash-refetch"])["locator"]
        assert locator["object"] == "Account" and locator["replay_id"] == "4242"
        # the replay id moved past the message, after the letter was indexed (ordering: test_sf_cdc_events)
        saved = await PgCursorStore(infra.pool).load("d", "cdcdl", "cdc:/data/AccountChangeEvent")
        assert saved == {"replay_id": 4242}
        assert await read_raw(infra, ("Account",)) == []

        capsys.readouterr()
        assert await asyncio.to_thread(main, ["dlq", "replay", "--consumer", "cdc-listener"]) == 0
        assert "replayed 1 dead letter(s)" in capsys.readouterr().out
        landed = {r.source_id for r in await read_raw(infra, ("Account",))}
        assert landed == {a["Id"] for a in org.records("Account", include_deleted=True)}
