"""Resolver + points engine on real PostgreSQL, driven through the real consumer runtime (dedupe, outbox,
dead letters) with a recording publisher instead of Kafka: fast, and every scenario of the issue."""

from __future__ import annotations

import datetime as dt
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from canonical.envelope import Envelope
from canonical.events import (
    CustomerData,
    CustomerUpserted,
    MemberData,
    MemberUpserted,
    OrderData,
    OrderDeleted,
    OrderLineData,
    OrderLineDeleted,
    OrderLineUpserted,
    OrderUpserted,
    ProductData,
    ProductUpserted,
    ReturnData,
    ReturnUpserted,
    decode_event,
    encode,
)
from canonical.topics import (
    CANONICAL_CUSTOMER,
    CANONICAL_ORDER,
    CANONICAL_PRODUCT,
    CANONICAL_RETURN,
    MEMBERS,
    POINTS_LEDGER,
    POINTS_MEMBER_LEDGER,
    RESOLVED_ORDER,
    RESOLVED_RETURN,
)
from points import app as points_app
from points.cli import balances, set_program
from points.handlers import make_handler
from points.rules import Program
from resolver import app as resolver_app
from resolver.cli import import_members, resolver_stats
from resolver.handlers import handle as resolve
from servicekit.consumer import PipeConsumer
from servicekit.db import migrate
from servicekit.kafka import OutMessage
from servicekit.outbox import TaskOutbox
from servicekit.runtime import Infra

NOW = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)


class FakePublisher:
    """Records what would have gone to the broker."""

    def __init__(self) -> None:
        self.sent: list[OutMessage] = []

    async def send_all(self, messages: Sequence[OutMessage]) -> list[tuple[int, int]]:
        self.sent.extend(messages)
        return [(0, i) for i in range(len(messages))]


@dataclass
class Rec:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    timestamp: int = 0


_TOPIC = {
    "member.upserted": MEMBERS,
    "customer.upserted": CANONICAL_CUSTOMER,
    "customer.deleted": CANONICAL_CUSTOMER,
    "product.upserted": CANONICAL_PRODUCT,
    "return.upserted": CANONICAL_RETURN,
    "return.deleted": CANONICAL_RETURN,
}


class Pipe:
    """canonical events -> resolver consumer -> (recorded) resolved events -> points consumer."""

    def __init__(self, infra: Infra, clock: Any = lambda: NOW) -> None:
        self.infra = infra
        self.clock = clock
        self.pub = FakePublisher()
        common: dict[str, Any] = {"settings": infra.settings, "pool": infra.pool, "publisher": self.pub}
        self.resolver = PipeConsumer("resolver", [], resolve, accepted=resolver_app.ACCEPTED, **common)
        self.points = PipeConsumer(
            "points", [], make_handler(lambda: self.clock()), accepted=points_app.ACCEPTED, **common
        )
        self.offsets = itertools.count()
        self.fed = 0

    def _recs(self, msgs: Sequence[tuple[str, bytes | None, bytes]]) -> list[Rec]:
        return [Rec(t, 0, next(self.offsets), k, v) for t, k, v in msgs]

    async def feed(self, events: Sequence[Envelope]) -> None:
        to_points = [e for e in events if isinstance(e, ProductUpserted)]
        to_resolver = [e for e in events if not isinstance(e, ProductUpserted)]
        if to_points:
            await self.points.process_batch(
                self._recs([(self.infra.settings.topic(CANONICAL_PRODUCT), e.key, encode(e)) for e in to_points])
            )
        if to_resolver:
            await self.resolver.process_batch(
                self._recs(
                    [
                        (self.infra.settings.topic(_TOPIC.get(e.event_type, CANONICAL_ORDER)), e.key, encode(e))
                        for e in to_resolver
                    ]
                )
            )
        await self.pump()

    async def pump(self) -> None:
        """Hand what the resolver (or a task) published since last time to the points consumer."""
        new, self.fed = self.pub.sent[self.fed :], len(self.pub.sent)
        wanted = {self.infra.settings.topic(RESOLVED_ORDER), self.infra.settings.topic(RESOLVED_RETURN)}
        resolved = [m for m in new if m.topic in wanted]
        if resolved:
            await self.points.process_batch(self._recs([(m.topic, m.key, m.value) for m in resolved]))
            await self.pump()

    def published(self, topic: str) -> list[Any]:
        return [decode_event(m.value) for m in self.pub.sent if m.topic == self.infra.settings.topic(topic)]


