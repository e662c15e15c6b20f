"""The poller's view of one connection: its settings validated, with the defaults filled in."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from connectorkit.endpoints import check_endpoint
from connectorkit.protocol import SettingError
from servicekit.connections import Connection

__all__ = ["BASE_SELECT", "DEFAULT_ENTITIES", "ENTITY_SETS", "CeConnection", "EntitySpec", "parse_connection"]

ENTITY_SETS = {
    "account": "accounts",
    "contact": "contacts",
    "product": "products",
    "salesorder": "salesorders",
    "salesorderdetail": "salesorderdetails",
    "msdyn_rma": "msdyn_rmas",
    "msdyn_rmaproduct": "msdyn_rmaproducts",
    "transactioncurrency": "transactioncurrencies",
}
DEFAULT_ENTITIES = ("account", "contact", "product", "salesorder", "salesorderdetail")

# Every name below is listed with its source in docs/vendor-facts.md ("Dynamics 365 CE (Dataverse)");
# tests/unit/test_vendor_facts.py fails on one that is not.
BASE_SELECT: dict[str, tuple[str, ...]] = {
    "account": ("accountid", "name", "accountnumber", "emailaddress1", "statecode", "modifiedon", "versionnumber"),
    "contact": (
        "contactid", "firstname", "lastname", "fullname", "emailaddress1", "_parentcustomerid_value", "statecode",
        "modifiedon", "versionnumber",
    ),
    "product": (
        "productid", "productnumber", "name", "price", "productstructure", "statecode",
        "_transactioncurrencyid_value", "modifiedon", "versionnumber",
    ),
    "salesorder": (
        "salesorderid", "ordernumber", "name", "statecode", "statuscode", "_customerid_value", "emailaddress",
        "_transactioncurrencyid_value", "exchangerate", "totalamount", "totallineitemamount", "discountamount",
        "totaldiscountamount", "totalamountlessfreight", "freightamount", "totaltax", "submitdate",
        "datefulfilled", "createdon", "modifiedon", "versionnumber",
    ),
    "salesorderdetail": (
        "salesorderdetailid", "_salesorderid_value", "_productid_value", "productdescription", "quantity",
        "priceperunit", "baseamount", "manualdiscountamount", "tax", "extendedamount", "lineitemnumber",
        "_transactioncurrencyid_value", "exchangerate", "modifiedon", "versionnumber",
    ),
    "msdyn_rma": (
        "msdyn_rmaid", "msdyn_name", "msdyn_referenceno", "_msdyn_serviceaccount_value",
        "_msdyn_requestedbycontact_value", "msdyn_systemstatus", "msdyn_totalamount", "exchangerate", "statecode",
        "statuscode", "_transactioncurrencyid_value", "modifiedon", "versionnumber",
    ),
    "msdyn_rmaproduct": (
        "msdyn_rmaproductid", "_msdyn_rma_value", "_msdyn_product_value", "msdyn_quantitytoreturn", "msdyn_unitamount",
        "msdyn_totalamount", "msdyn_credittoaccount", "_transactioncurrencyid_value", "exchangerate",
        "modifiedon", "versionnumber",
    ),
}

# Lookup column naming the parent of an order-scoped row (so tombstones can be keyed by their order).
PARENT_COLUMN = {"salesorderdetail": "_salesorderid_value", "msdyn_rmaproduct": "_msdyn_rma_value"}


@dataclass(frozen=True)
class EntitySpec:
    logical: str
    entity_set: str
    key: str
    select: tuple[str, ...]
    parent_column: str | None = None
    publish: bool = True
    """False for tables only tracked to assemble another record (RMA products)."""


@dataclass(frozen=True)
class CeConnection:
    tenant_id: str
    connection_id: str
    org_url: str
    authority: str
    client_id: str
    client_secret: str = field(repr=False)
    ca_bundle: str | None
    page_size: int
    entities: tuple[EntitySpec, ...]
    return_source: dict[str, Any]
    limits: dict[str, float]
    poll_interval_s: float
    expiry_warning_days: float
    entity_concurrency: int = 4
    max_record_bytes: int = 900_000
    """Largest row published; a larger one is dead-lettered (the broker would refuse the whole batch)."""
    annotations: str = "Microsoft.Dynamics.CRM.lookuplogicalname,OData.Community.Display.V1.FormattedValue"
    """``Prefer: odata.include-annotations`` terms: the lookup's table (polymorphic customerid) and formatted
    values (the order's status label), docs/vendor-facts.md "annotation" rows."""

    @property
    def api(self) -> str:
        return f"{self.org_url}/api/data/v9.2/"

    @property
    def scope(self) -> str:
        return f"{self.org_url}/.default"

    def spec(self, logical: str) -> EntitySpec:
        for s in self.entities:
            if s.logical == logical:
                return s
        raise KeyError(logical)


def parse_connection(conn: Connection) -> CeConnection:
    """Validate a ``dynamics-ce`` connection; a ConfigError names the setting to fix."""
    s = conn.settings or {}
    c = conn.credentials or {}
    cid = conn.connection_id
    for k in ("tenant_id", "client_id", "client_secret"):
        if not c.get(k):
            raise SettingError(cid, f"credentials.{k}", "is missing",
                               "the app registration's tenant_id, client_id and client_secret in --credentials "
                               "('{\"tenant_id\": ..., \"client_id\": ..., \"client_secret\": ...}')")
    org_url = str(s.get("org_url") or conn.endpoint or "").rstrip("/")
    check_endpoint(org_url, kinds=["dynamics-ce"], setting="endpoint (or settings.org_url)")
    authority = str(s.get("authority") or f"https://login.microsoftonline.com/{c['tenant_id']}").rstrip("/")
    check_endpoint(authority, kinds=["entra"], setting="settings.authority")
    try:
        page_size = int(s.get("page_size", 5000))
    except (TypeError, ValueError):
        page_size = 0
    if not 1 <= page_size <= 5000:
        raise SettingError(cid, "settings.page_size", f"is {s.get('page_size')!r}",
                           "a whole number 1..5000 (Dataverse's largest page)")
    extra = s.get("select") or {}
    ext = s.get("external_id_field", "accountnumber")
    ext_fields = ext if isinstance(ext, dict) else {"account": ext}
    category = str(s.get("category_field", "new_category"))
    rs = dict(s.get("return_source") or {"kind": "msdyn_rma"})
    kind = rs.get("kind", "msdyn_rma")
    names = list(s.get("entities") or DEFAULT_ENTITIES)
    specs: list[EntitySpec] = []
    for name in names:
        if name not in BASE_SELECT:
            raise SettingError(cid, "settings.entities", f"names an unknown table {name!r}",
                               f"some of {', '.join(sorted(BASE_SELECT))} (returns come from settings.return_source)")
        cols = list(BASE_SELECT[name])
        if name in ext_fields and ext_fields[name] not in cols:
            cols.append(str(ext_fields[name]))
        if name == "product" and category not in cols:
            cols.append(category)
        cols += [x for x in extra.get(name, ()) if x not in cols]
        specs.append(EntitySpec(name, ENTITY_SETS[name], BASE_SELECT[name][0], tuple(cols), PARENT_COLUMN.get(name)))
    if kind == "msdyn_rma":
        order_field = str(rs.get("order_number_field", "msdyn_referenceno"))
        rma_cols = list(BASE_SELECT["msdyn_rma"])
        for extra_col in (order_field, rs.get("customer_field")):
            if extra_col and extra_col not in rma_cols:
                rma_cols.append(str(extra_col))
        specs.append(EntitySpec("msdyn_rma", "msdyn_rmas", "msdyn_rmaid", tuple(rma_cols)))
        specs.append(EntitySpec("msdyn_rmaproduct", "msdyn_rmaproducts", "msdyn_rmaproductid",
                                BASE_SELECT["msdyn_rmaproduct"], "_msdyn_rma_value", publish=False))
    elif kind == "custom":
        fields = rs.get("fields") or {}
        entity_set = rs.get("entity_set")
        if not entity_set or not fields.get("id") or not (fields.get("order_number") or fields.get("order_id")):
            raise SettingError(cid, "settings.return_source", "of kind custom lacks entity_set or fields",
                               "entity_set and fields.id plus fields.order_number or fields.order_id")
        logical = str(rs.get("entity") or entity_set.rstrip("s"))
        rcols = (*dict.fromkeys(str(v) for v in fields.values() if v), "modifiedon", "versionnumber")
        specs.append(EntitySpec(logical, str(entity_set), str(fields["id"]), rcols,
                                fields.get("order_id") and str(fields["order_id"])))
    elif kind != "none":
        raise SettingError(cid, "settings.return_source.kind", f"is {kind!r}", "msdyn_rma, custom or none")
    limits = {"requests_per_window": 6000.0, "window_seconds": 300.0, "concurrent": 52.0}
    limits.update({k: float(v) for k, v in (s.get("limits") or {}).items()})
    return CeConnection(
        tenant_id=conn.tenant_id, connection_id=conn.connection_id, org_url=org_url, authority=authority,
        client_id=c["client_id"], client_secret=c["client_secret"], ca_bundle=s.get("ca_bundle"),
        page_size=page_size, entities=tuple(specs), return_source=rs, limits=limits,
        poll_interval_s=float(s.get("poll_interval_s", 30)), expiry_warning_days=float(s.get("expiry_warning_days", 2)),
        entity_concurrency=max(1, int(s.get("entity_concurrency", 4))),
        max_record_bytes=_positive(cid, s, "max_record_bytes", 900_000),
    )


def _positive(cid: str, s: dict[str, Any], name: str, default: int) -> int:
    value = s.get(name, default)
    try:
        out = int(value)
    except (TypeError, ValueError):
        out = 0
    if out <= 0:
        raise SettingError(cid, f"settings.{name}", f"is {value!r}", "a positive whole number")
    return out
