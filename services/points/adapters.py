"""PostgreSQL adapters of the points engine: batched statements (unnest), every one filtered by tenant."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any

import asyncpg
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


_ORDER_COLS = (
    "tenant_id, order_source_id, connection_id, source, member_id, order_number, version, version_key, status, "
    "lifecycle, currency, exchange_rate, total_amount, tax_amount, shipping_amount, deleted, known, "
    "awardable_since, awarded, target_points, pending_points, earned, clawed, shortfall"
)
_ORDER_TYPES = (
    "text[], text[], text[], text[], text[], text[], text[], text[], text[], text[], text[], numeric[], "
    "numeric[], numeric[], numeric[], boolean[], boolean[], timestamptz[], boolean[], bigint[], bigint[], "
    "bigint[], bigint[], bigint[]"
)

_ORDER_PARAMS = ", ".join(f"${i + 1}::{t.strip()}" for i, t in enumerate(_ORDER_TYPES.split(",")))


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
        t, p = _pairs(keys)
        if not t:
            return set()
        rows = await self.conn.fetch(
            """SELECT DISTINCT tenant_id, order_source_id FROM order_lines
               WHERE NOT deleted AND (tenant_id, product_source_id) IN
                   (SELECT * FROM unnest($1::text[], $2::text[]))""",
            t,
            p,
        )
        return {(r["tenant_id"], r["order_source_id"]) for r in rows}

    async def orders_of_lines(self, keys: Iterable[Key]) -> dict[Key, str]:
        t, ln = _pairs(keys)
        if not t:
            return {}
        rows = await self.conn.fetch(
            """SELECT tenant_id, line_id, order_source_id FROM order_lines
               WHERE (tenant_id, line_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))""",
            t,
            ln,
        )
        return {(r["tenant_id"], r["line_id"]): r["order_source_id"] for r in rows}

    async def orders(self, ids: Iterable[Key], numbers: Iterable[Key], *, lock: bool = True) -> list[OrderState]:
        it, iv = _pairs(ids)
        nt, nv = _pairs(numbers)
        if not it and not nt:
            return []
        rows = await self.conn.fetch(
            f"""SELECT {_ORDER_COLS} FROM orders o
                WHERE (o.tenant_id, o.order_source_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))
                   OR (o.tenant_id, o.order_number) IN (SELECT * FROM unnest($3::text[], $4::text[]))
                ORDER BY tenant_id, order_source_id {"FOR UPDATE" if lock else ""}""",
            it,
            iv,
            nt,
            nv,
        )
        return [OrderState(**dict(r.items())) for r in rows]

    async def lines(self, orders: Iterable[Key]) -> dict[Key, list[LineState]]:
        t, o = _pairs(orders)
        out: dict[Key, list[LineState]] = {}
        if not t:
            return out
        rows = await self.conn.fetch(
            """SELECT tenant_id, order_source_id, line_id, product_source_id, amount, version_key, deleted
               FROM order_lines
               WHERE (tenant_id, order_source_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))""",
            t,
            o,
        )
        for r in rows:
            out.setdefault((r["tenant_id"], r["order_source_id"]), []).append(
                LineState(r["line_id"], r["product_source_id"], r["amount"], r["version_key"], r["deleted"])
            )
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
               WHERE (r.tenant_id, r.return_source_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))
                  OR (r.tenant_id, r.anchor_order_source_id) IN (SELECT * FROM unnest($3::text[], $4::text[]))
                  OR (r.tenant_id, r.anchor_order_number) IN (SELECT * FROM unnest($5::text[], $6::text[]))""",
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
        if not orders:
            return
        cols = [c.strip() for c in _ORDER_COLS.split(",")]
        rows = [tuple(getattr(o, c) for c in cols) for o in orders]
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in cols[2:])
        await self.conn.execute(
            f"""INSERT INTO orders ({_ORDER_COLS})
                SELECT * FROM unnest({_ORDER_PARAMS})
                ON CONFLICT (tenant_id, order_source_id) DO UPDATE SET {updates}, updated_at = now()""",
            *_cols(rows),
        )

    async def write_lines(self, rows: Sequence[tuple[str, str, str, str | None, Decimal, str, bool]]) -> None:
        if rows:
            latest = {(r[0], r[1], r[2]): r for r in rows}
            await self.conn.execute(
                """INSERT INTO order_lines AS l (tenant_id, order_source_id, line_id, product_source_id, amount,
                       version_key, deleted)
                   SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::numeric[],
                       $6::text[], $7::boolean[])
                   ON CONFLICT (tenant_id, order_source_id, line_id) DO UPDATE SET
                       product_source_id = EXCLUDED.product_source_id, amount = EXCLUDED.amount,
                       version_key = EXCLUDED.version_key, deleted = EXCLUDED.deleted""",
                *_cols(list(latest.values())),
            )

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
        cols = _cols(rows)
        cols[8] = [json.dumps(v) for v in cols[8]]
        written = await self.conn.fetch(
            """INSERT INTO ledger (tenant_id, member_id, order_source_id, source, kind, points, reason,
                   source_version, source_event_ids, event_id)
               SELECT t, m, o, s, k, p, r, v, ARRAY(SELECT jsonb_array_elements_text(e::jsonb)), i
               FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::text[],
                   $8::text[], $9::text[], $10::text[]) WITH ORDINALITY AS u(t, m, o, s, k, p, r, v, e, i, n)
               ORDER BY n
               ON CONFLICT (tenant_id, source, order_source_id, kind, source_version) DO NOTHING
               RETURNING event_id""",
            *cols,
        )
        return {r["event_id"] for r in written}

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
