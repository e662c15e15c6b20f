"""Business operations on an org, each one transaction (one transactionKey, CDC per touched row).

Order Management semantics of the simulator (documented, not confirmed against a real org):
* An ``OrderSummary`` mirrors one activated original ``Order``; an ``OrderItemSummary`` mirrors each line.
* ``OrderItemSummary.Quantity`` = ordered - canceled; ``AdjustedLineAmount`` = ``UnitPrice`` x
  (ordered - canceled - returned); ``AdjustedLineAmtWithTax`` adds the currency's tax rate.
* A cancel or a received return creates a change ``Order`` (``IsReductionOrder`` true, ``OriginalOrderId``
  the original) with negative lines, an ``OrderItemSummaryChange`` (``Cancel``/``Return``) per line, and
  lowers ``OrderSummary.TotalAdjustedProductAmount``/``GrandTotalAmount``.
* Core (``mode="order"``) cancel sets the org-defined ``Status = 'Cancelled'`` on the order.
"""

from __future__ import annotations

import random
from typing import Any

from sandbox.salesforce.clock import rest_datetime
from sandbox.salesforce.errors import SalesforceError
from sandbox.salesforce.org import Org

__all__ = [
    "TAX_RATES",
    "amend_quantity",
    "cancel_order",
    "close_return",
    "create_credit_memo",
    "create_order",
    "create_reduction_order",
    "create_return",
    "next_number",
    "random_mutations",
    "set_order_status",
    "submit_cancel",
]

TAX_RATES = {"EUR": 0.19, "USD": 0.0, "GBP": 0.2, "CHF": 0.081}


def next_number(org: Org, kind: str, width: int = 8) -> str:
    n = org.stats.get(f"seq:{kind}", 100) + 1
    org.stats[f"seq:{kind}"] = n
    return str(n).zfill(width)


def _order(org: Org, order_id: str) -> dict[str, Any]:
    rec = org.get("Order", order_id)
    if rec is None or rec.get("IsDeleted"):
        raise SalesforceError(404, "NOT_FOUND", "The requested resource does not exist")
    return rec


def _live_children(org: Org, obj: str, field: str, parent: str) -> list[dict[str, Any]]:
    return [
        org.tables[obj][i] for i in sorted(org.children(obj, field, parent)) if not org.tables[obj][i].get("IsDeleted")
    ]


def summary_for(org: Org, order_id: str) -> dict[str, Any] | None:
    for s in _live_children(org, "OrderSummary", "OriginalOrderId", order_id):
        return s
    return None


def create_order(
    org: Org,
    account_id: str,
    lines: list[tuple[str, float]],
    *,
    currency: str = "EUR",
    status: str = "Activated",
    bill_to_contact_id: str | None = None,
    order_type: str | None = None,
) -> str:
    """A new order with lines ``(product_id, quantity)`` priced from the standard pricebook entries."""
    pricebook = next((p for p in org.records("Pricebook2") if p.get("IsStandard")), None)
    with org.transaction() as tx:
        order_id = org.create(
            "Order",
            {
                "AccountId": account_id,
                "Status": "Draft",
                "EffectiveDate": rest_datetime(tx.ts)[:10],
                "Pricebook2Id": pricebook["Id"] if pricebook else None,
                "CurrencyIsoCode": currency,
                "OrderNumber": next_number(org, "Order"),
                "BillToContactId": bill_to_contact_id,
                "IsReductionOrder": False,
                "Type": order_type,
            },
        )
        for product_id, qty in lines:
            pbe = next(
                (
                    e
                    for e in _live_children(org, "PricebookEntry", "Product2Id", product_id)
                    if e.get("CurrencyIsoCode") == currency
                ),
                None,
            )
            price = pbe["UnitPrice"] if pbe else 10.0
            org.create(
                "OrderItem",
                {
                    "OrderId": order_id,
                    "Product2Id": product_id,
                    "PricebookEntryId": pbe["Id"] if pbe else None,
                    "Quantity": float(qty),
                    "UnitPrice": price,
                    "ListPrice": price,
                    "CurrencyIsoCode": currency,
                    "OrderItemNumber": next_number(org, "OrderItem", 10),
                },
            )
        if status != "Draft":
            set_order_status(org, order_id, status)
    return order_id


