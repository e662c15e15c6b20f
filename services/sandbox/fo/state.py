"""The F&O simulator's state: tenants and app registrations, environments with their companies and entity
rows, tokens, throttling, and Business Events subscriptions. Plain Python so tests drive it in-process.

Rows are stored under the environment's own field names (its :class:`~sandbox.fo.schema.Variant`), keyed by
their full key tuple. Writers go through :class:`Environment` methods, which keep the documented behaviour:
header totals stay zero with ``AreTotalsCalculated = No`` until :meth:`Environment.calculate_totals`; an
extension modified-date field (when the variant has one named in ``stamp_field``) is stamped on every header
or line change; invoicing an order creates its invoice header and raises ``SalesInvoicePostedBusinessEvent``;
a return's credit note is a negative invoice on the return order's number.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
import secrets
import ssl
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sandbox.fo.schema import ENTITIES, Variant

__all__ = ["AppRegistration", "BusinessEventSubscription", "Environment", "FOState", "Token"]

TWO = Decimal("0.01")


@dataclass
class AppRegistration:
    tenant_id: str
    client_id: str
    client_secret: str


@dataclass
class Token:
    value: str
    tenant_id: str
    client_id: str
    environment: str
    expires_at: float


@dataclass
class BusinessEventSubscription:
    """An HTTPS endpoint (URL as registered, secret included) activated for some business events."""

    url: str
    events: frozenset[str]
    ssl_context: ssl.SSLContext | None = None
    legal_entity: str | None = None


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _iso(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Environment:
    name: str
    tenant_id: str
    companies: tuple[str, ...] = ("usmf",)
    default_company: str = "usmf"
    variant: Variant = field(default_factory=Variant)
    stamp_field: str | None = None
    """An extension DateTimeOffset on the header stamped on every header/line change (a customer extension)."""
    page_size: int = 10_000
    rows: dict[str, dict[tuple[str, ...], dict[str, Any]]] = field(default_factory=dict)
    subscriptions: list[BusinessEventSubscription] = field(default_factory=list)
    control_number: int = 5_637_144_576
    outbox: deque[tuple[BusinessEventSubscription, dict[str, Any]]] = field(default_factory=deque)
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    _lot: int = 0
    _lines_by_order: dict[tuple[str, str], list[tuple[str, ...]]] = field(default_factory=dict)
    _indexes: dict[tuple[str, str], tuple[int, dict[Any, list[dict[str, Any]]]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for es in ENTITIES:
            self.rows.setdefault(es, {})

    # -- field names ---------------------------------------------------------------------------------------

    def f(self, entity_set: str, standard: str) -> str:
        name = self.variant.name(entity_set, standard)
        if name is None:
            raise KeyError(f"{entity_set}.{standard} is absent in environment {self.name}")
        return name

    def _put(self, entity_set: str, standard: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Store a row given standard field names (dropping fields the variant removed)."""
        row: dict[str, Any] = {}
        for k, v in standard.items():
            n = self.variant.name(entity_set, k)
            if n is not None:
                row[n] = v
        row.update(extra or {})
        for ext in self.variant.extensions.get(entity_set, {}):
            row.setdefault(ext, None)
        key = tuple(str(row[k]) for k in self.variant.key(entity_set))
        self.rows[entity_set][key] = row
        return row

    def get(self, entity_set: str, *key: str) -> dict[str, Any] | None:
        """A row by its key values, in the order of the entity's key."""
        return self.rows[entity_set].get(tuple(key))

    def header(self, company: str, number: str) -> dict[str, Any]:
        row = self.rows["SalesOrderHeadersV2"].get((company, number))
        if row is None:
            raise KeyError(f"no order {company}/{number}")
        return row

    def lines_of(self, company: str, number: str) -> list[dict[str, Any]]:
        return [self.rows["SalesOrderLines"][k] for k in self._lines_by_order.get((company, number), ())]

    def index(self, entity_set: str, field_name: str) -> dict[Any, list[dict[str, Any]]]:
        """Rows by the value of a field that never changes once written (an order number on lines, a lot id):
        what the service's own indexes do for ``eq`` lookups. Rows are only ever added, so the index is
        rebuilt when the row count changed."""
        rows = self.rows[entity_set]
        cached = self._indexes.get((entity_set, field_name))
        if cached is None or cached[0] != len(rows):
            idx: dict[Any, list[dict[str, Any]]] = {}
            for r in rows.values():
                idx.setdefault(str(r.get(field_name)).lower(), []).append(r)
            cached = (len(rows), idx)
            self._indexes[(entity_set, field_name)] = cached
        return cached[1]

    def _stamp(self, company: str, number: str) -> None:
        if self.stamp_field:
            self.header(company, number)[self.stamp_field] = _iso(_now())

    # -- writers -------------------------------------------------------------------------------------------

    def add_customer(self, company: str, account: str, name: str, email: str | None, currency: str = "USD") -> None:
        self._put("CustomersV3", {"dataAreaId": company, "CustomerAccount": account, "OrganizationName": name,
                                  "PrimaryContactEmail": email, "SalesCurrencyCode": currency,
                                  "PartyType": "Organization"})

    def add_product(self, company: str, item: str, name: str, price: Decimal, group: str | None) -> None:
        self._put("ReleasedProductsV2", {"dataAreaId": company, "ItemNumber": item, "ProductNumber": item,
                                         "ProductName": name, "ProductGroupId": group, "SalesPrice": price,
                                         "SalesUnitSymbol": "ea", "ProductType": "Item"})

    def create_order(self, company: str, number: str, customer: str, currency: str,
                     lines: list[tuple[str, Decimal, Decimal, Decimal]], *, email: str | None = None,
                     created: dt.datetime | None = None, charges: Decimal = Decimal(0),
                     tax_rate: Decimal = Decimal(0)) -> dict[str, Any]:
        """A new order with ``lines`` of (item, quantity, unit price, line discount); totals not calculated."""
        created = created or _now()
        head = self._put("SalesOrderHeadersV2", {
            "dataAreaId": company, "SalesOrderNumber": number, "SalesOrderStatus": "Backorder",
            "OrderingCustomerAccountNumber": customer, "InvoiceCustomerAccountNumber": customer,
            "CurrencyCode": currency, "Email": email, "CustomersOrderReference": None,
            "OrderCreationDateTime": _iso(created), "OrderTotalAmount": Decimal(0),
            "OrderTotalChargesAmount": Decimal(0), "OrderTotalDiscountAmount": Decimal(0),
            "OrderTotalTaxAmount": Decimal(0), "AreTotalsCalculated": "No",
        })
        head["_charges"], head["_tax_rate"] = charges, tax_rate  # simulator-internal, never served
        for i, (item, qty, price, disc) in enumerate(lines, start=1):
            self.add_line(company, number, item, qty, price, disc, seq=i)
        self._stamp(company, number)
        return head

    def add_line(self, company: str, number: str, item: str, qty: Decimal, price: Decimal,
                 disc: Decimal = Decimal(0), *, seq: int | None = None) -> dict[str, Any]:
        self._lot += 1
        lot = f"{company.upper()}-{self._lot:09d}"
        head = self.header(company, number)
        seq = seq if seq is not None else len(self.lines_of(company, number)) + 1
        row = self._put("SalesOrderLines", {
            "dataAreaId": company, "InventoryLotId": lot, "SalesOrderNumber": number,
            "LineCreationSequenceNumber": seq, "ItemNumber": item, "LineDescription": f"Item {item}",
            "OrderedSalesQuantity": qty, "SalesPrice": price, "LineAmount": (qty * price - disc).quantize(TWO),
            "LineDiscountAmount": disc, "SalesOrderLineStatus": "Backorder",
            "CurrencyCode": head[self.f("SalesOrderHeadersV2", "CurrencyCode")],
        })
        self._lines_by_order.setdefault((company, number), []).append(
            tuple(str(row[k]) for k in self.variant.key("SalesOrderLines")))
        self._uncalculate(company, number)
        return row

    def set_line_quantity(self, company: str, lot: str, qty: Decimal) -> None:
        row = self.rows["SalesOrderLines"][(company, lot)]
        price = Decimal(str(row[self.f("SalesOrderLines", "SalesPrice")]))
        disc = Decimal(str(row[self.f("SalesOrderLines", "LineDiscountAmount")] or 0))
        row[self.f("SalesOrderLines", "OrderedSalesQuantity")] = qty
        row[self.f("SalesOrderLines", "LineAmount")] = (qty * price - disc).quantize(TWO)
        number = row[self.f("SalesOrderLines", "SalesOrderNumber")]
        self._uncalculate(company, number)

    def _uncalculate(self, company: str, number: str) -> None:
        head = self.header(company, number)
        h = "SalesOrderHeadersV2"
        for t in ("OrderTotalAmount", "OrderTotalChargesAmount", "OrderTotalDiscountAmount", "OrderTotalTaxAmount"):
            head[self.f(h, t)] = Decimal(0)
        head[self.f(h, "AreTotalsCalculated")] = "No"
        self._stamp(company, number)

    def net_of_lines(self, company: str, number: str) -> Decimal:
        la = self.f("SalesOrderLines", "LineAmount")
        return sum((Decimal(str(r[la])) for r in self.lines_of(company, number)), Decimal(0))

    def calculate_totals(self, company: str, number: str) -> Decimal:
        """What the Totals form does: header totals from the lines, charges and tax; returns the total."""
        head = self.header(company, number)
        h = "SalesOrderHeadersV2"
        net = self.net_of_lines(company, number)
        charges = Decimal(head.get("_charges", 0))
        tax = ((net + charges) * Decimal(head.get("_tax_rate", 0))).quantize(TWO)
        disc = sum((Decimal(str(r[self.f("SalesOrderLines", "LineDiscountAmount")] or 0))
                    for r in self.lines_of(company, number)), Decimal(0))
        total = (net + charges + tax).quantize(TWO)
        head[self.f(h, "OrderTotalAmount")] = total
        head[self.f(h, "OrderTotalChargesAmount")] = charges
        head[self.f(h, "OrderTotalDiscountAmount")] = disc
        head[self.f(h, "OrderTotalTaxAmount")] = tax
        head[self.f(h, "AreTotalsCalculated")] = "Yes"
        self._stamp(company, number)
        return total

    def set_status(self, company: str, number: str, status: str) -> None:
        head = self.header(company, number)
        head[self.f("SalesOrderHeadersV2", "SalesOrderStatus")] = status
        for line in self.lines_of(company, number):
            line[self.f("SalesOrderLines", "SalesOrderLineStatus")] = status
        self._stamp(company, number)

    def invoice_order(self, company: str, number: str, invoice: str | None = None) -> dict[str, Any]:
        """Post the sales order invoice: totals calculated, status Invoiced, an invoice header, and the
        ``SalesInvoicePostedBusinessEvent`` for subscribed endpoints."""
        total = self.calculate_totals(company, number)
        self.set_status(company, number, "Invoiced")
        head = self.header(company, number)
        invoice = invoice or f"CIV-{number}"
        today = _now()
        inv = self._put("SalesInvoiceHeadersV2", {
            "dataAreaId": company, "InvoiceNumber": invoice, "InvoiceDate": today.date().isoformat(),
            "SalesOrderNumber": number,
            "InvoiceCustomerAccountNumber": head[self.f("SalesOrderHeadersV2", "InvoiceCustomerAccountNumber")],
            "CurrencyCode": head[self.f("SalesOrderHeadersV2", "CurrencyCode")], "TotalInvoiceAmount": total,
            "TotalTaxAmount": head[self.f("SalesOrderHeadersV2", "OrderTotalTaxAmount")],
            "TotalChargeAmount": head[self.f("SalesOrderHeadersV2", "OrderTotalChargesAmount")],
            "TotalDiscountAmount": Decimal(0),
        })
        self.raise_event("SalesInvoicePostedBusinessEvent", company, {
            "InvoiceAccount": inv[self.f("SalesInvoiceHeadersV2", "InvoiceCustomerAccountNumber")],
            "InvoiceId": invoice, "SalesOrderId": number, "InvoiceDate": _iso(today),
            "InvoiceDueDate": _iso(today + dt.timedelta(days=30)),
            "InvoiceAmountInAccountingCurrency": float(total),
            "InvoiceTaxAmount": float(inv[self.f("SalesInvoiceHeadersV2", "TotalTaxAmount")] or 0),
            "LegalEntity": company,
        })
        return inv

    def create_return(self, company: str, rma: str, customer: str, currency: str,
                      lines: list[tuple[str, Decimal]], *, status: str = "Awaiting") -> dict[str, Any]:
        """A return order for ``lines`` of (original InventoryLotId, quantity returned); amounts on lines only."""
        number = f"RET-{rma}"
        head = self._put("ReturnOrderHeaders", {
            "dataAreaId": company, "ReturnOrderNumber": number, "RMANumber": rma, "ReturnOrderStatus": status,
            "CustomerAccountNumber": customer, "CurrencyCode": currency,
        })
        for lot, qty in lines:
            orig = self.rows["SalesOrderLines"][(company, lot)]
            price = Decimal(str(orig[self.f("SalesOrderLines", "SalesPrice")]))
            self._lot += 1
            self._put("ReturnOrderLines", {
                "dataAreaId": company, "ReturningInventoryLotId": f"{company.upper()}-{self._lot:09d}",
                "ReturnOrderNumber": number, "ReturnInventoryLotId": lot,
                "ItemNumber": orig[self.f("SalesOrderLines", "ItemNumber")], "ReturnSalesQuantity": -qty,
                "SalesPrice": price, "LineAmount": (-qty * price).quantize(TWO), "ReturnStatus": status,
            })
        return head

    def set_return_status(self, company: str, number: str, status: str) -> None:
        self.rows["ReturnOrderHeaders"][(company, number)][self.f("ReturnOrderHeaders", "ReturnOrderStatus")] = status
        for r in self.rows["ReturnOrderLines"].values():
            if r["dataAreaId"] == company and r[self.f("ReturnOrderLines", "ReturnOrderNumber")] == number:
                r[self.f("ReturnOrderLines", "ReturnStatus")] = status

    def credit_return(self, company: str, number: str, amount: Decimal | None = None) -> dict[str, Any]:
        """Invoice the return order: a credit note (negative invoice) on the return order's number."""
        head = self.rows["ReturnOrderHeaders"][(company, number)]
        la = self.f("ReturnOrderLines", "LineAmount")
        lines = [r for r in self.rows["ReturnOrderLines"].values()
                 if r["dataAreaId"] == company and r[self.f("ReturnOrderLines", "ReturnOrderNumber")] == number]
        total = amount if amount is not None else sum((Decimal(str(r[la])) for r in lines), Decimal(0))
        self.set_return_status(company, number, "Invoiced")
        return self._put("SalesInvoiceHeadersV2", {
            "dataAreaId": company, "InvoiceNumber": f"CCN-{number}", "InvoiceDate": _now().date().isoformat(),
            "SalesOrderNumber": number,
            "InvoiceCustomerAccountNumber": head[self.f("ReturnOrderHeaders", "CustomerAccountNumber")],
            "CurrencyCode": head[self.f("ReturnOrderHeaders", "CurrencyCode")],
            "TotalInvoiceAmount": -abs(total), "TotalTaxAmount": Decimal(0), "TotalChargeAmount": Decimal(0),
            "TotalDiscountAmount": Decimal(0),
        })

    # -- business events -----------------------------------------------------------------------------------

    def raise_event(self, business_event_id: str, company: str, payload: dict[str, Any]) -> None:
        """Queue the event for every subscription of it; the control number grows with gaps (documented)."""
        self.control_number += self.rng.randint(1, 7)
        now = dt.datetime.now(dt.UTC)
        body = {
            "BusinessEventId": business_event_id,
            "BusinessEventLegalEntity": company,
            "ContextRecordSubject": "",
            "ControlNumber": self.control_number,
            "EventId": str(uuid.uuid4()).upper(),
            "EventTime": f"/Date({int(now.timestamp() * 1000)})/",
            "EventTimeIso8601": now.strftime("%Y-%m-%dT%H:%M:%S.%f0Z"),
            "InitiatingUserAADObjectId": "{00000000-0000-0000-0000-000000000000}",
            "MajorVersion": 0,
            "MinorVersion": 0,
            "ParentContextRecordSubjects": [],
            **payload,
        }
        for sub in self.subscriptions:
            if business_event_id in sub.events and (sub.legal_entity in (None, company)):
                self.outbox.append((sub, body))


