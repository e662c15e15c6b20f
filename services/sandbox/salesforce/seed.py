"""Deterministic seed data and the ground truth a test computes expected results from.

``seed_org`` lays out ~90 days of history ending shortly before "now" on a manual clock, through the same
write path live mutations use (so totals, summaries and change orders are consistent), with CDC
publishing switched off. Ids, numbers, amounts and statuses depend only on the org name and ``seed``;
timestamps additionally on ``anchor_ms`` (default: the org clock, floored to the minute).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sandbox.salesforce import domain
from sandbox.salesforce.clock import ManualClock
from sandbox.salesforce.org import Org

if TYPE_CHECKING:
    from sandbox.salesforce.state import SalesforceState

__all__ = ["CURRENCIES", "LineTruth", "OrderTruth", "SeedSummary", "ground_truth", "seed_org"]

CURRENCIES = ("EUR", "USD", "GBP")
_FIRST = [
    "Anna",
    "Ben",
    "Chloe",
    "David",
    "Emma",
    "Felix",
    "Grace",
    "Hugo",
    "Ines",
    "Jonas",
    "Klara",
    "Liam",
    "Mia",
    "Noah",
    "Olivia",
    "Paul",
    "Rosa",
    "Sam",
    "Tara",
    "Viktor",
    "Wen",
    "Yusuf",
    "Zoe",
]
_LAST = [
    "Schmidt",
    "Martin",
    "Rossi",
    "Garcia",
    "Smith",
    "Dubois",
    "Novak",
    "Jensen",
    "Silva",
    "Kowalski",
    "Meyer",
    "Brown",
    "Lopez",
    "Fischer",
    "Moreau",
    "Bianchi",
    "Nguyen",
    "Okafor",
    "Ivanova",
    "Berg",
]
_COMPANY = [
    "Acme",
    "Globex",
    "Initech",
    "Umbrella",
    "Stark",
    "Wayne",
    "Tyrell",
    "Cyberdyne",
    "Hooli",
    "Vandelay",
]
_SUFFIX = ["GmbH", "Ltd", "Inc", "SA", "BV", "AG"]
_FAMILIES = ["Apparel", "Footwear", "Accessories", "Electronics", "Home"]
_ITEMS = ["Shirt", "Sneaker", "Backpack", "Headphones", "Lamp", "Jacket", "Watch", "Mug", "Scarf", "Speaker"]
_ADJ = ["Classic", "Urban", "Trail", "Pro", "Eco", "Studio", "Nordic", "Retro"]
_MINUTE = 60_000
_DAY = 86_400_000


@dataclass
class SeedSummary:
    org: str
    mode: str
    counts: dict[str, int] = field(default_factory=dict)
    start_ms: int = 0
    end_ms: int = 0


def seed_org(
    state: SalesforceState,
    org: Org | str,
    *,
    accounts: int = 20,
    person_accounts: int = 20,
    contacts: int = 30,
    products: int = 25,
    orders: int = 200,
    mode: str | None = None,
    seed: int = 1,
    anchor_ms: int | None = None,
) -> SeedSummary:
    """Populate ``org`` (an Org or a name; created if missing). ``mode``: "order" | "order_management"."""
    if isinstance(org, str):
        org = state.orgs[org] if org in state.orgs else state.add_org(org, mode=mode or "order")
    if mode is not None:
        if mode not in ("order", "order_management"):
            raise ValueError("mode must be 'order' or 'order_management'")
        org.mode = mode
    rng = random.Random(seed)
    end = anchor_ms if anchor_ms is not None else (state.clock.now_ms() // _MINUTE * _MINUTE) - 10 * _MINUTE
    start = end - 90 * _DAY
    clock = ManualClock(start)
    real_clock = org.clock
    org.clock, org.publish_enabled = clock, False
    try:
        _seed(org, rng, clock, start, end, accounts, person_accounts, contacts, products, orders)
    finally:
        org.clock, org.publish_enabled = real_clock, True
    summary = SeedSummary(org.name, org.mode, start_ms=start, end_ms=end)
    for obj, table in org.tables.items():
        summary.counts[obj] = len(table)
    return summary


def _seed(
    org: Org,
    rng: random.Random,
    clock: ManualClock,
    start: int,
    end: int,
    n_accounts: int,
    n_person: int,
    n_contacts: int,
    n_products: int,
    n_orders: int,
) -> None:
    clock.set(start)
    pricebook = next((p["Id"] for p in org.records("Pricebook2") if p.get("IsStandard")), None)
    if pricebook is None:
        org.create("Pricebook2", {"Name": "Standard Price Book", "IsActive": True, "IsStandard": True})
    base = len(org.tables["Product2"])
    product_ids: list[str] = []
    for i in range(n_products):
        clock.set(start + i * 1000)
        n = base + i + 1
        with org.transaction():
            pid = org.create(
                "Product2",
                {
                    "Name": f"{rng.choice(_ADJ)} {rng.choice(_ITEMS)} {n}",
                    "ProductCode": f"P-{n:05d}",
                    "StockKeepingUnit": f"SKU-{n:05d}",
                    "Family": rng.choice(_FAMILIES),
                    "IsActive": rng.random() > 0.05,
                },
            )
            price = round(rng.uniform(5, 250), 2)
            fx = {"EUR": 1.0, "USD": 1.08, "GBP": 0.86}
            pb = next(p["Id"] for p in org.records("Pricebook2") if p.get("IsStandard"))
            for cur in CURRENCIES:
                org.create(
                    "PricebookEntry",
                    {
                        "Pricebook2Id": pb,
                        "Product2Id": pid,
                        "UnitPrice": round(price * fx[cur], 2),
                        "IsActive": True,
                        "UseStandardPrice": False,
                        "CurrencyIsoCode": cur,
                        "ProductCode": f"P-{n:05d}",
                        "Name": org.tables["Product2"][pid]["Name"],
                    },
                )
        product_ids.append(pid)
    customers: list[tuple[str, str | None]] = []  # (account id, bill-to contact id)
    t = start + _DAY
    for i in range(n_accounts):
        clock.set(t + i * 7_000)
        acc = org.create(
            "Account",
            {
                "Name": f"{rng.choice(_COMPANY)} {rng.choice(_SUFFIX)} {i + 1}",
                "IsPersonAccount": False,
                "AccountNumber": f"B{100000 + i}",
                "Phone": f"+49 30 {rng.randint(1000000, 9999999)}",
                "Type": "Customer",
                "CurrencyIsoCode": rng.choice(CURRENCIES),
            },
        )
        customers.append((acc, None))
    business = [a for a, _ in customers]
    for i in range(n_contacts):
        if not business:
            break
        clock.set(t + _DAY + i * 5_000)
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        acc = business[i % len(business)] if i < len(business) else rng.choice(business)
        cid = org.create(
            "Contact",
            {
                "FirstName": first,
                "LastName": last,
                "AccountId": acc,
                "IsPersonAccount": False,
                "Email": f"{first.lower()}.{last.lower()}.{i + 1}@example.com",
                "HasOptedOutOfEmail": False,
            },
        )
        idx = business.index(acc)
        if customers[idx][1] is None:
            customers[idx] = (acc, cid)
    for i in range(n_person):
        clock.set(t + 2 * _DAY + i * 3_000)
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        email = f"{first.lower()}.{last.lower()}.p{i + 1}@example.net"
        with org.transaction():
            acc = org.create(
                "Account",
                {
                    "FirstName": first,
                    "LastName": last,
                    "IsPersonAccount": True,
                    "PersonEmail": email,
                    "AccountNumber": f"P{200000 + i}",
                    "PersonHasOptedOutOfEmail": rng.random() < 0.1,
                    "Phone": f"+44 20 {rng.randint(1000000, 9999999)}",
                    "CurrencyIsoCode": rng.choice(CURRENCIES),
                },
            )
            contact = org.create(
                "Contact",
                {
                    "FirstName": first,
                    "LastName": last,
                    "AccountId": acc,
                    "Email": email,
                    "IsPersonAccount": True,
                },
            )
            org.update("Account", acc, {"PersonContactId": contact})
        customers.append((acc, contact))
    if not customers or not product_ids:
        return
    active = [p for p in product_ids if org.tables["Product2"][p]["IsActive"]] or product_ids
    om = org.mode == "order_management"
    order_start = start + 5 * _DAY
    step = max(2, (end - order_start - _DAY) // max(1, n_orders))
    t = order_start
    last_batch = t
    for _ in range(n_orders):
        if rng.random() > 0.15:  # otherwise: same millisecond as the previous order (a batch insert)
            t += rng.randint(1, 2 * step)
        customer, bill_to = rng.choice(customers)
        currency = rng.choice(CURRENCIES)
        lines = [
            (rng.choice(active), float(rng.randint(1, 4))) for _ in range(rng.choices([1, 2, 3, 4], [4, 3, 2, 1])[0])
        ]
        clock.set(t)
        roll = rng.random()
        oid = domain.create_order(org, customer, lines, currency=currency, status="Draft", bill_to_contact_id=bill_to)
        if roll < 0.07:
            if rng.random() < 0.15:
                clock.set(t + rng.randint(1, 3_600_000))
                org.delete("Order", oid)
            continue
        # activation: often in the same millisecond as the previous activation batch
        t_act = last_batch if last_batch >= t and rng.random() < 0.3 else t + rng.randint(1_000, 1_800_000)
        last_batch = t_act
        clock.set(t_act)
        domain.set_order_status(org, oid, "Activated")
        t_next = t_act + rng.randint(_MINUTE, 3 * _DAY)
        if t_next >= end:
            continue
        clock.set(t_next)
        if roll < 0.17:
            domain.cancel_order(org, oid, "Customer Request")
            continue
        if om and roll < 0.22:
            summary = domain.summary_for(org, oid)
            if summary is not None:
                ois = sorted(org.children("OrderItemSummary", "OrderSummaryId", summary["Id"]))[0]
                domain.submit_cancel(org, summary["Id"], [(ois, 1.0)], "Wrong Item")
        if roll < 0.65:
            continue
        domain.set_order_status(org, oid, "Fulfilled")
        items = sorted(org.children("OrderItem", "OrderId", oid))
        if roll > 0.9 and items:
            t_ret = t_next + rng.randint(_DAY, 5 * _DAY)
            if t_ret >= end:
                continue
            clock.set(t_ret)
            item = org.tables["OrderItem"][rng.choice(items)]
            summary = domain.summary_for(org, oid) if om else None
            if summary is not None:
                line_summary = next(
                    o
                    for i in org.children("OrderItemSummary", "OrderSummaryId", summary["Id"])
                    if (o := org.tables["OrderItemSummary"][i])["OriginalOrderItemId"] == item["Id"]
                )
                available = (
                    line_summary["Quantity"]
                    - line_summary["QuantityReturned"]
                    - line_summary["QuantityReturnInitiated"]
                )
            else:
                available = item["Quantity"]
            if available < 1:
                continue
            qty = float(rng.randint(1, int(available)))
            status = rng.choices(["Submitted", "Approved", "Closed"], [3, 2, 5])[0]
            rid = domain.create_return(
                org,
                oid,
                [(item["Id"], qty, rng.choice(["Damaged", "Wrong Size", "Not Needed"]))],
                status=status,
            )
            if status == "Closed" and not om and rng.random() < 0.5:
                line = next(iter(org.children("ReturnOrderLineItem", "ReturnOrderId", rid)))
                ln = org.tables["ReturnOrderLineItem"][line]
                domain.create_credit_memo(org, oid, [(ln["OrderItemId"], ln["TotalPrice"])])
        elif not om and 0.85 < roll <= 0.9 and items:
            item = org.tables["OrderItem"][items[0]]
            domain.create_reduction_order(org, oid, [(item["Id"], 1.0)])


@dataclass(frozen=True)
class LineTruth:
    order_item_id: str
    product_id: str
    sku: str | None
    quantity: float
    unit_price: float
    total_price: float


@dataclass(frozen=True)
class OrderTruth:
    """What a correct connector should conclude about one original (non-reduction) order.

    ``cancelled_amount``: the whole total for core Status 'Cancelled' or a deleted order, plus reduction /
    OM Cancel change lines. ``returned_amount``: received return lines (``QuantityReturned`` x unit price).
    ``net_amount`` = ``total_amount`` - cancelled - returned (never below 0).
    """

    order_id: str
    order_number: str
    account_id: str
    email: str | None
    currency: str
    status: str
    status_code: str
    is_deleted: bool
    total_amount: float
    lines: tuple[LineTruth, ...]
    cancelled_amount: float
    returned_amount: float
    credited_amount: float
    order_summary_id: str | None

    @property
    def net_amount(self) -> float:
        return max(0.0, round(self.total_amount - self.cancelled_amount - self.returned_amount, 2))


def ground_truth(org: Org) -> dict[str, OrderTruth]:
    """Original orders (deleted included) keyed by id, computed from the org's current records."""
    t = org.tables
    reductions: dict[str, float] = {}
    for o in t["Order"].values():
        if o.get("IsReductionOrder") and o.get("OriginalOrderId") and not o.get("IsDeleted"):
            reductions.setdefault(o["OriginalOrderId"], 0.0)
    om_cancel: dict[str, float] = {}
    om_return_change: set[str] = set()
    for c in t["OrderItemSummaryChange"].values():
        item = t["OrderItem"].get(c.get("ChangeOrderItemId") or "")
        if item is None:
            continue
        if c["ChangeType"] == "Cancel":
            om_cancel[item["OrderId"]] = om_cancel.get(item["OrderId"], 0.0) + abs(item["TotalPrice"])
        else:
            om_return_change.add(item["OrderId"])
    for o in t["Order"].values():
        if o.get("IsReductionOrder") and o.get("OriginalOrderId") and o["Id"] not in om_return_change:
            amount = om_cancel.get(o["Id"])
            if amount is None:
                amount = sum(
                    abs(t["OrderItem"][i]["TotalPrice"]) for i in org.children("OrderItem", "OrderId", o["Id"])
                )
            reductions[o["OriginalOrderId"]] = reductions.get(o["OriginalOrderId"], 0.0) + amount
    returned: dict[str, float] = {}
    for ln in t["ReturnOrderLineItem"].values():
        ro = t["ReturnOrder"].get(ln["ReturnOrderId"])
        item = t["OrderItem"].get(ln["OrderItemId"])
        if ro is None or item is None or ro.get("IsDeleted") or ln.get("IsDeleted"):
            continue
        returned[ro["OrderId"]] = (
            returned.get(ro["OrderId"], 0.0) + (ln.get("QuantityReturned") or 0.0) * item["UnitPrice"]
        )
    credited: dict[str, float] = {}
    for memo in t["CreditMemo"].values():
        ref = memo.get("ReferenceEntityId") or ""
        order_id = ref if ref in t["Order"] else (t["OrderSummary"].get(ref) or {}).get("OriginalOrderId")
        if order_id:
            credited[order_id] = credited.get(order_id, 0.0) + memo["TotalAmount"]
    summaries = {s["OriginalOrderId"]: s["Id"] for s in t["OrderSummary"].values()}
    out: dict[str, OrderTruth] = {}
    for o in t["Order"].values():
        if o.get("IsReductionOrder"):
            continue
        account: dict[str, Any] = t["Account"].get(o.get("AccountId") or "") or {}
        contact: dict[str, Any] = t["Contact"].get(o.get("BillToContactId") or "") or {}
        lines = tuple(
            LineTruth(
                i["Id"],
                i["Product2Id"],
                (t["Product2"].get(i["Product2Id"]) or {}).get("StockKeepingUnit"),
                i["Quantity"],
                i["UnitPrice"],
                i["TotalPrice"],
            )
            for i in (t["OrderItem"][x] for x in sorted(org.children("OrderItem", "OrderId", o["Id"])))
        )
        total = o.get("TotalAmount") or 0.0
        whole = o["Status"] == "Cancelled" or bool(o.get("IsDeleted"))
        out[o["Id"]] = OrderTruth(
            order_id=o["Id"],
            order_number=o["OrderNumber"],
            account_id=o["AccountId"],
            email=account.get("PersonEmail") or contact.get("Email"),
            currency=o.get("CurrencyIsoCode") or "EUR",
            status=o["Status"],
            status_code=o["StatusCode"],
            is_deleted=bool(o.get("IsDeleted")),
            total_amount=total,
            lines=lines,
            cancelled_amount=round(total if whole else reductions.get(o["Id"], 0.0), 2),
            returned_amount=round(returned.get(o["Id"], 0.0), 2),
            credited_amount=round(credited.get(o["Id"], 0.0), 2),
            order_summary_id=summaries.get(o["Id"]),
        )
    return out
