"""Points engine handlers: keep order, line, return and product state; reconcile each touched order to
what its facts say; append the differences to the ledger and publish them on points.ledger.

One batch is loaded with a fixed handful of statements (programs, products, orders, lines, returns),
handled in memory in arrival order (one function per event type, listed in ``EVENT_HANDLERS``), then
written back with one statement per table. Nothing on the hot path issues a query per event.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter as Tally
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

from prometheus_client import Counter

from canonical.envelope import Envelope, Source, make_event_id
from canonical.events import (
    OrderDeleted,
    OrderLineDeleted,
    OrderLineUpserted,
    OrderResolved,
    PointsKind,
    PointsLedgerEntry,
    ProductDeleted,
    ProductUpserted,
    ReturnDeleted,
    ReturnResolved,
)
from canonical.topics import POINTS_LEDGER, POINTS_MEMBER_LEDGER
from points.adapters import Conn, LedgerRow, PgPointsStore
from points.rules import LineState, OrderState, Program, ReturnState, reconcile, version_key
from servicekit import metrics
from servicekit.consumer import Delivery, UnitOfWork
from servicekit.errors import Poison

__all__ = ["EVENT_HANDLERS", "PointsBatch", "handle", "make_handler", "mature_orders"]

Key = tuple[str, str]
Clock = Callable[[], dt.datetime]

# No tenant label: one series per tenant per metric would grow without bound (servicekit.metrics).
ENTRIES = Counter("flash_points_ledger_entries_total", "Ledger entries appended", ["kind"])


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class PointsBatch:
    """The state one batch touches, loaded up front, changed in memory, written back in one go."""

    def __init__(self, conn: Conn, now: dt.datetime) -> None:
        self.store = PgPointsStore(conn)
        self.now = now
        self.programs: dict[str, Program] = {}
        self.categories: dict[Key, str | None] = {}
        self.product_versions: dict[Key, str] = {}
        self.product_writes: list[tuple[str, str, str | None, str]] = []
        self.orders: dict[Key, OrderState] = {}
        self.by_number: dict[Key, str] = {}
        self.returns: dict[Key, ReturnState] = {}
        self.returns_by_anchor: dict[Key, set[str]] = defaultdict(set)
        self.returns_by_number: dict[Key, set[str]] = defaultdict(set)
        self.line_orders: dict[Key, str] = {}
        self.ledger: list[LedgerRow] = []
        self.entries: dict[str, PointsLedgerEntry] = {}
        self.shortfalls: list[tuple[str, str, str, int, str]] = []
        self.balances: dict[Key, int] = {}

    # ------------------------------------------------------------------------------------------ load

    async def load(self, events: Sequence[Envelope], extra_orders: Iterable[Key] = ()) -> None:
        # Dispatch on the exact type: isinstance on pydantic models goes through ABCMeta and costs more
        # than the rest of this loop.
        self.programs = await self.store.programs({e.tenant_id for e in events} | {t for t, _ in extra_orders})
        products: list[ProductUpserted] = []
        tombstones: list[OrderLineDeleted] = []
        resolved: list[OrderResolved] = []
        line_ups: list[OrderLineUpserted] = []
        ids: set[Key] = set(extra_orders)
        numbers: set[Key] = set()
        return_ids: set[Key] = set()
        for e in events:
            if type(e) is OrderResolved:
                resolved.append(e)
                ids.add((e.tenant_id, e.source_id))
            elif type(e) is OrderLineUpserted:
                line_ups.append(e)
                ids.add((e.tenant_id, e.order_id))
            elif type(e) is OrderDeleted:
                ids.add((e.tenant_id, e.source_id))
            elif type(e) is OrderLineDeleted:
                tombstones.append(e)
            elif type(e) is ReturnResolved:
                r = e.return_
                return_ids.add((e.tenant_id, e.source_id))
                if r.original_order_source_id:
                    ids.add((e.tenant_id, r.original_order_source_id))
                if r.original_order_number:
                    numbers.add((e.tenant_id, r.original_order_number))
            elif type(e) is ReturnDeleted:
                return_ids.add((e.tenant_id, e.source_id))
            elif type(e) is ProductUpserted:
                products.append(e)
        if products:
            known = await self.store.products((e.tenant_id, e.source_id) for e in products)
            self._remember_products(known)
            changed = {
                (e.tenant_id, e.source_id)
                for e in products
                if known.get((e.tenant_id, e.source_id), (None, ""))[0] != e.product.category
            }
            ids |= await self.store.orders_with_products(changed)
        if tombstones:
            orphans = [(e.tenant_id, e.source_id) for e in tombstones if not e.order_id]
            if orphans:
                self.line_orders = await self.store.orders_of_lines(orphans)
            for e in tombstones:
                ids.add((e.tenant_id, e.order_id or self.line_orders.get((e.tenant_id, e.source_id), e.source_id)))
        for o in await self.store.orders(ids, numbers):
            self._add_order(o)
        wanted = {
            (t, ln.product_source_id)
            for (t, _), o in self.orders.items()
            for ln in o.lines.values()
            if ln.product_source_id
        }
        for e in resolved:
            if e.order.lines:
                wanted.update((e.tenant_id, ln.product_source_id) for ln in e.order.lines if ln.product_source_id)
        for e in line_ups:
            if e.line.product_source_id:
                wanted.add((e.tenant_id, e.line.product_source_id))
        missing = {k for k in wanted if k not in self.product_versions}
        if missing:
            self._remember_products(await self.store.products(missing))
        numbers |= {(t, o.order_number) for (t, _), o in self.orders.items() if o.order_number}
        numbers |= {(e.tenant_id, e.order.order_number) for e in resolved if e.order.order_number}
        for loaded in await self.store.returns(return_ids, ids | set(self.orders), numbers):
            self._index_return(loaded)
        shortfall_tenants = {t for t, p in self.programs.items() if p.negative_balance == "record_shortfall"}
        if shortfall_tenants:
            members = {(o.tenant_id, o.member_id) for o in self.orders.values() if o.tenant_id in shortfall_tenants}
            members |= {(e.tenant_id, e.member_id) for e in resolved if e.tenant_id in shortfall_tenants}
            self.balances = defaultdict(int, await self.store.balances(members))

    def _remember_products(self, rows: dict[Key, tuple[str | None, str]]) -> None:
        for key, (category, vk) in rows.items():
            self.categories[key] = category
            self.product_versions[key] = vk

    def _add_order(self, o: OrderState) -> None:
        self.orders[(o.tenant_id, o.order_source_id)] = o
        if o.order_number:
            self.by_number[(o.tenant_id, o.order_number)] = o.order_source_id

    def _index_return(self, r: ReturnState) -> None:
        self.returns[(r.tenant_id, r.return_source_id)] = r
        if r.anchor_order_source_id:
            self.returns_by_anchor[(r.tenant_id, r.anchor_order_source_id)].add(r.return_source_id)
        if r.anchor_order_number:
            self.returns_by_number[(r.tenant_id, r.anchor_order_number)].add(r.return_source_id)

    # ----------------------------------------------------------------------------------------- state

    def program(self, tenant: str) -> Program:
        p = self.programs.get(tenant)
        if p is None:
            raise Poison(
                f"tenant {tenant} has no points program; set one with `flash points program set FILE` "
                f"and replay this message"
            )
        return p

    def order(self, key: Key) -> OrderState:
        o = self.orders.get(key)
        if o is None:
            o = self.orders[key] = OrderState(key[0], key[1])
        return o

    def anchored_order(self, r: ReturnState) -> OrderState | None:
        if r.anchor_order_source_id:
            o = self.orders.get((r.tenant_id, r.anchor_order_source_id))
            if o is not None and o.known:
                return o
        if r.anchor_order_number:
            oid = self.by_number.get((r.tenant_id, r.anchor_order_number))
            if oid is not None:
                return self.orders[(r.tenant_id, oid)]
        return None

    def returns_of(self, o: OrderState) -> list[ReturnState]:
        if not self.returns:
            return []
        ids = set(self.returns_by_anchor.get((o.tenant_id, o.order_source_id), ()))
        if o.order_number:
            for rid in self.returns_by_number.get((o.tenant_id, o.order_number), ()):
                r = self.returns[(o.tenant_id, rid)]
                if r.anchor_order_source_id in (None, o.order_source_id):
                    ids.add(rid)
        return [self.returns[(o.tenant_id, rid)] for rid in sorted(ids)]

    # ------------------------------------------------------------------------------------- reconcile

    def settle(self, o: OrderState, trigger: str, at: dt.datetime | None, event_ids: Sequence[str]) -> None:
        """Reconcile ``o`` and queue the ledger entries the change calls for, keyed by ``trigger``."""
        if not o.known:
            return
        prog = self.program(o.tenant_id)
        cats = {
            pid: self.categories.get((o.tenant_id, pid)) for ln in o.lines.values() if (pid := ln.product_source_id)
        }
        res = reconcile(prog, o, cats, self.returns_of(o), now=self.now, at=at)
        o.dirty = True
        if res.earn_kind is not None:
            self._entry(o, res.earn_kind, res.earn_delta, res.reason, trigger, at, event_ids)
            o.earned += res.earn_delta
        d = res.claw_delta
        if d:
            short = 0
            if d > 0 and o.shortfall < 0:
                short = min(d, -o.shortfall)
            elif d < 0 and prog.negative_balance == "record_shortfall":
                available = max(0, self.balances.get((o.tenant_id, o.member_id), 0))
                short = d - max(d, -available)
            take = d - short
            if take:
                what = "returned" if take < 0 else "return cancelled or order changed; clawback released"
                self._entry(
                    o,
                    "clawback",
                    take,
                    f"order {o.order_number or o.order_source_id}: {what}",
                    trigger,
                    at,
                    event_ids,
                )
                o.clawed += take
            if short:
                o.shortfall += short
                self.shortfalls.append((o.tenant_id, o.member_id, o.order_source_id, short, trigger))

    def _entry(
        self,
        o: OrderState,
        kind: PointsKind,
        points: int,
        reason: str,
        trigger: str,
        at: dt.datetime | None,
        event_ids: Sequence[str],
    ) -> None:
        source = cast(Source, o.source or "flash")
        connection = o.connection_id or "points"
        version = f"{kind}:{trigger}"[:512]
        event_id = make_event_id(
            "points.ledger_entry", o.tenant_id, connection, source, "points.ledger", o.order_source_id, version
        )
        # The ids are derived here (exactly as Envelope derives them) because the ledger row needs them too.
        entry = PointsLedgerEntry(
            tenant_id=o.tenant_id,
            connection_id=connection,
            source=source,
            entity="points.ledger",
            source_id=o.order_source_id,
            source_version=version,
            event_id=event_id,
            correlation_id=event_id,
            observed_at=at or self.now,
            member_id=o.member_id or "unknown",
            order_source_id=o.order_source_id,
            kind=kind,
            points=points,
            reason=reason,
            source_event_ids=tuple(event_ids),
            created_at=self.now,
        )
        self.entries[entry.event_id] = entry
        self.ledger.append(
            (
                o.tenant_id,
                entry.member_id,
                o.order_source_id,
                o.source,
                kind,
                points,
                reason,
                trigger,
                list(event_ids),
                entry.event_id,
            )
        )
        if self.balances:
            self.balances[(o.tenant_id, o.member_id)] = self.balances.get((o.tenant_id, o.member_id), 0) + points

    # ----------------------------------------------------------------------------------------- write

    async def flush(self, uow: UnitOfWork) -> None:
        await self.store.write_products(self.product_writes)
        await self.store.write_orders([o for o in self.orders.values() if (o.dirty and o.known) or o.lines_dirty])
        await self.store.write_returns([r for r in self.returns.values() if r.dirty])
        written = await self.store.append_ledger(self.ledger)
        await self.store.record_shortfalls(self.shortfalls)
        rows: list[LedgerRow] = []
        for row in self.ledger:
            if row[9] in written:
                rows.append(row)
                written.discard(row[9])  # a repeated entry in one batch was inserted (and is counted) once
        if not rows:
            return
        # Each member's entries of this batch get the next sequence numbers and running balances, in ledger
        # order: the store hands back where each member ends, and the batch counts back from there.
        moves: dict[Key, list[int]] = {}
        for row in rows:
            m = moves.setdefault((row[0], row[1]), [0, 0])
            m[0] += 1
            m[1] += row[5]
        ends = await self.store.advance_members([(t, mb, n, p) for (t, mb), (n, p) in moves.items()])
        position = {k: (ends[k][0] - n, ends[k][1] - p) for k, (n, p) in moves.items()}
        counts: Tally[tuple[str, str]] = Tally()
        for row in rows:
            key = (row[0], row[1])
            seq, balance = position[key]
            seq, balance = seq + 1, balance + row[5]
            position[key] = (seq, balance)
            entry = self.entries[row[9]].model_copy(update={"member_sequence": seq, "balance_after": balance})
            uow.emit(POINTS_LEDGER, entry)
            uow.emit(POINTS_MEMBER_LEDGER, entry, key=entry.member_key)
            counts[(row[0], row[4])] += 1
        for (_tenant, kind), n in counts.items():
            ENTRIES.labels(kind).inc(n)
        _count_points(rows)


def _count_points(rows: Iterable[LedgerRow]) -> None:
    """flash_points_total by kind (absolute points; no tenant label: servicekit.metrics)."""
    points: Tally[str] = Tally()
    for row in rows:
        points[row[4]] += abs(row[5])
    for kind, n in points.items():
        metrics.POINTS.labels(kind).inc(n)


# ----------------------------------------------------------------------------------------- handlers


def upsert_product(b: PointsBatch, e: ProductUpserted) -> None:
    key = (e.tenant_id, e.source_id)
    vk = version_key(e.source_version)
    if vk <= b.product_versions.get(key, ""):
        return
    old = b.categories.get(key)
    b.categories[key] = e.product.category
    b.product_versions[key] = vk
    b.product_writes.append((e.tenant_id, e.source_id, e.product.category, vk))
    if old != e.product.category:
        for o in list(b.orders.values()):
            if o.tenant_id == e.tenant_id and any(ln.product_source_id == e.source_id for ln in o.lines.values()):
                b.settle(o, f"product:{e.source_id}@{e.source_version}", e.observed_at, (e.event_id,))


def ignore(b: PointsBatch, e: Envelope) -> None:
    """Deleting a product keeps its category for the orders that have it (history does not change)."""


def upsert_order(b: PointsBatch, e: OrderResolved) -> None:
    o = b.order((e.tenant_id, e.order_source_id))
    vk = version_key(e.source_version)
    if o.known and vk <= o.version_key:
        return  # stale or same version: never roll an order back
    d = e.order
    o.known = True
    o.connection_id, o.source, o.member_id = e.connection_id, e.source, e.member_id
    o.version, o.version_key = e.source_version, vk
    o.status, o.lifecycle, o.currency = d.status, d.lifecycle, d.currency
    o.exchange_rate = d.exchange_rate
    o.total_amount, o.tax_amount, o.shipping_amount = d.total_amount, d.tax_amount, d.shipping_amount
    if d.order_number != o.order_number:
        o.order_number = d.order_number
        if d.order_number:
            b.by_number[(e.tenant_id, d.order_number)] = e.order_source_id
    if d.lines is not None:
        if o.lines:
            fresh = {ln.line_id for ln in d.lines}
            for ln in o.lines.values():
                if ln.line_id not in fresh and not ln.deleted:
                    ln.deleted, ln.version_key = True, vk
        for item in d.lines:
            o.lines[item.line_id] = LineState(item.line_id, item.product_source_id, item.amount, vk)
        o.lines_dirty = True
    b.settle(o, f"order@{e.source_version}", e.observed_at, (e.upstream_event_id, e.event_id))


def upsert_line(b: PointsBatch, e: OrderLineUpserted) -> None:
    o = b.order((e.tenant_id, e.order_id))
    vk = version_key(e.source_version)
    cur = o.lines.get(e.line.line_id)
    if cur is not None and vk <= cur.version_key:
        return
    o.lines[e.line.line_id] = LineState(e.line.line_id, e.line.product_source_id, e.line.amount, vk)
    o.lines_dirty = True
    b.settle(o, f"line:{e.line.line_id}@{e.source_version}", e.observed_at, (e.event_id,))


def delete_line(b: PointsBatch, e: OrderLineDeleted) -> None:
    order_id = e.order_id or b.line_orders.get((e.tenant_id, e.source_id))
    if order_id is None:
        return  # a tombstone of a line never seen: nothing to undo
    o = b.order((e.tenant_id, order_id))
    cur = o.lines.get(e.source_id)
    vk = version_key(e.source_version)
    if cur is None or cur.deleted or (vk < cur.version_key):
        return
    cur.deleted, cur.version_key = True, max(vk, cur.version_key)
    o.lines_dirty = True
    b.settle(o, f"line-deleted:{e.source_id}@{e.source_version}", e.observed_at, (e.event_id,))


def delete_order(b: PointsBatch, e: OrderDeleted) -> None:
    o = b.order((e.tenant_id, e.order_source_id))
    if o.deleted:
        return
    o.deleted = True
    o.dirty = True
    b.settle(o, f"order-deleted@{e.source_version}", e.observed_at, (e.event_id,))


def upsert_return(b: PointsBatch, e: ReturnResolved) -> None:
    key = (e.tenant_id, e.source_id)
    vk = version_key(e.source_version)
    cur = b.returns.get(key)
    if cur is not None and vk <= cur.version_key:
        return
    data = e.return_
    rs = ReturnState(
        e.tenant_id,
        e.source_id,
        data.original_order_source_id,
        data.original_order_number,
        vk,
        data.lifecycle,
        data.currency,
        data.exchange_rate,
        data.amount,
        deleted=False,
        dirty=True,
    )
    b._index_return(rs)
    o = b.anchored_order(rs)
    if o is not None:  # otherwise it waits in `returns` until its order arrives
        b.settle(o, f"return:{e.source_id}@{e.source_version}", e.observed_at, (e.upstream_event_id, e.event_id))


def delete_return(b: PointsBatch, e: ReturnDeleted) -> None:
    r = b.returns.get((e.tenant_id, e.source_id))
    if r is None or r.deleted:
        return
    r.deleted, r.dirty = True, True
    o = b.anchored_order(r)
    if o is not None:
        b.settle(o, f"return-deleted:{e.source_id}@{e.source_version}", e.observed_at, (e.event_id,))


EVENT_HANDLERS: dict[type[Envelope], Callable[[PointsBatch, Any], None]] = {
    ProductUpserted: upsert_product,
    ProductDeleted: ignore,
    OrderResolved: upsert_order,
    OrderLineUpserted: upsert_line,
    OrderLineDeleted: delete_line,
    OrderDeleted: delete_order,
    ReturnResolved: upsert_return,
    ReturnDeleted: delete_return,
}


def make_handler(clock: Clock = utcnow) -> Callable[[Sequence[Delivery[Any]], UnitOfWork], Any]:
    """The consumer's handler; ``clock`` decides when return windows have passed (tests inject one)."""

    async def handle(batch: Sequence[Delivery[Any]], uow: UnitOfWork) -> None:
        await handle_events([d.event for d in batch], uow, now=clock())

    return handle


