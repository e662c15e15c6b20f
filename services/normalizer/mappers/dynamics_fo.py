"""Finance & Operations data-entity records -> canonical events. Pure; table-tested on documentation fixtures.

Vendor facts (entities, fields, enums) are in ``docs/vendor-facts.md`` (Finance & Operations). Field names
differ per environment (renamed or extension fields), so every field this module reads goes through the
connection's ``settings.field_map`` (:data:`FIELD_DEFAULTS` when a name is not set); the poller confirms
each mapped field against the environment's ``$metadata`` at verify and refuses to go live otherwise.

Input (from the fo-poller; payload = the record's JSON as the OData service sent it, plus what the poller
assembled, under annotation names the service never uses):

* ``SalesOrderHeadersV2``: the header, with its lines under ``"SalesOrderLines"`` (the poller reads the
  lines entity by ``SalesOrderNumber`` and company). Source id ``<dataAreaId>/<SalesOrderNumber>``.
* ``CustomersV3`` -> ``<dataAreaId>/<CustomerAccount>``; ``ReleasedProductsV2`` -> ``<dataAreaId>/<ItemNumber>``.
* ``ReturnOrderHeaders``: the header with ``"ReturnOrderLines"``, ``"@flash.creditNote"`` (the invoice header
  whose ``SalesOrderNumber`` is the return order's number, or null) and ``"@flash.originalOrders"`` (the
  original order number per ``field_map.return_reference`` value, resolved by the poller).

Rules:

* ``dataAreaId`` (company) is part of every source id, customer id, product id and line id: the same order
  number in two companies is two orders.
* Order total: the header total (``order_total``, with ``order_tax`` and ``order_charges``) when
  ``totals_calculated`` is ``Yes``; otherwise the header totals are zero by design and the total is the sum of
  the lines' ``line_amount`` (no tax or charges known yet).
* Order lifecycle from ``status`` through ``settings.status_lifecycle`` (default: Invoiced, Delivered ->
  awardable; Canceled -> cancelled; anything else pending).
* Returns: return orders carry no amounts; the clawback amount is the credit note's ``credit_note_total``
  (absolute value: credit notes are negative invoices) when the return is invoiced, else the sum of the return
  lines' ``return_line_amount`` (absolute). Lifecycle from ``return_status`` via
  ``settings.return_status_lifecycle`` (default Received, Invoiced -> effective; Canceled -> cancelled); a
  credit note makes it effective. The anchor is the original order of the return lines.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from pydantic import ValidationError

from canonical.envelope import Envelope
from canonical.events import (
    CustomerData,
    CustomerDeleted,
    CustomerUpserted,
    OrderData,
    OrderDeleted,
    OrderLineData,
    OrderUpserted,
    ProductData,
    ProductDeleted,
    ProductUpserted,
    RawRecord,
    ReturnData,
    ReturnDeleted,
    ReturnLineData,
    ReturnUpserted,
)
from canonical.topics import CANONICAL_CUSTOMER, CANONICAL_ORDER, CANONICAL_PRODUCT, CANONICAL_RETURN
from normalizer.mappers import MapResult

__all__ = [
    "CREDIT_NOTE",
    "FIELD_DEFAULTS",
    "ORIGINAL_ORDERS",
    "RETURN_STATUS_DEFAULTS",
    "STATUS_DEFAULTS",
    "VENDOR_FIELDS",
    "field_map",
    "map_record",
]

FIELD_DEFAULTS: dict[str, str | None] = {
    # SalesOrderHeadersV2
    "order_number": "SalesOrderNumber",
    "order_total": "OrderTotalAmount",
    "order_tax": "OrderTotalTaxAmount",
    "order_charges": "OrderTotalChargesAmount",
    "order_discount": "OrderTotalDiscountAmount",
    "totals_calculated": "AreTotalsCalculated",
    "currency": "CurrencyCode",
    "status": "SalesOrderStatus",
    "customer": "OrderingCustomerAccountNumber",
    "email": "Email",
    "created": "OrderCreationDateTime",
    "change_date": None,
    # SalesOrderLines
    "line_id": "InventoryLotId",
    "line_order_number": "SalesOrderNumber",
    "line_item": "ItemNumber",
    "line_description": "LineDescription",
    "line_quantity": "OrderedSalesQuantity",
    "line_price": "SalesPrice",
    "line_amount": "LineAmount",
    # CustomersV3
    "customer_account": "CustomerAccount",
    "customer_name": "OrganizationName",
    "customer_email": "PrimaryContactEmail",
    # ReleasedProductsV2
    "product_item": "ItemNumber",
    "product_name": "ProductName",
    "product_category": "ProductGroupId",
    "product_price": "SalesPrice",
    # ReturnOrderHeaders / ReturnOrderLines
    "return_number": "ReturnOrderNumber",
    "return_rma": "RMANumber",
    "return_status": "ReturnOrderStatus",
    "return_customer": "CustomerAccountNumber",
    "return_currency": "CurrencyCode",
    "return_line_id": "ReturningInventoryLotId",
    "return_line_order_number": "ReturnOrderNumber",
    "return_reference": "ReturnInventoryLotId",
    "return_line_item": "ItemNumber",
    "return_line_quantity": "ReturnSalesQuantity",
    "return_line_amount": "LineAmount",
    # SalesInvoiceHeadersV2 (invoices and credit notes)
    "invoice_number": "InvoiceNumber",
    "invoice_order_number": "SalesOrderNumber",
    "invoice_date": "InvoiceDate",
    "credit_note_total": "TotalInvoiceAmount",
}
"""Mapping name -> entity field, the documented defaults (``docs/vendor-facts.md``). ``change_date`` has
none: the header has no modified date; an environment with one (an extension) maps it."""

def _entity_of(name: str) -> str:
    if name.startswith("line_"):
        return "SalesOrderLines"
    if name.startswith("return_line_") or name == "return_reference":
        return "ReturnOrderLines"
    if name.startswith("return_"):
        return "ReturnOrderHeaders"
    if name.startswith("customer_"):
        return "CustomersV3"
    if name.startswith("product_"):
        return "ReleasedProductsV2"
    if name.startswith("invoice_") or name == "credit_note_total":
        return "SalesInvoiceHeadersV2"
    return "SalesOrderHeadersV2"


VENDOR_FIELDS: dict[str, frozenset[str]] = {
    es: frozenset({"dataAreaId"} | {f for n, f in FIELD_DEFAULTS.items() if f and _entity_of(n) == es})
    for es in ("SalesOrderHeadersV2", "SalesOrderLines", "CustomersV3", "ReleasedProductsV2", "ReturnOrderHeaders",
               "ReturnOrderLines", "SalesInvoiceHeadersV2")
}
"""Entity set -> the vendor field names this mapper reads by default (``docs/vendor-facts.md`` ``field`` rows);
a connection's ``field_map`` replaces them with the names its environment confirmed at verify."""

