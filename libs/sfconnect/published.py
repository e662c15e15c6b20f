"""The published-version store: the newest version (and payload) of every record a connection published.

Every path that publishes Salesforce records (incremental poll and its overlap window, Bulk backfill, SOQL
reconcile, CDC) asks it first and publishes only records whose version is newer than the stored one, then
records what it published once the broker acknowledged it. Held in PostgreSQL (``sf_published``, migration
``0020``), so the dedupe holds across processes and restarts at any table size (the in-memory set it
replaces was capped at 10,000 rows: a 100k-row re-read window was published again after a restart).

The stored payload is the record as last published: the last known state a CDC ``UPDATE`` event (which
carries only changed fields) is applied to. Versions are ``YYYY-MM-DDTHH:MM:SS.mmmZ`` strings and compare as
strings. A crash between the broker's acknowledgement and :meth:`remember` re-publishes those records once
(same event ids; consumers deduplicate).

All database errors are translated by :func:`servicekit.db.db_errors` (an outage is Transient: waited out).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import asyncpg

from servicekit.db import Migrations, db_errors

__all__ = ["MIGRATIONS", "FakePublishedStore", "PgPublishedStore", "Published", "PublishedStore", "load_sql"]

MIGRATIONS = Migrations("sfconnect", "sfconnect")


@dataclass(frozen=True)
class Published:
    record_id: str
    version: str
    payload: str | None = None


class PublishedStore(Protocol):
    async def load(self, tenant_id: str, connection_id: str, obj: str, ids: Sequence[str], *,
                   payloads: bool = True) -> dict[str, Published]:
        """The stored rows of ``ids`` (missing ids are absent); ``payloads=False`` leaves ``payload`` None
        (the dedupe needs only versions: a Bulk page need not read 2,000 stored records back)."""
        ...

    async def remember(self, tenant_id: str, connection_id: str, obj: str, rows: Sequence[Published]) -> None:
        """Store rows; an older version never replaces a newer one."""
        ...


@dataclass
class FakePublishedStore:
    """In-memory double (unit tests and tools); unbounded, one process only."""

    rows: dict[tuple[str, str, str, str], Published] = field(default_factory=dict)
    loads: int = 0

    async def load(self, tenant_id: str, connection_id: str, obj: str, ids: Sequence[str], *,
                   payloads: bool = True) -> dict[str, Published]:
        self.loads += 1
        out = {}
        for rid in ids:
            got = self.rows.get((tenant_id, connection_id, obj, rid))
            if got is not None:
                out[rid] = got if payloads else Published(got.record_id, got.version)
        return out

    async def remember(self, tenant_id: str, connection_id: str, obj: str, rows: Sequence[Published]) -> None:
        for r in rows:
            key = (tenant_id, connection_id, obj, r.record_id)
            old = self.rows.get(key)
            if old is None or old.version <= r.version:
                self.rows[key] = r


def load_sql(*, payloads: bool) -> str:
    """The lookup statement of :meth:`PgPublishedStore.load` ($1 tenant, $2 connection, $3 object, $4 ids)."""
    cols = "s.version, s.payload" if payloads else "s.version, NULL::text AS payload"
    return f"""SELECT u.id AS record_id, p.version, p.payload
               FROM unnest($4::text[]) AS u(id) CROSS JOIN LATERAL (
                   SELECT {cols} FROM sf_published s
                   WHERE s.tenant_id = $1 AND s.connection_id = $2 AND s.object = $3 AND s.record_id = u.id
                   LIMIT 1) AS p"""


class PgPublishedStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def load(self, tenant_id: str, connection_id: str, obj: str, ids: Sequence[str], *,
                   payloads: bool = True) -> dict[str, Published]:
        """One statement per call. Each id is an index probe on the whole primary key (a LATERAL subquery
        with LIMIT cannot be flattened into a join): ``record_id = ANY($4)`` was planned (generic plan after
        five executions, or stale statistics) as a scan of every row of the connection's object with the
        array as a filter, so each page's lookup grew with the table (1.3 s per 2,000-id page at 40k rows)."""
        if not ids:
            return {}
        async with db_errors("sf_published load"):
            rows = await self.pool.fetch(load_sql(payloads=payloads), tenant_id, connection_id, obj,
                                         list(dict.fromkeys(ids)))
        return {r["record_id"]: Published(r["record_id"], r["version"], r["payload"]) for r in rows}

    async def remember(self, tenant_id: str, connection_id: str, obj: str, rows: Sequence[Published]) -> None:
        if not rows:
            return
        newest: dict[str, Published] = {}
        for r in rows:  # one row per id in a statement (ON CONFLICT cannot touch a row twice)
            old = newest.get(r.record_id)
            if old is None or old.version <= r.version:
                newest[r.record_id] = r
        async with db_errors("sf_published remember"):
            await self.pool.execute(
                """INSERT INTO sf_published (tenant_id, connection_id, object, record_id, version, payload)
                   SELECT $1, $2, $3, u.id, u.version, u.payload
                   FROM unnest($4::text[], $5::text[], $6::text[]) AS u(id, version, payload)
                   ON CONFLICT (tenant_id, connection_id, object, record_id) DO UPDATE
                   SET version = EXCLUDED.version, payload = EXCLUDED.payload, updated_at = now()
                   WHERE sf_published.version <= EXCLUDED.version""",
                tenant_id, connection_id, obj, [r.record_id for r in newest.values()],
                [r.version for r in newest.values()], [r.payload for r in newest.values()])