def set_order_status(org: Org, order_id: str, status: str) -> None:
    order = _order(org, order_id)
    with org.transaction():
        org.update("Order", order_id, {"Status": status})
        if (
            org.mode == "order_management"
            and order["StatusCode"] == "Activated"
            and not order.get("IsReductionOrder")
            and summary_for(org, order_id) is None
        ):
            _create_summary(org, order)


def _create_summary(org: Org, order: dict[str, Any]) -> str:
    account = org.lookup(order.get("AccountId")) or {}
    contact = org.lookup(order.get("BillToContactId")) or {}
    email = account.get("PersonEmail") or contact.get("Email")
    rate = TAX_RATES.get(order.get("CurrencyIsoCode") or "", 0.0)
    os_id = org.create(
        "OrderSummary",
        {
            "OrderNumber": order.get("OrderNumber"),
            "AccountId": order.get("AccountId"),
            "Status": "Created",
            "OrderLifeCycleType": "MANAGED",
            "BillingEmailAddress": email,
            "OriginalOrderId": order["Id"],
            "OrderedDate": order.get("ActivatedDate") or order["CreatedDate"],
            "CurrencyIsoCode": order.get("CurrencyIsoCode"),
        },
    )
    for item in _live_children(org, "OrderItem", "OrderId", order["Id"]):
        product = org.lookup(item.get("Product2Id")) or {}
        amount = round(item["Quantity"] * item["UnitPrice"], 2)
        org.create(
            "OrderItemSummary",
            {
                "OrderSummaryId": os_id,
                "OriginalOrderItemId": item["Id"],
                "Product2Id": item.get("Product2Id"),
                "Name": product.get("Name"),
                "StockKeepingUnit": product.get("StockKeepingUnit"),
                "Status": "Ordered",
                "Quantity": item["Quantity"],
                "QuantityOrdered": item["Quantity"],
                "QuantityCanceled": 0.0,
                "QuantityFulfilled": 0.0,
                "QuantityReturnInitiated": 0.0,
                "QuantityReturned": 0.0,
                "UnitPrice": item["UnitPrice"],
                "AdjustedLineAmount": amount,
                "AdjustedLineAmtWithTax": round(amount * (1 + rate), 2),
                "CurrencyIsoCode": order.get("CurrencyIsoCode"),
            },
        )
    _retotal_summary(org, os_id)
    return os_id


def _retotal_summary(org: Org, os_id: str) -> None:
    items = _live_children(org, "OrderItemSummary", "OrderSummaryId", os_id)
    values: dict[str, Any] = {
        "TotalAdjustedProductAmount": round(sum(i["AdjustedLineAmount"] for i in items), 2),
        "GrandTotalAmount": round(sum(i["AdjustedLineAmtWithTax"] for i in items), 2),
    }
    values["TotalAdjustedProductTaxAmount"] = round(
        values["GrandTotalAmount"] - values["TotalAdjustedProductAmount"], 2
    )
    if items and all(i["Quantity"] == 0 for i in items):
        values["Status"] = "Canceled"
    org.update("OrderSummary", os_id, values)


def _reprice_ois(org: Org, ois: dict[str, Any], **deltas: float) -> None:
    values = {k: ois[k] + v for k, v in deltas.items()}
    merged = {**ois, **values}
    remaining = merged["QuantityOrdered"] - merged["QuantityCanceled"]
    kept = remaining - merged["QuantityReturned"]
    summary = org.lookup(ois["OrderSummaryId"]) or {}
    rate = TAX_RATES.get(summary.get("CurrencyIsoCode") or "", 0.0)
    amount = round(kept * merged["UnitPrice"], 2)
    values.update(Quantity=remaining, AdjustedLineAmount=amount, AdjustedLineAmtWithTax=round(amount * (1 + rate), 2))
    org.update("OrderItemSummary", ois["Id"], values)


