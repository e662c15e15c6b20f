"""Salesforce records -> canonical events. Pure; table-tested on recorded payloads.

Input: a :class:`RawRecord` from the sf poller / CDC listener (payload = the record as REST returned it,
parent fields nested as ``{"ReturnOrder": {"OrderId": ..}}``, or a Bulk CSV row as a JSON object of strings
with columns ``"ReturnOrder.OrderId"``; both are read alike) and the connection's settings (documented in
:mod:`sf_poller`). ``source_version`` is the record's SystemModstamp. Rules:

* Money: ``Decimal`` (REST numbers parsed with ``parse_float=Decimal``, CSV strings as they are); currency
  from ``CurrencyIsoCode`` (``settings.default_currency`` for single-currency orgs without the field).
* Order (``Status`` is org-defined; ``StatusCode`` is only Draft/Activated): lifecycle =
  ``settings.status_map[Status]`` (default Draft/Activated -> pending, Fulfilled -> awardable,
  Cancelled/Canceled -> cancelled), else by StatusCode (pending); total = ``TotalAmount`` (sum of lines,
  before tax); customer = ``AccountId``; email = ``Account.PersonEmail`` or ``BillToContact.Email``.
  Lines arrive separately (OrderItem -> OrderLineUpserted, amount = ``TotalPrice``).
* Partial cancellations, by mode:
  - ``order``: a reduction order (``IsReductionOrder``, ``OriginalOrderId``) becomes a ReturnUpserted
    anchored to the original order (amount = ``|TotalAmount|``, effective once Activated): the points
    engine claws back proportionally. Its negative lines produce nothing.
  - ``order_management``: the original Order carries the lifecycle (Salesforce recommends mirroring order
    statuses; ``OrderSummary.Status`` has no category). Each ``OrderItemSummary`` with ``QuantityCanceled``
    > 0 becomes a ReturnUpserted "cancellation" of ``QuantityCanceled x UnitPrice`` anchored through
    ``OrderSummary.OriginalOrderId``. Change orders and OrderSummary rows produce nothing: OrderSummary
    totals are net of cancels AND returns, so using them as well would count a refund twice.
  - ``order_summary``: as ``order_management``, but the order comes from the OrderSummary (keyed by its
    ``OriginalOrderId``; lifecycle from ``settings.summary_status_map``, total = ``OriginalOrder.TotalAmount``);
    Order rows produce nothing.
* Returns (``settings.refunds``; default ``return_order`` in order mode, ``credit_memo`` in OM):
  - ``return_order``: each ReturnOrderLineItem is a return anchored to ``ReturnOrder.OrderId``; amount =
    ``QuantityReturned x OrderItem.UnitPrice`` (effective once received; ``Canceled`` -> cancelled).
  - ``credit_memo``: a CreditMemo is a return of ``TotalAmount`` (net of tax) anchored to its order: the
    poller resolves an OrderSummary reference to the original order (``RawRecord.order_source_id``).
* Customers: Account -> account, or person_account (``IsPersonAccount``; email ``PersonEmail``); Contact ->
  contact (email ``Email``, parent ``AccountId``); a person account's own Contact produces nothing.
  ``external_id_field`` (default ``AccountNumber``) names the tenant's id: a field name (Accounts) or
  ``{"Account": .., "Contact": ..}``.
* Products: Product2 -> product (sku = ``StockKeepingUnit`` or ``ProductCode``, category = ``Family``). A
  standard-pricebook PricebookEntry (in ``settings.price_currency`` when set) -> the same product
  (``source_id`` = ``Product2Id``) with its price, from its ``Product2.*`` parent fields.
* Deletes (``op = delete``; ``IsDeleted`` rows from queryAll) -> the matching ``*Deleted`` event.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Mapping
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

__all__ = ["DEFAULT_STATUS_MAP", "map_record", "order_lifecycle"]

Events = list[tuple[str, Envelope]]

DEFAULT_STATUS_MAP: dict[str, str] = {
    "Draft": "pending", "Activated": "pending", "Fulfilled": "awardable", "Cancelled": "cancelled",
    "Canceled": "cancelled",
}
_LIFECYCLES = ("pending", "awardable", "cancelled")
_ZERO = Decimal(0)


class Unmappable(Exception):
    """One record that cannot become a canonical event; the message says what to fix."""


# ------------------------------------------------------------------------------------------------ values


def _get(rec: Mapping[str, Any], path: str) -> Any:
    """``A.B`` from a REST record (nested) or a Bulk row (column ``"A.B"``); ``""`` reads as null."""
    if path in rec:
        v = rec[path]
        return None if v == "" else v
    cur: Any = rec
    for part in path.split("."):
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(part)
    return None if cur == "" else cur


def _str(rec: Mapping[str, Any], path: str) -> str | None:
    v = _get(rec, path)
    return None if v is None else str(v)


def _bool(rec: Mapping[str, Any], path: str, default: bool = False) -> bool:
    v = _get(rec, path)
    if v is None:
        return default
    if isinstance(v, str):
        return v.lower() == "true"
    return bool(v)


def _dec(rec: Mapping[str, Any], path: str, *, required: bool = False, what: str = "") -> Decimal | None:
    v = _get(rec, path)
    if v is None:
        if required:
            raise Unmappable(f"{what}: {path} is missing or null (the connector selects it; check field-level "
                             "security of the Run As user)")
        return None
    if isinstance(v, bool):
        raise Unmappable(f"{what}: {path} is {v!r}, not a number")
    try:
        return v if isinstance(v, Decimal) else Decimal(str(v))
    except InvalidOperation:
        raise Unmappable(f"{what}: {path} is {v!r}, not a number") from None


def _time(v: Any) -> dt.datetime | None:
    if not v:
        return None
    s = str(v)
    if s.endswith("+0000"):
        s = s[:-5] + "+00:00"
    try:
        t = dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


def _currency(rec: Mapping[str, Any], settings: Mapping[str, Any], what: str) -> str:
    iso = _str(rec, "CurrencyIsoCode") or settings.get("default_currency")
    if not iso:
        raise Unmappable(f"{what}: no CurrencyIsoCode (single-currency org?): set settings.default_currency")
    return str(iso)


def _envelope(raw: RawRecord, **override: Any) -> dict[str, Any]:
    env = {
        "tenant_id": raw.tenant_id, "connection_id": raw.connection_id, "source": raw.source, "entity": raw.entity,
        "source_id": raw.source_id, "source_version": raw.source_version, "correlation_id": raw.correlation_id,
        "observed_at": raw.observed_at,
    }
    env.update(override)
    return env


def _mode(settings: Mapping[str, Any]) -> str:
    return str(settings.get("mode") or "order")


def _om(settings: Mapping[str, Any]) -> bool:
    """Order Management in play (``order_management`` or ``order_summary`` mode)."""
    return _mode(settings) in ("order_management", "order_summary")


def _refunds(settings: Mapping[str, Any]) -> str:
    return str(settings.get("refunds") or ("credit_memo" if _om(settings) else "return_order"))


def order_lifecycle(status: str | None, status_code: str | None, status_map: Mapping[str, str] | None) -> Lifecycle:
    """Where an Order stands for points: the connection's status map first, then the default map."""
    table = {**DEFAULT_STATUS_MAP, **dict(status_map or {})}
    if status is not None and status in table:
        value = table[status]
        if value not in _LIFECYCLES:
            raise Unmappable(f"settings.status_map[{status!r}] is {value!r}; use one of {', '.join(_LIFECYCLES)}")
        return value  # type: ignore[return-value]
    if status_code in ("Draft", "Activated"):
        return "pending"
    raise Unmappable(f"Order Status {status!r} (StatusCode {status_code!r}) is not in settings.status_map; map it "
                     "to pending, awardable or cancelled")


