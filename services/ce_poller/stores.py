"""The poller's known-key set: its port, the PostgreSQL adapter (database errors translated, so an outage of
our own database is waited out by the runner) and an in-memory fake."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import asyncpg

from servicekit.db import db_errors

__all__ = ["FakeKnownKeys", "KnownKey", "KnownKeys", "PgKnownKeys"]

@dataclass(frozen=True, slots=True)
class KnownKey:
    source_id: str
    parent_id: str | None
    version: str


class KnownKeys(Protocol):
    """Keys published per (tenant, connection, entity), with the generation of the sync that last saw them.

    Contract: ``record`` is called after the records it names were acknowledged by the broker; a full
    resync bumps the generation, and keys left on an older generation afterwards were deleted at the source.
    """

    async def record(self, tenant: str, conn: str, entity: str, keys: Sequence[KnownKey], generation: int) -> None: ...

    async def lookup(self, tenant: str, conn: str, entity: str, ids: Sequence[str]) -> dict[str, KnownKey]: ...

    async def forget(self, tenant: str, conn: str, entity: str, ids: Sequence[str]) -> None: ...

    async def stale(self, tenant: str, conn: str, entity: str, generation: int, limit: int) -> list[KnownKey]: ...

    async def orders_by_number(self, tenant: str, conn: str, numbers: Sequence[str]) -> dict[str, str]:
        """salesorderid per order number among published orders (their ``parent_id`` is the number)."""
        ...


class PgKnownKeys:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def record(self, tenant: str, conn: str, entity: str, keys: Sequence[KnownKey], generation: int) -> None:
        if not keys:
            return
        async with db_errors("known keys"):
            await self.pool.execute(
                """INSERT INTO ce_known_keys
                       (tenant_id, connection_id, entity, source_id, parent_id, version, generation)
                   SELECT $1, $2, $3, s, p, v, $7 FROM unnest($4::text[], $5::text[], $6::text[]) AS u(s, p, v)
                   ON CONFLICT (tenant_id, connection_id, entity, source_id) DO UPDATE SET
                       parent_id = COALESCE(EXCLUDED.parent_id, ce_known_keys.parent_id),
                       version = EXCLUDED.version, generation = EXCLUDED.generation""",
                tenant, conn, entity, [k.source_id for k in keys], [k.parent_id for k in keys],
                [k.version for k in keys], generation,
            )

    async def lookup(self, tenant: str, conn: str, entity: str, ids: Sequence[str]) -> dict[str, KnownKey]:
        async with db_errors("known keys"):
            rows = await self.pool.fetch(
                """SELECT source_id, parent_id, version FROM ce_known_keys
                   WHERE tenant_id = $1 AND connection_id = $2 AND entity = $3 AND source_id = ANY($4::text[])""",
                tenant, conn, entity, list(ids),
            )
        return {r["source_id"]: KnownKey(r["source_id"], r["parent_id"], r["version"]) for r in rows}

    async def forget(self, tenant: str, conn: str, entity: str, ids: Sequence[str]) -> None:
        async with db_errors("known keys"):
            await self.pool.execute(
                """DELETE FROM ce_known_keys WHERE tenant_id = $1 AND connection_id = $2 AND entity = $3
                   AND source_id = ANY($4::text[])""",
                tenant, conn, entity, list(ids),
            )

    async def stale(self, tenant: str, conn: str, entity: str, generation: int, limit: int) -> list[KnownKey]:
        async with db_errors("known keys"):
            rows = await self.pool.fetch(
                """SELECT source_id, parent_id, version FROM ce_known_keys
                   WHERE tenant_id = $1 AND connection_id = $2 AND entity = $3 AND generation < $4
                   ORDER BY source_id LIMIT $5""",
                tenant, conn, entity, generation, limit,
            )
        return [KnownKey(r["source_id"], r["parent_id"], r["version"]) for r in rows]

    async def orders_by_number(self, tenant: str, conn: str, numbers: Sequence[str]) -> dict[str, str]:
        async with db_errors("known keys"):
            rows = await self.pool.fetch(
                """SELECT parent_id, source_id FROM ce_known_keys WHERE tenant_id = $1 AND connection_id = $2
                   AND entity = 'salesorder' AND parent_id = ANY($3::text[])""",
                tenant, conn, list(numbers),
            )
        return {r["parent_id"]: r["source_id"] for r in rows}


@dataclass
class FakeKnownKeys:
    rows: dict[tuple[str, str, str, str], tuple[KnownKey, int]] = field(default_factory=dict)

    async def record(self, tenant: str, conn: str, entity: str, keys: Sequence[KnownKey], generation: int) -> None:
        for k in keys:
            old = self.rows.get((tenant, conn, entity, k.source_id))
            parent = k.parent_id or (old[0].parent_id if old else None)
            self.rows[(tenant, conn, entity, k.source_id)] = (KnownKey(k.source_id, parent, k.version), generation)

    async def lookup(self, tenant: str, conn: str, entity: str, ids: Sequence[str]) -> dict[str, KnownKey]:
        out = {}
        for i in ids:
            hit = self.rows.get((tenant, conn, entity, i))
            if hit:
                out[i] = hit[0]
        return out

    async def forget(self, tenant: str, conn: str, entity: str, ids: Sequence[str]) -> None:
        for i in ids:
            self.rows.pop((tenant, conn, entity, i), None)

    async def stale(self, tenant: str, conn: str, entity: str, generation: int, limit: int) -> list[KnownKey]:
        found = sorted(
            (k for (t, c, e, _), (k, g) in self.rows.items() if (t, c, e) == (tenant, conn, entity) and g < generation),
            key=lambda k: k.source_id,
        )
        return found[:limit]

    async def orders_by_number(self, tenant: str, conn: str, numbers: Sequence[str]) -> dict[str, str]:
        want = set(numbers)
        return {
            k.parent_id: k.source_id
            for (t, c, e, _), (k, _g) in self.rows.items()
            if (t, c, e) == (tenant, conn, "salesorder") and k.parent_id is not None and k.parent_id in want
        }
