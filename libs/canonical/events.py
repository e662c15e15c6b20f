"""Canonical event models (one module, one discriminated union, one TypeAdapter).

Naming: events are past-tense facts about a source record (``OrderUpserted``: the source now holds this
version of the order). Money is ``Decimal`` end to end and serialised as a JSON string, never a float.

Representation (docs/events.md, "Numbers"), the same whatever the source, fixed here in the models so the
mappers need not care: money (:data:`Money`) always has exactly four decimals (``"140.0200"``, ``"980.5400"``);
quantities and exchange rates (:data:`Quantity`, :data:`Rate`) are plain decimals without trailing zeros
(``"7"``, ``"1.5"``). Both are validated by a pattern in the published JSON Schemas.
"""

from __future__ import annotations

import datetime as dt
from decimal import ROUND_HALF_EVEN, Context, Decimal
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainSerializer, TypeAdapter, WithJsonSchema

from canonical.envelope import Envelope, NonEmpty, TenantId, entity_key, order_key
from canonical.limits import check_amount, check_rate

__all__ = [
    "EVENT_TYPES",
    "ZERO_MONEY",
    "AnyEvent",
    "CustomerData",
    "CustomerDeleted",
    "CustomerUpserted",
    "Lifecycle",
    "MemberData",
    "MemberUpserted",
    "Money",
    "OrderData",
    "OrderDeleted",
    "OrderLineData",
    "OrderLineDeleted",
    "OrderLineUpserted",
    "OrderResolved",
    "OrderUpserted",
    "PointsKind",
    "PointsLedgerEntry",
    "ProductData",
    "ProductDeleted",
    "ProductUpserted",
    "Quantity",
    "Rate",
    "RawRecord",
    "ReturnData",
    "ReturnDeleted",
    "ReturnLineData",
    "ReturnResolved",
    "ReturnUpserted",
    "decode_event",
    "decode_raw",
    "encode",
]

MONEY_SCALE = 4
"""Decimals of every money amount on the wire. Four is lossless for both vendors: Dataverse money columns
hold at most 4 decimals, Salesforce's standard currency fields 2 (docs/vendor-facts.md). A value with more
(at most 10 are accepted) is rounded half-even to 4."""
MONEY_PATTERN = r"^-?(0|[1-9][0-9]*)\.[0-9]{4}$"
PLAIN_DECIMAL_PATTERN = r"^-?(0|[1-9][0-9]*)(\.[0-9]*[1-9])?$"
ZERO_MONEY = Decimal("0.0000")
_Q4 = Decimal(1).scaleb(-MONEY_SCALE)
# A wide context: quantizing a 28-digit amount must not raise InvalidOperation.
_WIDE = Context(prec=60, rounding=ROUND_HALF_EVEN)


# The representation is applied when a value is written as JSON, not when it is read: decoding (every
# consumer, every message) stays on pydantic-core's native Decimal path, and whatever way a value got into a
# model (a mapper, an older body, a replay), what leaves is canonical. One Python call per field on encode.
def money_text(v: Decimal) -> str:
    """``140.02`` -> ``"140.0200"``; never scientific notation; no negative zero."""
    q = _WIDE.quantize(v, _Q4)
    # str() of a non-zero value with exponent -4 is plain notation (its adjusted exponent is >= -4).
    return str(q) if q else "0.0000"


def plain_text(v: Decimal) -> str:
    """``7.00000`` -> ``"7"``, ``1.50`` -> ``"1.5"``, ``1E+2`` -> ``"100"``; no negative zero."""
    s = str(v)
    if "E" in s:
        s = format(v, "f")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return "0" if s == "-0" else s


