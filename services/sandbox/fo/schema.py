"""Data entities the F&O simulator serves, their keys, field types and enums, and the CSDL ``$metadata``.

Field names follow the CDM entity definitions listed in ``docs/vendor-facts.md`` (Finance & Operations).
Entity-set names, keys and enum members that the documentation does not state are marked UNCONFIRMED there;
the simulator uses the documented defaults. An environment may rename fields and add extension fields
(:class:`Variant`), as customer extensions do, so the connector's field mapping is exercised.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from xml.sax.saxutils import escape

__all__ = [
    "ENTITIES",
    "ENUMS",
    "NAMESPACE",
    "EntityDef",
    "Variant",
    "csdl",
]

NAMESPACE = "Microsoft.Dynamics.DataEntities"

S, D, DT, DATE, I64 = "Edm.String", "Edm.Decimal", "Edm.DateTimeOffset", "Edm.Date", "Edm.Int64"

ENUMS: dict[str, tuple[str, ...]] = {
    "NoYes": ("No", "Yes"),
    "SalesStatus": ("None", "Backorder", "Delivered", "Invoiced", "Canceled"),
    "ReturnStatusHeader": ("None", "Awaiting", "Registered", "Received", "Invoiced", "Canceled"),
    "ReturnStatusLine": ("None", "Awaiting", "Registered", "Received", "Invoiced", "Canceled"),
    "DirPartyBaseType": ("None", "Person", "Organization"),
    "EcoResProductType": ("Item", "Service"),
}


def enum(name: str) -> str:
    return f"{NAMESPACE}.{name}"


@dataclass(frozen=True)
class EntityDef:
    entity_set: str
    entity_type: str
    key: tuple[str, ...]
    fields: Mapping[str, str]
    """Field name -> Edm type or ``Microsoft.Dynamics.DataEntities.<Enum>``."""


ENTITIES: dict[str, EntityDef] = {
    e.entity_set: e
    for e in (
        EntityDef("SalesOrderHeadersV2", "SalesOrderHeaderV2", ("dataAreaId", "SalesOrderNumber"), {
            "dataAreaId": S, "SalesOrderNumber": S, "SalesOrderStatus": enum("SalesStatus"),
            "OrderingCustomerAccountNumber": S, "InvoiceCustomerAccountNumber": S, "CurrencyCode": S,
            "Email": S, "CustomersOrderReference": S, "OrderCreationDateTime": DT, "OrderTotalAmount": D,
            "OrderTotalChargesAmount": D, "OrderTotalDiscountAmount": D, "OrderTotalTaxAmount": D,
            "AreTotalsCalculated": enum("NoYes"),
        }),
        EntityDef("SalesOrderLines", "SalesOrderLine", ("dataAreaId", "InventoryLotId"), {
            "dataAreaId": S, "InventoryLotId": S, "SalesOrderNumber": S, "LineCreationSequenceNumber": I64,
            "ItemNumber": S, "LineDescription": S, "OrderedSalesQuantity": D, "SalesPrice": D, "LineAmount": D,
            "LineDiscountAmount": D, "SalesOrderLineStatus": enum("SalesStatus"), "CurrencyCode": S,
        }),
        EntityDef("CustomersV3", "CustomerV3", ("dataAreaId", "CustomerAccount"), {
            "dataAreaId": S, "CustomerAccount": S, "OrganizationName": S, "PrimaryContactEmail": S,
            "SalesCurrencyCode": S, "PartyType": enum("DirPartyBaseType"),
        }),
        EntityDef("ReleasedProductsV2", "ReleasedProductV2", ("dataAreaId", "ItemNumber"), {
            "dataAreaId": S, "ItemNumber": S, "ProductNumber": S, "ProductName": S, "ProductGroupId": S,
            "SalesPrice": D, "SalesUnitSymbol": S, "ProductType": enum("EcoResProductType"),
        }),
        EntityDef("ReturnOrderHeaders", "ReturnOrderHeader", ("dataAreaId", "ReturnOrderNumber"), {
            "dataAreaId": S, "ReturnOrderNumber": S, "RMANumber": S, "ReturnOrderStatus": enum("ReturnStatusHeader"),
            "CustomerAccountNumber": S, "CurrencyCode": S,
        }),
        EntityDef("ReturnOrderLines", "ReturnOrderLine", ("dataAreaId", "ReturningInventoryLotId"), {
            "dataAreaId": S, "ReturningInventoryLotId": S, "ReturnOrderNumber": S, "ReturnInventoryLotId": S,
            "ItemNumber": S, "ReturnSalesQuantity": D, "SalesPrice": D, "LineAmount": D,
            "ReturnStatus": enum("ReturnStatusLine"),
        }),
        EntityDef("SalesInvoiceHeadersV2", "SalesInvoiceHeaderV2", ("dataAreaId", "InvoiceNumber"), {
            "dataAreaId": S, "InvoiceNumber": S, "InvoiceDate": DATE, "SalesOrderNumber": S,
            "InvoiceCustomerAccountNumber": S, "CurrencyCode": S, "TotalInvoiceAmount": D, "TotalTaxAmount": D,
            "TotalChargeAmount": D, "TotalDiscountAmount": D,
        }),
    )
}


@dataclass(frozen=True)
class Variant:
    """How one environment differs from the standard entities: renamed fields and extension fields.

    ``renames[entity_set][standard name] = environment name``; ``extensions[entity_set][name] = Edm type``.
    A field renamed to ``None`` is absent from the environment.
    """

    renames: Mapping[str, Mapping[str, str | None]] = field(default_factory=dict)
    extensions: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def name(self, entity_set: str, standard: str) -> str | None:
        """The environment's name of a standard field (None when the environment does not have it)."""
        r = self.renames.get(entity_set, {})
        return r[standard] if standard in r else standard

    def fields(self, entity_set: str) -> dict[str, str]:
        """Environment field name -> type."""
        out: dict[str, str] = {}
        for f, t in ENTITIES[entity_set].fields.items():
            n = self.name(entity_set, f)
            if n is not None:
                out[n] = t
        out.update(self.extensions.get(entity_set, {}))
        return out

    def key(self, entity_set: str) -> tuple[str, ...]:
        return tuple(self.name(entity_set, k) or k for k in ENTITIES[entity_set].key)


