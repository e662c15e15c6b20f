"""One contract for the CursorStore port, run against the recording fake and the PostgreSQL adapter alike."""

from __future__ import annotations

import asyncio

import pytest

from servicekit.connections import CursorStore, FakeCursorStore, PgCursorStore
from servicekit.leases import Lease
from servicekit.runtime import Infra


@pytest.fixture(params=["fake", "postgres"])
async def store(request: pytest.FixtureRequest, infra: Infra) -> CursorStore:
    return FakeCursorStore() if request.param == "fake" else PgCursorStore(infra.pool)


async def test_missing_cursor_loads_as_none(store: CursorStore) -> None:
    assert await store.load("acme", "c1", "salesorder") is None


async def test_save_then_load_round_trips_json(store: CursorStore) -> None:
    cursor = {"delta_link": "https://org/api/data/v9.2/salesorders?$deltatoken=919042%2108", "page": 3,
              "started_at": "2026-11-23T10:00:00Z", "nested": {"ids": ["a", "b"]}}
    await store.save("acme", "c1", "salesorder", cursor)
    assert await store.load("acme", "c1", "salesorder") == cursor


async def test_save_replaces_and_clear_removes(store: CursorStore) -> None:
    await store.save("acme", "c1", "salesorder", {"page": 1})
    await store.save("acme", "c1", "salesorder", {"page": 2})
    assert await store.load("acme", "c1", "salesorder") == {"page": 2}
    await store.clear("acme", "c1", "salesorder")
    assert await store.load("acme", "c1", "salesorder") is None


async def test_cursors_are_isolated_by_tenant_connection_and_entity(store: CursorStore) -> None:
    await store.save("acme", "c1", "salesorder", {"v": "acme"})
    await store.save("globex", "c1", "salesorder", {"v": "globex"})
    await store.save("acme", "c2", "salesorder", {"v": "c2"})
    await store.save("acme", "c1", "account", {"v": "account"})
    assert await store.load("acme", "c1", "salesorder") == {"v": "acme"}
    assert await store.load("globex", "c1", "salesorder") == {"v": "globex"}
    assert await store.load("acme", "c2", "salesorder") == {"v": "c2"}
    assert await store.load("acme", "c1", "account") == {"v": "account"}


async def test_under_a_lease_only_its_current_holder_moves_the_cursor(infra: Infra) -> None:
    """Fencing: a copy whose lease expired and was taken by another copy cannot move the cursor."""
    from servicekit.leases import ConnectionLeases, LeaseLost, PgLeaseStore, work_context

    store = PgCursorStore(infra.pool)
    leases = PgLeaseStore(infra.pool)
    old = ConnectionLeases(leases, "ce-poller", "old-copy", ttl_s=30)
    await old.rebalance([("acme", "c1")])
    old_lease = old.lease(("acme", "c1"))

    async def save_as(lease: Lease, page: int) -> None:
        await asyncio.get_running_loop().create_task(store.save("acme", "c1", "salesorder", {"page": page}),
                                                     context=work_context(lease))

    await save_as(old_lease, 1)
    assert await store.load("acme", "c1", "salesorder") == {"page": 1}
    # the old copy stalls past its lease; a new copy takes the connection over
    await infra.pool.execute("UPDATE connection_leases SET expires_at = now() - interval '1 second'")
    new = ConnectionLeases(leases, "ce-poller", "new-copy", ttl_s=30)
    await new.rebalance([("acme", "c1")])
    new_lease = new.lease(("acme", "c1"))
    assert new_lease.token > old_lease.token
    await save_as(new_lease, 2)
    with pytest.raises(LeaseLost, match="was not moved"):
        await save_as(old_lease, 99)
    assert await store.load("acme", "c1", "salesorder") == {"page": 2}
    # clearing is fenced the same way
    with pytest.raises(LeaseLost):
        await asyncio.get_running_loop().create_task(store.clear("acme", "c1", "salesorder"),
                                                     context=work_context(old_lease))
    assert await store.load("acme", "c1", "salesorder") == {"page": 2}