Money = Annotated[
    Decimal,
    Field(max_digits=28, decimal_places=10),
    AfterValidator(check_amount),  # plausibility (canonical.limits): within FLASH_MAX_AMOUNT
    PlainSerializer(money_text, return_type=str, when_used="json"),
    WithJsonSchema(
        {"type": "string", "pattern": MONEY_PATTERN,
         "description": "Money: a decimal string with exactly 4 decimals, in the currency of its record"},
        mode="serialization",
    ),
]
"""An amount of money (docs/events.md, "Numbers")."""
Quantity = Annotated[
    Decimal,
    Field(max_digits=28, decimal_places=10),
    PlainSerializer(plain_text, return_type=str, when_used="json"),
    WithJsonSchema(
        {"type": "string", "pattern": PLAIN_DECIMAL_PATTERN,
         "description": "A plain decimal string without trailing zeros (7, 1.5)"},
        mode="serialization",
    ),
]
"""A quantity (docs/events.md, "Numbers")."""
Rate = Annotated[Quantity, AfterValidator(check_rate)]
"""An exchange rate: same representation as a quantity; plausibility (canonical.limits): positive, within
FLASH_MIN/MAX_EXCHANGE_RATE."""
CurrencyCode = Annotated[str, Field(pattern=r"^[A-Z]{3}$")]

Lifecycle = Literal["pending", "awardable", "cancelled"]
"""Where an order stands for points: not yet awardable, awardable, or cancelled (voids)."""

ReturnLifecycle = Literal["pending", "effective", "cancelled"]
"""A return claws back only once effective (received/credited); a cancelled one restores."""

PointsKind = Literal["earn", "void", "adjust", "clawback"]


class _Data(BaseModel):
    # Every field is always serialised, so the published (serialization-mode) schemas mark them required.
    model_config = ConfigDict(frozen=True, extra="ignore", json_schema_serialization_defaults_required=True,
                              use_attribute_docstrings=True)


# --------------------------------------------------------------------------------------------- payloads


class CustomerData(_Data):
    kind: Literal["account", "contact", "person_account", "customer"]
    external_id: str | None = None
    """The tenant's own customer ID, taken from the field the connection names (e.g. accountnumber)."""
    email: str | None = None
    display_name: str | None = None
    parent_source_id: str | None = None
    active: bool = True


class ProductData(_Data):
    sku: str | None = None
    name: str | None = None
    category: str | None = None
    price: Money | None = None
    currency: CurrencyCode | None = None
    active: bool = True


class OrderLineData(_Data):
    line_id: NonEmpty
    product_source_id: str | None = None
    sku: str | None = None
    description: str | None = None
    quantity: Quantity = Decimal(1)
    unit_price: Money | None = None
    amount: Money
    """Line amount in the order currency, after line discounts, before tax."""


class OrderData(_Data):
    order_number: str | None = None
    customer_source_id: str | None = None
    customer_entity: str | None = None
    email: str | None = None
    status: str
    """The vendor's own status value (statuscode, Status, SalesOrderStatus), verbatim."""
    status_label: str | None = None
    """The vendor's display label of ``status`` (Dataverse: the statuscode's formatted value, in the language
    of the connection's user); ``None`` when the source path does not deliver one (docs/events.md)."""
    lifecycle: Lifecycle
    currency: CurrencyCode
    exchange_rate: Rate | None = None
    """Order-currency units per one unit of the tenant's base currency: Dataverse ``exchangerate`` (relative to
    the organisation's base currency); Salesforce ``CurrencyType.ConversionRate`` of the order's currency
    (relative to the corporate currency) in multi-currency orgs whose connector reads it. ``None`` when the
    source did not say (single-currency orgs; the points engine then needs a configured rate or rejects)."""
    total_amount: Money
    """Grand total: lines - discounts + shipping + tax."""
    tax_amount: Money = ZERO_MONEY
    shipping_amount: Money = ZERO_MONEY
    discount_amount: Money = ZERO_MONEY
    lines: tuple[OrderLineData, ...] | None = None
    """Lines when the source delivers them with the order; ``None`` means lines arrive separately as
    ``order.line_upserted`` / ``order.line_deleted`` events on the same topic and key (how to assemble an order:
    docs/events.md, "Assembling an order"; examples/order_view.py)."""
    placed_at: dt.datetime | None = None


