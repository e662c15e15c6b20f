"""The batch lookups of the resolver and the points engine stay index lookups as their tables grow.

A lookup by "id OR number" written as ``a IN (...) OR b IN (...)`` can only be a sequential scan in
PostgreSQL (hashed subplans filtered row by row), so each batch would cost time proportional to every
order ever stored. Each lookup here runs under EXPLAIN against tables of 5,000 rows with sequential
scans, hash and merge joins priced out: a plan that still reads a whole table has no path that probes
an index per key. (On small tables the planner may rightly prefer a scan; what matters is that it has
the choice, which it takes as tables grow.)
"""

from __future__ import annotations

import json
from typing import Any

import asyncpg

from points import app as points_app
from points.adapters import PgPointsStore
from resolver import app as resolver_app
from resolver.adapters import PgResolverStore
from servicekit.db import migrate
from servicekit.runtime import Infra

ROWS = 5_000
BIG = {"orders", "returns", "members", "customer_links", "order_members", "parked"}


class ExplainingConn:
    """Runs every query twice: under EXPLAIN (kept) and for real (returned)."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.plans: list[tuple[str, Any]] = []

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        plan = await self.conn.fetchval("EXPLAIN (FORMAT JSON) " + query, *args)
        self.plans.append((query, json.loads(plan) if isinstance(plan, str) else plan))
        return await self.conn.fetch(query, *args)


def full_scans(node: dict[str, Any]) -> list[str]:
    """Scans of the big tables that read all of it: sequential, or an index walked without a condition."""
    kind, rel = node.get("Node Type"), node.get("Relation Name", node.get("Index Name", ""))
    whole = (kind == "Seq Scan" and rel in BIG) or (
        kind in ("Index Scan", "Index Only Scan", "Bitmap Index Scan") and "Index Cond" not in node
    )
    found = [f"{kind} on {rel}"] if whole else []
    for child in node.get("Plans", ()):
        found += full_scans(child)
    return found


async def fill(conn: asyncpg.Connection) -> None:
    await conn.execute(
        f"""INSERT INTO orders (tenant_id, order_source_id, order_number, known, lines, line_keys)
            SELECT 'acme', 'o' || i, 'SO-' || i, true, '[]', ARRAY['l:o' || i || '-1', 'p:tv']
            FROM generate_series(1, {ROWS}) i;
            INSERT INTO returns (tenant_id, return_source_id, anchor_order_source_id, anchor_order_number,
                                 version_key, lifecycle, currency, amount, deleted)
            SELECT 'acme', 'r' || i, 'o' || i, 'SO-' || i, '1', 'effective', 'EUR', 1, false
            FROM generate_series(1, {ROWS}) i;
            INSERT INTO members (tenant_id, member_id, external_id, email_normalized)
            SELECT 'acme', 'm' || i, 'X' || i, 'm' || i || '@example.com' FROM generate_series(1, {ROWS}) i;
            INSERT INTO customer_links (tenant_id, connection_id, source, customer_source_id, entity,
                                        external_id, email_normalized, member_id, match, version_key)
            SELECT 'acme', 'crm', 'dynamics-ce', 'c' || i, 'account', 'X' || i, 'm' || i || '@example.com',
                   'm' || i, 'external_id', '1'
            FROM generate_series(1, {ROWS}) i;
            INSERT INTO order_members (tenant_id, order_source_id, order_number, member_id)
            SELECT 'acme', 'o' || i, 'SO-' || i, 'm' || i FROM generate_series(1, {ROWS}) i;
            INSERT INTO parked (tenant_id, order_source_id, kind, connection_id, source, customer_source_id,
                                email_normalized, anchor_order_source_id, anchor_order_number, event_id,
                                event_type, payload, reason)
            SELECT 'acme', 'p' || i, 'order', 'crm', 'dynamics-ce', 'c' || i, 'p' || i || '@example.com',
                   'o' || i, 'SO-' || i, 'e' || i, 'order.upserted', '{{}}', 'no member yet'
            FROM generate_series(1, {ROWS}) i;
            ANALYZE orders, returns, members, customer_links, order_members, parked;"""
    )


async def test_id_or_number_lookups_use_indexes(infra: Infra) -> None:
    await migrate(infra.pool, [resolver_app.MIGRATIONS, points_app.MIGRATIONS])
    async with infra.pool.acquire() as raw, raw.transaction():
        await fill(raw)
        for plan_kind in ("seqscan", "hashjoin", "mergejoin"):
            await raw.execute(f"SET LOCAL enable_{plan_kind} = off")
        conn = ExplainingConn(raw)
        ids = [("acme", f"o{i}") for i in range(1, 400, 3)]
        numbers = [("acme", f"SO-{i}") for i in range(2, 400, 3)]
        points = PgPointsStore(conn)  # type: ignore[arg-type]
        found = await points.orders(ids, numbers)
        assert len(found) == len(ids) + len(numbers)
        rets = await points.returns([("acme", "r1")], [("acme", "o5")], [("acme", "SO-9")])
        assert {r.return_source_id for r in rets} == {"r1", "r5", "r9"}

        resolver = PgResolverStore(conn)  # type: ignore[arg-type]
        idx = await resolver.member_index([("acme", "X7")], [("acme", "m8@example.com")])
        assert idx.by_external["acme"]["X7"] == ["m7"] and idx.by_email["acme"]["m8@example.com"] == ["m8"]
        links = await resolver.links_touching([("acme", "X7")], [("acme", "m8@example.com")])
        assert {r["customer_source_id"] for r in links} == {"c7", "c8"}
        by_id, by_number = await resolver.order_members([("acme", "o3")], [("acme", "SO-4")])
        assert by_id[("acme", "o3")] == "m3" and by_number[("acme", "SO-4")] == "m4"
        waiting = await resolver.orders_waiting_on(
            [("acme", "crm", "dynamics-ce", "c1")], [("acme", "p2@example.com")], [("acme", "o3")], [("acme", "SO-4")]
        )
        assert waiting == {("acme", "p1"), ("acme", "p2"), ("acme", "p3"), ("acme", "p4")}

    assert len(conn.plans) == 6
    for query, plan in conn.plans:
        assert not full_scans(plan[0]["Plan"]), f"full scan of a growing table in:\n{query}\n{plan}"
