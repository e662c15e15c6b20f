"""Dataverse (Dynamics 365 Sales) records -> canonical events. Pure; table-tested on recorded payloads.

Input: a :class:`RawRecord` from the CE poller (payload = the record's JSON as Dataverse sent it, plus the
poller's ``_transactioncurrencyid_value@flash.isocurrencycode`` annotation) and the connection's settings
(documented in :mod:`ce_poller`). Rules:

* Money: ``json.loads(payload, parse_float=Decimal)``; amounts stay ``Decimal``, with the ISO currency and the
  record's ``exchangerate`` (transaction-currency units per base unit).
* Order lifecycle from statecode/statuscode: ``status_overrides[statuscode]`` first (organisation-defined
  reasons), else statecode 3 Fulfilled / 4 Invoiced -> awardable, 2 Canceled -> cancelled, 0 Active /
  1 Submitted -> pending. Unknown status reasons follow their statecode; an unknown statecode is poison.
* ``_customerid_value`` resolves to account or contact by its ``Microsoft.Dynamics.CRM.lookuplogicalname``
  annotation.
* Order lines (salesorderdetail) become OrderLineUpserted keyed by their order; amount = baseamount -
  manualdiscountamount (after line discount, before tax). Tombstones become *Deleted events; a line's carries
  the order id the poller remembered.
* Returns: ``msdyn_rma`` rows carry their products (``msdyn_rmaproducts``, attached by the poller). The amount
  is the RMA's documented ``msdyn_totalamount`` (all RMA products including tax); when ``credited_only`` (default)
  drops products whose ``msdyn_credittoaccount`` is false, it is the sum of the remaining products'
  ``msdyn_totalamount``. ``msdyn_systemstatus`` 690970000 Pending -> pending, 690970001 Canceled -> cancelled,
  690970002 Products Received -> effective. The original order number is in ``return_source.order_number_field``
  (default ``msdyn_referenceno``), the customer in ``_msdyn_requestedbycontact_value`` else
  ``_msdyn_serviceaccount_value``. A custom return table maps through ``return_source.fields``.

Every Dataverse name and option value used here is listed, with its source, in ``docs/vendor-facts.md``
(section "Dynamics 365 CE (Dataverse)"); ``VENDOR_FIELDS`` declares them for ``tests/unit/test_vendor_facts.py``.
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
    Lifecycle,
    OrderData,
    OrderDeleted,
    OrderLineData,
    OrderLineDeleted,
    OrderLineUpserted,
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
    "CURRENCY_ANNOTATION",
    "LOGICAL_ANNOTATION",
    "ORDER_STATE_LIFECYCLE",
    "RMA_LIFECYCLE",
    "VENDOR_FIELDS",
    "lifecycle",
    "map_record",
]

CURRENCY_ANNOTATION = "_transactioncurrencyid_value@flash.isocurrencycode"
LOGICAL_ANNOTATION = "@Microsoft.Dynamics.CRM.lookuplogicalname"
FORMATTED = "@OData.Community.Display.V1.FormattedValue"
RMA_PRODUCTS = "msdyn_rmaproducts"

# docs/vendor-facts.md: option salesorder.statecode (0 Active, 1 Submitted, 2 Canceled, 3 Fulfilled, 4 Invoiced).
ORDER_STATE_LIFECYCLE: dict[int, Lifecycle] = {
    0: "pending", 1: "pending", 2: "cancelled", 3: "awardable", 4: "awardable",
}
# docs/vendor-facts.md: option msdyn_rma.msdyn_systemstatus (690970000 Pending, 690970001 Canceled,
# 690970002 Products Received). Not the RMA product's msdyn_itemstatus, whose 690970001 is Received.
RMA_LIFECYCLE: dict[int, str] = {690970000: "pending", 690970001: "cancelled", 690970002: "effective"}
RMA_ORDER_NUMBER_FIELD = "msdyn_referenceno"
"""Default ``return_source.order_number_field`` (UNCONFIRMED tenant convention, docs/vendor-facts.md)."""

VENDOR_FIELDS: dict[str, frozenset[str]] = {
    "salesorder": frozenset({
        "ordernumber", "_customerid_value", "emailaddress", "statuscode", "statecode", "exchangerate",
        "totalamount", "totaltax", "freightamount", "discountamount", "submitdate", "createdon",
        "_transactioncurrencyid_value",
    }),
    "salesorderdetail": frozenset({
        "_salesorderid_value", "baseamount", "quantity", "priceperunit", "manualdiscountamount", "_productid_value",
        "productdescription",
    }),
    "account": frozenset({"name", "accountnumber", "emailaddress1", "statecode"}),
    "contact": frozenset({"fullname", "firstname", "lastname", "emailaddress1", "_parentcustomerid_value",
                          "statecode"}),
    "product": frozenset({"price", "productnumber", "name", "statecode", "new_category"}),
    "msdyn_rma": frozenset({
        "msdyn_name", RMA_ORDER_NUMBER_FIELD, "msdyn_systemstatus", "msdyn_totalamount", "exchangerate",
        "_msdyn_requestedbycontact_value", "_msdyn_serviceaccount_value", "_transactioncurrencyid_value",
    }),
    "msdyn_rmaproduct": frozenset({
        "msdyn_rmaproductid", "msdyn_credittoaccount", "msdyn_totalamount", "_msdyn_product_value",
        "msdyn_quantitytoreturn", "exchangerate",
    }),
}
_LIFECYCLES = ("pending", "awardable", "cancelled")


class Unmappable(Exception):
    """One record that cannot become a canonical event; the message says what to fix."""


def lifecycle(statecode: Any, statuscode: Any, overrides: Mapping[str, str] | None = None) -> Lifecycle:
    """Where a salesorder stands for points (module docstring)."""
    if overrides and statuscode is not None and str(statuscode) in overrides:
        value = overrides[str(statuscode)]
        if value not in _LIFECYCLES:
            raise Unmappable(
                f"settings.status_overrides[{statuscode!s}] is {value!r}; use one of {', '.join(_LIFECYCLES)}"
            )
        return value  # type: ignore[return-value]
    try:
        return ORDER_STATE_LIFECYCLE[int(statecode)]
    except (KeyError, TypeError, ValueError):
        raise Unmappable(
            f"salesorder statecode {statecode!r} (statuscode {statuscode!r}) is not a known order state "
            "(0 Active, 1 Submitted, 2 Canceled, 3 Fulfilled, 4 Invoiced); map its statuscode in "
            "settings.status_overrides"
        ) from None


def _money(rec: Mapping[str, Any], name: str, *, required: bool = False) -> Decimal | None:
    v = rec.get(name)
    if v is None:
        if required:
            raise Unmappable(f"{name} is missing or null; add it to the poller's $select (settings.select)")
        return None
    if isinstance(v, bool):
        raise Unmappable(f"{name} is {v!r}, not an amount")
    try:
        return v if isinstance(v, Decimal) else Decimal(str(v))
    except InvalidOperation:
        raise Unmappable(f"{name} is {v!r}, not an amount") from None


def _currency(rec: Mapping[str, Any], settings: Mapping[str, Any], what: str) -> str:
    iso = rec.get(CURRENCY_ANNOTATION)
    if iso:
        return str(iso)
    cid = rec.get("_transactioncurrencyid_value")
    table = settings.get("currencies") or {}
    if cid and str(cid).lower() in table:
        return str(table[str(cid).lower()])
    raise Unmappable(
        f"{what}: transaction currency {cid!r} has no ISO code (the poller annotates it from "
        "transactioncurrencies: grant the application user read on Currency, or map the id in "
        "settings.currencies)"
    )


def _time(v: Any) -> dt.datetime | None:
    if not v:
        return None
    try:
        return dt.datetime.fromisoformat(str(v).replace("Z", "+00:00"))
    except ValueError:
        return None


def _str(v: Any) -> str | None:
    return None if v is None or v == "" else str(v)


def _lower(v: Any) -> str | None:
    return None if v is None or v == "" else str(v).lower()


def _envelope(raw: RawRecord) -> dict[str, Any]:
    return {
        "tenant_id": raw.tenant_id, "connection_id": raw.connection_id, "source": raw.source, "entity": raw.entity,
        "source_id": raw.source_id, "source_version": raw.source_version, "correlation_id": raw.correlation_id,
        "observed_at": raw.observed_at,
    }


# ------------------------------------------------------------------------------------------------ entities


def _order(raw: RawRecord, rec: Mapping[str, Any], settings: Mapping[str, Any]) -> list[tuple[str, Envelope]]:
    what = f"salesorder {raw.source_id}"
    customer = _lower(rec.get("_customerid_value"))
    kind = rec.get("_customerid_value" + LOGICAL_ANNOTATION)
    if customer and kind not in ("account", "contact"):
        raise Unmappable(
            f"{what}: _customerid_value has no lookuplogicalname annotation (account or contact); the poller must "
            "send Prefer: odata.include-annotations=\"Microsoft.Dynamics.CRM.lookuplogicalname\""
        )
    order = OrderData(
        order_number=_str(rec.get("ordernumber")),
        customer_source_id=customer,
        customer_entity=str(kind) if customer else None,
        email=_str(rec.get("emailaddress")),
        status=str(rec.get("statuscode")),
        status_label=_str(rec.get("statuscode" + FORMATTED)),
        lifecycle=lifecycle(rec.get("statecode"), rec.get("statuscode"), settings.get("status_overrides")),
        currency=_currency(rec, settings, what),
        exchange_rate=_money(rec, "exchangerate"),
        total_amount=_money(rec, "totalamount", required=True),
        tax_amount=_money(rec, "totaltax") or Decimal(0),
        shipping_amount=_money(rec, "freightamount") or Decimal(0),
        discount_amount=_money(rec, "discountamount") or Decimal(0),
        lines=None,
        placed_at=_time(rec.get("submitdate")) or _time(rec.get("createdon")),
    )
    return [(CANONICAL_ORDER, OrderUpserted(**_envelope(raw), order=order))]


def _line(raw: RawRecord, rec: Mapping[str, Any], settings: Mapping[str, Any]) -> list[tuple[str, Envelope]]:
    order_id = _lower(rec.get("_salesorderid_value")) or raw.order_source_id
    if not order_id:
        raise Unmappable(f"salesorderdetail {raw.source_id} names no order (_salesorderid_value); add it to $select")
    base = _money(rec, "baseamount")
    if base is None:
        qty = _money(rec, "quantity") or Decimal(1)
        base = (_money(rec, "priceperunit") or Decimal(0)) * qty
    amount = base - (_money(rec, "manualdiscountamount") or Decimal(0))
    line = OrderLineData(
        line_id=raw.source_id,
        product_source_id=_lower(rec.get("_productid_value")),
        description=_str(rec.get("productdescription")),
        quantity=_money(rec, "quantity") or Decimal(1),
        unit_price=_money(rec, "priceperunit"),
        amount=amount,
    )
    return [(CANONICAL_ORDER, OrderLineUpserted(**_envelope(raw), order_id=order_id, line=line))]


def _external_id(entity: str, rec: Mapping[str, Any], settings: Mapping[str, Any]) -> str | None:
    ext = settings.get("external_id_field", "accountnumber")
    field = ext.get(entity) if isinstance(ext, Mapping) else (ext if entity == "account" else None)
    return _str(rec.get(field)) if field else None


def _customer(raw: RawRecord, rec: Mapping[str, Any], settings: Mapping[str, Any]) -> list[tuple[str, Envelope]]:
    entity = raw.entity
    if entity == "account":
        name = _str(rec.get("name"))
    else:
        name = _str(rec.get("fullname")) or " ".join(
            x for x in (_str(rec.get("firstname")), _str(rec.get("lastname"))) if x) or None
    data = CustomerData(
        kind="account" if entity == "account" else "contact",
        external_id=_external_id(entity, rec, settings),
        email=_str(rec.get("emailaddress1")),
        display_name=name,
        parent_source_id=_lower(rec.get("_parentcustomerid_value")),
        active=rec.get("statecode", 0) in (0, None),
    )
    return [(CANONICAL_CUSTOMER, CustomerUpserted(**_envelope(raw), customer=data))]


def _product(raw: RawRecord, rec: Mapping[str, Any], settings: Mapping[str, Any]) -> list[tuple[str, Envelope]]:
    price = _money(rec, "price")
    cur = rec.get(CURRENCY_ANNOTATION)
    data = ProductData(
        sku=_str(rec.get("productnumber")),
        name=_str(rec.get("name")),
        category=_str(rec.get(str(settings.get("category_field", "new_category")))),
        price=price,
        currency=str(cur) if cur and price is not None else None,
        active=rec.get("statecode", 0) in (0, None),
    )
    return [(CANONICAL_PRODUCT, ProductUpserted(**_envelope(raw), product=data))]


def _rma(raw: RawRecord, rec: Mapping[str, Any], settings: Mapping[str, Any]) -> list[tuple[str, Envelope]]:
    what = f"msdyn_rma {raw.source_id}"
    rs = settings.get("return_source") or {}
    order_field = str(rs.get("order_number_field", RMA_ORDER_NUMBER_FIELD))
    credited_only = bool(rs.get("credited_only", True))
    number = _str(rec.get(order_field))
    if not number and not raw.order_source_id:
        raise Unmappable(
            f"{what}: names no original order ({order_field} is empty); set return_source.order_number_field to "
            "the column holding the order number"
        )
    products = rec.get(RMA_PRODUCTS)
    if not isinstance(products, list):
        raise Unmappable(f"{what}: payload lacks its {RMA_PRODUCTS} (the CE poller assembles them); re-fetch it")
    lines: list[ReturnLineData] = []
    rate: Decimal | None = _money(rec, "exchangerate")
    dropped = False
    for p in products:
        if credited_only and p.get("msdyn_credittoaccount") is False:
            dropped = True
            continue
        lines.append(ReturnLineData(
            line_id=str(p.get("msdyn_rmaproductid")),
            product_source_id=_lower(p.get("_msdyn_product_value")),
            quantity=_money(p, "msdyn_quantitytoreturn") or Decimal(1),
            amount=_money(p, "msdyn_totalamount") or Decimal(0),
        ))
        rate = rate or _money(p, "exchangerate")
    # The RMA's own msdyn_totalamount is "all RMA products including tax" (docs/vendor-facts.md); only when some
    # products are not credited is the amount the sum of those that are.
    header_total = _money(rec, "msdyn_totalamount")
    amount = sum((ln.amount for ln in lines), Decimal(0)) if dropped or header_total is None else header_total
    status = rec.get("msdyn_systemstatus")
    overrides = rs.get("status_overrides") or {}
    life = overrides.get(str(status)) or RMA_LIFECYCLE.get(status if isinstance(status, int) else -1)
    if life is None:
        raise Unmappable(f"{what}: msdyn_systemstatus {status!r} is unknown; map it in "
                         "return_source.status_overrides (pending | effective | cancelled)")
    customer_field = rs.get("customer_field")
    customer = rec.get(str(customer_field)) if customer_field else (
        rec.get("_msdyn_requestedbycontact_value") or rec.get("_msdyn_serviceaccount_value"))
    data = ReturnData(
        return_number=_str(rec.get("msdyn_name")),
        original_order_source_id=raw.order_source_id,
        original_order_number=number,
        customer_source_id=_lower(customer),
        status=str(status),
        lifecycle=life,
        currency=_currency(rec, settings, what),
        exchange_rate=rate,
        amount=amount,
        lines=tuple(lines),
    )
    return [(CANONICAL_RETURN, ReturnUpserted(**_envelope(raw), **{"return": data}))]


def _custom_return(raw: RawRecord, rec: Mapping[str, Any], settings: Mapping[str, Any]) -> list[tuple[str, Envelope]]:
    rs = settings.get("return_source") or {}
    f = rs.get("fields") or {}
    what = f"{raw.entity} {raw.source_id}"
    status = rec.get(f.get("status", "statuscode"))
    effective = {str(x) for x in rs.get("effective_statuses", [])}
    cancelled = {str(x) for x in rs.get("cancelled_statuses", [])}
    life = "cancelled" if str(status) in cancelled else "effective" if (not effective or str(status) in effective) \
        else "pending"
    order_id = _lower(rec.get(f["order_id"])) if f.get("order_id") else None
    number = _str(rec.get(f["order_number"])) if f.get("order_number") else None
    if not order_id and not number:
        raise Unmappable(f"{what}: names no original order (return_source.fields.order_id / order_number are empty)")
    if not f.get("amount"):
        raise Unmappable(f"{what}: return_source.fields.amount is not set; name the column with the credited amount")
    data = ReturnData(
        return_number=_str(rec.get(f["number"])) if f.get("number") else None,
        original_order_source_id=order_id or raw.order_source_id,
        original_order_number=number,
        customer_source_id=_lower(rec.get(f["customer"])) if f.get("customer") else None,
        status=str(status),
        lifecycle=life,
        currency=_currency(rec, settings, what),
        exchange_rate=_money(rec, f.get("exchange_rate", "exchangerate")),
        amount=_money(rec, str(f["amount"]), required=True),
    )
    return [(CANONICAL_RETURN, ReturnUpserted(**_envelope(raw), **{"return": data}))]


_UPSERT = {"salesorder": _order, "salesorderdetail": _line, "account": _customer, "contact": _customer,
           "product": _product, "msdyn_rma": _rma}


def _delete(raw: RawRecord, settings: Mapping[str, Any]) -> list[tuple[str, Envelope]]:
    env = _envelope(raw)
    match raw.entity:
        case "salesorder":
            return [(CANONICAL_ORDER, OrderDeleted(**env))]
        case "salesorderdetail":
            return [(CANONICAL_ORDER, OrderLineDeleted(**env, order_id=raw.order_source_id))]
        case "account" | "contact":
            return [(CANONICAL_CUSTOMER, CustomerDeleted(**env))]
        case "product":
            return [(CANONICAL_PRODUCT, ProductDeleted(**env))]
        case _:
            return [(CANONICAL_RETURN, ReturnDeleted(**env))]


def _is_custom_return(raw: RawRecord, settings: Mapping[str, Any]) -> bool:
    rs = settings.get("return_source") or {}
    entity = str(rs.get("entity") or str(rs.get("entity_set", "")).rstrip("s"))
    return rs.get("kind") == "custom" and raw.entity == entity


def _parse(raw: RawRecord) -> dict[str, Any]:
    try:
        rec = json.loads(raw.payload, parse_float=Decimal)
    except ValueError as exc:
        raise Unmappable(f"{raw.entity} {raw.source_id}: payload is not JSON ({exc}); re-fetch it") from exc
    if not isinstance(rec, dict):
        raise Unmappable(f"{raw.entity} {raw.source_id}: payload is a JSON {type(rec).__name__}, not a record")
    return rec


def map_record(raw: RawRecord, settings: Mapping[str, Any]) -> MapResult:
    """One Dataverse record -> canonical events, or the reason it cannot be mapped."""
    out = MapResult()
    known = raw.entity in _UPSERT or raw.entity == "msdyn_rmaproduct" or _is_custom_return(raw, settings)
    if not known:
        out.dead.append(f"dynamics-ce entity {raw.entity!r} has no mapping (known: {', '.join(sorted(_UPSERT))}, "
                        "or the connection's custom return_source entity)")
        return out
    try:
        if raw.op == "delete":
            out.events = _delete(raw, settings)
            return out
        rec = _parse(raw)
        fn = _custom_return if _is_custom_return(raw, settings) else _UPSERT.get(raw.entity)
        if fn is None:  # msdyn_rmaproduct rows travel inside their RMA
            return out
        out.events = fn(raw, rec, settings)
    except Unmappable as exc:
        out.dead.append(str(exc))
        out.actions.append(f"refetch {raw.entity}({raw.source_id})")
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
        out.dead.append(f"{raw.entity} {raw.source_id}: canonical event invalid: {problems}")
    return out
