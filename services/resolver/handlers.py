"""Resolver handlers: link source customers to members, enrich orders and returns, park what cannot
resolve yet and let it flow on when the member or the link appears.

A batch is handled in three phases so a batch that carries a member, its customer and their order
resolves in one go: members, then customers, then the order-scoped events in arrival order. Every phase
is batched (a handful of statements per batch, whatever its size).
"""

from __future__ import annotations

from collections import Counter as Tally
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter

from canonical.envelope import Envelope
from canonical.events import (
    CustomerDeleted,
    CustomerUpserted,
    MemberData,
    MemberUpserted,
    OrderDeleted,
    OrderLineDeleted,
    OrderLineUpserted,
    OrderResolved,
    OrderUpserted,
    ReturnDeleted,
    ReturnResolved,
    ReturnUpserted,
    decode_event,
    encode,
)
from canonical.topics import RESOLVED_ORDER, RESOLVED_RETURN
from resolver.adapters import CustKey, MemberIndex, ParkedRow, PgResolverStore
from resolver.rules import Match, match_customer, normalize_email, version_key
from servicekit.consumer import Delivery, UnitOfWork
from servicekit.logging import get_logger

__all__ = ["EVENT_HANDLERS", "handle", "member_row", "relink_members"]

log = get_logger(__name__)

MATCHES = Counter("flash_resolver_customer_matches_total", "Customer link outcomes", ["how"])
RESOLVED = Counter("flash_resolver_resolved_total", "Orders/returns published with a member", ["kind"])
PARKED = Counter("flash_resolver_parked_total", "Events parked waiting for a member", ["kind"])
UNPARKED = Counter("flash_resolver_unparked_total", "Parked events that flowed on", ["kind"])

Scoped = OrderUpserted | OrderLineUpserted | OrderLineDeleted | OrderDeleted | ReturnUpserted | ReturnDeleted


def member_row(tenant_id: str, m: MemberData, version: str) -> tuple[Any, ...]:
    return (
        tenant_id,
        m.member_id,
        m.external_id or None,
        normalize_email(m.email),
        m.consent_marketing,
        m.consent_profiling,
        m.status,
        version_key(version),
    )


# ------------------------------------------------------------------------------------------ members


async def upsert_members(events: Sequence[MemberUpserted], uow: UnitOfWork) -> None:
    """Store members (stale versions lose), then re-link every customer their old or new IDs touch."""
    store = PgResolverStore(uow.conn)
    keys = [(e.tenant_id, e.member.member_id) for e in events]
    before = await store.members_by_id(keys)
    await store.upsert_members([member_row(e.tenant_id, e.member, e.source_version) for e in events], relinked=True)
    after = await store.members_by_id(keys)
    await relink_members([*before, *after], uow)


async def relink_members(rows: Iterable[Any], uow: UnitOfWork) -> None:
    """Re-resolve every customer whose external id or email equals one of these members' (old or new)
    values, and let parked events of customers that now resolve flow on. ``rows`` need tenant_id,
    external_id and email_normalized."""
    store = PgResolverStore(uow.conn)
    externals = {(r["tenant_id"], r["external_id"]) for r in rows if r["external_id"]}
    emails = {(r["tenant_id"], r["email_normalized"]) for r in rows if r["email_normalized"]}
    links = await store.links_touching(externals, emails)
    idx = await store.member_index(
        {(r["tenant_id"], r["external_id"]) for r in links if r["external_id"]} | externals,
        {(r["tenant_id"], r["email_normalized"]) for r in links if r["email_normalized"]} | emails,
    )
    changed: list[tuple[str, str, str, str, str | None, str, str]] = []
    resolved: list[CustKey] = []
    for r in links:
        by_ext, by_email = idx.for_tenant(r["tenant_id"])
        m = match_customer(r["external_id"], r["email_normalized"], by_ext, by_email)
        key: CustKey = (r["tenant_id"], r["connection_id"], r["source"], r["customer_source_id"])
        if (m.member_id, m.how, m.note) != (r["member_id"], r["match"], r["note"]):
            changed.append((*key, m.member_id, m.how, m.note))
            _count_match(r["tenant_id"], m)
        if m.member_id:
            resolved.append(key)
    await store.set_matches(changed)
    await _flow_on(uow, customers=resolved, emails=emails)