def _external_id(obj: str, rec: Mapping[str, Any], settings: Mapping[str, Any]) -> str | None:
    ext = settings.get("external_id_field", "AccountNumber")
    field = ext.get(obj) if isinstance(ext, Mapping) else (ext if obj == "Account" else None)
    return _str(rec, str(field)) if field else None


def _customer_kind(rec: Mapping[str, Any]) -> str:
    """``person_account`` when the order's Account is a person account (``Account.IsPersonAccount``, selected
    when the org has person accounts), else ``account`` (docs/vendor-facts.md, Salesforce)."""
    return "person_account" if _bool(rec, "Account.IsPersonAccount") else "account"


# ------------------------------------------------------------------------------------------------ entities


def _order(raw: RawRecord, rec: Mapping[str, Any], settings: Mapping[str, Any]) -> Events:
    what = f"Order {raw.source_id}"
    currency = _currency(rec, settings, what)
    if _bool(rec, "IsReductionOrder"):
        if _om(settings):
            return []  # OM change orders: the OrderItemSummary quantities and credit memos carry the facts
        original = _str(rec, "OriginalOrderId")
        if not original:
            raise Unmappable(f"{what}: reduction order without OriginalOrderId")
        active = _str(rec, "StatusCode") == "Activated"
        ret = ReturnData(
            return_number=_str(rec, "OrderNumber"), original_order_source_id=original,
            customer_source_id=_str(rec, "AccountId"), status=f"reduction:{_str(rec, 'Status')}",
            lifecycle="effective" if active else "pending", currency=currency,
            amount=abs(_dec(rec, "TotalAmount", required=True, what=what) or _ZERO),
        )
        return [(CANONICAL_RETURN, ReturnUpserted(**_envelope(raw), return_=ret))]
    if _mode(settings) == "order_summary":
        return []  # the OrderSummary carries the order (its lifecycle and total) in this mode
    status = _str(rec, "Status")
    order = OrderData(
        order_number=_str(rec, "OrderNumber"),
        customer_source_id=_str(rec, "AccountId"),
        customer_entity=_customer_kind(rec) if _get(rec, "AccountId") else None,
        email=_str(rec, "Account.PersonEmail") or _str(rec, "BillToContact.Email"),
        status=status or "",
        status_label=status,
        lifecycle=order_lifecycle(status, _str(rec, "StatusCode"), settings.get("status_map")),
        currency=currency,
        total_amount=_dec(rec, "TotalAmount", required=True, what=what) or _ZERO,
        lines=None,
        placed_at=_time(_get(rec, "ActivatedDate")) or _time(_get(rec, "CreatedDate")),
    )
    return [(CANONICAL_ORDER, OrderUpserted(**_envelope(raw), order=order))]


