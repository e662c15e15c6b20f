"""The object model the simulated org exposes: key prefixes, fields and their types.

Field names follow the Salesforce read-side reference (§5). Where the real field is unconfirmed the
choice is noted here; connectors should still ``describe`` a real org.

Simulator choices (not confirmed against a real org):
* ``OrderItemSummaryChange`` key prefix ``0ah``, ``ReturnOrderLineItem`` ``0OS``, ``CreditMemoLine`` ``9cm``.
* ``ReturnOrderLineItem.TotalPrice`` = ``QuantityExpected`` x the returned ``OrderItem.UnitPrice``
  (order currency): the amount of the return line.
* ``CreditMemoLine`` has ``ChargeAmount``, ``TaxAmount`` and ``ReferenceEntityItemId``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["PREFIX_TO_OBJECT", "SCHEMA", "FieldDef", "ObjectDef", "find_object"]

# field types: id, string, picklist, email, phone, boolean, double, currency, date, datetime, reference


@dataclass(frozen=True)
class FieldDef:
    name: str
    type: str
    ref_to: tuple[str, ...] = ()

    @property
    def relationship(self) -> str | None:
        """Relationship name for a lookup (``AccountId`` -> ``Account``)."""
        if self.type in ("reference",) and self.name.endswith("Id"):
            return self.name[:-2]
        return None


@dataclass(frozen=True)
class ObjectDef:
    name: str
    prefix: str
    fields: dict[str, FieldDef] = field(default_factory=dict)
    parent_field: str | None = None  # master-detail parent: deletes cascade to these children

    def field_ci(self, name: str) -> FieldDef | None:
        return _CI_FIELDS[self.name].get(name.lower())

    def relationship_ci(self, name: str) -> FieldDef | None:
        return _CI_RELS[self.name].get(name.lower())


_SYSTEM = [
    ("Id", "id", ()),
    ("IsDeleted", "boolean", ()),
    ("CreatedDate", "datetime", ()),
    ("CreatedById", "reference", ("User",)),
    ("LastModifiedDate", "datetime", ()),
    ("LastModifiedById", "reference", ("User",)),
    ("SystemModstamp", "datetime", ()),
]

_OBJECTS: list[tuple[str, str, list[tuple[str, str, tuple[str, ...]]], str | None]] = [
    (
        "User",
        "005",
        [
            ("Name", "string", ()),
            ("Username", "string", ()),
            ("Email", "email", ()),
            ("IsActive", "boolean", ()),
        ],
        None,
    ),
    (
        "Account",
        "001",
        [
            ("Name", "string", ()),
            ("FirstName", "string", ()),
            ("LastName", "string", ()),
            ("AccountNumber", "string", ()),
            ("Type", "picklist", ()),
            ("Phone", "phone", ()),
            ("IsPersonAccount", "boolean", ()),
            ("PersonEmail", "email", ()),
            ("PersonContactId", "reference", ("Contact",)),
            ("PersonHasOptedOutOfEmail", "boolean", ()),
            ("CurrencyIsoCode", "picklist", ()),
        ],
        None,
    ),
    (
        "Contact",
        "003",
        [
            ("Name", "string", ()),
            ("FirstName", "string", ()),
            ("LastName", "string", ()),
            ("Email", "email", ()),
            ("Phone", "phone", ()),
            ("AccountId", "reference", ("Account",)),
            ("IsPersonAccount", "boolean", ()),
            ("HasOptedOutOfEmail", "boolean", ()),
            ("CurrencyIsoCode", "picklist", ()),
        ],
        None,
    ),
    (
        "Product2",
        "01t",
        [
            ("Name", "string", ()),
            ("ProductCode", "string", ()),
            ("StockKeepingUnit", "string", ()),
            ("Family", "picklist", ()),
            ("IsActive", "boolean", ()),
            ("Description", "string", ()),
        ],
        None,
    ),
    (
        "Pricebook2",
        "01s",
        [
            ("Name", "string", ()),
            ("IsActive", "boolean", ()),
            ("IsStandard", "boolean", ()),
        ],
        None,
    ),
    (
        "PricebookEntry",
        "01u",
        [
            ("Name", "string", ()),
            ("Pricebook2Id", "reference", ("Pricebook2",)),
            ("Product2Id", "reference", ("Product2",)),
            ("ProductCode", "string", ()),
            ("UnitPrice", "currency", ()),
            ("IsActive", "boolean", ()),
            ("UseStandardPrice", "boolean", ()),
            ("CurrencyIsoCode", "picklist", ()),
        ],
        None,
    ),
    (
        "Order",
        "801",
        [
            ("OrderNumber", "string", ()),
            ("AccountId", "reference", ("Account",)),
            ("Status", "picklist", ()),
            ("StatusCode", "picklist", ()),
            ("EffectiveDate", "date", ()),
            ("ActivatedDate", "datetime", ()),
            ("ActivatedById", "reference", ("User",)),
            ("TotalAmount", "currency", ()),
            ("Pricebook2Id", "reference", ("Pricebook2",)),
            ("BillToContactId", "reference", ("Contact",)),
            ("Type", "picklist", ()),
            ("Description", "string", ()),
            ("CurrencyIsoCode", "picklist", ()),
            ("IsReductionOrder", "boolean", ()),
            ("OriginalOrderId", "reference", ("Order",)),
        ],
        None,
    ),
    (
        "OrderItem",
        "802",
        [
            ("OrderItemNumber", "string", ()),
            ("OrderId", "reference", ("Order",)),
            ("Product2Id", "reference", ("Product2",)),
            ("PricebookEntryId", "reference", ("PricebookEntry",)),
            ("Quantity", "double", ()),
            ("UnitPrice", "currency", ()),
            ("ListPrice", "currency", ()),
            ("TotalPrice", "currency", ()),
            ("OriginalOrderItemId", "reference", ("OrderItem",)),
            ("Description", "string", ()),
            ("CurrencyIsoCode", "picklist", ()),
        ],
        "OrderId",
    ),
    (
        "OrderSummary",
        "1Os",
        [
            ("OrderNumber", "string", ()),
            ("AccountId", "reference", ("Account",)),
            ("Status", "picklist", ()),
            ("OrderLifeCycleType", "picklist", ()),
            ("BillingEmailAddress", "email", ()),
            ("OriginalOrderId", "reference", ("Order",)),
            ("GrandTotalAmount", "currency", ()),
            ("TotalAdjustedProductAmount", "currency", ()),
            ("TotalAdjustedProductTaxAmount", "currency", ()),
            ("OrderedDate", "datetime", ()),
            ("CurrencyIsoCode", "picklist", ()),
        ],
        None,
    ),
    (
        "OrderItemSummary",
        "10u",
        [
            ("OrderSummaryId", "reference", ("OrderSummary",)),
            ("OriginalOrderItemId", "reference", ("OrderItem",)),
            ("Product2Id", "reference", ("Product2",)),
            ("Name", "string", ()),
            ("StockKeepingUnit", "string", ()),
            ("Status", "picklist", ()),
            ("Quantity", "double", ()),
            ("QuantityOrdered", "double", ()),
            ("QuantityCanceled", "double", ()),
            ("QuantityFulfilled", "double", ()),
            ("QuantityReturnInitiated", "double", ()),
            ("QuantityReturned", "double", ()),
            ("UnitPrice", "currency", ()),
            ("AdjustedLineAmount", "currency", ()),
            ("AdjustedLineAmtWithTax", "currency", ()),
            ("CurrencyIsoCode", "picklist", ()),
        ],
        "OrderSummaryId",
    ),
    (
        "OrderItemSummaryChange",
        "0ah",
        [
            ("ChangeType", "picklist", ()),
            ("OrderItemSummaryId", "reference", ("OrderItemSummary",)),
            ("OrderSummaryId", "reference", ("OrderSummary",)),
            ("ChangeOrderItemId", "reference", ("OrderItem",)),
            ("IsPreFulfillment", "boolean", ()),
            ("Reason", "picklist", ()),
        ],
        None,
    ),
    (
        "ReturnOrder",
        "0OR",
        [
            ("ReturnOrderNumber", "string", ()),
            ("AccountId", "reference", ("Account",)),
            ("ContactId", "reference", ("Contact",)),
            ("OrderId", "reference", ("Order",)),
            ("OrderSummaryId", "reference", ("OrderSummary",)),
            ("Status", "picklist", ()),
            ("Description", "string", ()),
            ("CurrencyIsoCode", "picklist", ()),
        ],
        None,
    ),
    (
        "ReturnOrderLineItem",
        "0OS",
        [
            ("ReturnOrderId", "reference", ("ReturnOrder",)),
            ("OrderItemId", "reference", ("OrderItem",)),
            ("OrderItemSummaryId", "reference", ("OrderItemSummary",)),
            ("Product2Id", "reference", ("Product2",)),
            ("ChangeOrderItemId", "reference", ("OrderItem",)),
            ("QuantityExpected", "double", ()),
            ("QuantityReceived", "double", ()),
            ("QuantityReturned", "double", ()),
            ("ReasonForReturn", "picklist", ()),
            ("TotalPrice", "currency", ()),
            ("CurrencyIsoCode", "picklist", ()),
        ],
        "ReturnOrderId",
    ),
    (
        "CreditMemo",
        "50g",
        [
            ("DocumentNumber", "string", ()),
            ("BillingAccountId", "reference", ("Account",)),
            ("BillToContactId", "reference", ("Contact",)),
            ("Balance", "currency", ()),
            ("CreditDate", "datetime", ()),
            ("AppType", "picklist", ()),
            ("TotalAmount", "currency", ()),
            ("TotalTaxAmount", "currency", ()),
            ("TotalAmountWithTax", "currency", ()),
            ("ReferenceEntityId", "reference", ("Order", "OrderSummary")),
            ("Status", "picklist", ()),
            ("CurrencyIsoCode", "picklist", ()),
        ],
        None,
    ),
    (
        "CreditMemoLine",
        "9cm",
        [
            ("CreditMemoId", "reference", ("CreditMemo",)),
            ("Name", "string", ()),
            ("Type", "picklist", ()),
            ("ReferenceEntityItemId", "reference", ("OrderItem", "OrderItemSummary")),
            ("ChargeAmount", "currency", ()),
            ("TaxAmount", "currency", ()),
            ("CurrencyIsoCode", "picklist", ()),
        ],
        "CreditMemoId",
    ),
]


def _build() -> dict[str, ObjectDef]:
    out: dict[str, ObjectDef] = {}
    for name, prefix, fields, parent in _OBJECTS:
        defs = {n: FieldDef(n, t, r) for n, t, r in [*_SYSTEM, *fields]}
        out[name] = ObjectDef(name, prefix, defs, parent)
    return out


SCHEMA: dict[str, ObjectDef] = _build()
_CI_OBJECTS = {k.lower(): v for k, v in SCHEMA.items()}
_CI_FIELDS = {o.name: {f.lower(): d for f, d in o.fields.items()} for o in SCHEMA.values()}
_CI_RELS = {o.name: {d.relationship.lower(): d for d in o.fields.values() if d.relationship} for o in SCHEMA.values()}
PREFIX_TO_OBJECT = {o.prefix: o.name for o in SCHEMA.values()}


def find_object(name: str) -> ObjectDef | None:
    return _CI_OBJECTS.get(name.lower())