# ---------------------------------------------------------------------------------------- customers


async def upsert_customers(events: Sequence[CustomerUpserted | CustomerDeleted], uow: UnitOfWork) -> None:
    """Link each source customer to a member (guarded by source_version); unpark what now resolves."""
    store = PgResolverStore(uow.conn)
    latest: dict[CustKey, CustomerUpserted | CustomerDeleted] = {}
    for e in events:
        key: CustKey = (e.tenant_id, e.connection_id, e.source, e.source_id)
        prev = latest.get(key)
        if prev is None or version_key(prev.source_version) <= version_key(e.source_version):
            latest[key] = e
    ups = [e for e in latest.values() if isinstance(e, CustomerUpserted)]
    idx = await store.member_index(
        {(e.tenant_id, e.customer.external_id) for e in ups if e.customer.external_id},
        {(e.tenant_id, em) for e in ups if (em := normalize_email(e.customer.email))},
    )
    rows: list[tuple[Any, ...]] = []
    matches: dict[CustKey, Match] = {}
    for key, e in latest.items():
        if isinstance(e, CustomerUpserted):
            c = e.customer
            email = normalize_email(c.email)
            by_ext, by_email = idx.for_tenant(e.tenant_id)
            m = match_customer(c.external_id or None, email, by_ext, by_email)
            rows.append(
                (
                    *key,
                    e.entity,
                    c.parent_source_id,
                    c.external_id or None,
                    email,
                    m.member_id,
                    m.how,
                    m.note,
                    version_key(e.source_version),
                )
            )
        else:
            m = Match(None, "deleted")
            rows.append((*key, e.entity, None, None, None, None, "deleted", "", version_key(e.source_version)))
        matches[key] = m
    written = await store.upsert_links(rows)
    for key in written:
        _count_match(key[0], matches[key])
        if matches[key].how == "ambiguous":
            log.warning(
                "customer matches several members; left unresolved",
                tenant_id=key[0],
                customer_source_id=key[3],
                note=matches[key].note,
            )
    await _flow_on(uow, customers=[k for k in written if matches[k].member_id])


def _count_match(tenant: str, m: Match) -> None:
    MATCHES.labels(m.how).inc()


# ------------------------------------------------------------------------------------------- orders


@dataclass
class _Lookup:
    """What a batch of order-scoped events needs to resolve, fetched in one statement per kind."""

    links: dict[CustKey, str | None] = field(default_factory=dict)
    members: MemberIndex | None = None
    order_by_id: dict[tuple[str, str], str] = field(default_factory=dict)
    order_by_number: dict[tuple[str, str], str] = field(default_factory=dict)

    @classmethod
    async def load(cls, store: PgResolverStore, heads: Sequence[OrderUpserted | ReturnUpserted]) -> _Lookup:
        keys: set[CustKey] = set()
        emails: set[tuple[str, str]] = set()
        ids: set[tuple[str, str]] = set()
        numbers: set[tuple[str, str]] = set()
        for e in heads:
            if isinstance(e, OrderUpserted):
                if e.order.customer_source_id:
                    keys.add((e.tenant_id, e.connection_id, e.source, e.order.customer_source_id))
                elif em := normalize_email(e.order.email):
                    emails.add((e.tenant_id, em))
            else:
                r = e.return_
                if r.customer_source_id:
                    keys.add((e.tenant_id, e.connection_id, e.source, r.customer_source_id))
                if r.original_order_source_id:
                    ids.add((e.tenant_id, r.original_order_source_id))
                if r.original_order_number:
                    numbers.add((e.tenant_id, r.original_order_number))
        look = cls(links=await store.links(keys))
        look.members = await store.member_index((), emails) if emails else None
        look.order_by_id, look.order_by_number = await store.order_members(ids, numbers)
        return look

    def member_for_order(
        self, tenant: str, connection: str, source: str, customer: str | None, email: str | None
    ) -> str | None:
        if customer:
            return self.links.get((tenant, connection, source, customer))
        if email and self.members is not None:
            _, by_email = self.members.for_tenant(tenant)
            return match_customer(None, email, {}, by_email).member_id
        return None

    def member_for_return(
        self,
        tenant: str,
        connection: str,
        source: str,
        customer: str | None,
        anchor_id: str | None,
        anchor_number: str | None,
    ) -> str | None:
        if customer and (m := self.links.get((tenant, connection, source, customer))):
            return m
        if anchor_id and (m := self.order_by_id.get((tenant, anchor_id))):
            return m
        if anchor_number and (m := self.order_by_number.get((tenant, anchor_number))):
            return m
        return None