def _order_item(raw: RawRecord, rec: Mapping[str, Any], settings: Mapping[str, Any]) -> Events:
    what = f"OrderItem {raw.source_id}"
    qty = _dec(rec, "Quantity") or Decimal(1)
    if qty < 0 or _get(rec, "OriginalOrderItemId"):
        return []  # a reduction/change order line: its order carries the amount
    order_id = _str(rec, "OrderId") or raw.order_source_id
    if not order_id:
        raise Unmappable(f"{what} names no OrderId")
    unit = _dec(rec, "UnitPrice")
    amount = _dec(rec, "TotalPrice")
    if amount is None:
        amount = (unit or _ZERO) * qty
    line = OrderLineData(
        line_id=raw.source_id, product_source_id=_str(rec, "Product2Id"), sku=_str(rec, "Product2.StockKeepingUnit"),
        description=_str(rec, "Description"), quantity=qty, unit_price=unit, amount=amount,
    )
    return [(CANONICAL_ORDER, OrderLineUpserted(**_envelope(raw), order_id=order_id, line=line))]


def _return_line(raw: RawRecord, rec: Mapping[str, Any], settings: Mapping[str, Any]) -> Events:
    if _refunds(settings) != "return_order":
        return []
    what = f"ReturnOrderLineItem {raw.source_id}"
    order_id = _str(rec, "ReturnOrder.OrderId") or raw.order_source_id
    if not order_id:
        raise Unmappable(f"{what}: ReturnOrder.OrderId is empty; the return cannot be anchored to an order")
    expected = _dec(rec, "QuantityExpected") or _ZERO
    returned = _dec(rec, "QuantityReturned") or _ZERO
    unit = _dec(rec, "OrderItem.UnitPrice")
    if unit is None:
        total = _dec(rec, "TotalPrice") or _ZERO
        unit = total / expected if expected else _ZERO
    status = _str(rec, "ReturnOrder.Status") or ""
    lifecycle = "cancelled" if status in ("Canceled", "Cancelled") else ("effective" if returned > 0 else "pending")
    amount = returned * unit
    ret = ReturnData(
        return_number=_str(rec, "ReturnOrder.ReturnOrderNumber"), original_order_source_id=order_id,
        customer_source_id=_str(rec, "ReturnOrder.AccountId"), status=status, lifecycle=lifecycle,
        currency=_currency(rec, settings, what), amount=amount,
        lines=(ReturnLineData(line_id=raw.source_id, product_source_id=_str(rec, "Product2Id"),
                              original_line_id=_str(rec, "OrderItemId"), quantity=returned, amount=amount),),
    )
    return [(CANONICAL_RETURN, ReturnUpserted(**_envelope(raw), return_=ret))]


