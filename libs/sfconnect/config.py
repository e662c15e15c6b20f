"""Parse a ``salesforce`` connection row into a typed configuration (see the package docstring)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from servicekit.connections import Connection
from servicekit.errors import ConfigError

__all__ = ["CDC_SUBSCRIBED", "DEFAULT_OBJECTS", "DEFAULT_STATUS_MAP", "DEFAULT_SUMMARY_STATUS_MAP", "FIELDS",
           "SfConnection", "parse_connection"]

Mode = Literal["order", "order_management", "order_summary"]

CDC_SUBSCRIBED = "cdc:subscribed"
"""Cursor entity the CDC listener writes once its first subscription succeeded; the poller's backfill waits
for it (nothing between snapshot and stream is lost)."""

DEFAULT_OBJECTS: dict[str, tuple[str, ...]] = {
    "order": ("Account", "Contact", "Product2", "PricebookEntry", "Order", "OrderItem", "ReturnOrderLineItem"),
    "order_management": (
        "Account", "Contact", "Product2", "PricebookEntry", "Order", "OrderItem", "OrderItemSummary", "CreditMemo",
    ),
    "order_summary": (
        "Account", "Contact", "Product2", "PricebookEntry", "OrderSummary", "OrderItem", "OrderItemSummary",
        "CreditMemo",
    ),
}
"""Objects synced by mode. ``ReturnOrder`` headers carry no amounts: their lines are read with
``ReturnOrder.*`` parent fields instead. ``OrderSummary`` can be added but maps to nothing (its totals are net
of cancels and returns; see ``normalizer.mappers.salesforce``)."""

DEFAULT_STATUS_MAP: dict[str, str] = {
    "Draft": "pending", "Activated": "pending", "Fulfilled": "awardable", "Cancelled": "cancelled",
    "Canceled": "cancelled",
}

DEFAULT_SUMMARY_STATUS_MAP: dict[str, str] = {
    "Created": "pending", "Approved": "pending", "Waiting to Fulfill": "pending", "Fulfilled": "awardable",
    "Canceled": "cancelled", "Cancelled": "cancelled",
}
"""OrderSummary.Status -> lifecycle in ``order_summary`` mode. OrderSummary.Status has no status category and
its values are org-defined (docs/vendor-facts.md, Salesforce: only ``Created`` is documented): UNCONFIRMED
defaults, overridden per connection by ``settings.summary_status_map``."""

_SYSTEM = ("Id", "IsDeleted", "SystemModstamp", "LastModifiedDate")

FIELDS: dict[str, tuple[str, ...]] = {
    "Account": (*_SYSTEM, "Name", "FirstName", "LastName", "AccountNumber", "IsPersonAccount", "PersonEmail",
                "PersonContactId", "PersonHasOptedOutOfEmail", "CurrencyIsoCode"),
    "Contact": (*_SYSTEM, "Name", "FirstName", "LastName", "Email", "AccountId", "IsPersonAccount",
                "HasOptedOutOfEmail"),
    "Product2": (*_SYSTEM, "Name", "ProductCode", "StockKeepingUnit", "Family", "IsActive"),
    "PricebookEntry": (*_SYSTEM, "Pricebook2Id", "Product2Id", "UnitPrice", "IsActive", "CurrencyIsoCode",
                       "ProductCode", "Pricebook2.IsStandard", "Product2.Name", "Product2.StockKeepingUnit",
                       "Product2.ProductCode", "Product2.Family", "Product2.IsActive"),
    "Order": (*_SYSTEM, "OrderNumber", "AccountId", "Status", "StatusCode", "EffectiveDate", "ActivatedDate",
              "TotalAmount", "CurrencyIsoCode", "BillToContactId", "IsReductionOrder", "OriginalOrderId",
              "Account.PersonEmail", "Account.IsPersonAccount", "BillToContact.Email", "CreatedDate"),
    "OrderItem": (*_SYSTEM, "OrderId", "Product2Id", "Quantity", "UnitPrice", "TotalPrice", "OriginalOrderItemId",
                  "OrderItemNumber", "Product2.StockKeepingUnit", "Description", "CurrencyIsoCode"),
    "ReturnOrder": (*_SYSTEM, "ReturnOrderNumber", "AccountId", "OrderId", "OrderSummaryId", "Status",
                    "CurrencyIsoCode"),
    "ReturnOrderLineItem": (*_SYSTEM, "ReturnOrderId", "OrderItemId", "Product2Id", "QuantityExpected",
                            "QuantityReceived", "QuantityReturned", "TotalPrice", "CurrencyIsoCode",
                            "ReturnOrder.OrderId", "ReturnOrder.AccountId", "ReturnOrder.Status",
                            "ReturnOrder.ReturnOrderNumber", "OrderItem.UnitPrice"),
    "OrderSummary": (*_SYSTEM, "OrderNumber", "AccountId", "Status", "OriginalOrderId", "GrandTotalAmount",
                     "TotalAdjustedProductAmount", "TotalAdjustedProductTaxAmount", "BillingEmailAddress",
                     "CurrencyIsoCode", "OrderedDate", "Account.IsPersonAccount", "Account.PersonEmail",
                     "OriginalOrder.TotalAmount", "OriginalOrder.OrderNumber"),
    "OrderItemSummary": (*_SYSTEM, "OrderSummaryId", "OriginalOrderItemId", "Product2Id", "Quantity",
                         "QuantityOrdered", "QuantityCanceled", "QuantityReturned", "UnitPrice",
                         "AdjustedLineAmount", "CurrencyIsoCode", "OrderSummary.OriginalOrderId",
                         "OrderSummary.AccountId", "OrderSummary.OrderNumber"),
    "CreditMemo": (*_SYSTEM, "DocumentNumber", "BillingAccountId", "TotalAmount", "TotalTaxAmount",
                   "TotalAmountWithTax", "ReferenceEntityId", "Status", "CurrencyIsoCode", "CreditDate"),
}
"""SOQL select list per object (REST and Bulk). Parent fields (``ReturnOrder.OrderId``) anchor order-scoped
records to their order without a second call; REST nests them, Bulk CSV names the column ``A.B``."""

ORDER_PARENT: dict[str, str] = {
    "Order": "OriginalOrderId|Id",
    "OrderItem": "OrderId",
    "ReturnOrder": "OrderId",
    "ReturnOrderLineItem": "ReturnOrder.OrderId",
    "OrderSummary": "OriginalOrderId",
    "OrderItemSummary": "OrderSummary.OriginalOrderId",
    "CreditMemo": "ReferenceEntityId",
}
"""Where the order a record belongs to is found (first non-empty of ``a|b``), for the Kafka key."""


@dataclass(frozen=True)
class Quota:
    run_share: float = 0.25
    org_share: float = 0.8
    pause_s: float = 300.0
    """How long a run pauses when a share is reached before trying again."""
    limit_backoff_s: float = 60.0
    """First wait after REQUEST_LIMIT_EXCEEDED (doubling, capped at 16x); Salesforce sends no Retry-After."""


@dataclass(frozen=True)
class SfConnection:
    tenant_id: str
    connection_id: str
    my_domain: str
    client_id: str = field(repr=False)
    client_secret: str = field(repr=False)
    api_version: str = "66.0"
    ca_bundle: str | None = None
    objects: tuple[str, ...] = DEFAULT_OBJECTS["order"]
    mode: Mode = "order"
    status_map: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_STATUS_MAP))
    external_id_field: str = "AccountNumber"
    own_id_fields: dict[str, str] = field(default_factory=lambda: {"Account": "AccountNumber"})
    """Object -> the field holding the tenant's own customer id (``settings.external_id_field``: a field name
    for Accounts, or ``{"Account": .., "Contact": ..}``); selected in every SOQL of that object."""
    bulk_threshold: int = 2000
    bulk_max_records: int = 50_000
    bulk_timeout_s: float = 900.0
    bulk_poll_s: float = 2.0
    page_size: int = 2000
    poll_interval_s: float = 30.0
    overlap_s: float = 60.0
    """How far behind its cursor the incremental query re-reads, for rows of long transactions that
    commit after the cursor passed their SystemModstamp (0: off)."""
    cdc: bool = True
    cdc_channels: tuple[str, ...] = ()
    reconcile_interval_s: float = 3600.0
    quota: Quota = field(default_factory=Quota)
    raw_settings: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def data_path(self) -> str:
        return f"/services/data/v{self.api_version}"

    def own_ids(self, obj: str) -> tuple[str, ...]:
        f = self.own_id_fields.get(obj)
        return (f,) if f else ()


def _float(settings: dict[str, Any], key: str, default: float, *, lo: float = 0.0) -> float:
    v = settings.get(key, default)
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"settings.{key} must be a number, got {v!r}") from None
    if f < lo:
        raise ConfigError(f"settings.{key} must be >= {lo}, got {f}")
    return f


def parse_connection(conn: Connection) -> SfConnection:
    """Validate a connection; every ConfigError says what to fix."""
    s = dict(conn.settings or {})
    creds = conn.credentials or {}
    if not creds.get("client_id") or not creds.get("client_secret"):
        raise ConfigError("credentials need client_id and client_secret of the External Client App "
                          "(client credentials flow enabled, Run As user with the api scope)")
    endpoint = (s.get("my_domain") or conn.endpoint or "").rstrip("/")
    if not endpoint.startswith("https://"):
        raise ConfigError(f"endpoint must be the org's My Domain URL (https://<mydomain>.my.salesforce.com), "
                          f"got {endpoint!r}")
    host = endpoint.split("://", 1)[1].split("/", 1)[0].split(":", 1)[0].lower()
    if host in ("login.salesforce.com", "test.salesforce.com"):
        raise ConfigError("use the org's My Domain URL (https://<mydomain>.my.salesforce.com), not "
                          f"{host}: the client credentials grant is rejected there")
    mode = s.get("mode", "order")
    if mode not in ("order", "order_management", "order_summary"):
        raise ConfigError(f"settings.mode must be 'order', 'order_management' or 'order_summary', got {mode!r}")
    summary_map = {**DEFAULT_SUMMARY_STATUS_MAP, **dict(s.get("summary_status_map") or {})}
    bad_summary = {k: v for k, v in summary_map.items() if v not in ("pending", "awardable", "cancelled")}
    if bad_summary:
        raise ConfigError(f"settings.summary_status_map values must be pending|awardable|cancelled, got {bad_summary}")
    objects = tuple(s.get("objects") or DEFAULT_OBJECTS[mode])
    unknown = [o for o in objects if o not in FIELDS]
    if unknown:
        raise ConfigError(f"settings.objects: unsupported object(s) {unknown}; supported: {sorted(FIELDS)}")
    status_map = {**DEFAULT_STATUS_MAP, **dict(s.get("status_map") or {})}
    bad = {k: v for k, v in status_map.items() if v not in ("pending", "awardable", "cancelled")}
    if bad:
        raise ConfigError(f"settings.status_map values must be pending|awardable|cancelled, got {bad}")
    q = dict(s.get("quota") or {})
    quota = Quota(
        run_share=_float(q, "run_share", 0.25), org_share=_float(q, "org_share", 0.8),
        pause_s=_float(q, "pause_s", 300.0), limit_backoff_s=_float(q, "limit_backoff_s", 60.0),
    )
    if not (0 < quota.run_share <= 1 and 0 < quota.org_share <= 1):
        raise ConfigError("settings.quota.run_share and org_share are fractions in (0, 1]")
    ext = s.get("external_id_field", "AccountNumber")
    if isinstance(ext, dict):
        own = {str(k): str(v) for k, v in ext.items() if v}
    elif isinstance(ext, str):
        own = {"Account": ext} if ext else {}
    else:
        raise ConfigError(f"settings.external_id_field must be a field name (Accounts) or "
                          f"{{\"Account\": .., \"Contact\": ..}}, got {ext!r}")
    bad_own = [f for f in own.values() if not f.replace("_", "").isalnum()]
    if bad_own:
        raise ConfigError(f"settings.external_id_field names invalid field(s) {bad_own}: use API names such as "
                          "AccountNumber or Loyalty_Id__c")
    version = str(s.get("instance_version") or s.get("api_version") or "66.0").lstrip("v")
    return SfConnection(
        tenant_id=conn.tenant_id, connection_id=conn.connection_id, my_domain=endpoint,
        client_id=creds["client_id"], client_secret=creds["client_secret"], api_version=version,
        ca_bundle=s.get("ca_bundle"), objects=objects, mode=mode, status_map=status_map,
        external_id_field=str(own.get("Account") or ""), own_id_fields=own,
        bulk_threshold=int(s.get("bulk_threshold", 2000)),
        bulk_max_records=int(s.get("bulk_max_records", 50_000)),
        bulk_timeout_s=_float(s, "bulk_timeout_s", 900.0), bulk_poll_s=_float(s, "bulk_poll_s", 2.0),
        page_size=max(200, min(2000, int(s.get("page_size", 2000)))),
        poll_interval_s=_float(s, "poll_interval_s", 30.0), overlap_s=_float(s, "overlap_s", 60.0),
        cdc=bool(s.get("cdc", True)),
        reconcile_interval_s=_float(s, "reconcile_interval_s", 3600.0),
        quota=quota, raw_settings=s,
    )