def order_resolved(e: OrderUpserted, member_id: str) -> OrderResolved:
    return OrderResolved(
        tenant_id=e.tenant_id,
        connection_id=e.connection_id,
        source=e.source,
        entity=e.entity,
        source_id=e.source_id,
        source_version=e.source_version,
        correlation_id=e.correlation_id,
        observed_at=e.observed_at,
        member_id=member_id,
        order=e.order,
        upstream_event_id=e.event_id,
    )


def return_resolved(e: ReturnUpserted, member_id: str) -> ReturnResolved:
    return ReturnResolved(
        tenant_id=e.tenant_id,
        connection_id=e.connection_id,
        source=e.source,
        entity=e.entity,
        source_id=e.source_id,
        source_version=e.source_version,
        correlation_id=e.correlation_id,
        observed_at=e.observed_at,
        member_id=member_id,
        return_=e.return_,
        upstream_event_id=e.event_id,
    )


class _OrderRouter:
    """Routes one batch of order-scoped events in arrival order."""

    def __init__(self, uow: UnitOfWork, look: _Lookup, parked: dict[tuple[str, str], ParkedRow]) -> None:
        self.uow = uow
        self.store = PgResolverStore(uow.conn)
        self.look = look
        self.parked_orders: set[tuple[str, str]] = set(parked)
        self.to_park: list[tuple[Any, ...]] = []
        self.resolved_orders: list[tuple[str, str, str | None, str]] = []
        self.resolved: Tally[tuple[str, str]] = Tally()

    async def route(self, events: Sequence[Scoped]) -> None:
        for e in events:
            await ORDER_ROUTES[type(e)](self, e)
        for (_tenant, kind), n in self.resolved.items():
            RESOLVED.labels(kind).inc(n)
        await self.store.park(self.to_park)
        await self.store.upsert_order_members(self.resolved_orders)
        # Returns parked because their order was unknown flow on now that it resolved.
        await _flow_on(
            self.uow,
            anchor_ids=[(t, o) for t, o, _, _ in self.resolved_orders],
            anchor_numbers=[(t, n) for t, _, n, _ in self.resolved_orders if n],
        )

    async def resolve_order(self, e: OrderUpserted) -> None:
        o = e.order
        email = normalize_email(o.email)
        member = self.look.member_for_order(e.tenant_id, e.connection_id, e.source, o.customer_source_id, email)
        okey = (e.tenant_id, e.order_source_id)
        if member is None:
            why = (
                f"customer {o.customer_source_id} has no member yet"
                if o.customer_source_id
                else "order names no customer; its email matches no single member"
            )
            self._park(e, "order", o.customer_source_id, None if o.customer_source_id else email, None, None, why)
            return
        if okey in self.parked_orders:
            await self._release(okey, member)
        self.uow.emit(RESOLVED_ORDER, order_resolved(e, member))
        self.resolved_orders.append((e.tenant_id, e.order_source_id, o.order_number, member))
        self.look.order_by_id[okey] = member
        if o.order_number:
            self.look.order_by_number[(e.tenant_id, o.order_number)] = member
        self.resolved[(e.tenant_id, "order")] += 1

    async def resolve_return(self, e: ReturnUpserted) -> None:
        r = e.return_
        member = self.look.member_for_return(
            e.tenant_id,
            e.connection_id,
            e.source,
            r.customer_source_id,
            r.original_order_source_id,
            r.original_order_number,
        )
        okey = (e.tenant_id, e.order_source_id)
        if member is None:
            self._park(
                e,
                "return",
                r.customer_source_id,
                None,
                r.original_order_source_id,
                r.original_order_number,
                "neither the customer nor the original order has a member yet",
            )
            return
        if okey in self.parked_orders:
            await self._release(okey, member)
        self.uow.emit(RESOLVED_RETURN, return_resolved(e, member))
        self.resolved[(e.tenant_id, "return")] += 1

    async def forward_part(self, e: OrderLineUpserted | OrderLineDeleted | OrderDeleted | ReturnDeleted) -> None:
        """Lines and deletes need no member; they queue behind a parked head of the same order."""
        if (e.tenant_id, e.order_source_id) in self.parked_orders:
            self._park(e, "part", None, None, None, None, "queued behind a parked event of the same order")
            return
        self.uow.emit(RESOLVED_RETURN if type(e) is ReturnDeleted else RESOLVED_ORDER, e)

    def _park(
        self,
        e: Envelope,
        kind: str,
        customer: str | None,
        email: str | None,
        anchor_id: str | None,
        anchor_number: str | None,
        reason: str,
    ) -> None:
        okey = (e.tenant_id, _order_of(e))
        self.parked_orders.add(okey)
        self.to_park.append(
            (
                e.tenant_id,
                okey[1],
                kind,
                e.connection_id,
                e.source,
                customer,
                email,
                anchor_id,
                anchor_number,
                e.event_id,
                e.event_type,
                encode(e),
                reason,
            )
        )
        PARKED.labels(kind).inc()

    async def _release(self, okey: tuple[str, str], member: str) -> None:
        """A newer head of a parked order resolved: what waited before it flows first, with its member."""
        await self.store.park(self.to_park)
        self.to_park = []
        rows = await self.store.parked_rows_of([okey])
        for row in rows:
            _emit_parked(self.uow, row, member)
        await self.store.unpark((r.tenant_id, r.seq) for r in rows)
        self.parked_orders.discard(okey)


