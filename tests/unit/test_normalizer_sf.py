"""The Salesforce mapper, table-tested on records recorded from the sandbox (core and Order Management)."""

from __future__ import annotations

import csv
import io
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from canonical.events import (
    CustomerUpserted,
    OrderDeleted,
    OrderLineUpserted,
    OrderUpserted,
    ProductUpserted,
    RawRecord,
    ReturnDeleted,
    ReturnUpserted,
)
from normalizer.mappers import mapper_for
from normalizer.mappers.salesforce import map_record, order_lifecycle

FIX = Path(__file__).parents[1] / "fixtures" / "salesforce"
RECORDS: dict[str, dict[str, list[dict[str, Any]]]] = json.loads((FIX / "records.json").read_text())
CORE = {"mode": "order", "price_currency": "EUR"}
OM = {"mode": "order_management", "price_currency": "EUR"}


def raw(obj: str, rec: dict[str, Any], *, op: str = "upsert", order: str | None = None) -> RawRecord:
    return RawRecord(
        tenant_id="acme", connection_id="sf1", source="salesforce", entity=obj, source_id=rec["Id"],
        source_version=str(rec.get("SystemModstamp") or "0"), op=op,  # type: ignore[arg-type]
        payload=json.dumps(rec), order_source_id=order,
    )


def one(mode: str, obj: str, pred: Any = lambda r: True) -> dict[str, Any]:
    return next(r for r in RECORDS[mode][obj] if pred(r))


def events(obj: str, rec: dict[str, Any], settings: dict[str, Any], **kw: Any) -> list[Any]:
    result = map_record(raw(obj, rec, **kw), settings)
    assert not result.dead, result.dead
    return [e for _, e in result.events]


def test_dispatch_finds_the_module() -> None:
    assert mapper_for("salesforce") is not None


@pytest.mark.parametrize(
    ("status", "code", "status_map", "expected"),
    [
        ("Draft", "Draft", None, "pending"),
        ("Activated", "Activated", None, "pending"),
        ("Fulfilled", "Activated", None, "awardable"),
        ("Cancelled", "Activated", None, "cancelled"),
        ("Shipped", "Activated", {"Shipped": "awardable"}, "awardable"),
        ("Activated", "Activated", {"Activated": "awardable"}, "awardable"),
        ("OnHold", "Activated", None, "pending"),  # unknown values follow their StatusCode category
    ],
)
def test_order_status_to_lifecycle(status: str, code: str, status_map: dict[str, str] | None, expected: str) -> None:
    assert order_lifecycle(status, code, status_map) == expected


def test_order_maps_total_customer_email_and_lifecycle() -> None:
    rec = one("order", "Order", lambda r: r["Status"] == "Fulfilled")
    (e,) = events("Order", rec, CORE)
    assert isinstance(e, OrderUpserted)
    o = e.order
    assert (o.lifecycle, o.status, o.currency) == ("awardable", "Fulfilled", rec["CurrencyIsoCode"])
    assert o.total_amount == Decimal(str(rec["TotalAmount"]))
    assert o.customer_source_id == rec["AccountId"] and o.customer_entity == (
        "person_account" if (rec.get("Account") or {}).get("IsPersonAccount") else "account")
    assert o.email == ((rec.get("Account") or {}).get("PersonEmail") or (rec.get("BillToContact") or {}).get("Email"))
    assert o.order_number == rec["OrderNumber"] and o.lines is None
    assert e.key == f"acme:{rec['Id']}".encode()


def test_cancelled_status_and_custom_map() -> None:
    rec = one("order", "Order", lambda r: r["Status"] == "Cancelled")
    assert events("Order", rec, CORE)[0].order.lifecycle == "cancelled"
    rec2 = {**rec, "Status": "Activated"}
    assert events("Order", rec2, {**CORE, "status_map": {"Activated": "awardable"}})[0].order.lifecycle == "awardable"
    bad = map_record(raw("Order", rec2), {**CORE, "status_map": {"Activated": "paid"}})
    assert bad.dead and "status_map" in bad.dead[0]