STATUS_DEFAULTS: dict[str, str] = {"Invoiced": "awardable", "Delivered": "awardable", "Canceled": "cancelled"}
RETURN_STATUS_DEFAULTS: dict[str, str] = {"Received": "effective", "Invoiced": "effective", "Canceled": "cancelled"}

LINES = "SalesOrderLines"
RETURN_LINES = "ReturnOrderLines"
CREDIT_NOTE = "@flash.creditNote"
ORIGINAL_ORDERS = "@flash.originalOrders"


class Unmappable(Exception):
    """One record that cannot become a canonical event; the message says what to fix."""


def field_map(settings: Mapping[str, Any]) -> dict[str, str | None]:
    """The connection's field mapping: its ``field_map`` over :data:`FIELD_DEFAULTS`."""
    out = dict(FIELD_DEFAULTS)
    given = settings.get("field_map") or {}
    for k, v in given.items():
        out[str(k)] = None if v in (None, "") else str(v)
    return out


def _get(rec: Mapping[str, Any], fm: Mapping[str, str | None], name: str, what: str, *, required: bool = False) -> Any:
    field = fm.get(name)
    if not field:
        if required:
            raise Unmappable(f"{what}: settings.field_map.{name} is not set; name the entity field that holds it")
        return None
    if field not in rec:
        if required:
            raise Unmappable(f"{what}: field {field!r} (settings.field_map.{name}) is not in the record; "
                             "verify the connection: its $metadata lists the fields the environment offers")
        return None
    return rec[field]