def _order_of(e: Envelope) -> str:
    return str(getattr(e, "order_source_id", e.source_id))


ORDER_ROUTES: dict[type[Envelope], Callable[[_OrderRouter, Any], Awaitable[None]]] = {
    OrderUpserted: _OrderRouter.resolve_order,
    ReturnUpserted: _OrderRouter.resolve_return,
    OrderLineUpserted: _OrderRouter.forward_part,
    OrderLineDeleted: _OrderRouter.forward_part,
    OrderDeleted: _OrderRouter.forward_part,
    ReturnDeleted: _OrderRouter.forward_part,
}


async def route_orders(events: Sequence[Scoped], uow: UnitOfWork) -> None:
    store = PgResolverStore(uow.conn)
    heads = [e for e in events if type(e) is OrderUpserted or type(e) is ReturnUpserted]
    look = await _Lookup.load(store, heads)
    parked = await store.parked_orders({(e.tenant_id, e.order_source_id) for e in events})
    await _OrderRouter(uow, look, parked).route(events)


# -------------------------------------------------------------------------------------------- unpark


def _emit_parked(uow: UnitOfWork, row: ParkedRow, member: str) -> None:
    e = decode_event(row.payload)
    if isinstance(e, OrderUpserted):
        uow.emit(RESOLVED_ORDER, order_resolved(e, member))
    elif isinstance(e, ReturnUpserted):
        uow.emit(RESOLVED_RETURN, return_resolved(e, member))
    elif isinstance(e, ReturnDeleted):
        uow.emit(RESOLVED_RETURN, e)
    else:
        uow.emit(RESOLVED_ORDER, e)
    UNPARKED.labels(row.kind).inc()