async def prepare(infra: Infra) -> None:
    await migrate(infra.pool, [resolver_app.MIGRATIONS, points_app.MIGRATIONS])


# ------------------------------------------------------------------------------------------- builders

_v = itertools.count(1)


def member(tenant: str, mid: str, *, ext: str | None = None, email: str | None = None) -> MemberUpserted:
    return MemberUpserted(
        tenant_id=tenant,
        connection_id="loyalty-core",
        source="loyalty-core",
        entity="member",
        source_id=mid,
        source_version=f"2025-01-01T00:00:{next(_v) % 60:02d}Z",
        member=MemberData(member_id=mid, external_id=ext, email=email),
    )


def customer(
    tenant: str, cid: str, *, ext: str | None = None, email: str | None = None, v: str = "1"
) -> CustomerUpserted:
    return CustomerUpserted(
        tenant_id=tenant,
        connection_id="crm",
        source="dynamics-ce",
        entity="account",
        source_id=cid,
        source_version=v,
        customer=CustomerData(kind="account", external_id=ext, email=email),
    )


def order(
    tenant: str,
    oid: str,
    cust: str | None,
    *,
    v: int = 1,
    status: str = "100003",
    total: str = "100",
    tax: str = "0",
    currency: str = "EUR",
    rate: str | None = None,
    lifecycle: str = "awardable",
    lines: tuple[OrderLineData, ...] | None = None,
    number: str | None = None,
    observed: dt.datetime = NOW,
) -> OrderUpserted:
    return OrderUpserted(
        tenant_id=tenant,
        connection_id="crm",
        source="dynamics-ce",
        entity="salesorder",
        source_id=oid,
        source_version=str(v),
        observed_at=observed,
        order=OrderData(
            order_number=number or f"N-{oid}",
            customer_source_id=cust,
            status=status,
            lifecycle=lifecycle,
            currency=currency,  # type: ignore[arg-type]
            exchange_rate=Decimal(rate) if rate else None,
            total_amount=Decimal(total),
            tax_amount=Decimal(tax),
            lines=lines,
        ),
    )


def ret(
    tenant: str,
    rid: str,
    *,
    order_id: str | None = None,
    number: str | None = None,
    amount: str = "50",
    v: int = 1,
    lifecycle: str = "effective",
    cust: str | None = None,
) -> ReturnUpserted:
    return ReturnUpserted(
        tenant_id=tenant,
        connection_id="crm",
        source="dynamics-ce",
        entity="msdyn_rma",
        source_id=rid,
        source_version=str(v),
        return_=ReturnData(
            original_order_source_id=order_id,
            original_order_number=number,
            customer_source_id=cust,
            status="x",
            lifecycle=lifecycle,
            currency="EUR",
            amount=Decimal(amount),
        ),  # type: ignore[arg-type]
    )


def line(tenant: str, oid: str, lid: str, amount: str, product: str | None = None, v: int = 1) -> OrderLineUpserted:
    return OrderLineUpserted(
        tenant_id=tenant,
        connection_id="crm",
        source="dynamics-ce",
        entity="salesorderdetail",
        source_id=lid,
        source_version=str(v),
        order_id=oid,
        line=OrderLineData(line_id=lid, product_source_id=product, amount=Decimal(amount)),
    )


def program(tenant: str, **kw: Any) -> Program:
    base: dict[str, Any] = {
        "tenant_id": tenant,
        "base_currency": "EUR",
        "points_per_unit": "1",
        "basis": "total_ex_tax_shipping",
        "rounding": "floor",
        "awardable_statuses": {"dynamics-ce": ["100003"]},
    }
    return Program.model_validate({**base, **kw})