def _money(v: Any, what: str, name: str) -> Decimal | None:
    if v is None or v == "":
        return None
    if isinstance(v, bool):
        raise Unmappable(f"{what}: {name} is {v!r}, not an amount")
    try:
        return v if isinstance(v, Decimal) else Decimal(str(v))
    except InvalidOperation:
        raise Unmappable(f"{what}: {name} is {v!r}, not an amount") from None


def _str(v: Any) -> str | None:
    return None if v is None or v == "" else str(v)


def _time(v: Any) -> dt.datetime | None:
    if not v:
        return None
    try:
        t = dt.datetime.fromisoformat(str(v).replace("Z", "+00:00"))
    except ValueError:
        return None
    # F&O serves an empty date-time as 1900-01-01 (UNCONFIRMED); treat anything that old as unset.
    return None if t.year <= 1900 else t


def _company(rec: Mapping[str, Any], what: str) -> str:
    company = rec.get("dataAreaId")
    if not company:
        raise Unmappable(f"{what}: dataAreaId is missing; the poller must read with cross-company=true and keep it")
    return str(company).lower()


def _ref(company: str, value: Any) -> str | None:
    s = _str(value)
    return f"{company}/{s}" if s else None


def _envelope(raw: RawRecord) -> dict[str, Any]:
    return {
        "tenant_id": raw.tenant_id, "connection_id": raw.connection_id, "source": raw.source, "entity": raw.entity,
        "source_id": raw.source_id, "source_version": raw.source_version, "correlation_id": raw.correlation_id,
        "observed_at": raw.observed_at,
    }


def _check_source_id(raw: RawRecord, company: str, number: str | None, what: str) -> None:
    expected = f"{company}/{number}"
    if raw.source_id.lower() != expected.lower():
        raise Unmappable(f"{what}: source id {raw.source_id!r} is not <dataAreaId>/<key> ({expected!r})")


def _order(raw: RawRecord, rec: Mapping[str, Any], settings: Mapping[str, Any]) -> list[tuple[str, Envelope]]:
    fm = field_map(settings)
    what = f"SalesOrderHeadersV2 {raw.source_id}"
    company = _company(rec, what)
    number = _str(_get(rec, fm, "order_number", what, required=True))
    _check_source_id(raw, company, number, what)
    lines_raw = rec.get(LINES)
    if not isinstance(lines_raw, list):
        raise Unmappable(f"{what}: payload lacks its {LINES} (the fo-poller assembles them); re-fetch it")
    lines: list[OrderLineData] = []
    for ln in lines_raw:
        lwhat = f"{what} line"
        lot = _str(_get(ln, fm, "line_id", lwhat, required=True))
        amount = _money(_get(ln, fm, "line_amount", lwhat, required=True), lwhat, "line_amount")
        item = _str(_get(ln, fm, "line_item", lwhat))
        lines.append(OrderLineData(
            line_id=f"{company}/{lot}",
            product_source_id=_ref(company, item),
            sku=item,
            description=_str(_get(ln, fm, "line_description", lwhat)),
            quantity=_money(_get(ln, fm, "line_quantity", lwhat), lwhat, "line_quantity") or Decimal(1),
            unit_price=_money(_get(ln, fm, "line_price", lwhat), lwhat, "line_price"),
            amount=amount or Decimal(0),
        ))
    calculated = str(_get(rec, fm, "totals_calculated", what) or "").lower() in ("yes", "true", "1")
    if calculated:
        total = _money(_get(rec, fm, "order_total", what, required=True), what, "order_total") or Decimal(0)
        tax = _money(_get(rec, fm, "order_tax", what), what, "order_tax") or Decimal(0)
        charges = _money(_get(rec, fm, "order_charges", what), what, "order_charges") or Decimal(0)
        discount = _money(_get(rec, fm, "order_discount", what), what, "order_discount") or Decimal(0)
    else:
        total = sum((ln.amount for ln in lines), Decimal(0))
        tax = charges = discount = Decimal(0)
    status = _str(_get(rec, fm, "status", what, required=True))
    table = {**STATUS_DEFAULTS, **(settings.get("status_lifecycle") or {})}
    life = table.get(status or "", "pending")
    if life not in ("pending", "awardable", "cancelled"):
        raise Unmappable(f"settings.status_lifecycle[{status!r}] is {life!r}; use pending, awardable or cancelled")
    currency = _str(_get(rec, fm, "currency", what, required=True))
    if not currency:
        raise Unmappable(f"{what}: {fm['currency']} is empty; an order needs its currency")
    order = OrderData(
        order_number=number,
        customer_source_id=_ref(company, _get(rec, fm, "customer", what)),
        customer_entity="customer",
        email=_str(_get(rec, fm, "email", what)),
        status=status or "",
        status_label=status,
        lifecycle=life,
        currency=currency.upper(),
        total_amount=total,
        tax_amount=tax,
        shipping_amount=charges,
        discount_amount=discount,
        lines=tuple(lines),
        placed_at=_time(_get(rec, fm, "created", what)),
    )
    return [(CANONICAL_ORDER, OrderUpserted(**_envelope(raw), order=order))]