async def handle_events(events: Sequence[Envelope], uow: UnitOfWork, *, now: dt.datetime) -> None:
    """Products first (so the batch's orders see current categories), then the rest in arrival order."""
    b = PointsBatch(uow.conn, now)
    await b.load(events)
    later: list[Envelope] = []
    for e in events:
        t = type(e)
        if t is ProductUpserted or t is ProductDeleted:
            EVENT_HANDLERS[t](b, e)
        else:
            later.append(e)
    for e in later:
        fn = EVENT_HANDLERS.get(type(e))
        if fn is not None:
            fn(b, e)
    await b.flush(uow)


handle = make_handler()


async def mature_orders(conn: Conn, uow: UnitOfWork, *, now: dt.datetime, limit: int = 500) -> int:
    """Award pending orders whose return window has passed; returns how many were due."""
    keys = await PgPointsStore(conn).maturing(now, limit)
    if not keys:
        return 0
    b = PointsBatch(conn, now)
    await b.load([], extra_orders=keys)
    for key in keys:
        o = b.orders.get(key)
        if o is None or key[0] not in b.programs:
            continue
        prog = b.programs[key[0]]
        if o.awardable_since is not None and o.awardable_since + prog.window <= now:
            b.settle(o, f"matured@{o.version}", None, ())
    await b.flush(uow)
    return len(keys)