def _item_summary(raw: RawRecord, rec: Mapping[str, Any], settings: Mapping[str, Any]) -> Events:
    what = f"OrderItemSummary {raw.source_id}"
    canceled = _dec(rec, "QuantityCanceled") or _ZERO
    if canceled <= 0:
        return []
    order_id = _str(rec, "OrderSummary.OriginalOrderId") or raw.order_source_id
    if not order_id:
        raise Unmappable(f"{what}: OrderSummary.OriginalOrderId is empty; the cancellation has no order")
    amount = canceled * (_dec(rec, "UnitPrice", required=True, what=what) or _ZERO)
    number = _str(rec, "OrderSummary.OrderNumber")
    ret = ReturnData(
        return_number=f"{number}-cancel" if number else None, original_order_source_id=order_id,
        customer_source_id=_str(rec, "OrderSummary.AccountId"), status="Canceled", lifecycle="effective",
        currency=_currency(rec, settings, what), amount=amount,
        lines=(ReturnLineData(line_id=raw.source_id, product_source_id=_str(rec, "Product2Id"),
                              original_line_id=_str(rec, "OriginalOrderItemId"), quantity=canceled, amount=amount),),
    )
    return [(CANONICAL_RETURN, ReturnUpserted(**_envelope(raw), return_=ret))]


_MEMO_STATUS = {"Posted": "effective", "Draft": "pending", "Canceled": "cancelled", "Cancelled": "cancelled",
                "Void": "cancelled", "Voided": "cancelled"}


def _memo_lifecycle(status: str, settings: Mapping[str, Any], what: str) -> str:
    """CreditMemo.Status -> return lifecycle: ``settings.memo_status_map`` over the defaults (the picklist's
    values are UNCONFIRMED in the reference; docs/vendor-facts.md, Salesforce)."""
    table = {**_MEMO_STATUS, **dict(settings.get("memo_status_map") or {})}
    value = table.get(status)
    if value is None:
        raise Unmappable(f"{what}: Status {status!r} is not in settings.memo_status_map; map it to pending, "
                         "effective or cancelled")
    if value not in ("pending", "effective", "cancelled"):
        raise Unmappable(f"settings.memo_status_map[{status!r}] is {value!r}; use pending, effective or cancelled")
    return str(value)


def _credit_memo(raw: RawRecord, rec: Mapping[str, Any], settings: Mapping[str, Any]) -> Events:
    if _refunds(settings) != "credit_memo":
        return []
    what = f"CreditMemo {raw.source_id}"
    ref = _str(rec, "ReferenceEntityId") or ""
    order_id = raw.order_source_id if raw.order_source_id and raw.order_source_id.startswith("801") else None
    order_id = order_id or (ref if ref.startswith("801") else None)
    if not order_id:
        raise Unmappable(f"{what}: references {ref or 'nothing'}, not an Order; the connector resolves an "
                         "OrderSummary reference to its original order (RawRecord.order_source_id) - re-fetch it")
    status = _str(rec, "Status") or "Posted"
    ret = ReturnData(
        return_number=_str(rec, "DocumentNumber"), original_order_source_id=order_id,
        customer_source_id=_str(rec, "BillingAccountId"), status=status,
        lifecycle=_memo_lifecycle(status, settings, what),
        currency=_currency(rec, settings, what), amount=_dec(rec, "TotalAmount", required=True, what=what) or _ZERO,
    )
    return [(CANONICAL_RETURN, ReturnUpserted(**_envelope(raw), return_=ret))]


