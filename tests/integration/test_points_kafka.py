"""Resolver + points engine as services on the real broker: canonical events in, ledger entries on
points.ledger out, a parked order flowing on after a member import, duplicates changing nothing."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka import AIOKafkaConsumer
from test_points_engine import customer, member, order, prepare, program, ret

from canonical.events import MemberData, decode_event, encode
from canonical.topics import CANONICAL_CUSTOMER, CANONICAL_ORDER, CANONICAL_RETURN, MEMBERS, POINTS_LEDGER
from points.app import build_service
from points.cli import set_program
from resolver.app import SERVICE as RESOLVER
from resolver.cli import import_members
from servicekit.kafka import OutMessage, ensure_topics
from servicekit.runtime import Infra, run_services


async def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await cond():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.timeout(120)
async def test_resolver_and_points_services_on_the_broker(infra: Infra) -> None:
    await prepare(infra)
    await ensure_topics(infra.bootstrap, infra.settings)
    t = "acme"
    await set_program(infra.pool, program(t))
    s = infra.settings

    def msg(topic: str, e) -> OutMessage:
        return OutMessage(s.topic(topic), encode(e), e.key)

    n = 200
    events = [
        msg(MEMBERS, member(t, "m1", ext="C-1")),
        msg(CANONICAL_CUSTOMER, customer(t, "c1", ext="C-1")),
        msg(CANONICAL_CUSTOMER, customer(t, "c2", email="late@example.com")),
    ]
    await infra.publisher.send_all(events)
    orders = [msg(CANONICAL_ORDER, order(t, f"o{i}", "c1", total=str(10 + i))) for i in range(n)]
    orders.append(msg(CANONICAL_ORDER, order(t, "o-late", "c2", total="50")))
    orders.append(msg(CANONICAL_RETURN, ret(t, "r1", order_id="o0", amount="5")))
    await infra.publisher.send_all(orders)
    await infra.publisher.send_all(orders[:50])  # duplicates on the wire

    stop = asyncio.Event()
    runner = asyncio.create_task(run_services([RESOLVER, build_service(mature_interval_s=0.5)], s, stop=stop))
    try:

        async def count() -> int:
            return int(await infra.pool.fetchval("SELECT count(DISTINCT order_source_id) FROM ledger"))

        await wait_for(lambda: _ge(count, n), 60, f"{n} orders earning")
        assert await infra.pool.fetchval("SELECT count(*) FROM parked WHERE tenant_id = $1", t) == 1
        await import_members(infra.pool, t, [MemberData(member_id="m2", email="LATE@example.com")])
        await wait_for(lambda: _ge(count, n + 1), 20, "the parked order to flow on after the import")
        net = {
            r["order_source_id"]: r["n"]
            for r in await infra.pool.fetch("SELECT order_source_id, sum(points)::int AS n FROM ledger GROUP BY 1")
        }
        assert net["o0"] == 5 and net["o-late"] == 50 and net["o199"] == 209
        assert await infra.pool.fetchval("SELECT count(*) FROM ledger") == n + 2
    finally:
        stop.set()
        assert await asyncio.wait_for(runner, 30) == 0

    consumer = AIOKafkaConsumer(
        s.topic(POINTS_LEDGER), bootstrap_servers=infra.bootstrap, auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()
    got = []
    try:
        deadline = time.monotonic() + 15
        while len(got) < n + 2 and time.monotonic() < deadline:
            for recs in (await consumer.getmany(timeout_ms=500)).values():
                got.extend(decode_event(r.value) for r in recs)
    finally:
        await consumer.stop()
    assert len({e.event_id for e in got}) == n + 2
    assert {e.member_id for e in got} == {"m1", "m2"}


async def _ge(fn, n: int) -> bool:
    return await fn() >= n
