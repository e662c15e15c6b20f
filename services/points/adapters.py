"""PostgreSQL adapters of the points engine: batched statements (unnest), every one filtered by tenant."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any

import asyncpg
import orjson
from asyncpg.pool import PoolConnectionProxy
from pydantic import ValidationError

from points.rules import LineState, OrderState, Program, ReturnState
from servicekit.errors import Poison

__all__ = ["Conn", "LedgerRow", "PgPointsStore"]

Conn = asyncpg.Connection | PoolConnectionProxy
Key = tuple[str, str]

LedgerRow = tuple[str, str, str, str, str, int, str, str, list[str], str]
"""(tenant, member, order, source, kind, points, reason, source_version, source_event_ids, event_id)"""


def _pairs(items: Iterable[Key]) -> tuple[list[str], list[str]]:
    uniq = sorted(set(items))
    return [a for a, _ in uniq], [b for _, b in uniq]


def _cols(rows: Sequence[Sequence[Any]]) -> list[list[Any]]:
    return [list(c) for c in zip(*rows, strict=True)]


_ORDER_SPEC: tuple[tuple[str, str], ...] = (
    ("tenant_id", "text"),
    ("order_source_id", "text"),
    ("connection_id", "text"),
    ("source", "text"),
    ("member_id", "text"),
    ("order_number", "text"),
    ("version", "text"),
    ("version_key", "text"),
    ("status", "text"),
    ("lifecycle", "text"),
    ("currency", "text"),
    ("exchange_rate", "numeric"),
    ("total_amount", "numeric"),
    ("tax_amount", "numeric"),
    ("shipping_amount", "numeric"),
    ("deleted", "boolean"),
    ("known", "boolean"),
    ("awardable_since", "timestamptz"),
    ("awarded", "boolean"),
    ("target_points", "bigint"),
    ("pending_points", "bigint"),
    ("earned", "bigint"),
    ("clawed", "bigint"),
    ("shortfall", "bigint"),
)
"""OrderState's persisted fields (besides its lines) and their column types."""
_ORDER_COLS = ", ".join(c for c, _ in _ORDER_SPEC)
_ORDER_NAMES = tuple(c for c, _ in _ORDER_SPEC)
_N_ORDER_COLS = len(_ORDER_SPEC)
# Batches travel as one JSON document of row arrays rather than one array parameter per column: asyncpg
# checks every element of an array parameter against collections.abc ABCs, which for 26 columns x 1000
# rows cost more than building and parsing the JSON (numbers as text, timestamps as ISO strings).
_WRITE_ORDERS = f"""INSERT INTO orders ({_ORDER_COLS}, lines, line_keys)
    SELECT {", ".join(f"(e->>{i})::{t}" for i, (_, t) in enumerate(_ORDER_SPEC))},
           e->{_N_ORDER_COLS}, ARRAY(SELECT jsonb_array_elements_text(e->{_N_ORDER_COLS + 1}))
    FROM jsonb_array_elements($1::jsonb) AS e
    ON CONFLICT (tenant_id, order_source_id) DO UPDATE SET
        {", ".join(f"{c} = EXCLUDED.{c}" for c, _ in _ORDER_SPEC[2:])}, lines = EXCLUDED.lines,
        line_keys = EXCLUDED.line_keys, updated_at = now()"""


def _num(v: Decimal | None) -> str | None:
    return None if v is None else str(v)


def _order_row(o: OrderState) -> list[Any]:
    """One order as _WRITE_ORDERS reads it. An order known only from its lines (no header yet) is never
    stored as deleted: a delete before the header is not remembered (as before lines lived here)."""
    return [
        o.tenant_id,
        o.order_source_id,
        o.connection_id,
        o.source,
        o.member_id,
        o.order_number,
        o.version,
        o.version_key,
        o.status,
        o.lifecycle,
        o.currency,
        _num(o.exchange_rate),
        str(o.total_amount),
        str(o.tax_amount),
        str(o.shipping_amount),
        o.deleted and o.known,
        o.known,
        None if o.awardable_since is None else o.awardable_since.isoformat(),
        o.awarded,
        o.target_points,
        o.pending_points,
        o.earned,
        o.clawed,
        o.shortfall,
        [[ln.line_id, ln.product_source_id, str(ln.amount), ln.version_key, ln.deleted] for ln in o.lines.values()],
        _line_keys(o),
    ]


def _line_keys(o: OrderState) -> list[str]:
    """orders.line_keys: 'l:<line id>' for every line, 'p:<product>' for the products of live lines."""
    keys = ["l:" + ln.line_id for ln in o.lines.values()]
    keys += ["p:" + ln.product_source_id for ln in o.lines.values() if ln.product_source_id and not ln.deleted]
    return list(dict.fromkeys(keys))


