"""The fo-poller's view of one ``dynamics-fo`` connection: settings validated, documented defaults filled in.

Connection fields:

* ``endpoint``: the environment URL, ``https://<env>.operations.dynamics.com``; the OData root is
  ``<endpoint>/data/`` and the token scope ``<endpoint>/.default``.
* ``credentials``: ``tenant_id``, ``client_id``, ``client_secret`` (Entra ID app registration, client
  credentials); ``business_events_secret`` when Business Events are enabled (the secret the environment's
  HTTPS endpoint URL carries as ``?code=``).
* ``settings`` (all optional):

  ====================================  =================================================================
  ``field_map``                         ``{name: entity field}`` over the documented defaults
                                        (``FIELD_DEFAULTS``); verify confirms every one against $metadata
  ``status_lifecycle``                  ``{SalesOrderStatus value: pending|awardable|cancelled}``
  ``return_status_lifecycle``           ``{ReturnOrderStatus value: pending|effective|cancelled}``
  ``entity_sets``                       ``{orders, lines, customers, products, returns, return_lines,
                                        invoices}`` -> entity-set names (defaults in :data:`ENTITY_SETS`)
  ``streams``                           which of ``orders customers products returns`` to sync (all)
  ``companies``                         ``dataAreaId`` values to read (default: every company, cross-company)
  ``page_size``                         ``Prefer: odata.maxpagesize`` (1..10000, default 5000)
  ``poll_interval_s``                   seconds between incremental cycles (60)
  ``overlap_s``                         how far each date window reaches back before the last one (300)
  ``scan_interval_s``                   seconds between full content-hash scans (3600; 0 = every cycle)
  ``batch_size``                        orders per lines request (``or`` of keys; ``in`` is unsupported) (25)
  ``concurrency``                       lines/lookup requests in flight at once per connection (4)
  ``business_events``                   ``{"enabled": bool, "max_age_s": 86400, "events": {BusinessEventId:
                                        {"company": payload field, "order": payload field}}}``
  ``external_id_field``                 CustomersV3 field with the tenant's own customer id (CustomerAccount)
  ``authority``                         Entra authority (``https://login.microsoftonline.com/<tenant_id>``)
  ``ca_bundle``                         a private CA bundle (simulators, TLS-inspecting proxies)
  ====================================  =================================================================

The Business Events receiver of the process listens on ``FLASH_FO_EVENTS_HOST``/``FLASH_FO_EVENTS_PORT``
(HTTPS with ``FLASH_FO_EVENTS_CERT`` / ``FLASH_FO_EVENTS_KEY``); see :mod:`fo_poller.events`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from connectorkit.endpoints import check_endpoint
from connectorkit.protocol import SettingError
from servicekit.connections import Connection

__all__ = [
    "DEFAULT_EVENTS",
    "ENTITY_SETS",
    "FIELD_DEFAULTS",
    "RETURN_STATUS_DEFAULTS",
    "STATUS_DEFAULTS",
    "STREAMS",
    "FoConnection",
    "parse_connection",
]

ENTITY_SETS: dict[str, str] = {
    "orders": "SalesOrderHeadersV2",
    "lines": "SalesOrderLines",
    "customers": "CustomersV3",
    "products": "ReleasedProductsV2",
    "returns": "ReturnOrderHeaders",
    "return_lines": "ReturnOrderLines",
    "invoices": "SalesInvoiceHeadersV2",
}
"""Entity sets (``docs/vendor-facts.md``, F&O: several set names are UNCONFIRMED, hence settings)."""

STREAMS: dict[str, str] = {"orders": "orders", "customers": "customers", "products": "products",
                           "returns": "returns"}

# The documented defaults; normalizer.mappers.dynamics_fo holds the same table (services share no code): a
# unit test fails when the two differ.
FIELD_DEFAULTS: dict[str, str | None] = {
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
    "line_id": "InventoryLotId",
    "line_order_number": "SalesOrderNumber",
    "line_item": "ItemNumber",
    "line_description": "LineDescription",
    "line_quantity": "OrderedSalesQuantity",
    "line_price": "SalesPrice",
    "line_amount": "LineAmount",
    "customer_account": "CustomerAccount",
    "customer_name": "OrganizationName",
    "customer_email": "PrimaryContactEmail",
    "product_item": "ItemNumber",
    "product_name": "ProductName",
    "product_category": "ProductGroupId",
    "product_price": "SalesPrice",
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
    "invoice_number": "InvoiceNumber",
    "invoice_order_number": "SalesOrderNumber",
    "invoice_date": "InvoiceDate",
    "credit_note_total": "TotalInvoiceAmount",
}
STATUS_DEFAULTS: dict[str, str] = {"Invoiced": "awardable", "Delivered": "awardable", "Canceled": "cancelled"}
RETURN_STATUS_DEFAULTS: dict[str, str] = {"Received": "effective", "Invoiced": "effective", "Canceled": "cancelled"}

DEFAULT_EVENTS: dict[str, dict[str, str]] = {
    "SalesInvoicePostedBusinessEvent": {"company": "LegalEntity", "order": "SalesOrderId"},
}
"""Business events that announce a changed order: the documented "Invoice is created from a sales order"
event and its payload fields (``docs/vendor-facts.md``). A return order's invoice (a credit note) raises it
too, with the return order's number."""