async def ledger(infra: Infra, tenant: str) -> list[dict[str, Any]]:
    rows = await infra.pool.fetch(
        "SELECT member_id, order_source_id, kind, points, source_version FROM ledger WHERE tenant_id = $1 ORDER BY id",
        tenant,
    )
    return [dict(r.items()) for r in rows]


async def order_net(infra: Infra, tenant: str) -> dict[str, int]:
    rows = await infra.pool.fetch(
        "SELECT order_source_id, sum(points)::int AS n FROM ledger WHERE tenant_id = $1 GROUP BY 1", tenant
    )
    return {r["order_source_id"]: r["n"] for r in rows}


# ------------------------------------------------------------------------------------------- scenarios


async def test_resolution_parking_and_unparking(infra: Infra) -> None:
    await prepare(infra)
    pipe = Pipe(infra)
    t = "acme"
    await set_program(infra.pool, program(t))
    await pipe.feed(
        [
            member(t, "m1", ext="C-1", email="ann@example.com"),
            member(t, "m2", email="dup@example.com"),
            member(t, "m3", email="DUP@example.com "),
            customer(t, "c1", ext="C-1", email="other@example.com"),
            customer(t, "c2", email="  Ann@Example.COM "),
            customer(t, "c3", email="dup@example.com"),
            customer(t, "c4", email="new@example.com"),
        ]
    )
    links = {
        r["customer_source_id"]: (r["member_id"], r["match"])
        for r in await infra.pool.fetch(
            "SELECT customer_source_id, member_id, match FROM customer_links WHERE tenant_id = $1", t
        )
    }
    assert links == {
        "c1": ("m1", "external_id"),
        "c2": ("m1", "email"),
        "c3": (None, "ambiguous"),
        "c4": (None, "unmatched"),
    }

    await pipe.feed(
        [
            order(t, "o1", "c1"),
            order(t, "o3", "c3"),
            order(t, "o4", "c4", status="100001", lifecycle="pending"),
            line(t, "o4", "o4-l1", "100"),
            order(t, "o4", "c4", v=2),  # a newer version of a parked order parks behind the first
            ret(t, "r1", order_id="o1", amount="25"),  # no customer: takes the member of its order
            ret(t, "r5", order_id="o5", amount="100"),  # its order is not resolved yet: parked
        ]
    )
    resolved = pipe.published(RESOLVED_ORDER)
    assert [(e.event_type, e.source_id) for e in resolved] == [("order.resolved", "o1")]
    assert [(e.source_id, e.member_id) for e in pipe.published(RESOLVED_RETURN)] == [("r1", "m1")]
    stats = (await resolver_stats(infra.pool, t))[t]
    assert stats["parked"] == {"order": 3, "part": 1, "return": 1}
    assert stats["customers"] == {"external_id": 1, "email": 1, "ambiguous": 1, "unmatched": 1}
    assert "dup@example.com" in stats["ambiguous"][0]["note"]

    # The loyalty core's import writes members directly; the relink task lets o4 flow, in order.
    await import_members(infra.pool, t, [MemberData(member_id="m4", email="new@example.com")])
    assert await resolver_app.relink_once(TaskOutbox("resolver-relink", infra.pool, pipe.pub, infra.settings)) == 1
    await pipe.pump()
    flowed = [(e.event_type, e.source_id, e.source_version) for e in pipe.published(RESOLVED_ORDER)][1:]
    assert flowed == [
        ("order.resolved", "o4", "1"),
        ("order.line_upserted", "o4-l1", "1"),
        ("order.resolved", "o4", "2"),
    ]
    # A later customer event links o5's customer; o5 resolves and releases the return waiting on it.
    await pipe.feed([order(t, "o5", "c2")])
    assert [e.source_id for e in pipe.published(RESOLVED_RETURN)] == ["r1", "r5"]
    # Shared email stays unresolved and reported; a changed customer (newer version) resolves.
    await pipe.feed([customer(t, "c3", ext="C-1", email="dup@example.com", v="2"), customer(t, "c3", v="1")])
    assert pipe.published(RESOLVED_ORDER)[-1].source_id == "o3"
    assert pipe.published(RESOLVED_ORDER)[-1].member_id == "m1"
    stats = (await resolver_stats(infra.pool, t))[t]
    assert "parked" not in stats

    # Points: o1 earned 100, r1 clawed 25; o4 earned 100; o5 earned 100 and r5 took it all back; o3 100.
    assert await order_net(infra, t) == {"o1": 75, "o3": 100, "o4": 100, "o5": 0}
    bal = {r["member_id"]: r["balance"] for r in await balances(infra.pool, t)}
    assert bal == {"m1": 175, "m4": 100}

    # Replaying every message again changes nothing.
    before = await ledger(infra, t)
    sent = list(pipe.pub.sent)
    await pipe.resolver.process_batch(
        pipe._recs([(m.topic, m.key, m.value) for m in sent if m.topic.endswith(CANONICAL_ORDER)])
    )
    await pipe.points.process_batch(
        pipe._recs([(m.topic, m.key, m.value) for m in sent if m.topic.endswith((RESOLVED_ORDER, RESOLVED_RETURN))])
    )
    assert await ledger(infra, t) == before