class ReturnLineData(_Data):
    line_id: NonEmpty
    product_source_id: str | None = None
    original_line_id: str | None = None
    quantity: Quantity = Decimal(1)
    amount: Money


class ReturnData(_Data):
    return_number: str | None = None
    original_order_source_id: str | None = None
    original_order_number: str | None = None
    """The anchor: at least one of the two must name the original order."""
    customer_source_id: str | None = None
    status: str
    lifecycle: ReturnLifecycle
    currency: CurrencyCode
    exchange_rate: Rate | None = None
    amount: Money
    """Returned/credited amount in the return's currency, on the same basis as the order's total."""
    lines: tuple[ReturnLineData, ...] = ()


class MemberData(_Data):
    member_id: NonEmpty
    external_id: str | None = None
    email: str | None = None
    consent_marketing: bool = False
    consent_profiling: bool = False
    status: Literal["active", "suspended", "closed"] = "active"


# ----------------------------------------------------------------------------------------------- events


class RawRecord(Envelope):
    """One vendor record exactly as fetched (raw.<source>.<entity>), for the normalizer."""

    event_type: Literal["raw.record"] = "raw.record"
    op: Literal["upsert", "delete"] = "upsert"
    payload: str
    """The record's JSON (or CSV row rendered as JSON) as the vendor sent it; numbers untouched."""
    request_url: str | None = None
    order_source_id: str | None = None
    """For order-scoped records (lines, returns), the order they belong to, when the poller knows it."""

    @property
    def key(self) -> bytes:
        return order_key(self.tenant_id, self.order_source_id or self.source_id)


class CustomerUpserted(Envelope):
    event_type: Literal["customer.upserted"] = "customer.upserted"
    customer: CustomerData


class CustomerDeleted(Envelope):
    event_type: Literal["customer.deleted"] = "customer.deleted"


class ProductUpserted(Envelope):
    event_type: Literal["product.upserted"] = "product.upserted"
    product: ProductData


class ProductDeleted(Envelope):
    event_type: Literal["product.deleted"] = "product.deleted"


class _OrderScoped(Envelope):
    @property
    def order_source_id(self) -> str:
        return self.source_id

    @property
    def key(self) -> bytes:
        return order_key(self.tenant_id, self.order_source_id)


class OrderUpserted(_OrderScoped):
    event_type: Literal["order.upserted"] = "order.upserted"
    order: OrderData


class OrderDeleted(_OrderScoped):
    event_type: Literal["order.deleted"] = "order.deleted"


class OrderLineUpserted(_OrderScoped):
    """A line tracked on its own (Dataverse salesorderdetails); joined to its order downstream."""

    event_type: Literal["order.line_upserted"] = "order.line_upserted"
    order_id: NonEmpty
    line: OrderLineData

    @property
    def order_source_id(self) -> str:
        return self.order_id


class OrderLineDeleted(_OrderScoped):
    event_type: Literal["order.line_deleted"] = "order.line_deleted"
    order_id: str | None = None
    """Tombstones from change tracking carry only the line id; the consumer looks the order up."""

    @property
    def order_source_id(self) -> str:
        return self.order_id or self.source_id


class ReturnUpserted(_OrderScoped):
    event_type: Literal["return.upserted"] = "return.upserted"
    return_: ReturnData = Field(alias="return")

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True, serialize_by_alias=True)

    @property
    def order_source_id(self) -> str:
        return self.return_.original_order_source_id or self.return_.original_order_number or self.source_id


class ReturnDeleted(_OrderScoped):
    event_type: Literal["return.deleted"] = "return.deleted"


class OrderResolved(_OrderScoped):
    """An order (or its line event) matched to a member: resolved.order."""

    event_type: Literal["order.resolved"] = "order.resolved"
    member_id: NonEmpty
    order: OrderData
    upstream_event_id: str


class ReturnResolved(_OrderScoped):
    event_type: Literal["return.resolved"] = "return.resolved"
    member_id: NonEmpty
    return_: ReturnData = Field(alias="return")
    upstream_event_id: str

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True, serialize_by_alias=True)

    @property
    def order_source_id(self) -> str:
        return self.return_.original_order_source_id or self.return_.original_order_number or self.source_id