@dataclass(frozen=True)
class FoConnection:
    tenant_id: str
    connection_id: str
    env_url: str
    authority: str
    client_id: str
    client_secret: str = field(repr=False)
    events_secret: str | None = field(repr=False)
    ca_bundle: str | None
    field_map: dict[str, str | None]
    explicit_fields: frozenset[str]
    entity_sets: dict[str, str]
    streams: tuple[str, ...]
    companies: tuple[str, ...] | None
    page_size: int
    poll_interval_s: float
    overlap_s: float
    scan_interval_s: float
    batch_size: int
    concurrency: int
    events_enabled: bool
    events_max_age_s: float
    events: dict[str, dict[str, str]]
    settings: Mapping[str, Any]

    @property
    def data_url(self) -> str:
        return f"{self.env_url}/data/"

    @property
    def scope(self) -> str:
        return f"{self.env_url}/.default"

    @property
    def token_url(self) -> str:
        return f"{self.authority}/oauth2/v2.0/token"

    def f(self, name: str) -> str:
        """The environment's field for mapping ``name`` (KeyError when it maps to nothing)."""
        v = self.field_map.get(name)
        if not v:
            raise KeyError(name)
        return v


def _number(cid: str, s: Mapping[str, Any], name: str, default: float, lo: float, hi: float, what: str) -> float:
    raw = s.get(name, default)
    try:
        v = float(raw)
    except (TypeError, ValueError):
        v = lo - 1
    if not lo <= v <= hi:
        raise SettingError(cid, f"settings.{name}", f"is {raw!r}", what)
    return v