async def test_tenant_isolation_equal_emails_and_ids(infra: Infra) -> None:
    await prepare(infra)
    pipe = Pipe(infra)
    for t in ("acme", "globex"):
        await set_program(infra.pool, program(t))
    await pipe.feed(
        [
            member("acme", "m-same", ext="X-1", email="same@example.com"),
            customer("acme", "c-same", ext="X-1", email="same@example.com"),
            # globex: same customer id, same external id and email, but no globex member
            customer("globex", "c-same", ext="X-1", email="same@example.com"),
            order("globex", "o-same", "c-same"),
            order("acme", "o-same", "c-same"),
            ret("globex", "r-same", order_id="o-same", amount="100"),
        ]
    )
    assert [(e.tenant_id, e.member_id) for e in pipe.published(RESOLVED_ORDER)] == [("acme", "m-same")]
    assert pipe.published(RESOLVED_RETURN) == []
    # A globex member with the same id appears: only globex's parked events flow, to globex's member.
    await pipe.feed([member("globex", "m-same", ext="X-1", email="same@example.com")])
    got = [
        (e.tenant_id, e.member_id, e.source_id)
        for e in pipe.published(RESOLVED_ORDER) + pipe.published(RESOLVED_RETURN)
    ]
    assert sorted(got) == [("acme", "m-same", "o-same"), ("globex", "m-same", "o-same"), ("globex", "m-same", "r-same")]
    assert await order_net(infra, "acme") == {"o-same": 100}
    assert await order_net(infra, "globex") == {"o-same": 0}
    entries = pipe.published(POINTS_LEDGER)
    assert {(e.tenant_id, e.order_source_id, e.points) for e in entries if e.tenant_id == "acme"} == {
        ("acme", "o-same", 100)
    }