def _change_order(org: Org, original: dict[str, Any], lines: list[tuple[dict[str, Any], float]]) -> dict[str, str]:
    """A reduction/change order with negative lines; returns original item id -> change item id."""
    change_id = org.create(
        "Order",
        {
            "AccountId": original.get("AccountId"),
            "Status": "Draft",
            "Pricebook2Id": original.get("Pricebook2Id"),
            "CurrencyIsoCode": original.get("CurrencyIsoCode"),
            "OrderNumber": next_number(org, "Order"),
            "BillToContactId": original.get("BillToContactId"),
            "IsReductionOrder": True,
            "OriginalOrderId": original["Id"],
            "EffectiveDate": original.get("EffectiveDate"),
        },
    )
    mapping: dict[str, str] = {}
    for item, qty in lines:
        mapping[item["Id"]] = org.create(
            "OrderItem",
            {
                "OrderId": change_id,
                "Product2Id": item.get("Product2Id"),
                "PricebookEntryId": item.get("PricebookEntryId"),
                "Quantity": -float(qty),
                "UnitPrice": item["UnitPrice"],
                "ListPrice": item.get("ListPrice"),
                "OriginalOrderItemId": item["Id"],
                "CurrencyIsoCode": item.get("CurrencyIsoCode"),
                "OrderItemNumber": next_number(org, "OrderItem", 10),
            },
        )
    org.update("Order", change_id, {"Status": "Activated"})
    return mapping


def create_reduction_order(org: Org, order_id: str, lines: list[tuple[str, float]]) -> str:
    """Core reduction order: negative lines ``(order_item_id, quantity)`` against ``order_id``."""
    original = _order(org, order_id)
    with org.transaction():
        items = [(org.tables["OrderItem"][i], q) for i, q in lines]
        mapping = _change_order(org, original, items)
    change_item = org.tables["OrderItem"][next(iter(mapping.values()))]
    return str(change_item["OrderId"])


def submit_cancel(
    org: Org, order_summary_id: str, changes: list[tuple[str, float]], reason: str = "Customer Request"
) -> str:
    """OM ``submit-cancel`` of ``(order_item_summary_id, quantity)`` pairs; returns the change order id."""
    summary = org.get("OrderSummary", order_summary_id)
    if summary is None:
        raise SalesforceError(404, "NOT_FOUND", "The requested resource does not exist")
    original = _order(org, summary["OriginalOrderId"])
    with org.transaction():
        pairs = []
        for ois_id, qty in changes:
            ois = org.tables["OrderItemSummary"][ois_id]
            if qty <= 0 or qty > ois["Quantity"] - ois["QuantityFulfilled"]:
                raise SalesforceError(400, "INVALID_INPUT", f"quantity {qty} cannot be canceled for {ois_id}")
            pairs.append((ois, org.tables["OrderItem"][ois["OriginalOrderItemId"]], qty))
        mapping = _change_order(org, original, [(item, q) for _, item, q in pairs])
        for ois, item, qty in pairs:
            _reprice_ois(org, ois, QuantityCanceled=qty)
            org.create(
                "OrderItemSummaryChange",
                {
                    "ChangeType": "Cancel",
                    "OrderItemSummaryId": ois["Id"],
                    "OrderSummaryId": order_summary_id,
                    "ChangeOrderItemId": mapping[item["Id"]],
                    "IsPreFulfillment": True,
                    "Reason": reason,
                },
            )
        _retotal_summary(org, order_summary_id)
    return str(org.tables["OrderItem"][next(iter(mapping.values()))]["OrderId"])


def cancel_order(org: Org, order_id: str, reason: str = "Customer Request") -> str | None:
    """Cancel a whole order: core sets Status 'Cancelled'; OM submits a cancel of every open quantity."""
    order = _order(org, order_id)
    summary = summary_for(org, order_id) if org.mode == "order_management" else None
    if summary is None:
        org.update("Order", order["Id"], {"Status": "Cancelled"})
        return None
    changes = [
        (ois["Id"], ois["Quantity"] - ois["QuantityFulfilled"])
        for ois in _live_children(org, "OrderItemSummary", "OrderSummaryId", summary["Id"])
        if ois["Quantity"] - ois["QuantityFulfilled"] > 0
    ]
    if not changes:
        return None
    return submit_cancel(org, summary["Id"], changes, reason)


def amend_quantity(org: Org, order_item_id: str, quantity: float) -> None:
    """Change a line's quantity (TotalPrice and the order's TotalAmount follow)."""
    org.update("OrderItem", order_item_id, {"Quantity": float(quantity)})


