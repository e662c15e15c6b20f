"""PostgreSQL adapters of the resolver: every statement is batched (unnest) and filters by tenant."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
from asyncpg.pool import PoolConnectionProxy

__all__ = ["Conn", "CustKey", "MemberIndex", "ParkedRow", "PgResolverStore"]

Conn = asyncpg.Connection | PoolConnectionProxy
"""A connection, pooled or not."""

CustKey = tuple[str, str, str, str]
"""(tenant_id, connection_id, source, customer_source_id)"""


def _pairs(items: Iterable[tuple[str, str]]) -> tuple[list[str], list[str]]:
    uniq = sorted(set(items))
    return [a for a, _ in uniq], [b for _, b in uniq]


def _jcols(rows: Iterable[Sequence[Any]], width: int) -> list[str]:
    """Distinct ``rows`` as ``width`` JSON arrays of text, one per column, for :func:`_rows_from`."""
    uniq = sorted(set(map(tuple, rows)))
    return [orjson.dumps([r[i] for r in uniq]).decode() for i in range(width)]


def _rows_from(first: int, width: int) -> str:
    """``ROWS FROM`` over parameters $first.. holding JSON arrays of text, zipped into rows.

    The order path's key lists travel as JSON: asyncpg checks every element of an array parameter against
    collections.abc ABCs, which for thousands of keys costs more than building and parsing the JSON.
    """
    return "ROWS FROM (" + ", ".join(
        f"jsonb_array_elements_text(${first + i}::jsonb)" for i in range(width)
    ) + ")"


@dataclass
class MemberIndex:
    """Members of the tenants in play, indexed by (tenant, external id) and (tenant, email)."""

    by_external: dict[str, dict[str, list[str]]]
    by_email: dict[str, dict[str, list[str]]]

    def for_tenant(self, tenant: str) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        return self.by_external.get(tenant, {}), self.by_email.get(tenant, {})


@dataclass(frozen=True, slots=True)
class ParkedRow:
    tenant_id: str
    seq: int
    order_source_id: str
    kind: str
    connection_id: str
    source: str
    customer_source_id: str | None
    email_normalized: str | None
    anchor_order_source_id: str | None
    anchor_order_number: str | None
    payload: bytes

    @classmethod
    def of(cls, r: asyncpg.Record) -> ParkedRow:
        return cls(
            r["tenant_id"],
            r["seq"],
            r["order_source_id"],
            r["kind"],
            r["connection_id"],
            r["source"],
            r["customer_source_id"],
            r["email_normalized"],
            r["anchor_order_source_id"],
            r["anchor_order_number"],
            bytes(r["payload"]),
        )


_PARKED_COLS = """tenant_id, seq, order_source_id, kind, connection_id, source, customer_source_id,
    email_normalized, anchor_order_source_id, anchor_order_number, payload"""


class PgResolverStore:
    def __init__(self, conn: Conn) -> None:
        self.conn = conn

    # ------------------------------------------------------------------------------------- members

    async def member_index(
        self, externals: Iterable[tuple[str, str]], emails: Iterable[tuple[str, str]]
    ) -> MemberIndex:
        et, ev = _pairs(externals)
        mt, mv = _pairs(emails)
        idx = MemberIndex(defaultdict(lambda: defaultdict(list)), defaultdict(lambda: defaultdict(list)))
        if not et and not mt:
            return idx
        rows = await self.conn.fetch(
            """SELECT tenant_id, member_id, external_id, email_normalized FROM members m
               WHERE (m.tenant_id, m.external_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))
               UNION
               SELECT tenant_id, member_id, external_id, email_normalized FROM members m
               WHERE (m.tenant_id, m.email_normalized) IN (SELECT * FROM unnest($3::text[], $4::text[]))""",
            et,
            ev,
            mt,
            mv,
        )
        for r in rows:
            if r["external_id"]:
                idx.by_external[r["tenant_id"]][r["external_id"]].append(r["member_id"])
            if r["email_normalized"]:
                idx.by_email[r["tenant_id"]][r["email_normalized"]].append(r["member_id"])
        return idx

    async def members_by_id(self, keys: Iterable[tuple[str, str]]) -> list[asyncpg.Record]:
        t, m = _pairs(keys)
        return await self.conn.fetch(
            """SELECT tenant_id, member_id, external_id, email_normalized FROM members
               WHERE (tenant_id, member_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))""",
            t,
            m,
        )

    async def upsert_members(self, rows: Sequence[tuple[Any, ...]], *, relinked: bool) -> None:
        """rows: (tenant, member, external_id, email_normalized, consent_marketing, consent_profiling,
        status, version_key). A stale version never overwrites a newer one."""
        if not rows:
            return
        cols = list(zip(*rows, strict=True))
        await self.conn.execute(
            """INSERT INTO members AS m (tenant_id, member_id, external_id, email_normalized,
                   consent_marketing, consent_profiling, status, version_key, relinked)
               SELECT *, $9::boolean FROM unnest($1::text[], $2::text[], $3::text[], $4::text[],
                   $5::boolean[], $6::boolean[], $7::text[], $8::text[])
               ON CONFLICT (tenant_id, member_id) DO UPDATE SET
                   external_id = EXCLUDED.external_id, email_normalized = EXCLUDED.email_normalized,
                   consent_marketing = EXCLUDED.consent_marketing,
                   consent_profiling = EXCLUDED.consent_profiling,
                   status = EXCLUDED.status, version_key = EXCLUDED.version_key, relinked = EXCLUDED.relinked,
                   updated_at = now()
               WHERE m.version_key <= EXCLUDED.version_key""",
            *[list(c) for c in cols],
            relinked,
        )

    async def claim_unlinked_members(self, limit: int) -> list[asyncpg.Record]:
        return await self.conn.fetch(
            """SELECT tenant_id, member_id, external_id, email_normalized FROM members
               WHERE NOT relinked ORDER BY updated_at LIMIT $1 FOR UPDATE SKIP LOCKED""",
            limit,
        )

    async def mark_relinked(self, keys: Iterable[tuple[str, str]]) -> None:
        t, m = _pairs(keys)
        if t:
            await self.conn.execute(
                """UPDATE members SET relinked = true
                   WHERE (tenant_id, member_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))""",
                t,
                m,
            )

    # ---------------------------------------------------------------------------------------- links

    async def links(self, keys: Iterable[CustKey]) -> dict[CustKey, str | None]:
        cols = _jcols(keys, 4)
        if cols[0] == "[]":
            return {}
        rows = await self.conn.fetch(
            f"""SELECT tenant_id, connection_id, source, customer_source_id, member_id FROM customer_links
                WHERE (tenant_id, connection_id, source, customer_source_id) IN (SELECT * FROM {_rows_from(1, 4)})""",
            *cols,
        )
        return {
            (r["tenant_id"], r["connection_id"], r["source"], r["customer_source_id"]): r["member_id"] for r in rows
        }

    async def upsert_links(self, rows: Sequence[tuple[Any, ...]]) -> list[CustKey]:
        """rows: (tenant, connection, source, customer, entity, parent, external_id, email, member, match,
        note, version_key). Guarded by version; returns the keys written."""
        if not rows:
            return []
        cols = list(zip(*rows, strict=True))
        written = await self.conn.fetch(
            """INSERT INTO customer_links AS l (tenant_id, connection_id, source, customer_source_id, entity,
                   parent_source_id, external_id, email_normalized, member_id, match, note, version_key)
               SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                   $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[])
               ON CONFLICT (tenant_id, connection_id, source, customer_source_id) DO UPDATE SET
                   entity = EXCLUDED.entity, parent_source_id = EXCLUDED.parent_source_id,
                   external_id = EXCLUDED.external_id, email_normalized = EXCLUDED.email_normalized,
                   member_id = EXCLUDED.member_id, match = EXCLUDED.match, note = EXCLUDED.note,
                   version_key = EXCLUDED.version_key, updated_at = now()
               WHERE l.version_key <= EXCLUDED.version_key
               RETURNING tenant_id, connection_id, source, customer_source_id""",
            *[list(c) for c in cols],
        )
        return [(r["tenant_id"], r["connection_id"], r["source"], r["customer_source_id"]) for r in written]

    async def links_touching(
        self, externals: Iterable[tuple[str, str]], emails: Iterable[tuple[str, str]]
    ) -> list[asyncpg.Record]:
        et, ev = _pairs(externals)
        mt, mv = _pairs(emails)
        return await self.conn.fetch(
            """SELECT tenant_id, connection_id, source, customer_source_id, external_id, email_normalized,
                      member_id, match, note FROM customer_links l
               WHERE l.match <> 'deleted' AND (l.tenant_id, l.connection_id, l.source, l.customer_source_id) IN (
                   SELECT x.tenant_id, x.connection_id, x.source, x.customer_source_id FROM customer_links x
                   WHERE (x.tenant_id, x.external_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))
                   UNION ALL
                   SELECT x.tenant_id, x.connection_id, x.source, x.customer_source_id FROM customer_links x
                   WHERE (x.tenant_id, x.email_normalized) IN (SELECT * FROM unnest($3::text[], $4::text[])))
               FOR UPDATE""",
            et,
            ev,
            mt,
            mv,
        )

    async def set_matches(self, rows: Sequence[tuple[str, str, str, str, str | None, str, str]]) -> None:
        """rows: (tenant, connection, source, customer, member, match, note)."""
        if not rows:
            return
        await self.conn.execute(
            """UPDATE customer_links l SET member_id = u.m, match = u.h, note = u.n, updated_at = now()
               FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[])
                   AS u(t, c, s, k, m, h, n)
               WHERE l.tenant_id = u.t AND l.connection_id = u.c AND l.source = u.s
                 AND l.customer_source_id = u.k""",
            *[list(c) for c in zip(*rows, strict=True)],
        )

    # -------------------------------------------------------------------------------- order members

    async def order_members(
        self, ids: Iterable[tuple[str, str]], numbers: Iterable[tuple[str, str]]
    ) -> tuple[dict[tuple[str, str], str], dict[tuple[str, str], str]]:
        it, iv = _pairs(ids)
        nt, nv = _pairs(numbers)
        by_id: dict[tuple[str, str], str] = {}
        by_number: dict[tuple[str, str], str] = {}
        if not it and not nt:
            return by_id, by_number
        rows = await self.conn.fetch(
            """SELECT tenant_id, order_source_id, order_number, member_id FROM order_members o
               WHERE (o.tenant_id, o.order_source_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))
               UNION
               SELECT tenant_id, order_source_id, order_number, member_id FROM order_members o
               WHERE (o.tenant_id, o.order_number) IN (SELECT * FROM unnest($3::text[], $4::text[]))""",
            it,
            iv,
            nt,
            nv,
        )
        for r in rows:
            by_id[(r["tenant_id"], r["order_source_id"])] = r["member_id"]
            if r["order_number"]:
                by_number[(r["tenant_id"], r["order_number"])] = r["member_id"]
        return by_id, by_number

    async def upsert_order_members(self, rows: Sequence[tuple[str, str, str | None, str]]) -> None:
        if not rows:
            return
        latest = {(r[0], r[1]): r for r in rows}
        await self.conn.execute(
            f"""INSERT INTO order_members (tenant_id, order_source_id, order_number, member_id)
                SELECT * FROM {_rows_from(1, 4)}
                ON CONFLICT (tenant_id, order_source_id) DO UPDATE SET
                    order_number = EXCLUDED.order_number, member_id = EXCLUDED.member_id, resolved_at = now()
                WHERE (order_members.order_number, order_members.member_id)
                      IS DISTINCT FROM (EXCLUDED.order_number, EXCLUDED.member_id)""",
            *[orjson.dumps([r[i] for r in latest.values()]).decode() for i in range(4)],
        )

    # --------------------------------------------------------------------------------------- parked

    async def parked_orders(self, orders: Iterable[tuple[str, str]]) -> dict[tuple[str, str], ParkedRow]:
        """The newest parked row of each of ``orders`` that has any."""
        cols = _jcols(orders, 2)
        if cols[0] == "[]":
            return {}
        rows = await self.conn.fetch(
            f"""SELECT DISTINCT ON (tenant_id, order_source_id) {_PARKED_COLS} FROM parked p
                WHERE (p.tenant_id, p.order_source_id) IN (SELECT * FROM {_rows_from(1, 2)})
                ORDER BY tenant_id, order_source_id, seq DESC""",
            *cols,
        )
        return {(r["tenant_id"], r["order_source_id"]): ParkedRow.of(r) for r in rows}

    async def park(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """rows in arrival order: (tenant, order, kind, connection, source, customer, email, anchor id,
        anchor number, event_id, event_type, payload, reason)."""
        if rows:
            await self.conn.executemany(
                """INSERT INTO parked (tenant_id, order_source_id, kind, connection_id, source,
                       customer_source_id, email_normalized, anchor_order_source_id, anchor_order_number,
                       event_id, event_type, payload, reason)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
                   ON CONFLICT (tenant_id, event_id) DO NOTHING""",
                rows,
            )

    async def orders_waiting_on(
        self,
        customers: Iterable[CustKey] = (),
        emails: Iterable[tuple[str, str]] = (),
        anchor_ids: Iterable[tuple[str, str]] = (),
        anchor_numbers: Iterable[tuple[str, str]] = (),
    ) -> set[tuple[str, str]]:
        """Orders with a parked head row waiting on one of these customers, emails or anchored orders."""
        cust = _jcols(customers, 4)
        em = _jcols(emails, 2)
        anchor = _jcols(anchor_ids, 2)
        num = _jcols(anchor_numbers, 2)
        if all(c[0] == "[]" for c in (cust, em, anchor, num)):
            return set()
        rows = await self.conn.fetch(
            f"""SELECT tenant_id, order_source_id FROM parked p WHERE p.kind <> 'part'
                 AND (p.tenant_id, p.connection_id, p.source, p.customer_source_id) IN
                     (SELECT * FROM {_rows_from(1, 4)})
               UNION
               SELECT tenant_id, order_source_id FROM parked p WHERE p.kind <> 'part'
                 AND (p.tenant_id, p.email_normalized) IN (SELECT * FROM {_rows_from(5, 2)})
               UNION
               SELECT tenant_id, order_source_id FROM parked p WHERE p.kind <> 'part'
                 AND (p.tenant_id, p.anchor_order_source_id) IN (SELECT * FROM {_rows_from(7, 2)})
               UNION
               SELECT tenant_id, order_source_id FROM parked p WHERE p.kind <> 'part'
                 AND (p.tenant_id, p.anchor_order_number) IN (SELECT * FROM {_rows_from(9, 2)})""",
            *cust,
            *em,
            *anchor,
            *num,
        )
        return {(r["tenant_id"], r["order_source_id"]) for r in rows}

    async def parked_rows_of(self, orders: Iterable[tuple[str, str]]) -> list[ParkedRow]:
        t, o = _pairs(orders)
        if not t:
            return []
        rows = await self.conn.fetch(
            f"""SELECT {_PARKED_COLS} FROM parked p
                WHERE (p.tenant_id, p.order_source_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))
                ORDER BY tenant_id, seq FOR UPDATE""",
            t,
            o,
        )
        return [ParkedRow.of(r) for r in rows]

    async def unpark(self, keys: Iterable[tuple[str, int]]) -> None:
        t, s = _pairs((k[0], str(k[1])) for k in keys)
        if t:
            await self.conn.execute(
                """DELETE FROM parked WHERE (tenant_id, seq) IN
                       (SELECT t, s::bigint FROM unnest($1::text[], $2::text[]) AS u(t, s))""",
                t,
                s,
            )