async def test_points_rules_end_to_end(infra: Infra) -> None:
    await prepare(infra)
    clock = {"now": NOW}
    pipe = Pipe(infra, clock=lambda: clock["now"])
    t = "shop"
    await set_program(
        infra.pool, program(t, category_multipliers={"electronics": "2"}, per_order_cap=1000, minimum_order="10")
    )
    await pipe.feed(
        [
            member(t, "m1", ext="K1"),
            customer(t, "k1", ext="K1"),
            ProductUpserted(
                tenant_id=t,
                connection_id="crm",
                source="dynamics-ce",
                entity="product",
                source_id="tv",
                source_version="1",
                product=ProductData(sku="TV", category="electronics"),
            ),
        ]
    )
    lines = (
        OrderLineData(line_id="a", product_source_id="tv", amount=Decimal(50)),
        OrderLineData(line_id="b", product_source_id="sock", amount=Decimal(50)),
    )
    # pending -> awardable (earn) -> amended (adjust) -> returned half (clawback) -> cancelled (void, release)
    await pipe.feed(
        [order(t, "o1", "k1", v=1, status="100001", lifecycle="pending", total="121", tax="21", lines=lines)]
    )
    assert await ledger(infra, t) == []
    assert (await balances(infra.pool, t))[0]["pending"] == 150
    await pipe.feed([order(t, "o1", "k1", v=2, total="121", tax="21", lines=lines)])
    await pipe.feed([order(t, "o1", "k1", v=3, total="242", tax="42", lines=lines)])
    await pipe.feed([order(t, "o1", "k1", v=2, total="121", tax="21", lines=lines)])  # stale: ignored
    await pipe.feed([ret(t, "r1", number="N-o1", amount="121")])
    await pipe.feed(
        [order(t, "o1", "k1", v=4, status="100004", lifecycle="cancelled", total="242", tax="42", lines=lines)]
    )
    kinds = [(r["kind"], r["points"]) for r in await ledger(infra, t)]
    assert kinds == [("earn", 150), ("adjust", 150), ("clawback", -150), ("void", -300), ("clawback", 150)]

    # Foreign currency: the order's own rate converts; none known is dead-lettered with a clear reason.
    await pipe.feed(
        [
            order(t, "o2", "k1", currency="USD", rate="1.25", total="125"),
            order(t, "o3", "k1", currency="USD", total="125"),
        ]
    )
    assert (await order_net(infra, t))["o2"] == 100
    reason = await infra.pool.fetchval("SELECT error_message FROM dead_letters WHERE consumer = 'points'")
    assert "o3 is in USD but carries no exchange rate" in reason and "exchange_rates.USD" in reason
    # Minimum order and cap.
    await pipe.feed([order(t, "o4", "k1", total="9"), order(t, "o5", "k1", total="5000")])
    net = await order_net(infra, t)
    assert "o4" not in net and net["o5"] == 1000
    # A return that arrives before its order is applied when the order comes; lines arriving separately
    # and a late product category change adjust the order.
    await pipe.feed([ret(t, "r6", order_id="o6", amount="40")])
    await pipe.feed([order(t, "o6", "k1", total="100")])
    assert (await order_net(infra, t))["o6"] == 60
    await pipe.feed([line(t, "o6", "o6-a", "100", product="radio")])
    await pipe.feed(
        [
            ProductUpserted(
                tenant_id=t,
                connection_id="crm",
                source="dynamics-ce",
                entity="product",
                source_id="radio",
                source_version="5",
                product=ProductData(category="electronics"),
            )
        ]
    )
    assert (await order_net(infra, t))["o6"] == 120  # 200 points, 40% returned
    await pipe.feed(
        [
            OrderDeleted(
                tenant_id=t,
                connection_id="crm",
                source="dynamics-ce",
                entity="salesorder",
                source_id="o6",
                source_version="9",
            )
        ]
    )
    assert (await order_net(infra, t))["o6"] == 0

    # Return window: pending until the window passes, then the maturity task awards.
    w = "window"
    await set_program(infra.pool, program(w, return_window_days="14"))
    await pipe.feed(
        [
            member(w, "m1", ext="K1"),
            customer(w, "k1", ext="K1"),
            order(w, "o1", "k1", observed=NOW - dt.timedelta(days=1)),
        ]
    )
    assert await ledger(infra, w) == []
    assert (await balances(infra.pool, w))[0]["pending"] == 100
    box = TaskOutbox("points-maturity", infra.pool, pipe.pub, infra.settings)
    assert await points_app.mature_once(box, NOW) == 0
    clock["now"] = NOW + dt.timedelta(days=14)
    assert await points_app.mature_once(box, clock["now"]) == 1
    assert [(r["kind"], r["points"]) for r in await ledger(infra, w)] == [("earn", 100)]
    assert pipe.published(POINTS_LEDGER)[-1].kind == "earn"

    # Shortfall: the member spent points elsewhere; a clawback takes what is left and records the rest.
    s = "strict"
    await set_program(infra.pool, program(s, negative_balance="record_shortfall"))
    await pipe.feed([member(s, "m1", ext="K1"), customer(s, "k1", ext="K1"), order(s, "o1", "k1")])
    await infra.pool.execute(
        """INSERT INTO ledger (tenant_id, member_id, order_source_id, source, kind, points, reason, source_version,
               event_id) VALUES ($1, 'm1', 'redeemed', 'flash', 'adjust', -80, 'redeemed', 'r1', 'x')""",
        s,
    )
    await pipe.feed([ret(s, "r1", order_id="o1", amount="100")])
    assert [(r["kind"], r["points"]) for r in await ledger(infra, s)][-1] == ("clawback", -20)
    assert (await balances(infra.pool, s))[0] == {"member_id": "m1", "balance": 0, "pending": 0, "shortfall": -80}