class MemberUpserted(Envelope):
    """A member as the loyalty core knows it (members topic); connectors never produce these."""

    event_type: Literal["member.upserted"] = "member.upserted"
    member: MemberData


class PointsLedgerEntry(Envelope):
    """One append-only ledger row, published on points.ledger for downstream loyalty consumers."""

    event_type: Literal["points.ledger_entry"] = "points.ledger_entry"
    member_id: NonEmpty
    order_source_id: NonEmpty
    kind: PointsKind
    points: int
    reason: str
    source_event_ids: tuple[str, ...] = ()
    created_at: dt.datetime
    member_sequence: int | None = Field(default=None, ge=1)
    """1, 2, 3 ... per (tenant, member), without gaps, in the order the entries were appended; ``None`` only on
    entries written before the sequence existed."""
    balance_after: int | None = None
    """The member's balance (sum of all their entries) including this one."""

    @property
    def key(self) -> bytes:
        """Key on points.ledger (by order); points.member-ledger uses :attr:`member_key`."""
        return order_key(self.tenant_id, self.order_source_id)

    @property
    def member_key(self) -> bytes:
        return entity_key(self.tenant_id, self.member_id)


AnyEvent = Annotated[
    RawRecord
    | CustomerUpserted
    | CustomerDeleted
    | ProductUpserted
    | ProductDeleted
    | OrderUpserted
    | OrderDeleted
    | OrderLineUpserted
    | OrderLineDeleted
    | ReturnUpserted
    | ReturnDeleted
    | OrderResolved
    | ReturnResolved
    | MemberUpserted
    | PointsLedgerEntry,
    Field(discriminator="event_type"),
]

_ADAPTER: TypeAdapter[AnyEvent] = TypeAdapter(AnyEvent)
_RAW_ADAPTER: TypeAdapter[RawRecord] = TypeAdapter(RawRecord)

EVENT_TYPES: dict[str, type[Envelope]] = {
    m.model_fields["event_type"].default: m
    for m in (
        RawRecord, CustomerUpserted, CustomerDeleted, ProductUpserted, ProductDeleted, OrderUpserted,
        OrderDeleted, OrderLineUpserted, OrderLineDeleted, ReturnUpserted, ReturnDeleted, OrderResolved,
        ReturnResolved, MemberUpserted, PointsLedgerEntry,
    )
}


_TYPE_PREFIX = b'{"event_type":"'
_PREFIX_LEN = len(_TYPE_PREFIX)


def decode_event(data: bytes | str) -> AnyEvent:
    """Validate one message body (fast path: no dict detour). Raises pydantic ValidationError.

    Bodies this platform encodes start with their event_type, so the model is picked from those first
    bytes and validates the body straight from JSON; the tagged union would first parse the whole body
    into a generic tree to find its tag (~16 us instead of ~11 us for an order). The model's own
    ``event_type`` literal is still checked, so a body that does not match its prefix fails validation.
    Anything else (other field order, whitespace) goes through the union.
    """
    raw = data.encode() if isinstance(data, str) else data
    if raw.startswith(_TYPE_PREFIX):
        end = raw.find(b'"', _PREFIX_LEN, 80)
        model = _BY_TYPE_BYTES.get(raw[_PREFIX_LEN:end]) if end > 0 else None
        if model is not None:
            return model.model_validate_json(raw)  # type: ignore[return-value]
    return _ADAPTER.validate_json(raw)


_BY_TYPE_BYTES: dict[bytes, type[Envelope]] = {k.encode(): m for k, m in EVENT_TYPES.items()}


def decode_raw(data: bytes | str) -> RawRecord:
    return _RAW_ADAPTER.validate_json(data)


def encode(event: Envelope) -> bytes:
    # The serializer's bytes directly: model_dump_json builds a str that would then be encoded again.
    return event.__pydantic_serializer__.to_json(event, by_alias=True)


# Re-exported for callers that annotate tenant ids.
TenantIdType = TenantId
