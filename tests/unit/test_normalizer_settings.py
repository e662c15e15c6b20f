"""The normalizer refuses records of unknown tenants or connections (never maps them with empty settings),
its settings cache is bounded, and a payload nested beyond the limit is a dead letter, not a crash."""

from __future__ import annotations

from typing import Any

import pytest

from canonical.events import RawRecord
from normalizer.handlers import SettingsCache, make_handler, map_raw
from servicekit.consumer import Delivery
from servicekit.errors import Poison


class FakeConn:
    def __init__(self, rows: dict[tuple[str, str], dict[str, Any]]) -> None:
        self.rows = rows
        self.queries = 0

    async def fetch(self, sql: str, tenants: list[str], ids: list[str]) -> list[dict[str, Any]]:
        self.queries += 1
        return [{"tenant_id": t, "connection_id": c, "settings": self.rows[(t, c)]}
                for t, c in zip(tenants, ids, strict=True) if (t, c) in self.rows]


class FakeUow:
    def __init__(self, conn: FakeConn) -> None:
        self.conn = conn
        self.emitted: list[Any] = []

    def emit(self, topic: str, event: Any) -> None:
        self.emitted.append((topic, event))


def raw(tenant: str, connection: str, payload: str = "{}") -> RawRecord:
    return RawRecord(tenant_id=tenant, connection_id=connection, source="dynamics-ce", entity="account",
                     source_id="a1", source_version="1", payload=payload)


async def test_a_record_of_an_unknown_connection_is_refused_with_a_reason() -> None:
    uow = FakeUow(FakeConn({("acme", "ce"): {}}))
    handler = make_handler(SettingsCache())
    with pytest.raises(Poison, match="no connection 'ghost' for tenant 'acme'"):
        await handler([Delivery(raw("acme", "ghost"), None)], uow)  # type: ignore[arg-type]
    with pytest.raises(Poison, match="no connection 'ce' for tenant 'nobody'"):
        await handler([Delivery(raw("nobody", "ce"), None)], uow)  # type: ignore[arg-type]


async def test_the_settings_cache_is_bounded() -> None:
    rows = {("acme", f"c{i}"): {"n": i} for i in range(50)}
    cache = SettingsCache(max_entries=10)
    conn = FakeConn(rows)
    for i in range(50):
        got = await cache.get_many(FakeUow(conn), {("acme", f"c{i}")})  # type: ignore[arg-type]
        assert got[("acme", f"c{i}")] == {"n": i}
    assert len(cache) <= 10


def test_a_payload_nested_beyond_the_limit_is_a_dead_letter() -> None:
    result = map_raw(raw("acme", "ce", "[" * 5000 + "]" * 5000), {})
    assert result.dead and "nest" in result.dead[0]