def test_core_reduction_order_becomes_a_return_against_the_original() -> None:
    rec = one("order", "Order", lambda r: r["IsReductionOrder"])
    (e,) = events("Order", rec, CORE)
    assert isinstance(e, ReturnUpserted)
    r = e.return_
    assert r.original_order_source_id == rec["OriginalOrderId"]
    assert r.amount == abs(Decimal(str(rec["TotalAmount"]))) and r.amount > 0
    assert r.lifecycle == "effective"
    assert e.key == f"acme:{rec['OriginalOrderId']}".encode()
    assert events("Order", rec, OM) == []  # OM change orders: item summaries carry the facts


def test_deleted_order_and_reduction() -> None:
    rec = one("order", "Order", lambda r: r["IsDeleted"])
    assert isinstance(events("Order", rec, CORE, op="delete")[0], OrderDeleted)
    red = {**one("order", "Order", lambda r: r["IsReductionOrder"]), "IsDeleted": True}
    assert isinstance(events("Order", red, CORE, op="delete")[0], ReturnDeleted)


def test_order_item_lines_and_reduction_lines() -> None:
    rec = one("order", "OrderItem", lambda r: r["Quantity"] > 0)
    (e,) = events("OrderItem", rec, CORE)
    assert isinstance(e, OrderLineUpserted)
    assert e.order_id == rec["OrderId"] and e.line.amount == Decimal(str(rec["TotalPrice"]))
    assert e.line.sku == rec["Product2"]["StockKeepingUnit"]
    assert e.key == f"acme:{rec['OrderId']}".encode()
    neg = one("order", "OrderItem", lambda r: r["Quantity"] < 0)
    assert events("OrderItem", neg, CORE) == []


def test_return_order_line_claws_back_received_quantity() -> None:
    rec = one("order", "ReturnOrderLineItem", lambda r: r["QuantityReturned"] > 0)
    (e,) = events("ReturnOrderLineItem", rec, CORE)
    r = e.return_
    assert r.original_order_source_id == rec["ReturnOrder"]["OrderId"]
    assert r.lifecycle == "effective"
    assert r.amount == Decimal(str(rec["QuantityReturned"])) * Decimal(str(rec["OrderItem"]["UnitPrice"]))
    assert r.lines[0].original_line_id == rec["OrderItemId"]
    pending = one("order", "ReturnOrderLineItem", lambda r: r["QuantityReturned"] == 0)
    assert events("ReturnOrderLineItem", pending, CORE)[0].return_.lifecycle == "pending"
    assert events("ReturnOrderLineItem", rec, OM) == []  # OM refunds come from credit memos


def test_om_item_summary_cancellation() -> None:
    rec = one("order_management", "OrderItemSummary", lambda r: r["QuantityCanceled"] > 0)
    (e,) = events("OrderItemSummary", rec, OM)
    r = e.return_
    assert r.original_order_source_id == rec["OrderSummary"]["OriginalOrderId"]
    assert r.amount == Decimal(str(rec["QuantityCanceled"])) * Decimal(str(rec["UnitPrice"]))
    assert r.lifecycle == "effective"
    untouched = one("order_management", "OrderItemSummary", lambda r: r["QuantityCanceled"] == 0)
    assert events("OrderItemSummary", untouched, OM) == []


def test_om_credit_memo_anchored_to_the_original_order() -> None:
    rec = one("order_management", "CreditMemo")
    assert rec["ReferenceEntityId"].startswith("1Os")
    unanchored = map_record(raw("CreditMemo", rec), OM)
    assert unanchored.dead and unanchored.actions == [f"refetch CreditMemo({rec['Id']})"]
    (e,) = events("CreditMemo", rec, OM, order="801MF00000007JlYAI")
    assert e.return_.original_order_source_id == "801MF00000007JlYAI"
    assert e.return_.amount == Decimal(str(rec["TotalAmount"])) and e.return_.lifecycle == "effective"
    core_memo = one("order", "CreditMemo")
    assert events("CreditMemo", core_memo, CORE) == []  # core refunds duplicate the received return lines
    (c,) = events("CreditMemo", core_memo, {**CORE, "refunds": "credit_memo"})
    assert c.return_.original_order_source_id == core_memo["ReferenceEntityId"]


