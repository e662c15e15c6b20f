"""The CDC listener against the sandbox's CometD over HTTPS, publishing to the real broker: creates and
updates fetched back in full, replay ids saved only after the broker's acks, gap and overflow events,
a dropped stream, a kill/restart mid-stream without loss, and a replay id past retention."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from test_sf_support import add_connection, read_raw, wait_for

from cdc_listener.app import aiohttp_session, listener_for
from cdc_listener.listener import CdcListener
from sandbox.salesforce import (
    SalesforceState,
    build_app,
    cancel_order,
    create_order,
    create_return,
    seed_org,
    set_order_status,
)
from sandbox.server import serve
from servicekit.connections import PgCursorStore
from servicekit.db import migrate
from servicekit.runtime import Infra
from sfconnect.client import build_client, http_client
from sfconnect.config import CDC_SUBSCRIBED, SfConnection, parse_connection
from sfconnect.published import MIGRATIONS as SF_MIGRATIONS
from sfconnect.records import norm_ts


class Running:
    """A listener task with its own HTTP clients (a process, as far as the org can tell)."""

    def __init__(self, cc: SfConnection, infra: Infra) -> None:
        self.cc, self.infra = cc, infra
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.listener: CdcListener | None = None
        self.checks: list[tuple[int, Any]] = []

    async def start(self) -> Running:
        self._http = http_client(self.cc)
        self._session = aiohttp_session(self.cc)
        client = build_client(self.cc, self._http, self.infra)
        self.listener = listener_for(self.cc, client, self.infra, self._session)
        cursors = PgCursorStore(self.infra.pool)

        async def on_batch(events: list[dict[str, Any]]) -> None:
            # published and acknowledged, not yet checkpointed: the stored replay id is still older
            ch = events[-1]["channel"]
            stored = await cursors.load(self.cc.tenant_id, self.cc.connection_id, f"cdc:{ch}")
            self.checks.append((int(events[-1]["data"]["event"]["replayId"]), stored and stored["replay_id"]))

        self.listener.on_batch = on_batch
        self.task = asyncio.create_task(self.listener.run(self.stop))
        return self

    async def kill(self) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self._session.close()
        await self._http.aclose()


@pytest.mark.timeout(120)
async def test_cdc_listener_end_to_end_on_the_broker(infra: Infra) -> None:
    await migrate(infra.pool, [SF_MIGRATIONS])
    state = SalesforceState(cometd_timeout_s=0.5)
    org = state.add_org("acme")
    seed_org(state, org, orders=40, seed=31)
    t, cid = "acme", "sf-cdc"
    async with serve(build_app(state)) as sb:
        conn = await add_connection(infra, t, cid, sb.base_url, org.client_id, org.client_secret,
                                    {"ca_bundle": str(sb.tls.ca_path), "quota": {"limit_backoff_s": 0.05}})
        cc = parse_connection(conn)
        cursors = PgCursorStore(infra.pool)
        run = await Running(cc, infra).start()
        await wait_for(lambda: _has(cursors, t, cid, CDC_SUBSCRIBED), 10, "the first subscription")
        accounts = [a["Id"] for a in org.records("Account")]
        products = [p["Id"] for p in org.records("Product2") if p["IsActive"]]
        o1 = create_order(org, accounts[0], [(products[0], 2.0), (products[1], 1.0)])
        o2 = create_order(org, accounts[1], [(products[2], 1.0)])
        set_order_status(org, o1, "Fulfilled")
        cancel_order(org, o2)
        item = next(iter(org.children("OrderItem", "OrderId", o1)))
        ret = create_return(org, o1, [(item, 1.0, "Damaged")], status="Closed")
        acc = org.create("Account", {"Name": "Streamed GmbH", "AccountNumber": "B-STREAM", "IsPersonAccount": False})

        async def published(ids: set[str], versions: bool = True) -> bool:
            recs = await read_raw(infra)
            have = {(r.source_id, r.source_version) for r in recs}
            want = {(i, _rest(org, i)) for i in ids}
            return want <= have if versions else ids <= {r.source_id for r in recs}

        line_ids = set(org.children("OrderItem", "OrderId", o1)) | set(org.children("ReturnOrderLineItem",
                                                                                     "ReturnOrderId", ret))
        await wait_for(lambda: published({o1, o2, acc, *line_ids}), 20, "creates and updates at their last version")
        recs = await read_raw(infra)
        o1_final = [r for r in recs if r.source_id == o1 and r.source_version == _rest(org, o1)]
        assert '"Status":"Fulfilled"' in o1_final[0].payload and '"TotalAmount"' in o1_final[0].payload  # full record
        assert [r for r in recs if r.source_id == o2][-1].payload.count('"Status":"Cancelled"') == 1
        # replay ids were stored only after the batch was acknowledged
        assert run.checks and all(stored is None or stored < rid for rid, stored in run.checks)
        saved = await cursors.load(t, cid, "cdc:/data/OrderChangeEvent")
        assert saved is not None and saved["replay_id"] >= max(e.replay_id for e in org.events if e.entity == "Order")

        # a gap event is re-read through REST; an overflow runs a SOQL reconcile of the object
        assert run.listener is not None
        fetched = run.listener.stats.fetched
        org.emit_gap("Order", [o1])
        org.emit_overflow("Account")
        await wait_for(lambda: _true(run.listener.reconciles and run.listener.stats.fetched > fetched), 10,  # type: ignore[union-attr]
                       "gap fetch and overflow reconcile")
        assert run.listener.reconciles[-1][0] == "Account"

        # a dropped stream re-handshakes and resumes from the stored replay ids
        handshakes = run.listener.handshakes
        state.drop_streams("acme")
        o3 = create_order(org, accounts[2], [(products[0], 3.0)])
        await wait_for(lambda: published({o3}), 15, "an order after the drop")
        assert run.listener.handshakes > handshakes

        # kill the listener mid-stream while orders keep coming, restart it: nothing lost
        created: list[str] = []
        rng = random.Random(5)

        async def mutate(n: int) -> None:
            for _ in range(n):
                created.append(create_order(org, rng.choice(accounts), [(rng.choice(products), 1.0)]))
                await asyncio.sleep(0.01)

        writer = asyncio.create_task(mutate(60))
        await asyncio.sleep(0.25)
        await run.kill()
        await asyncio.sleep(0.2)
        run2 = await Running(cc, infra).start()
        await writer
        await wait_for(lambda: published(set(created)), 30, "every order created around the kill")

        # past retention: the stored replay id is rejected; the listener reconciles by SOQL and says so
        await run2.kill()
        state.advance_clock(73 * 3600)
        org.update("Account", acc, {"Phone": "+49 30 1234567"})
        run3 = await Running(cc, infra).start()
        await wait_for(lambda: published({acc}), 20, "the change made while the replay id expired")
        assert run3.listener is not None and any(obj == "Account" for obj, _ in run3.listener.reconciles)
        await run3.kill()


def _rest(org: Any, rid: str) -> str:
    from sandbox.salesforce.clock import rest_datetime

    return norm_ts(rest_datetime(org.lookup(rid)["SystemModstamp"])) or ""


async def _has(cursors: PgCursorStore, t: str, cid: str, entity: str) -> bool:
    return await cursors.load(t, cid, entity) is not None


async def _true(value: Any) -> bool:
    return bool(value)