async def _flow_on(
    uow: UnitOfWork,
    *,
    customers: Iterable[CustKey] = (),
    emails: Iterable[tuple[str, str]] = (),
    anchor_ids: Iterable[tuple[str, str]] = (),
    anchor_numbers: Iterable[tuple[str, str]] = (),
) -> None:
    """Release parked orders waiting on these customers/emails/orders whose heads now resolve, in order.

    An order's parked rows are walked by seq: a head (order/return) that resolves is emitted with its
    member, the parts behind it follow; the first head that still does not resolve keeps itself and
    everything after it parked. Released orders may in turn release returns anchored to them.
    """
    store = PgResolverStore(uow.conn)
    orders = await store.orders_waiting_on(customers, emails, anchor_ids, anchor_numbers)
    seen: set[tuple[str, str]] = set()
    while orders - seen:
        todo = orders - seen
        seen |= todo
        rows = await store.parked_rows_of(todo)
        heads = [decode_event(r.payload) for r in rows if r.kind != "part"]
        look = await _Lookup.load(store, [h for h in heads if isinstance(h, OrderUpserted | ReturnUpserted)])
        by_order: dict[tuple[str, str], list[ParkedRow]] = defaultdict(list)
        for r in rows:
            by_order[(r.tenant_id, r.order_source_id)].append(r)
        released: list[tuple[str, int]] = []
        newly: list[tuple[str, str, str | None, str]] = []
        for group in by_order.values():
            member: str | None = None
            for row in group:
                if row.kind != "part":
                    e = decode_event(row.payload)
                    if isinstance(e, OrderUpserted):
                        member = look.member_for_order(
                            row.tenant_id,
                            row.connection_id,
                            row.source,
                            row.customer_source_id,
                            row.email_normalized,
                        )
                        if member:
                            newly.append((e.tenant_id, e.order_source_id, e.order.order_number, member))
                    else:
                        member = look.member_for_return(
                            row.tenant_id,
                            row.connection_id,
                            row.source,
                            row.customer_source_id,
                            row.anchor_order_source_id,
                            row.anchor_order_number,
                        )
                if member is None:
                    break
                _emit_parked(uow, row, member)
                released.append((row.tenant_id, row.seq))
        await store.unpark(released)
        await store.upsert_order_members(newly)
        if newly:
            again = await store.orders_waiting_on(
                anchor_ids=[(t, o) for t, o, _, _ in newly],
                anchor_numbers=[(t, n) for t, _, n, _ in newly if n],
            )
            seen -= again  # returns anchored to orders released just now get another walk
            orders |= again


# -------------------------------------------------------------------------------------------- entry


EVENT_HANDLERS: dict[type[Envelope], Callable[[Sequence[Any], UnitOfWork], Awaitable[None]]] = {
    MemberUpserted: upsert_members,
    CustomerUpserted: upsert_customers,
    CustomerDeleted: upsert_customers,
    OrderUpserted: route_orders,
    OrderLineUpserted: route_orders,
    OrderLineDeleted: route_orders,
    OrderDeleted: route_orders,
    ReturnUpserted: route_orders,
    ReturnDeleted: route_orders,
}
"""Event type -> batch handler. Handlers sharing a function get their events together, in arrival order."""

_PHASES: tuple[Callable[[Sequence[Any], UnitOfWork], Awaitable[None]], ...] = (
    upsert_members,
    upsert_customers,
    route_orders,
)


async def handle(batch: Sequence[Delivery[Any]], uow: UnitOfWork) -> None:
    """The resolver consumer's handler: members, then customers, then order-scoped events."""
    groups: dict[Callable[[Sequence[Any], UnitOfWork], Awaitable[None]], list[Any]] = defaultdict(list)
    for d in batch:
        fn = EVENT_HANDLERS.get(type(d.event))
        if fn is not None:
            groups[fn].append(d.event)
    for fn in _PHASES:
        if groups.get(fn):
            await fn(groups[fn], uow)
