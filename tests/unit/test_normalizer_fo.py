"""Table tests of the Finance & Operations mapper on fixtures written from the documentation
(tests/fixtures/vendor-docs/dynamics-fo, each file naming the documents it follows)."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from canonical.events import CustomerUpserted, OrderUpserted, ProductUpserted, RawRecord, ReturnUpserted
from canonical.topics import CANONICAL_CUSTOMER, CANONICAL_ORDER, CANONICAL_PRODUCT, CANONICAL_RETURN
from normalizer.mappers import mapper_for
from normalizer.mappers.dynamics_fo import FIELD_DEFAULTS, map_record

FIX = Path(__file__).parents[1] / "fixtures" / "vendor-docs" / "dynamics-fo"


def _load(name: str) -> tuple[RawRecord, dict[str, Any]]:
    doc = json.loads((FIX / name).read_text())
    assert doc["_source"], f"{name} must name the documentation it follows"
    raw = RawRecord(tenant_id="acme", connection_id="fo-1", source="dynamics-fo", entity=doc["entity"],
                    source_id=doc["source_id"], source_version="v1", payload=json.dumps(doc["payload"]),
                    order_source_id=doc.get("order_source_id"))
    return raw, doc.get("settings", {})


def _one(name: str) -> tuple[str, Any]:
    raw, settings = _load(name)
    out = map_record(raw, settings)
    assert not out.dead, out.dead
    assert len(out.events) == 1
    return out.events[0]


ORDERS = [
    # file, order number, total, tax, charges, lifecycle, line amounts
    ("order_totals_calculated.json", "000749", "1188", "88", "10", "awardable", ["600", "490"]),
    ("order_totals_not_calculated.json", "000750", "491", "0", "0", "pending", ["295", "196"]),
    ("order_canceled_other_company.json", "000750", "49.99", "0", "0", "cancelled", ["49.99"]),
    ("order_renamed_status_extension.json", "000751", "550", "50", "0", "awardable", ["500"]),
]


@pytest.mark.parametrize(("name", "number", "total", "tax", "charges", "life", "lines"), ORDERS)
def test_orders(name: str, number: str, total: str, tax: str, charges: str, life: str, lines: list[str]) -> None:
    topic, ev = _one(name)
    assert topic == CANONICAL_ORDER and isinstance(ev, OrderUpserted)
    company = json.loads((FIX / name).read_text())["payload"]["dataAreaId"]
    o = ev.order
    assert ev.source_id == f"{company}/{number}" and ev.key == f"acme:{company}/{number}".encode()
    assert o.order_number == number and o.currency == "USD" and o.lifecycle == life
    assert (o.total_amount, o.tax_amount, o.shipping_amount) == (Decimal(total), Decimal(tax), Decimal(charges))
    assert [ln.amount for ln in o.lines or ()] == [Decimal(x) for x in lines]
    assert all(ln.line_id.startswith(f"{company}/") and (ln.product_source_id or "").startswith(f"{company}/")
               for ln in o.lines or ())
    assert o.customer_source_id == f"{company}/US-003" and o.customer_entity == "customer"


def test_same_number_in_two_companies_is_two_orders() -> None:
    _, a = _one("order_totals_not_calculated.json")
    _, b = _one("order_canceled_other_company.json")
    assert a.order.order_number == b.order.order_number
    assert a.source_id != b.source_id and a.event_id != b.event_id and a.key != b.key


def test_renamed_status_without_mapping_is_a_dead_letter_naming_the_setting() -> None:
    raw, _ = _load("order_renamed_status_extension.json")
    out = map_record(raw, {})
    assert not out.events
    assert "SalesOrderStatus" in out.dead[0] and "field_map.status" in out.dead[0]


def test_status_lifecycle_setting_overrides_the_default() -> None:
    raw, _ = _load("order_totals_not_calculated.json")
    out = map_record(raw, {"status_lifecycle": {"Backorder": "awardable"}})
    assert out.events[0][1].order.lifecycle == "awardable"  # type: ignore[attr-defined]
    bad = map_record(raw, {"status_lifecycle": {"Backorder": "maybe"}})
    assert "status_lifecycle" in bad.dead[0]


def test_customer_and_product() -> None:
    topic, c = _one("customer.json")
    assert topic == CANONICAL_CUSTOMER and isinstance(c, CustomerUpserted)
    assert c.source_id == "usmf/US-003" and c.customer.external_id == "US-003"
    assert c.customer.email == "forest.wholesales@example.com" and c.customer.display_name == "Forest Wholesales"
    topic, p = _one("released_product.json")
    assert topic == CANONICAL_PRODUCT and isinstance(p, ProductUpserted)
    assert p.source_id == "usmf/D0001" and p.product.sku == "D0001" and p.product.category == "Audio"
    assert p.product.price == Decimal("300")


def test_credited_return_claws_back_the_credit_note_amount() -> None:
    topic, ev = _one("return_credited.json")
    assert topic == CANONICAL_RETURN and isinstance(ev, ReturnUpserted)
    r = ev.return_
    assert r.original_order_source_id == "usmf/000749" and ev.key == b"acme:usmf/000749"
    assert r.lifecycle == "effective" and r.amount == Decimal("211.68")
    assert [(ln.line_id, ln.original_line_id, ln.quantity, ln.amount) for ln in r.lines] == [
        ("usmf/000001201", "usmf/000001138", Decimal(2), Decimal("196"))]


def test_return_without_credit_note_uses_its_lines() -> None:
    _, ev = _one("return_received_not_credited.json")
    assert ev.return_.lifecycle == "effective" and ev.return_.amount == Decimal("196")


@pytest.mark.parametrize(("name", "words"), [
    ("order_without_lines.json", ["SalesOrderLines", "re-fetch"]),
    ("return_without_anchor.json", ["field_map.return_reference"]),
])
def test_unmappable_records_say_what_to_fix(name: str, words: list[str]) -> None:
    raw, settings = _load(name)
    out = map_record(raw, settings)
    assert not out.events and out.actions
    assert all(w in out.dead[0] for w in words), out.dead


def test_registered_for_its_source_and_defaults_are_documented() -> None:
    assert mapper_for("dynamics-fo") is not None
    facts = (Path(__file__).parents[2] / "docs" / "vendor-facts.md").read_text()
    section = facts.split("## Finance & Operations", 1)[1]
    missing = [f for f in FIELD_DEFAULTS.values() if f and f not in section]
    assert not missing, f"field defaults not in docs/vendor-facts.md: {missing}"