class PgPointsStore:
    def __init__(self, conn: Conn) -> None:
        self.conn = conn

    async def programs(self, tenants: Iterable[str]) -> dict[str, Program]:
        rows = await self.conn.fetch(
            "SELECT tenant_id, config FROM programs WHERE tenant_id = ANY($1::text[])", sorted(set(tenants))
        )
        out: dict[str, Program] = {}
        for r in rows:
            try:
                out[r["tenant_id"]] = Program.model_validate_json(r["config"])
            except ValidationError as exc:
                raise Poison(f"the points program of tenant {r['tenant_id']} is invalid: {exc}") from exc
        return out

    async def products(self, keys: Iterable[Key]) -> dict[Key, tuple[str | None, str]]:
        t, p = _pairs(keys)
        if not t:
            return {}
        rows = await self.conn.fetch(
            """SELECT tenant_id, product_source_id, category, version_key FROM products
               WHERE (tenant_id, product_source_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))""",
            t,
            p,
        )
        return {(r["tenant_id"], r["product_source_id"]): (r["category"], r["version_key"]) for r in rows}

    async def orders_with_products(self, keys: Iterable[Key]) -> set[Key]:
        """Orders with a live line of one of these products (GIN index on line_keys)."""
        t, p = _pairs(keys)
        if not t:
            return set()
        rows = await self.conn.fetch(
            """SELECT DISTINCT o.tenant_id, o.order_source_id FROM unnest($1::text[], $2::text[]) AS u(t, k)
               JOIN orders o ON o.tenant_id = u.t AND o.line_keys @> ARRAY[u.k]""",
            t,
            ["p:" + x for x in p],
        )
        return {(r["tenant_id"], r["order_source_id"]) for r in rows}

    async def orders_of_lines(self, keys: Iterable[Key]) -> dict[Key, str]:
        """The order of each (tenant, line id), for tombstones that name no order."""
        t, ln = _pairs(keys)
        if not t:
            return {}
        rows = await self.conn.fetch(
            """SELECT u.t AS tenant_id, u.l AS line_id, o.order_source_id
               FROM unnest($1::text[], $2::text[], $3::text[]) AS u(t, l, k)
               JOIN orders o ON o.tenant_id = u.t AND o.line_keys @> ARRAY[u.k]
               ORDER BY o.order_source_id""",
            t,
            ln,
            ["l:" + x for x in ln],
        )
        return {(r["tenant_id"], r["line_id"]): r["order_source_id"] for r in rows}

    async def orders(self, ids: Iterable[Key], numbers: Iterable[Key], *, lock: bool = True) -> list[OrderState]:
        """Orders by id or number, with their lines, locked for the rest of the transaction."""
        it, iv = _pairs(ids)
        nt, nv = _pairs(numbers)
        if not it and not nt:
            return []
        rows = await self.conn.fetch(
            f"""SELECT {_ORDER_COLS}, lines FROM orders o
                WHERE (o.tenant_id, o.order_source_id) IN (
                    SELECT * FROM unnest($1::text[], $2::text[])
                    UNION ALL
                    SELECT n.tenant_id, n.order_source_id FROM orders n
                    WHERE (n.tenant_id, n.order_number) IN (SELECT * FROM unnest($3::text[], $4::text[])))
                ORDER BY tenant_id, order_source_id {"FOR UPDATE" if lock else ""}""",
            it,
            iv,
            nt,
            nv,
        )
        out = []
        for r in rows:
            o = OrderState(**dict(zip(_ORDER_NAMES, r, strict=False)))
            for line_id, product, amount, vk, deleted in orjson.loads(r["lines"]):
                o.lines[line_id] = LineState(line_id, product, Decimal(amount), vk, deleted)
            out.append(o)
        return out

    async def returns(
        self, ids: Iterable[Key], anchor_ids: Iterable[Key], anchor_numbers: Iterable[Key]
    ) -> list[ReturnState]:
        rt, rv = _pairs(ids)
        at, av = _pairs(anchor_ids)
        nt, nv = _pairs(anchor_numbers)
        if not (rt or at or nt):
            return []
        rows = await self.conn.fetch(
            """SELECT tenant_id, return_source_id, anchor_order_source_id, anchor_order_number, version_key,
                      lifecycle, currency, exchange_rate, amount, deleted FROM returns r
               WHERE (r.tenant_id, r.return_source_id) IN (
                   SELECT * FROM unnest($1::text[], $2::text[])
                   UNION ALL
                   SELECT a.tenant_id, a.return_source_id FROM returns a
                   WHERE (a.tenant_id, a.anchor_order_source_id) IN (SELECT * FROM unnest($3::text[], $4::text[]))
                   UNION ALL
                   SELECT a.tenant_id, a.return_source_id FROM returns a
                   WHERE (a.tenant_id, a.anchor_order_number) IN (SELECT * FROM unnest($5::text[], $6::text[])))""",
            rt,
            rv,
            at,
            av,
            nt,
            nv,
        )
        return [ReturnState(**dict(r.items())) for r in rows]

    async def balances(self, members: Iterable[Key]) -> dict[Key, int]:
        t, m = _pairs(members)
        if not t:
            return {}
        rows = await self.conn.fetch(
            """SELECT tenant_id, member_id, sum(points)::bigint AS balance FROM ledger
               WHERE (tenant_id, member_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))
               GROUP BY tenant_id, member_id""",
            t,
            m,
        )
        return {(r["tenant_id"], r["member_id"]): int(r["balance"]) for r in rows}

    # ------------------------------------------------------------------------------------------ writes

    async def write_products(self, rows: Sequence[tuple[str, str, str | None, str]]) -> None:
        if rows:
            await self.conn.execute(
                """INSERT INTO products AS p (tenant_id, product_source_id, category, version_key)
                   SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
                   ON CONFLICT (tenant_id, product_source_id) DO UPDATE SET
                       category = EXCLUDED.category, version_key = EXCLUDED.version_key
                   WHERE p.version_key < EXCLUDED.version_key""",
                *_cols(rows),
            )

    async def write_orders(self, orders: Sequence[OrderState]) -> None:
        """Upsert orders with their lines (see :func:`_order_row`)."""
        if orders:
            await self.conn.execute(_WRITE_ORDERS, orjson.dumps([_order_row(o) for o in orders]).decode())

    async def write_returns(self, returns: Sequence[ReturnState]) -> None:
        if returns:
            rows = [
                (
                    r.tenant_id,
                    r.return_source_id,
                    r.anchor_order_source_id,
                    r.anchor_order_number,
                    r.version_key,
                    r.lifecycle,
                    r.currency,
                    r.exchange_rate,
                    r.amount,
                    r.deleted,
                )
                for r in returns
            ]
            await self.conn.execute(
                """INSERT INTO returns (tenant_id, return_source_id, anchor_order_source_id, anchor_order_number,
                       version_key, lifecycle, currency, exchange_rate, amount, deleted)
                   SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                       $7::text[], $8::numeric[], $9::numeric[], $10::boolean[])
                   ON CONFLICT (tenant_id, return_source_id) DO UPDATE SET
                       anchor_order_source_id = EXCLUDED.anchor_order_source_id,
                       anchor_order_number = EXCLUDED.anchor_order_number, version_key = EXCLUDED.version_key,
                       lifecycle = EXCLUDED.lifecycle, currency = EXCLUDED.currency,
                       exchange_rate = EXCLUDED.exchange_rate, amount = EXCLUDED.amount, deleted = EXCLUDED.deleted""",
                *_cols(rows),
            )

    async def append_ledger(self, rows: Sequence[LedgerRow]) -> set[str]:
        """Insert entries; an entry whose idempotency key exists is skipped. Returns the event ids written."""
        if not rows:
            return set()
        written = await self.conn.fetch(
            """INSERT INTO ledger (tenant_id, member_id, order_source_id, source, kind, points, reason,
                   source_version, source_event_ids, event_id)
               SELECT e->>0, e->>1, e->>2, e->>3, e->>4, (e->>5)::bigint, e->>6, e->>7,
                      ARRAY(SELECT jsonb_array_elements_text(e->8)), e->>9
               FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS u(e, n)
               ORDER BY n
               ON CONFLICT (tenant_id, order_source_id, source, kind, source_version) DO NOTHING
               RETURNING event_id""",
            orjson.dumps(rows).decode(),
        )
        return {r["event_id"] for r in written}

    async def advance_members(self, moves: Sequence[tuple[str, str, int, int]]) -> dict[Key, tuple[int, int]]:
        """Add (entries, points) to each (tenant, member)'s position; returns the new (sequence, balance).

        Rows are locked in (tenant, member) order, so two engines advancing the same members cannot deadlock;
        the second waits for the first to commit and continues from its sequence.
        """
        if not moves:
            return {}
        rows = await self.conn.fetch(
            """INSERT INTO member_balances AS m (tenant_id, member_id, sequence, balance)
               SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[]) AS u(t, mb, n, p)
               ORDER BY 1, 2
               ON CONFLICT (tenant_id, member_id) DO UPDATE SET
                   sequence = m.sequence + EXCLUDED.sequence, balance = m.balance + EXCLUDED.balance,
                   updated_at = now()
               RETURNING tenant_id, member_id, sequence, balance""",
            *_cols(sorted(moves)),
        )
        return {(r["tenant_id"], r["member_id"]): (int(r["sequence"]), int(r["balance"])) for r in rows}

    async def record_shortfalls(self, rows: Sequence[tuple[str, str, str, int, str]]) -> None:
        if rows:
            await self.conn.execute(
                """INSERT INTO shortfalls (tenant_id, member_id, order_source_id, points, source_version)
                   SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[])
                   ON CONFLICT DO NOTHING""",
                *_cols(rows),
            )

    async def maturing(self, now: dt.datetime, limit: int) -> list[Key]:
        """Pending orders whose program's return window after the awardable status has passed."""
        rows = await self.conn.fetch(
            """SELECT o.tenant_id, o.order_source_id FROM orders o JOIN programs p USING (tenant_id)
               WHERE NOT o.awarded AND o.awardable_since IS NOT NULL AND NOT o.deleted
                 AND o.awardable_since + make_interval(
                         secs => coalesce((p.config->>'return_window_days')::numeric, 0) * 86400) <= $1
               ORDER BY o.awardable_since LIMIT $2 FOR UPDATE OF o SKIP LOCKED""",
            now,
            limit,
        )
        return [(r["tenant_id"], r["order_source_id"]) for r in rows]