def csdl(variant: Variant) -> str:
    """The ``$metadata`` document (OData CSDL XML) of an environment."""
    out = [
        '<?xml version="1.0" encoding="utf-8"?>',
        '<edmx:Edmx Version="4.0" xmlns:edmx="http://docs.oasis-open.org/odata/ns/edmx">',
        "<edmx:DataServices>",
        f'<Schema Namespace="{NAMESPACE}" xmlns="http://docs.oasis-open.org/odata/ns/edm">',
    ]
    for name, members in ENUMS.items():
        out.append(f'<EnumType Name="{name}">')
        out += [f'<Member Name="{m}" Value="{i}" />' for i, m in enumerate(members)]
        out.append("</EnumType>")
    for es, e in ENTITIES.items():
        out.append(f'<EntityType Name="{e.entity_type}">')
        out.append("<Key>" + "".join(f'<PropertyRef Name="{k}" />' for k in variant.key(es)) + "</Key>")
        for f, t in variant.fields(es).items():
            nullable = "false" if f in variant.key(es) else "true"
            out.append(f'<Property Name="{escape(f)}" Type="{t}" Nullable="{nullable}" />')
        out.append("</EntityType>")
    out.append('<EntityContainer Name="Resources">')
    out += [f'<EntitySet Name="{es}" EntityType="{NAMESPACE}.{e.entity_type}" />' for es, e in ENTITIES.items()]
    out += ["</EntityContainer>", "</Schema>", "</edmx:DataServices>", "</edmx:Edmx>"]
    return "\n".join(out)