async def test_lines_before_header_tombstones_and_category_changes(infra: Infra) -> None:
    """Lines live on the order row: lines may precede their header, a tombstone that names no order finds
    it by line id, and a category change re-settles exactly the orders of that tenant holding the product."""
    await prepare(infra)
    pipe = Pipe(infra)
    t, other = "lines", "lines-other"
    for tenant in (t, other):
        await set_program(infra.pool, program(tenant, category_multipliers={"electronics": "2"}))
        await pipe.feed([member(tenant, "m1", ext="K1"), customer(tenant, "k1", ext="K1")])
    # Lines first: the order row exists (unknown) and the header, when it comes, is settled with them.
    await pipe.feed([line(t, "o1", "o1-a", "60", product="tv"), line(t, "o1", "o1-b", "40", product="sock")])
    assert await ledger(infra, t) == []
    assert await infra.pool.fetchval("SELECT known FROM orders WHERE tenant_id = $1 AND order_source_id = 'o1'", t)\
        is False
    assert [r["member_id"] for r in await balances(infra.pool, t)] == []
    await pipe.feed([order(t, "o1", "k1", total="100"), order(other, "o1", "k1", total="100")])
    await pipe.feed([line(other, "o1", "o1-a", "100", product="tv")])
    assert (await order_net(infra, t))["o1"] == 100
    # tv becomes electronics (x2) in one tenant only: its order earns 60 more; the other tenant's does not.
    await pipe.feed(
        [
            ProductUpserted(
                tenant_id=t,
                connection_id="crm",
                source="dynamics-ce",
                entity="product",
                source_id="tv",
                source_version="2",
                product=ProductData(category="electronics"),
            )
        ]
    )
    assert (await order_net(infra, t))["o1"] == 160
    assert (await order_net(infra, other))["o1"] == 100
    # A tombstone with only the line id: the order is found by line, the tv line goes, back to 100.
    await pipe.feed(
        [
            OrderLineDeleted(
                tenant_id=t,
                connection_id="crm",
                source="dynamics-ce",
                entity="salesorderdetail",
                source_id="o1-a",
                source_version="3",
            )
        ]
    )
    assert (await order_net(infra, t))["o1"] == 100
    assert (await order_net(infra, other))["o1"] == 100
    row = await infra.pool.fetchrow(
        "SELECT lines, line_keys FROM orders WHERE tenant_id = $1 AND order_source_id = 'o1'", t
    )
    assert sorted((ln[0], ln[4]) for ln in json.loads(row["lines"])) == [("o1-a", True), ("o1-b", False)]
    assert row["line_keys"] == ["l:o1-a", "l:o1-b", "p:sock"]
    # Replaying everything changes nothing.
    before = await ledger(infra, t)
    await pipe.feed([line(t, "o1", "o1-a", "60", product="tv"), order(t, "o1", "k1", total="100")])
    assert await ledger(infra, t) == before