def _account(raw: RawRecord, rec: Mapping[str, Any], settings: Mapping[str, Any]) -> Events:
    person = _bool(rec, "IsPersonAccount")
    data = CustomerData(
        kind="person_account" if person else "account", external_id=_external_id("Account", rec, settings),
        email=_str(rec, "PersonEmail") if person else None, display_name=_str(rec, "Name"),
    )
    return [(CANONICAL_CUSTOMER, CustomerUpserted(**_envelope(raw), customer=data))]


def _contact(raw: RawRecord, rec: Mapping[str, Any], settings: Mapping[str, Any]) -> Events:
    if _bool(rec, "IsPersonAccount"):
        return []  # the person account itself is the customer
    data = CustomerData(
        kind="contact", external_id=_external_id("Contact", rec, settings), email=_str(rec, "Email"),
        display_name=_str(rec, "Name"), parent_source_id=_str(rec, "AccountId"),
    )
    return [(CANONICAL_CUSTOMER, CustomerUpserted(**_envelope(raw), customer=data))]


def _product(raw: RawRecord, rec: Mapping[str, Any], settings: Mapping[str, Any]) -> Events:
    data = ProductData(
        sku=_str(rec, "StockKeepingUnit") or _str(rec, "ProductCode"), name=_str(rec, "Name"),
        category=_str(rec, "Family"), active=_bool(rec, "IsActive", True),
    )
    return [(CANONICAL_PRODUCT, ProductUpserted(**_envelope(raw), product=data))]


def _pricebook_entry(raw: RawRecord, rec: Mapping[str, Any], settings: Mapping[str, Any]) -> Events:
    what = f"PricebookEntry {raw.source_id}"
    if _get(rec, "Pricebook2.IsStandard") is not None and not _bool(rec, "Pricebook2.IsStandard"):
        return []
    currency = _str(rec, "CurrencyIsoCode") or settings.get("default_currency")
    wanted = settings.get("price_currency")
    if wanted and currency != wanted:
        return []
    product_id = _str(rec, "Product2Id")
    if not product_id:
        raise Unmappable(f"{what} names no Product2Id")
    data = ProductData(
        sku=_str(rec, "Product2.StockKeepingUnit") or _str(rec, "Product2.ProductCode") or _str(rec, "ProductCode"),
        name=_str(rec, "Product2.Name"), category=_str(rec, "Product2.Family"),
        price=_dec(rec, "UnitPrice"), currency=str(currency) if currency else None,
        active=_bool(rec, "Product2.IsActive", True) and _bool(rec, "IsActive", True),
    )
    return [(CANONICAL_PRODUCT, ProductUpserted(**_envelope(raw, source_id=product_id, entity="Product2"),
                                                product=data))]


DEFAULT_SUMMARY_STATUS_MAP: dict[str, str] = {
    "Created": "pending", "Approved": "pending", "Waiting to Fulfill": "pending", "Fulfilled": "awardable",
    "Canceled": "cancelled", "Cancelled": "cancelled",
}
"""UNCONFIRMED defaults (OrderSummary.Status has no category; docs/vendor-facts.md, Salesforce); the connection's
``settings.summary_status_map`` overrides them."""


def _order_summary(raw: RawRecord, rec: Mapping[str, Any], settings: Mapping[str, Any]) -> Events:
    """``order_summary`` mode: the OrderSummary is the order. Keyed by its original Order's id (returns,
    cancellations and credit memos are anchored there), lifecycle from ``settings.summary_status_map``, total
    = the original order's ``TotalAmount`` (pre-tax, before cancels and returns, which arrive as returns: the
    summary's own totals are net of them and would count a refund twice)."""
    if _mode(settings) != "order_summary":
        return []  # other modes: the Order carries the order (see the module docstring)
    what = f"OrderSummary {raw.source_id}"
    original = _str(rec, "OriginalOrderId")
    if not original:
        raise Unmappable(f"{what}: no OriginalOrderId; an OrderSummary always mirrors an original Order")
    status = _str(rec, "Status")
    table = {**DEFAULT_SUMMARY_STATUS_MAP, **dict(settings.get("summary_status_map") or {})}
    lifecycle = table.get(status or "")
    if lifecycle not in _LIFECYCLES:
        raise Unmappable(f"{what}: Status {status!r} is not in settings.summary_status_map; map it to pending, "
                         "awardable or cancelled")
    total = _dec(rec, "OriginalOrder.TotalAmount", required=True, what=what) or _ZERO
    order = OrderData(
        order_number=_str(rec, "OrderNumber") or _str(rec, "OriginalOrder.OrderNumber"),
        customer_source_id=_str(rec, "AccountId"),
        customer_entity=_customer_kind(rec) if _get(rec, "AccountId") else None,
        email=_str(rec, "Account.PersonEmail") or _str(rec, "BillingEmailAddress"),
        status=status or "", status_label=status, lifecycle=lifecycle,
        currency=_currency(rec, settings, what), total_amount=total, lines=None,
        placed_at=_time(_get(rec, "OrderedDate")) or _time(_get(rec, "CreatedDate")),
    )
    return [(CANONICAL_ORDER, OrderUpserted(**_envelope(raw, source_id=original), order=order))]