def parse_connection(conn: Connection) -> FoConnection:
    """Validate a ``dynamics-fo`` connection; a ConfigError names the setting to fix and what to put."""
    s: Mapping[str, Any] = conn.settings or {}
    c = conn.credentials or {}
    cid = conn.connection_id
    for k in ("tenant_id", "client_id", "client_secret"):
        if not c.get(k):
            raise SettingError(cid, f"credentials.{k}", "is missing",
                               "the app registration's tenant_id, client_id and client_secret in --credentials")
    env_url = str(s.get("env_url") or conn.endpoint or "").rstrip("/")
    if env_url.endswith("/data"):
        env_url = env_url[: -len("/data")]
    check_endpoint(env_url, kinds=["dynamics-fo"], setting="endpoint (the environment URL)")
    authority = str(s.get("authority") or f"https://login.microsoftonline.com/{c['tenant_id']}").rstrip("/")
    check_endpoint(authority, kinds=["entra"], setting="settings.authority")
    given = s.get("field_map") or {}
    if not isinstance(given, Mapping):
        raise SettingError(cid, "settings.field_map", "is not an object", '{"status": "<field>", ...}')
    unknown = sorted(set(given) - set(FIELD_DEFAULTS))
    if unknown:
        raise SettingError(cid, "settings.field_map", f"names unknown mappings {unknown}",
                           f"some of {', '.join(sorted(FIELD_DEFAULTS))}")
    fmap = dict(FIELD_DEFAULTS)
    for k, v in given.items():
        fmap[str(k)] = None if v in (None, "") else str(v)
    sets = dict(ENTITY_SETS)
    for k, v in (s.get("entity_sets") or {}).items():
        if k not in ENTITY_SETS:
            raise SettingError(cid, "settings.entity_sets", f"names unknown {k!r}", f"some of {', '.join(ENTITY_SETS)}")
        sets[k] = str(v)
    streams = tuple(s.get("streams") or STREAMS)
    bad = [x for x in streams if x not in STREAMS]
    if bad:
        raise SettingError(cid, "settings.streams", f"names unknown streams {bad}", f"some of {', '.join(STREAMS)}")
    for table, allowed in (("status_lifecycle", ("pending", "awardable", "cancelled")),
                           ("return_status_lifecycle", ("pending", "effective", "cancelled"))):
        for k, v in (s.get(table) or {}).items():
            if v not in allowed:
                raise SettingError(cid, f"settings.{table}.{k}", f"is {v!r}", " or ".join(allowed))
    companies = s.get("companies")
    be = s.get("business_events") or {}
    enabled = bool(be.get("enabled", False))
    if enabled and not c.get("business_events_secret"):
        raise SettingError(cid, "credentials.business_events_secret", "is missing while business_events.enabled",
                           "a long random secret; register the endpoint URL with ?code=<secret> in the environment")
    events = dict(DEFAULT_EVENTS)
    for k, v in (be.get("events") or {}).items():
        if not isinstance(v, Mapping) or not v.get("company") or not v.get("order"):
            raise SettingError(cid, f"settings.business_events.events.{k}", "lacks company/order",
                               '{"company": "<payload field>", "order": "<payload field>"}')
        events[str(k)] = {"company": str(v["company"]), "order": str(v["order"])}
    return FoConnection(
        tenant_id=conn.tenant_id,
        connection_id=cid,
        env_url=env_url,
        authority=authority,
        client_id=str(c["client_id"]),
        client_secret=str(c["client_secret"]),
        events_secret=str(c["business_events_secret"]) if c.get("business_events_secret") else None,
        ca_bundle=str(s["ca_bundle"]) if s.get("ca_bundle") else None,
        field_map=fmap,
        explicit_fields=frozenset(str(k) for k in given),
        entity_sets=sets,
        streams=streams,
        companies=tuple(str(x).lower() for x in companies) if companies else None,
        page_size=int(_number(cid, s, "page_size", 5000, 1, 10_000, "a whole number 1..10000 (the service's "
                                                                     "largest page)")),
        poll_interval_s=_number(cid, s, "poll_interval_s", 60, 0.05, 86_400, "seconds between cycles (0.05..86400)"),
        overlap_s=_number(cid, s, "overlap_s", 300, 0, 86_400, "seconds (0..86400)"),
        scan_interval_s=_number(cid, s, "scan_interval_s", 3600, 0, 7 * 86_400, "seconds (0..604800)"),
        batch_size=int(_number(cid, s, "batch_size", 25, 1, 100, "orders per lines request (1..100)")),
        concurrency=int(_number(cid, s, "concurrency", 4, 1, 32, "requests in flight (1..32)")),
        events_enabled=enabled,
        events_max_age_s=_number(cid, be, "max_age_s", 86_400, 1, 30 * 86_400, "seconds (1..2592000)"),
        events=events,
        settings=s,
    )