def create_return(org: Org, order_id: str, lines: list[tuple[str, float, str]], *, status: str = "Submitted") -> str:
    """A ReturnOrder with lines ``(order_item_id, quantity, reason)``."""
    order = _order(org, order_id)
    summary = summary_for(org, order_id) if org.mode == "order_management" else None
    with org.transaction():
        ro_id = org.create(
            "ReturnOrder",
            {
                "ReturnOrderNumber": next_number(org, "ReturnOrder"),
                "AccountId": order.get("AccountId"),
                "ContactId": order.get("BillToContactId"),
                "OrderId": order_id,
                "OrderSummaryId": summary["Id"] if summary else None,
                "Status": "Submitted",
                "CurrencyIsoCode": order.get("CurrencyIsoCode"),
            },
        )
        for item_id, qty, reason in lines:
            item = org.tables["OrderItem"][item_id]
            ois = None
            if summary is not None:
                ois = next(
                    o
                    for o in _live_children(org, "OrderItemSummary", "OrderSummaryId", summary["Id"])
                    if o["OriginalOrderItemId"] == item_id
                )
                _reprice_ois(org, ois, QuantityReturnInitiated=qty)
            org.create(
                "ReturnOrderLineItem",
                {
                    "ReturnOrderId": ro_id,
                    "OrderItemId": item_id,
                    "OrderItemSummaryId": ois["Id"] if ois else None,
                    "Product2Id": item.get("Product2Id"),
                    "QuantityExpected": float(qty),
                    "QuantityReceived": 0.0,
                    "QuantityReturned": 0.0,
                    "ReasonForReturn": reason,
                    "TotalPrice": round(qty * item["UnitPrice"], 2),
                    "CurrencyIsoCode": item.get("CurrencyIsoCode"),
                },
            )
        if status == "Closed":
            close_return(org, ro_id)
        elif status != "Submitted":
            org.update("ReturnOrder", ro_id, {"Status": status})
    return ro_id


def close_return(org: Org, return_id: str, *, refund: bool | None = None) -> str | None:
    """Receive every line and close; in OM a Return change order is written and (by default) a CreditMemo."""
    ro = org.get("ReturnOrder", return_id)
    if ro is None:
        raise SalesforceError(404, "NOT_FOUND", "The requested resource does not exist")
    memo_id = None
    with org.transaction():
        lines = _live_children(org, "ReturnOrderLineItem", "ReturnOrderId", return_id)
        for line in lines:
            q = line["QuantityExpected"]
            org.update("ReturnOrderLineItem", line["Id"], {"QuantityReceived": q, "QuantityReturned": q})
        org.update("ReturnOrder", return_id, {"Status": "Closed"})
        summary_id = ro.get("OrderSummaryId")
        if summary_id:
            original = _order(org, ro["OrderId"])
            items = [(org.tables["OrderItem"][ln["OrderItemId"]], ln["QuantityExpected"]) for ln in lines]
            mapping = _change_order(org, original, items)
            for line in lines:
                ois = org.tables["OrderItemSummary"][line["OrderItemSummaryId"]]
                q = line["QuantityExpected"]
                _reprice_ois(org, ois, QuantityReturned=q, QuantityReturnInitiated=-q)
                org.create(
                    "OrderItemSummaryChange",
                    {
                        "ChangeType": "Return",
                        "OrderItemSummaryId": ois["Id"],
                        "OrderSummaryId": summary_id,
                        "ChangeOrderItemId": mapping[line["OrderItemId"]],
                        "IsPreFulfillment": False,
                        "Reason": line.get("ReasonForReturn"),
                    },
                )
                org.update("ReturnOrderLineItem", line["Id"], {"ChangeOrderItemId": mapping[line["OrderItemId"]]})
            _retotal_summary(org, summary_id)
        if refund if refund is not None else bool(summary_id):
            memo_id = create_credit_memo(
                org,
                summary_id or ro["OrderId"],
                [(ln.get("OrderItemSummaryId") or ln["OrderItemId"], ln["TotalPrice"]) for ln in lines],
            )
    return memo_id


