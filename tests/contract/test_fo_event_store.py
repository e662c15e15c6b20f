"""One contract for the fo-poller's EventStore port (Business Events received), against the fake and the
PostgreSQL adapter alike."""

from __future__ import annotations

import datetime as dt

import pytest

from fo_poller.app import MIGRATIONS
from fo_poller.events import Announcement, EventStore, FakeEventStore, PgEventStore
from servicekit.db import migrate
from servicekit.runtime import Infra

T = dt.datetime(2026, 12, 5, 12, 0, tzinfo=dt.UTC)


@pytest.fixture(params=["fake", "postgres"])
async def store(request: pytest.FixtureRequest, infra: Infra) -> EventStore:
    if request.param == "fake":
        return FakeEventStore()
    await migrate(infra.pool, [MIGRATIONS])
    return PgEventStore(infra.pool)


def _a(n: int, number: str = "SO-1", company: str = "usmf") -> Announcement:
    return Announcement(n, "SalesInvoicePostedBusinessEvent", company, number)


async def test_a_control_number_is_accepted_once(store: EventStore) -> None:
    assert await store.accept("acme", "fo-1", _a(5637144576), T)
    assert not await store.accept("acme", "fo-1", _a(5637144576, "SO-2"), T)  # a replay, whatever it says
    assert await store.accept("acme", "fo-1", _a(5637144580), T)  # gaps are fine
    assert await store.accept("acme", "fo-1", _a(5637144578), T)  # so is out-of-order delivery


async def test_pending_until_done_in_control_number_order(store: EventStore) -> None:
    for n in (30, 10, 20):
        await store.accept("acme", "fo-1", _a(n, f"SO-{n}"), T)
    assert [a.control_number for a in await store.pending("acme", "fo-1")] == [10, 20, 30]
    await store.done("acme", "fo-1", [10, 30])
    assert await store.pending("acme", "fo-1") == [_a(20, "SO-20")]
    await store.done("acme", "fo-1", [])


async def test_isolated_by_tenant_and_connection(store: EventStore) -> None:
    assert await store.accept("acme", "fo-1", _a(1), T)
    assert await store.accept("globex", "fo-1", _a(1), T)
    assert await store.accept("acme", "fo-2", _a(1), T)
    await store.done("acme", "fo-1", [1])
    assert await store.pending("acme", "fo-1") == []
    assert [a.control_number for a in await store.pending("globex", "fo-1")] == [1]
    assert [a.control_number for a in await store.pending("acme", "fo-2")] == [1]