def _ignored(raw: RawRecord, rec: Mapping[str, Any], settings: Mapping[str, Any]) -> Events:
    return []  # OrderSummary / ReturnOrder headers: see the module docstring


_UPSERT: dict[str, Callable[[RawRecord, Mapping[str, Any], Mapping[str, Any]], Events]] = {
    "Order": _order, "OrderItem": _order_item, "ReturnOrderLineItem": _return_line,
    "OrderItemSummary": _item_summary, "CreditMemo": _credit_memo, "Account": _account, "Contact": _contact,
    "Product2": _product, "PricebookEntry": _pricebook_entry, "OrderSummary": _order_summary, "ReturnOrder": _ignored,
}


def _delete(raw: RawRecord, rec: Mapping[str, Any] | None, settings: Mapping[str, Any]) -> Events:
    env = _envelope(raw)
    match raw.entity:
        case "Order":
            if rec is not None and _bool(rec, "IsReductionOrder"):
                return [] if _om(settings) else [(CANONICAL_RETURN, ReturnDeleted(**env))]
            if _mode(settings) == "order_summary":
                return []  # the OrderSummary carries the order in this mode
            return [(CANONICAL_ORDER, OrderDeleted(**env))]
        case "OrderSummary":
            if _mode(settings) != "order_summary":
                return []
            original = (_str(rec, "OriginalOrderId") if rec else None) or raw.order_source_id
            return [(CANONICAL_ORDER, OrderDeleted(**_envelope(raw, source_id=original)))] if original else []
        case "OrderItem":
            order_id = (_str(rec, "OrderId") if rec else None) or raw.order_source_id
            return [(CANONICAL_ORDER, OrderLineDeleted(**env, order_id=order_id))]
        case "Account" | "Contact":
            return [(CANONICAL_CUSTOMER, CustomerDeleted(**env))]
        case "Product2":
            return [(CANONICAL_PRODUCT, ProductDeleted(**env))]
        case "ReturnOrderLineItem" | "OrderItemSummary" | "CreditMemo":
            return [(CANONICAL_RETURN, ReturnDeleted(**env))]
        case _:
            return []


def _parse(raw: RawRecord) -> dict[str, Any]:
    try:
        rec = json.loads(raw.payload, parse_float=Decimal)
    except ValueError as exc:
        raise Unmappable(f"{raw.entity} {raw.source_id}: payload is not JSON ({exc}); re-fetch it") from exc
    if not isinstance(rec, dict):
        raise Unmappable(f"{raw.entity} {raw.source_id}: payload is a JSON {type(rec).__name__}, not a record")
    return rec


def map_record(raw: RawRecord, settings: Mapping[str, Any]) -> MapResult:
    """One Salesforce record -> canonical events, or the reason it cannot be mapped."""
    out = MapResult()
    if raw.entity not in _UPSERT:
        out.dead.append(f"salesforce object {raw.entity!r} has no mapping (known: {', '.join(sorted(_UPSERT))})")
        return out
    try:
        if raw.op == "delete":
            try:
                rec: dict[str, Any] | None = _parse(raw)
            except Unmappable:
                rec = None
            out.events = _delete(raw, rec, settings)
            return out
        out.events = _UPSERT[raw.entity](raw, _parse(raw), settings)
    except Unmappable as exc:
        out.dead.append(str(exc))
        out.actions.append(f"refetch {raw.entity}({raw.source_id})")
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
        out.dead.append(f"{raw.entity} {raw.source_id}: canonical event invalid: {problems}")
    return out