def _customer(raw: RawRecord, rec: Mapping[str, Any], settings: Mapping[str, Any]) -> list[tuple[str, Envelope]]:
    fm = field_map(settings)
    what = f"CustomersV3 {raw.source_id}"
    company = _company(rec, what)
    account = _str(_get(rec, fm, "customer_account", what, required=True))
    _check_source_id(raw, company, account, what)
    ext_field = settings.get("external_id_field")
    data = CustomerData(
        kind="customer",
        external_id=_str(rec.get(str(ext_field))) if ext_field else account,
        email=_str(_get(rec, fm, "customer_email", what)),
        display_name=_str(_get(rec, fm, "customer_name", what)),
    )
    return [(CANONICAL_CUSTOMER, CustomerUpserted(**_envelope(raw), customer=data))]


def _product(raw: RawRecord, rec: Mapping[str, Any], settings: Mapping[str, Any]) -> list[tuple[str, Envelope]]:
    fm = field_map(settings)
    what = f"ReleasedProductsV2 {raw.source_id}"
    company = _company(rec, what)
    item = _str(_get(rec, fm, "product_item", what, required=True))
    _check_source_id(raw, company, item, what)
    data = ProductData(
        sku=item,
        name=_str(_get(rec, fm, "product_name", what)),
        category=_str(_get(rec, fm, "product_category", what)),
        price=_money(_get(rec, fm, "product_price", what), what, "product_price"),
    )
    return [(CANONICAL_PRODUCT, ProductUpserted(**_envelope(raw), product=data))]