class FOState:
    """Tenants, app registrations, environments, tokens, throttling and stats."""

    def __init__(self, *, seed: int = 1) -> None:
        self.rng = random.Random(seed)
        self.tenants: dict[str, dict[str, AppRegistration]] = {}
        self.environments: dict[str, Environment] = {}
        self.tokens: dict[str, Token] = {}
        self.token_lifetime = 3599.0
        self.stats: Counter[str] = Counter()
        self.throttle_next: deque[int] = deque()
        """Retry-After seconds for each of the next requests to answer 429 (resource-based throttling)."""
        self.user_limit: tuple[int, float] | None = None
        """Optional user-based limit: (requests, window seconds) per app registration."""
        self._user_requests: dict[str, deque[float]] = {}
        self.delivery_log: list[tuple[str, int, int]] = []
        """(BusinessEventId, ControlNumber, HTTP status) of each delivery attempt."""

    def add_environment(self, name: str, *, tenant_id: str | None = None, client_id: str | None = None,
                        client_secret: str | None = None, **kw: Any) -> tuple[Environment, AppRegistration]:
        tenant_id = (tenant_id or str(uuid.UUID(int=self.rng.getrandbits(128), version=4))).lower()
        client_id = (client_id or str(uuid.UUID(int=self.rng.getrandbits(128), version=4))).lower()
        app = AppRegistration(tenant_id, client_id, client_secret or secrets.token_urlsafe(30))
        self.tenants.setdefault(tenant_id, {})[client_id] = app
        env = Environment(name=name, tenant_id=tenant_id, **kw)
        self.environments[name] = env
        return env, app

    def issue_token(self, tenant_id: str, client_id: str, environment: str) -> Token:
        tok = Token(secrets.token_urlsafe(48), tenant_id, client_id, environment, time.time() + self.token_lifetime)
        self.tokens[tok.value] = tok
        return tok

    def expire_tokens(self) -> None:
        for t in self.tokens.values():
            t.expires_at = 0.0

    def throttled(self, client_id: str) -> int | None:
        """Retry-After seconds when this request is throttled, else None."""
        if self.throttle_next:
            return self.throttle_next.popleft()
        if self.user_limit:
            n, window = self.user_limit
            q = self._user_requests.setdefault(client_id, deque())
            now = time.monotonic()
            while q and q[0] < now - window:
                q.popleft()
            if len(q) >= n:
                return max(1, int(q[0] + window - now) + 1)
            q.append(now)
        return None

    async def deliver_events(self, *, retries: int = 3, interval_s: float = 1.0) -> int:
        """POST every queued business event to its endpoint, retrying ``retries`` times ``interval_s`` apart
        (the documented defaults), then dropping it to the error log. Returns deliveries that succeeded."""
        import aiohttp  # the app's own client, as for any outbound call of the simulator

        delivered = 0
        async with aiohttp.ClientSession() as session:
            for env in self.environments.values():
                while env.outbox:
                    sub, body = env.outbox.popleft()
                    data = json.dumps(body)
                    for attempt in range(retries + 1):
                        status = 0
                        try:
                            async with session.post(sub.url, data=data, ssl=sub.ssl_context or True,
                                                    headers={"Content-Type": "application/json"}) as resp:
                                status = resp.status
                        except aiohttp.ClientError:
                            status = 0
                        self.delivery_log.append((body["BusinessEventId"], body["ControlNumber"], status))
                        if 200 <= status < 300:
                            delivered += 1
                            break
                        if attempt < retries:
                            await asyncio.sleep(interval_s)
        return delivered
