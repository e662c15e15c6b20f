"""Work assignment on the in-memory lease store: even shares, failover after the lease time, handing a
connection over only after its runner stopped, and per-tenant fairness."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from servicekit.errors import InfrastructureUnavailable
from servicekit.leases import (
    ConnectionLeases,
    FakeLeaseStore,
    Key,
    TenantGate,
    current_lease,
    supervise_leased,
    tenant_slot,
)

pytestmark = pytest.mark.unit

S = "ce-poller"


def keys(n: int, tenants: int = 1) -> list[Key]:
    return [(f"t{i % tenants}", f"c{i}") for i in range(n)]


async def settle(copies: list[ConnectionLeases], live: list[Key], rounds: int = 4) -> dict[str, set[Key]]:
    owned: dict[str, set[Key]] = {}
    for _ in range(rounds):
        for c in copies:
            plan = await c.rebalance(live)
            if plan.give_up:
                await c.release(plan.give_up)
            owned[c.holder] = set(plan.owned)
    return owned


async def test_copies_share_connections_evenly_and_each_is_owned_once() -> None:
    store = FakeLeaseStore()
    copies = [ConnectionLeases(store, S, f"copy-{i}", ttl_s=10) for i in range(3)]
    live = keys(10, tenants=3)
    owned = await settle(copies, live)
    assert sorted(len(v) for v in owned.values()) == [3, 3, 4]
    assert set().union(*owned.values()) == set(live)
    assert sum(len(v) for v in owned.values()) == 10  # nobody owns a connection twice


async def test_a_new_copy_gets_its_share_from_the_first() -> None:
    store = FakeLeaseStore()
    a, b = ConnectionLeases(store, S, "a", ttl_s=10), ConnectionLeases(store, S, "b", ttl_s=10)
    live = keys(8, tenants=2)
    assert len((await settle([a], live))["a"]) == 8
    owned = await settle([a, b], live)
    assert (len(owned["a"]), len(owned["b"])) == (4, 4)
    # each tenant's connections are spread over both copies
    for holder in ("a", "b"):
        assert Counter(k[0] for k in owned[holder]) == {"t0": 2, "t1": 2}


async def test_a_dead_copys_connections_move_after_the_lease_time() -> None:
    store = FakeLeaseStore()
    copies = [ConnectionLeases(store, S, f"copy-{i}", ttl_s=10, clock=lambda: store.now) for i in range(3)]
    live = keys(9)
    owned = await settle(copies, live)
    dead = copies.pop(1)  # stops heartbeating and renewing: killed
    store.now += 5
    owned = await settle(copies, live, rounds=1)
    assert set().union(*owned.values()).isdisjoint(owned_by_dead := set(dead.held))  # not before expiry
    assert len(owned_by_dead) == 3
    store.now += 6  # past the lease time
    owned = await settle(copies, live, rounds=2)
    assert sorted(len(v) for v in owned.values()) == [4, 5]
    assert set().union(*owned.values()) == set(live)


async def test_a_copy_that_lost_its_lease_sees_it_lost_and_locally_expired() -> None:
    now = [0.0]
    store = FakeLeaseStore(clock=lambda: now[0])
    a = ConnectionLeases(store, S, "a", ttl_s=10, clock=lambda: now[0])
    await a.rebalance([("t", "c")])
    assert a.expired() == []
    now[0] = 9.5  # past 90% of the lease without a confirmed renewal: stop before anyone else may start
    assert a.expired() == [("t", "c")]
    now[0] = 11
    b = ConnectionLeases(store, S, "b", ttl_s=10, clock=lambda: now[0])
    assert set((await b.rebalance([("t", "c")])).owned) == {("t", "c")}
    plan = await a.rebalance([("t", "c")])
    assert plan.lost == [("t", "c")] and plan.owned == {}


async def test_supervisor_never_runs_a_connection_in_two_copies_and_fails_over() -> None:
    store = FakeLeaseStore(clock=time.monotonic)
    live = {k: k for k in keys(6, tenants=2)}
    running: Counter[Key] = Counter()
    overlap: list[Key] = []
    tokens: dict[Key, int] = {}

    async def run(item: Key) -> None:
        lease = current_lease()
        assert lease is not None and (lease.tenant_id, lease.connection_id) == item
        assert lease.token > tokens.get(item, 0)  # a new owner always has a greater fencing token
        tokens[item] = lease.token
        running[item] += 1
        if running[item] > 1:
            overlap.append(item)
        try:
            await asyncio.Event().wait()
        finally:
            running[item] -= 1

    async def list_live() -> dict[Key, Key]:
        return live

    stops = [asyncio.Event() for _ in range(3)]
    copies = [ConnectionLeases(store, S, f"copy-{i}", ttl_s=0.6) for i in range(3)]
    tasks = [asyncio.create_task(supervise_leased(c, s, list_live=list_live, run=run, fingerprint=str, relist_s=0.1,
                                              stop_grace_s=0.1))
             for c, s in zip(copies, stops, strict=True)]
    await asyncio.sleep(1.0)
    assert sum(running.values()) == 6 and max(running.values()) == 1
    assert sorted(len(c.held) for c in copies) == [2, 2, 2]
    # copy 0 is "killed": its task is cancelled without releasing anything (as if the process died)
    victim = copies[0]
    victim_keys = set(victim.held)
    victim.close = _no_release  # type: ignore[method-assign]
    tasks[0].cancel()
    await asyncio.gather(tasks[0], return_exceptions=True)
    await asyncio.sleep(1.5)  # lease time 0.6 s + a round
    assert victim_keys <= set(copies[1].held) | set(copies[2].held)
    assert sorted(len(c.held) for c in copies[1:]) == [3, 3]
    assert sum(running.values()) == 6
    for s in stops[1:]:
        s.set()
    await asyncio.gather(*tasks[1:])
    assert overlap == []
    assert await store.owners(S) == {}  # a clean stop releases every lease


async def _no_release() -> None:
    return None


async def test_supervisor_stops_runners_when_the_database_is_gone_longer_than_the_lease() -> None:
    store = FakeLeaseStore(clock=time.monotonic)
    leases = ConnectionLeases(store, S, "a", ttl_s=0.5)
    stopped = asyncio.Event()

    async def run(item: Key) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            stopped.set()

    down = False

    async def list_live() -> dict[Key, Key]:
        if down:
            raise InfrastructureUnavailable("database down")
        return {("t", "c"): ("t", "c")}

    stop = asyncio.Event()
    task = asyncio.create_task(supervise_leased(leases, stop, list_live=list_live, run=run, fingerprint=str,
                                                relist_s=0.1))
    await asyncio.sleep(0.3)
    assert not stopped.is_set()
    down = True
    await asyncio.wait_for(stopped.wait(), 2.0)
    stop.set()
    await task


async def test_one_tenants_backfill_does_not_starve_another_tenants_reads() -> None:
    store = FakeLeaseStore(clock=time.monotonic)
    gate = TenantGate(2)
    live = {**{("big", f"c{i}"): ("big", f"c{i}") for i in range(6)}, ("small", "c0"): ("small", "c0")}
    small_cycles = 0

    async def run(item: Key) -> None:
        nonlocal small_cycles
        while True:
            async with tenant_slot(item[0]):
                if item[0] == "big":
                    await asyncio.sleep(10)  # a long backfill page
                else:
                    small_cycles += 1
                    await asyncio.sleep(0.01)

    async def list_live() -> dict[Key, Key]:
        return live

    stop = asyncio.Event()
    task = asyncio.create_task(supervise_leased(ConnectionLeases(store, S, "a", ttl_s=3), stop, list_live=list_live,
                                                run=run, fingerprint=str, gate=gate, stop_grace_s=0.1))
    await asyncio.sleep(0.5)
    stop.set()
    await task
    assert gate.peak["big"] == 2  # the backfilling tenant holds at most its own slots
    assert small_cycles >= 10  # the other tenant kept reading meanwhile
