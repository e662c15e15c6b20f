"""One contract for the CursorStore port, run against the recording fake and the PostgreSQL adapter alike."""

from __future__ import annotations

import pytest

from servicekit.connections import CursorStore, FakeCursorStore, PgCursorStore
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
