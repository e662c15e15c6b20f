"""Dry-run stage ``points`` (entry point ``flash_connect.previews``): the points sampled orders and returns
would move under the tenant's program, by ``points.rules``, reading only (the program, and the orders the
ledger already knows, for cancellations and returns).

- an awardable order: ``earn`` its points (they post once the program's return window has passed);
- a pending order: ``pending`` (nothing moves yet); a cancelled one: ``void`` of what it already earned;
- an effective return: ``clawback`` of the proportional share of its original order's points.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

from canonical.envelope import Envelope
from canonical.events import OrderUpserted, ReturnUpserted
from connectorkit.dryrun import PointsPreview
from points.adapters import PgPointsStore
from points.rules import OrderState, base_amount, clawback_points, order_points, order_stage
from servicekit.db import DbConnection
from servicekit.errors import Poison

__all__ = ["points"]


def _state(e: OrderUpserted, member: str) -> OrderState:
    o = e.order
    return OrderState(tenant_id=e.tenant_id, order_source_id=e.source_id, connection_id=e.connection_id,
                      source=e.source, member_id=member, order_number=o.order_number, status=o.status,
                      lifecycle=o.lifecycle, currency=o.currency, exchange_rate=o.exchange_rate,
                      total_amount=o.total_amount, tax_amount=o.tax_amount, shipping_amount=o.shipping_amount,
                      known=True)


async def points(conn: DbConnection, tenant_id: str, resolved: Sequence[tuple[Envelope, str]]) -> list[PointsPreview]:
    program = (await PgPointsStore(conn).programs([tenant_id])).get(tenant_id)
    if program is None:
        return [PointsPreview(e.source_id, m, "none", 0, f"tenant {tenant_id} has no points program "
                              "(flash points program set)") for e, m in resolved]
    out: list[PointsPreview] = []
    sampled: dict[str, tuple[OrderState, int]] = {}
    for e, member in resolved:
        if not isinstance(e, OrderUpserted):
            continue
        st = _state(e, member)
        try:
            target = order_points(program, st, {})
        except Poison as exc:
            out.append(PointsPreview(e.source_id, member, "dead-letter", 0, str(exc)))
            continue
        sampled[e.source_id] = (st, target)
        if e.order.order_number:
            sampled.setdefault(e.order.order_number, (st, target))
        stage = order_stage(program, st)
        if stage == "awardable":
            window = f" after the {program.return_window_days}-day return window" if program.return_window_days else ""
            out.append(PointsPreview(e.source_id, member, "earn", target, f"awardable; posts{window}"))
        elif stage == "cancelled":
            earned = await conn.fetchval("SELECT earned FROM orders WHERE tenant_id = $1 AND order_source_id = $2",
                                         tenant_id, e.source_id)
            out.append(PointsPreview(e.source_id, member, "void", int(earned or 0), "cancelled"))
        else:
            out.append(PointsPreview(e.source_id, member, "pending", target, f"status {e.order.status} not awardable"))
    for e, member in resolved:
        if not isinstance(e, ReturnUpserted):
            continue
        r = e.return_
        if r.lifecycle != "effective":
            out.append(PointsPreview(e.source_id, member, "none", 0, f"return {r.lifecycle}"))
            continue
        anchor = sampled.get(r.original_order_source_id or "") or sampled.get(r.original_order_number or "")
        if anchor is None:
            row = await conn.fetchrow(
                """SELECT total_amount, currency, exchange_rate, earned FROM orders WHERE tenant_id = $1
                   AND (order_source_id = $2 OR order_number = $3) LIMIT 1""",
                tenant_id, r.original_order_source_id or "", r.original_order_number or "")
            if row is None:
                out.append(PointsPreview(e.source_id, member, "none", 0, "original order not known yet (parks)"))
                continue
            total, currency, rate, earned = Decimal(row["total_amount"]), row["currency"], row["exchange_rate"], \
                int(row["earned"])
        else:
            st, earned = anchor
            total, currency, rate = st.total_amount, st.currency, st.exchange_rate
        try:
            total_base = base_amount(program, total, currency, rate, "original order")
            returned = base_amount(program, r.amount, r.currency, r.exchange_rate or rate, f"return {e.source_id}")
        except Poison as exc:
            out.append(PointsPreview(e.source_id, member, "dead-letter", 0, str(exc)))
            continue
        back = clawback_points(program, earned, returned, total_base)
        out.append(PointsPreview(e.source_id, member, "clawback", back, f"{r.amount} {r.currency} of the order"))

    return out
