"""Dry-run stage ``resolve`` (entry point ``flash_connect.previews``): which existing member each sampled
order and return would resolve to, by the resolver's own rules, reading only.

Customers in the sample are matched to members (tenant's own ID first, then normalised email:
``resolver.rules.match_customer``) without writing links; orders and returns then resolve through those
matches, the links already stored, the order's email, or (returns) their original order. Runs inside the
caller's READ ONLY transaction.
"""

from __future__ import annotations

from collections.abc import Sequence

from canonical.envelope import Envelope
from canonical.events import CustomerUpserted, OrderUpserted, ReturnUpserted
from connectorkit.dryrun import Resolution
from resolver.adapters import PgResolverStore
from resolver.rules import match_customer, normalize_email
from servicekit.db import DbConnection

__all__ = ["resolve"]


async def resolve(conn: DbConnection, tenant_id: str, events: Sequence[Envelope]) -> list[Resolution]:
    store = PgResolverStore(conn)
    customers = [e for e in events if isinstance(e, CustomerUpserted)]
    orders = [e for e in events if isinstance(e, OrderUpserted)]
    returns = [e for e in events if isinstance(e, ReturnUpserted)]
    emails = {normalize_email(c.customer.email) for c in customers} | {normalize_email(o.order.email) for o in orders}
    idx = await store.member_index({(tenant_id, c.customer.external_id) for c in customers if c.customer.external_id},
                                   {(tenant_id, e) for e in emails if e})
    by_ext, by_email = idx.for_tenant(tenant_id)
    sampled: dict[tuple[str, str, str], tuple[str | None, str]] = {}
    for c in customers:
        m = match_customer(c.customer.external_id or None, normalize_email(c.customer.email), by_ext, by_email)
        sampled[(c.connection_id, c.source, c.source_id)] = (m.member_id, m.how if m.member_id else
                                                             f"customer {c.source_id}: {m.how} {m.note}".strip())
    wanted = {(tenant_id, e.connection_id, e.source, cust) for e in orders
              if (cust := e.order.customer_source_id) and (e.connection_id, e.source, cust) not in sampled}
    wanted |= {(tenant_id, e.connection_id, e.source, cust) for e in returns
               if (cust := e.return_.customer_source_id) and (e.connection_id, e.source, cust) not in sampled}
    stored = await store.links(wanted)
    out: list[Resolution] = []
    order_members: dict[str, str] = {}
    number_members: dict[str, str] = {}
    for o in orders:
        cust = o.order.customer_source_id
        member: str | None = None
        how = "unmatched"
        if cust:
            key = (o.connection_id, o.source, cust)
            if key in sampled:
                member, how = sampled[key]
                how = "customer " + how if member else how
            elif stored.get((tenant_id, *key)):
                member, how = stored[(tenant_id, *key)], "stored customer link"
            else:
                how = f"customer {cust} is not linked to any member (not in the sample, no stored link)"
        elif email := normalize_email(o.order.email):
            m = match_customer(None, email, {}, by_email)
            member, how = m.member_id, ("order email" if m.member_id else f"order email {m.how}")
        else:
            how = "the order names no customer and no email"
        if member:
            order_members[o.source_id] = member
            if o.order.order_number:
                number_members[o.order.order_number] = member
        out.append(Resolution(o, member, how))
    anchors_id = {(tenant_id, r.return_.original_order_source_id) for r in returns
                  if r.return_.original_order_source_id}
    anchors_no = {(tenant_id, r.return_.original_order_number) for r in returns if r.return_.original_order_number}
    by_id, by_no = await store.order_members(anchors_id, anchors_no)
    for r in returns:
        rd = r.return_
        member = None
        how = "its original order resolves to no member"
        key = (r.connection_id, r.source, rd.customer_source_id or "")
        if rd.customer_source_id and key in sampled and sampled[key][0]:
            member, how = sampled[key][0], "customer " + sampled[key][1]
        elif rd.customer_source_id and stored.get((tenant_id, *key)):
            member, how = stored[(tenant_id, *key)], "stored customer link"
        elif rd.original_order_source_id and (m2 := order_members.get(rd.original_order_source_id)
                                              or by_id.get((tenant_id, rd.original_order_source_id))):
            member, how = m2, "original order"
        elif rd.original_order_number and (m3 := number_members.get(rd.original_order_number)
                                           or by_no.get((tenant_id, rd.original_order_number))):
            member, how = m3, "original order (by number)"
        out.append(Resolution(r, member, how))
    return out
