"""Table definitions of the simulated Dataverse: columns, types, option sets, navigation names.

Rows are stored compactly as tuples in column order (see :mod:`sandbox.dataverse.store`); this module is
the single description of what each column is and how it renders:

* ``money`` columns are stored as integers in ten-thousandths of the transaction currency and rendered as
  JSON numbers with four decimals (``20000.0000``); when ``base`` is set a read-only ``<name>_base`` column
  is derived at read time as ``value / exchangerate`` (four decimals).
* ``datetime`` columns are stored as integer epoch seconds and rendered as ``2023-04-07T21:59:01Z``.
* ``lookup`` columns are named like the Web API property (``_customerid_value``); polymorphic lookups keep
  the target table in a hidden sibling column ``<name>#type``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Literal

__all__ = [
    "ENTITIES",
    "ENTITY_BY_LOGICAL",
    "ORDER_STATUS",
    "Column",
    "Entity",
    "Kind",
]

Kind = Literal["guid", "str", "int", "bool", "money", "decimal", "datetime", "option", "lookup", "version"]


@dataclass(frozen=True)
class Column:
    name: str
    kind: Kind
    base: bool = False  # money: derive ``<name>_base``
    targets: tuple[str, ...] = ()  # lookup: logical names of the target tables
    nav: str = ""  # lookup: navigation property (single target); polymorphic: "<nav>_<target>"
    labels: MappingProxyType[int, str] = field(default_factory=lambda: MappingProxyType({}))
    readonly: bool = False
    scale: int = 4  # decimal: digits rendered after the point

    @property
    def polymorphic(self) -> bool:
        return len(self.targets) > 1

    @property
    def type_column(self) -> str:
        return f"{self.name}#type"


@dataclass(frozen=True)
class Entity:
    logical: str
    entity_set: str
    key: str
    primary_name: str
    columns: tuple[Column, ...]
    change_tracking: bool = True
    privilege: str = ""  # "SalesOrder" -> prvReadSalesOrder

    @cached_property
    def by_name(self) -> dict[str, Column]:
        return {c.name: c for c in self.columns}

    def storage_columns(self) -> tuple[str, ...]:
        """Column order of the stored tuple: declared columns then hidden polymorphic type columns."""
        names = [c.name for c in self.columns]
        names += [c.type_column for c in self.columns if c.kind == "lookup" and c.polymorphic]
        return tuple(names)


def _opt(name: str, labels: dict[int, str]) -> Column:
    return Column(name, "option", labels=MappingProxyType(labels))


def _lookup(name: str, *targets: str, nav: str = "", readonly: bool = False) -> Column:
    return Column(f"_{name}_value", "lookup", targets=targets, nav=nav or name, readonly=readonly)


def _money(name: str, *, base: bool = True, readonly: bool = False) -> Column:
    return Column(name, "money", base=base, readonly=readonly)


_SYSTEM = (
    Column("createdon", "datetime", readonly=True),
    Column("modifiedon", "datetime", readonly=True),
    Column("versionnumber", "version", readonly=True),
)

# salesorder statecode/statuscode: docs/vendor-facts.md "option salesorder.*" rows. Other status reasons
# (700970000, 100000001, ...) are organisation-defined: the seed adds them per org (Org.add_status_reason).
ORDER_STATE = {0: "Active", 1: "Submitted", 2: "Canceled", 3: "Fulfilled", 4: "Invoiced"}
ORDER_STATUS = {
    1: "New",
    2: "Pending",
    3: "In Progress",
    4: "No Money",
    100001: "Complete",
    100002: "Partial",
    100003: "Invoiced",
}
# statuscode -> statecode it belongs to (org-defined custom reasons are added per org).
ORDER_STATUS_STATE = {1: 0, 2: 0, 3: 1, 4: 2, 100001: 3, 100002: 3, 100003: 4}

_MONEY_TOTALS = (
    _money("totallineitemamount"),
    _money("totallineitemdiscountamount"),
    _money("discountamount"),
    Column("discountpercentage", "decimal", scale=2),
    _money("totaldiscountamount"),
    _money("totalamountlessfreight"),
    _money("freightamount"),
    _money("totaltax"),
    _money("totalamount"),
)

SALESORDER = Entity(
    "salesorder",
    "salesorders",
    "salesorderid",
    "name",
    (
        Column("salesorderid", "guid"),
        Column("ordernumber", "str"),
        Column("name", "str"),
        _opt("statecode", ORDER_STATE),
        _opt("statuscode", ORDER_STATUS),
        _lookup("customerid", "account", "contact"),
        _lookup("accountid", "account", readonly=True),
        _lookup("contactid", "contact", readonly=True),
        _lookup("transactioncurrencyid", "transactioncurrency"),
        _lookup("pricelevelid", "pricelevel"),
        _lookup("quoteid", "quote"),
        Column("emailaddress", "str"),
        Column("description", "str"),
        Column("submitdate", "datetime"),
        Column("datefulfilled", "datetime"),
        Column("exchangerate", "decimal", readonly=True, scale=12),
        *_MONEY_TOTALS,
        *_SYSTEM,
    ),
    privilege="SalesOrder",
)

SALESORDERDETAIL = Entity(
    "salesorderdetail",
    "salesorderdetails",
    "salesorderdetailid",
    "productdescription",
    (
        Column("salesorderdetailid", "guid"),
        _lookup("salesorderid", "salesorder"),
        _lookup("productid", "product"),
        Column("productdescription", "str"),
        Column("isproductoverridden", "bool"),
        Column("lineitemnumber", "int"),
        Column("quantity", "decimal", scale=5),
        _money("priceperunit"),
        _money("baseamount", readonly=True),
        _money("manualdiscountamount"),
        _money("tax"),
        _money("extendedamount", readonly=True),
        Column("quantityshipped", "decimal", scale=5),
        Column("quantitycancelled", "decimal", scale=5),
        Column("quantitybackordered", "decimal", scale=5),
        _lookup("uomid", "uom"),
        _lookup("transactioncurrencyid", "transactioncurrency"),
        Column("exchangerate", "decimal", readonly=True, scale=10),
        *_SYSTEM,
    ),
    privilege="SalesOrder",
)

ACCOUNT = Entity(
    "account",
    "accounts",
    "accountid",
    "name",
    (
        Column("accountid", "guid"),
        Column("name", "str"),
        Column("accountnumber", "str"),
        Column("emailaddress1", "str"),
        Column("telephone1", "str"),
        Column("fax", "str"),
        _money("revenue"),
        Column("address1_city", "str"),
        Column("address1_country", "str"),
        _opt("statecode", {0: "Active", 1: "Inactive"}),
        _opt("statuscode", {1: "Active", 2: "Inactive"}),
        _lookup("transactioncurrencyid", "transactioncurrency"),
        *_SYSTEM,
    ),
    privilege="Account",
)

CONTACT = Entity(
    "contact",
    "contacts",
    "contactid",
    "fullname",
    (
        Column("contactid", "guid"),
        Column("firstname", "str"),
        Column("lastname", "str"),
        Column("fullname", "str", readonly=True),
        Column("emailaddress1", "str"),
        Column("telephone1", "str"),
        _lookup("parentcustomerid", "account", "contact"),
        _opt("statecode", {0: "Active", 1: "Inactive"}),
        _opt("statuscode", {1: "Active", 2: "Inactive"}),
        *_SYSTEM,
    ),
    privilege="Contact",
)

PRODUCT = Entity(
    "product",
    "products",
    "productid",
    "name",
    (
        Column("productid", "guid"),
        Column("productnumber", "str"),
        Column("name", "str"),
        Column("description", "str"),
        _money("price", base=True),
        _money("standardcost", base=True),
        _opt("productstructure", {1: "Product", 2: "Product Family", 3: "Product Bundle"}),
        _lookup("parentproductid", "product"),
        # Custom column (publisher prefix "new_"): Dataverse has no product category out of the box.
        Column("new_category", "str"),
        _opt("statecode", {0: "Active", 1: "Retired", 2: "Draft", 3: "Under Revision"}),
        _opt("statuscode", {1: "Active", 2: "Retired", 0: "Draft", 3: "Under Revision"}),
        _lookup("transactioncurrencyid", "transactioncurrency"),
        Column("exchangerate", "decimal", readonly=True, scale=10),
        *_SYSTEM,
    ),
    privilege="Product",
)

INVOICE = Entity(
    "invoice",
    "invoices",
    "invoiceid",
    "name",
    (
        Column("invoiceid", "guid"),
        Column("invoicenumber", "str"),
        Column("name", "str"),
        _lookup("salesorderid", "salesorder"),
        _lookup("customerid", "account", "contact"),
        _opt("statecode", {0: "Active", 1: "Closed", 2: "Paid", 3: "Canceled"}),
        _opt(
            "statuscode",
            {
                1: "New",
                2: "Partially Shipped",
                4: "Billed",
                5: "Booked",
                6: "Installed",
                3: "Canceled",
                7: "Paid in Full",
                100001: "Complete",
                100002: "Partial",
                100003: "Canceled",
            },
        ),
        _lookup("transactioncurrencyid", "transactioncurrency"),
        Column("exchangerate", "decimal", readonly=True, scale=10),
        *_MONEY_TOTALS,
        *_SYSTEM,
    ),
    privilege="Invoice",
)

TRANSACTIONCURRENCY = Entity(
    "transactioncurrency",
    "transactioncurrencies",
    "transactioncurrencyid",
    "currencyname",
    (
        Column("transactioncurrencyid", "guid"),
        Column("isocurrencycode", "str"),
        Column("currencyname", "str"),
        Column("currencysymbol", "str"),
        Column("currencyprecision", "int"),
        Column("exchangerate", "decimal", scale=10),
        _opt("statecode", {0: "Active", 1: "Inactive"}),
        _opt("statuscode", {1: "Active", 2: "Inactive"}),
        *_SYSTEM,
    ),
    privilege="TransactionCurrency",
)

ORGANIZATION = Entity(
    "organization",
    "organizations",
    "organizationid",
    "name",
    (
        Column("organizationid", "guid"),
        Column("name", "str"),
        Column("expirechangetrackingindays", "int"),
        _lookup("basecurrencyid", "transactioncurrency"),
        *_SYSTEM,
    ),
    change_tracking=False,
    privilege="Organization",
)

# Field Service return merchandise authorisation (docs/vendor-facts.md "msdyn_rma" rows). It has no link to a
# sales order; this simulator's tenants put the order number in the documented "Reference No" column
# (``msdyn_referenceno``), the convention the CE poller's ``return_source.order_number_field`` defaults to.
RMA = Entity(
    "msdyn_rma",
    "msdyn_rmas",
    "msdyn_rmaid",
    "msdyn_name",
    (
        Column("msdyn_rmaid", "guid"),
        Column("msdyn_name", "str"),
        Column("msdyn_referenceno", "str"),
        _lookup("msdyn_serviceaccount", "account"),
        _lookup("msdyn_billingaccount", "account"),
        _lookup("msdyn_requestedbycontact", "contact"),
        Column("msdyn_description", "str"),
        _opt("msdyn_systemstatus", {690970000: "Pending", 690970001: "Canceled", 690970002: "Products Received"}),
        Column("msdyn_taxable", "bool"),
        _money("msdyn_totalamount"),
        _opt("statecode", {0: "Active", 1: "Inactive"}),
        _opt("statuscode", {1: "Active", 2: "Inactive"}),
        _lookup("transactioncurrencyid", "transactioncurrency"),
        Column("exchangerate", "decimal", readonly=True, scale=10),
        *_SYSTEM,
    ),
    privilege="msdyn_rma",
)

RMAPRODUCT = Entity(
    "msdyn_rmaproduct",
    "msdyn_rmaproducts",
    "msdyn_rmaproductid",
    "msdyn_name",
    (
        Column("msdyn_rmaproductid", "guid"),
        Column("msdyn_name", "str"),
        _lookup("msdyn_rma", "msdyn_rma"),
        _lookup("msdyn_product", "product"),
        Column("msdyn_quantitytoreturn", "decimal", scale=2),
        _money("msdyn_unitamount"),
        _money("msdyn_totalamount"),
        Column("msdyn_credittoaccount", "bool"),
        Column("msdyn_taxable", "bool"),
        _opt("msdyn_itemstatus", {690970000: "Pending", 690970001: "Received", 690970002: "Canceled"}),
        _opt("statecode", {0: "Active", 1: "Inactive"}),
        _opt("statuscode", {1: "Active", 2: "Inactive"}),
        _lookup("transactioncurrencyid", "transactioncurrency"),
        Column("exchangerate", "decimal", readonly=True, scale=10),
        *_SYSTEM,
    ),
    privilege="msdyn_rmaproduct",
)

ENTITIES: dict[str, Entity] = {
    e.entity_set: e
    for e in (
        SALESORDER,
        SALESORDERDETAIL,
        ACCOUNT,
        CONTACT,
        PRODUCT,
        INVOICE,
        TRANSACTIONCURRENCY,
        ORGANIZATION,
        RMA,
        RMAPRODUCT,
    )
}
ENTITY_BY_LOGICAL: dict[str, Entity] = {e.logical: e for e in ENTITIES.values()}