def _return(raw: RawRecord, rec: Mapping[str, Any], settings: Mapping[str, Any]) -> list[tuple[str, Envelope]]:
    fm = field_map(settings)
    what = f"ReturnOrderHeaders {raw.source_id}"
    company = _company(rec, what)
    number = _str(_get(rec, fm, "return_number", what, required=True))
    _check_source_id(raw, company, number, what)
    lines_raw = rec.get(RETURN_LINES)
    originals = rec.get(ORIGINAL_ORDERS)
    if not isinstance(lines_raw, list) or not isinstance(originals, Mapping):
        raise Unmappable(f"{what}: payload lacks {RETURN_LINES} or {ORIGINAL_ORDERS} (the fo-poller assembles "
                         "them); re-fetch it")
    anchors: set[str] = set()
    lines: list[ReturnLineData] = []
    for ln in lines_raw:
        lwhat = f"{what} line"
        ref = _str(_get(ln, fm, "return_reference", lwhat))
        if ref and originals.get(ref):
            anchors.add(str(originals[ref]))
        amount = _money(_get(ln, fm, "return_line_amount", lwhat), lwhat, "return_line_amount") or Decimal(0)
        qty = _money(_get(ln, fm, "return_line_quantity", lwhat), lwhat, "return_line_quantity")
        lines.append(ReturnLineData(
            line_id=f"{company}/{_str(_get(ln, fm, 'return_line_id', lwhat, required=True))}",
            product_source_id=_ref(company, _get(ln, fm, "return_line_item", lwhat)),
            original_line_id=_ref(company, ref),
            quantity=abs(qty) if qty is not None else Decimal(1),
            amount=abs(amount),
        ))
    if not anchors:
        raise Unmappable(f"{what}: no return line names an original order (settings.field_map.return_reference = "
                         f"{fm['return_reference']!r} is empty or unknown on every line); map the field that holds "
                         "the original order line's InventoryLotId")
    if len(anchors) > 1:
        raise Unmappable(f"{what}: its lines return items of several orders ({', '.join(sorted(anchors))}); "
                         "split the return order per original order")
    credit = rec.get(CREDIT_NOTE)
    status = _str(_get(rec, fm, "return_status", what)) or ""
    table = {**RETURN_STATUS_DEFAULTS, **(settings.get("return_status_lifecycle") or {})}
    life = table.get(status, "pending")
    if isinstance(credit, Mapping):
        credited = _money(_get(credit, fm, "credit_note_total", f"{what} credit note", required=True),
                          what, "credit_note_total")
        amount = abs(credited or Decimal(0))
        if life != "cancelled":
            life = "effective"
    else:
        amount = sum((ln.amount for ln in lines), Decimal(0))
    if life not in ("pending", "effective", "cancelled"):
        raise Unmappable(f"settings.return_status_lifecycle[{status!r}] is {life!r}; use pending, effective or "
                         "cancelled")
    currency = _str(_get(rec, fm, "return_currency", what, required=True))
    if not currency:
        raise Unmappable(f"{what}: {fm['return_currency']} is empty; a return needs its currency")
    original = anchors.pop()
    data = ReturnData(
        return_number=number,
        original_order_source_id=f"{company}/{original}",
        original_order_number=original,
        customer_source_id=_ref(company, _get(rec, fm, "return_customer", what)),
        status=status,
        lifecycle=life,
        currency=currency.upper(),
        amount=amount,
        lines=tuple(lines),
    )
    return [(CANONICAL_RETURN, ReturnUpserted(**_envelope(raw), **{"return": data}))]


_UPSERT = {"SalesOrderHeadersV2": _order, "CustomersV3": _customer, "ReleasedProductsV2": _product,
           "ReturnOrderHeaders": _return}


def _delete(raw: RawRecord) -> list[tuple[str, Envelope]]:
    env = _envelope(raw)
    match raw.entity:
        case "SalesOrderHeadersV2":
            return [(CANONICAL_ORDER, OrderDeleted(**env))]
        case "CustomersV3":
            return [(CANONICAL_CUSTOMER, CustomerDeleted(**env))]
        case "ReleasedProductsV2":
            return [(CANONICAL_PRODUCT, ProductDeleted(**env))]
        case _:
            return [(CANONICAL_RETURN, ReturnDeleted(**env))]


def _parse(raw: RawRecord) -> dict[str, Any]:
    try:
        rec = json.loads(raw.payload, parse_float=Decimal)
    except ValueError as exc:
        raise Unmappable(f"{raw.entity} {raw.source_id}: payload is not JSON ({exc}); re-fetch it") from exc
    if not isinstance(rec, dict):
        raise Unmappable(f"{raw.entity} {raw.source_id}: payload is a JSON {type(rec).__name__}, not a record")
    return rec


def map_record(raw: RawRecord, settings: Mapping[str, Any]) -> MapResult:
    """One F&O record (as the fo-poller assembled it) -> canonical events, or the reason it cannot be mapped."""
    out = MapResult()
    if raw.entity not in _UPSERT:
        out.dead.append(f"dynamics-fo entity {raw.entity!r} has no mapping (known: {', '.join(sorted(_UPSERT))})")
        return out
    try:
        if raw.op == "delete":
            out.events = _delete(raw)
            return out
        out.events = _UPSERT[raw.entity](raw, _parse(raw), settings)
    except Unmappable as exc:
        out.dead.append(str(exc))
        out.actions.append(f"refetch {raw.entity}({raw.source_id})")
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
        out.dead.append(f"{raw.entity} {raw.source_id}: canonical event invalid: {problems}")
    return out
