"""Contracts of the connector kit's ports, run against the fakes and the PostgreSQL adapters alike: the
published-versions ledger, the kit's cursor store, and a database outage surfacing as
InfrastructureUnavailable (which the runner waits out)."""

from __future__ import annotations

import pytest

from connectorkit import MIGRATIONS
from connectorkit.cursors import FakePublishedVersions, PgCursorStore, PgPublishedVersions, PublishedVersions
from servicekit.db import create_pool, migrate
from servicekit.errors import InfrastructureUnavailable
from servicekit.runtime import Infra


@pytest.fixture(params=["fake", "postgres"])
async def versions(request: pytest.FixtureRequest, infra: Infra) -> PublishedVersions:
    if request.param == "fake":
        return FakePublishedVersions()
    await migrate(infra.pool, [MIGRATIONS])
    return PgPublishedVersions(infra.pool)


async def test_unseen_until_recorded_then_only_changed_versions(versions: PublishedVersions) -> None:
    assert await versions.unseen("acme", "c1", "Order", [("a", "1"), ("b", "1")]) == {"a", "b"}
    await versions.record("acme", "c1", "Order", [("a", "1"), ("b", "1")])
    assert await versions.unseen("acme", "c1", "Order", [("a", "1"), ("b", "2"), ("c", "1")]) == {"b", "c"}
    await versions.record("acme", "c1", "Order", [("b", "2")])
    assert await versions.unseen("acme", "c1", "Order", [("a", "1"), ("b", "2")]) == set()


async def test_versions_are_isolated_by_tenant_connection_and_stream(versions: PublishedVersions) -> None:
    await versions.record("acme", "c1", "Order", [("a", "1")])
    assert await versions.unseen("globex", "c1", "Order", [("a", "1")]) == {"a"}
    assert await versions.unseen("acme", "c2", "Order", [("a", "1")]) == {"a"}
    assert await versions.unseen("acme", "c1", "Account", [("a", "1")]) == {"a"}


async def test_a_database_outage_is_infrastructure_unavailable(infra: Infra) -> None:
    pool = await create_pool(str(infra.database_url), schema=infra.settings.db_schema, max_size=1)
    await pool.close()
    with pytest.raises(InfrastructureUnavailable):
        await PgCursorStore(pool).load("acme", "c1", "Order")
    with pytest.raises(InfrastructureUnavailable):
        await PgPublishedVersions(pool).unseen("acme", "c1", "Order", [("a", "1")])