def test_accounts_person_accounts_and_contacts() -> None:
    biz = one("order", "Account", lambda r: not r["IsPersonAccount"])
    (e,) = events("Account", biz, CORE)
    assert isinstance(e, CustomerUpserted)
    assert (e.customer.kind, e.customer.external_id, e.customer.email) == ("account", biz["AccountNumber"], None)
    person = one("order", "Account", lambda r: r["IsPersonAccount"])
    (p,) = events("Account", person, CORE)
    assert (p.customer.kind, p.customer.email) == ("person_account", person["PersonEmail"])
    contact = one("order", "Contact", lambda r: not r["IsPersonAccount"])
    (c,) = events("Contact", contact, CORE)
    assert (c.customer.kind, c.customer.email, c.customer.parent_source_id) == (
        "contact", contact["Email"], contact["AccountId"])
    assert events("Contact", one("order", "Contact", lambda r: r["IsPersonAccount"]), CORE) == []
    custom = events("Contact", contact, {**CORE, "external_id_field": {"Contact": "Email"}})
    assert custom[0].customer.external_id == contact["Email"]


def test_products_and_prices() -> None:
    prod = one("order", "Product2")
    (e,) = events("Product2", prod, CORE)
    assert isinstance(e, ProductUpserted)
    assert (e.product.sku, e.product.category, e.product.price) == (prod["StockKeepingUnit"], prod["Family"], None)
    pbe = one("order", "PricebookEntry", lambda r: r["CurrencyIsoCode"] == "EUR")
    (p,) = events("PricebookEntry", pbe, CORE)
    assert p.source_id == pbe["Product2Id"]
    assert (p.product.price, p.product.currency) == (Decimal(str(pbe["UnitPrice"])), "EUR")
    assert p.product.category == pbe["Product2"]["Family"]
    assert events("PricebookEntry", {**pbe, "CurrencyIsoCode": "USD"}, CORE) == []


def test_bulk_csv_rows_map_like_rest_records_with_the_same_event_ids() -> None:
    rows = list(csv.DictReader(io.StringIO((FIX / "bulk_orders.csv").read_text())))
    by_id = {r["Id"]: r for r in RECORDS["order"]["Order"]}
    row = next(r for r in rows if r["Id"] in by_id)
    rest = by_id[row["Id"]]
    version = rest["SystemModstamp"].replace("+0000", "Z")
    a = map_record(RawRecord(tenant_id="acme", connection_id="sf1", source="salesforce", entity="Order",
                             source_id=row["Id"], source_version=version, payload=json.dumps(row)), CORE)
    b = map_record(RawRecord(tenant_id="acme", connection_id="sf1", source="salesforce", entity="Order",
                             source_id=rest["Id"], source_version=version, payload=json.dumps(rest)), CORE)
    assert not a.dead and not b.dead
    ea, eb = a.events[0][1], b.events[0][1]
    assert ea.event_id == eb.event_id
    assert isinstance(ea, OrderUpserted) and isinstance(eb, OrderUpserted)
    assert ea.order.model_dump(exclude={"placed_at"}) == eb.order.model_dump(exclude={"placed_at"})


def test_unknown_object_and_bad_payload_are_dead_letters() -> None:
    rec = one("order", "Account")
    assert map_record(raw("Opportunity", rec), CORE).dead
    bad = RawRecord(tenant_id="acme", connection_id="sf1", source="salesforce", entity="Order", source_id="801x",
                    source_version="1", payload="{not json")
    out = map_record(bad, CORE)
    assert out.dead and out.actions == ["refetch Order(801x)"]