def create_credit_memo(org: Org, reference_id: str, lines: list[tuple[str, float]]) -> str:
    """A posted CreditMemo referencing an Order or OrderSummary, lines ``(item_id, net_amount)`` + tax."""
    ref = org.lookup(reference_id)
    if ref is None:
        raise SalesforceError(404, "NOT_FOUND", "The requested resource does not exist")
    order = ref if org.object_of(reference_id) == "Order" else (org.lookup(ref.get("OriginalOrderId")) or {})
    currency = ref.get("CurrencyIsoCode") or "EUR"
    rate = TAX_RATES.get(currency, 0.0)
    net = round(sum(a for _, a in lines), 2)
    tax = round(sum(round(a * rate, 2) for _, a in lines), 2)
    with org.transaction():
        memo_id = org.create(
            "CreditMemo",
            {
                "DocumentNumber": "CM-" + next_number(org, "CreditMemo"),
                "BillingAccountId": ref.get("AccountId"),
                "BillToContactId": order.get("BillToContactId"),
                "Balance": round(net + tax, 2),
                "CreditDate": org.clock.now_ms(),
                "AppType": "Commerce Cloud",
                "TotalAmount": net,
                "TotalTaxAmount": tax,
                "TotalAmountWithTax": round(net + tax, 2),
                "ReferenceEntityId": ref["Id"],
                "Status": "Posted",
                "CurrencyIsoCode": currency,
            },
        )
        for item_id, amount in lines:
            org.create(
                "CreditMemoLine",
                {
                    "CreditMemoId": memo_id,
                    "Name": "Refund",
                    "Type": "Charge",
                    "ReferenceEntityItemId": item_id,
                    "ChargeAmount": round(amount, 2),
                    "TaxAmount": round(amount * rate, 2),
                    "CurrencyIsoCode": currency,
                },
            )
    return memo_id


def random_mutations(org: Org, count: int, rng: random.Random | None = None) -> list[tuple[str, str]]:
    """Apply ``count`` plausible random changes (live demos); returns ``(kind, record_id)`` pairs."""
    rng = rng or random.Random()
    done: list[tuple[str, str]] = []
    accounts = [a["Id"] for a in org.records("Account")]
    products = [p["Id"] for p in org.records("Product2") if p.get("IsActive")]
    for _ in range(count):
        orders = [o for o in org.records("Order") if not o.get("IsReductionOrder")]
        kind = rng.choices(
            ["create", "fulfil", "cancel", "amend", "return", "email", "price", "delete", "touch"],
            weights=[40, 15, 8, 8, 8, 8, 5, 2, 6],
        )[0]
        try:
            if kind == "create" or not orders:
                if not accounts or not products:
                    break
                acc = org.tables["Account"][rng.choice(accounts)]
                contact = acc.get("PersonContactId") or next(
                    iter(sorted(org.children("Contact", "AccountId", acc["Id"]))), None
                )
                lines = [(rng.choice(products), float(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
                oid = create_order(
                    org,
                    acc["Id"],
                    lines,
                    currency=rng.choice(list(TAX_RATES)[:3]),
                    bill_to_contact_id=contact,
                )
                done.append(("create", oid))
                continue
            order = rng.choice(orders)
            oid = order["Id"]
            items = _live_children(org, "OrderItem", "OrderId", oid)
            if kind == "fulfil" and order["Status"] == "Activated":
                set_order_status(org, oid, "Fulfilled")
            elif kind == "cancel" and order["Status"] in ("Activated", "Draft"):
                cancel_order(org, oid)
            elif kind == "amend" and items and order["Status"] == "Draft":
                amend_quantity(org, rng.choice(items)["Id"], float(rng.randint(1, 6)))
            elif kind == "return" and items and order["Status"] in ("Activated", "Fulfilled"):
                item = rng.choice(items)
                create_return(org, oid, [(item["Id"], 1.0, "Damaged")], status=rng.choice(["Submitted", "Closed"]))
            elif kind == "email" and order.get("BillToContactId"):
                n = rng.randint(1, 10_000)
                org.update("Contact", order["BillToContactId"], {"Email": f"changed{n}@example.com"})
            elif kind == "price" and products:
                pid = rng.choice(products)
                org.update("Product2", pid, {"Description": f"Revised {rng.randint(1, 999)}"})
            elif kind == "delete" and order["Status"] == "Draft":
                org.delete("Order", oid)
            elif kind == "touch":
                org.touch("Order", oid)
            else:
                continue
            done.append((kind, oid))
        except SalesforceError:
            continue
    return done