async def test_member_ledger_sequences_and_balances_follow_the_ledger(infra: Infra) -> None:
    """points.member-ledger.v1: keyed by member, member_sequence 1..n without gaps, balance_after a running
    sum that ends at the ledger's balance; the same entries on points.ledger carry the same numbers."""
    await prepare(infra)
    pipe = Pipe(infra)
    t = "shop"
    await set_program(infra.pool, program(t))
    await pipe.feed([member(t, "m1", ext="K1"), member(t, "m2", ext="K2"),
                     customer(t, "k1", ext="K1"), customer(t, "k2", ext="K2")])
    await pipe.feed([order(t, "o1", "k1", total="100"), order(t, "o2", "k2", total="40"),
                     order(t, "o3", "k1", total="30")])
    await pipe.feed([order(t, "o1", "k1", v=2, total="150")])          # adjust
    await pipe.feed([ret(t, "r1", order_id="o1", amount="75")])        # clawback half
    await pipe.feed([order(t, "o2", "k2", v=2, total="40", status="x", lifecycle="cancelled")])  # void
    await pipe.feed([order(t, "o1", "k1", v=2, total="150")])          # duplicate: nothing new
    by_member = pipe.published(POINTS_MEMBER_LEDGER)
    keyed = [m.key for m in pipe.pub.sent if m.topic == infra.settings.topic(POINTS_MEMBER_LEDGER)]
    assert keyed == [f"{t}:{e.member_id}".encode() for e in by_member]
    rows = await infra.pool.fetch(
        "SELECT member_id, sum(points)::int AS n, count(*)::int AS c FROM ledger WHERE tenant_id = $1 GROUP BY 1", t
    )
    assert {r["member_id"] for r in rows} == {"m1", "m2"}
    for r in rows:
        mine = [e for e in by_member if e.member_id == r["member_id"]]
        assert [e.member_sequence for e in mine] == list(range(1, r["c"] + 1))
        running = 0
        for e in mine:
            running += e.points
            assert e.balance_after == running
        assert mine[-1].balance_after == r["n"]
    assert {e.kind for e in by_member} >= {"earn", "adjust", "clawback", "void"}
    same = {e.event_id: (e.member_sequence, e.balance_after) for e in pipe.published(POINTS_LEDGER)}
    assert same == {e.event_id: (e.member_sequence, e.balance_after) for e in by_member}
    # The store's position is where the stream ends.
    pos = await infra.pool.fetch("SELECT member_id, sequence, balance FROM member_balances WHERE tenant_id = $1", t)
    assert {p["member_id"]: (p["sequence"], p["balance"]) for p in pos} == {
        r["member_id"]: (r["c"], r["n"]) for r in rows
    }


async def test_member_sequences_stay_contiguous_when_two_engines_write_one_member(infra: Infra) -> None:
    """Two points engines (two transactions, as two replicas on different partitions) append entries for the
    same members at once: the second waits on the first's member rows and continues from its sequence, so
    each member's sequence is 1..n with the right running sums."""
    import asyncio

    from canonical.events import OrderResolved
    from points.handlers import handle_events
    from servicekit.outbox import UnitOfWork

    await prepare(infra)
    t = "shop"
    await set_program(infra.pool, program(t))

    def resolved(oid: str, member_id: str, total: str) -> OrderResolved:
        return OrderResolved(
            tenant_id=t, connection_id="crm", source="dynamics-ce", entity="salesorder", source_id=oid,
            source_version="1", member_id=member_id, upstream_event_id=f"up-{oid}",
            order=OrderData(order_number=f"N-{oid}", status="100003", lifecycle="awardable", currency="EUR",
                            total_amount=Decimal(total)),
        )

    # Each batch touches both members, in opposite orders.
    first = [resolved(f"a{i}", "m1" if i % 2 else "m2", "10") for i in range(20)]
    second = [resolved(f"b{i}", "m2" if i % 2 else "m1", "5") for i in range(20)]

    async def engine(events: list[OrderResolved]) -> list[OutMessage]:
        async with infra.pool.acquire() as conn, conn.transaction():
            uow = UnitOfWork(conn, "points", infra.settings)
            await handle_events(events, uow, now=NOW)
            await asyncio.sleep(0.2)  # hold the member rows while the other engine tries to take them
            return uow.outbox

    out = await asyncio.wait_for(asyncio.gather(engine(first), engine(second)), 30)
    entries = [decode_event(m.value) for batch in out for m in batch
               if m.topic == infra.settings.topic(POINTS_MEMBER_LEDGER)]
    assert len(entries) == 40
    for mid in ("m1", "m2"):
        mine = sorted((e for e in entries if e.member_id == mid), key=lambda e: e.member_sequence)
        assert [e.member_sequence for e in mine] == list(range(1, 21))
        running = 0
        for e in mine:
            running += e.points
            assert e.balance_after == running
        assert running == 10 * 10 + 10 * 5
