"""Table tests on payloads written from Microsoft's documentation (``tests/fixtures/vendor-docs/dynamics-ce``).

Each fixture names the document it follows. Responses go through the CE poller's record handling (the
annotations it asks for in ``Prefer``, its page links, its tombstones) and then the CE mapper. A real
Dataverse only returns the annotations a request asks for, so :func:`as_served` drops every annotation the
poller's ``Prefer: odata.include-annotations`` did not name before the poller sees the page.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from canonical.events import OrderUpserted, RawRecord, ReturnUpserted
from ce_poller.client import DataverseClient, Page, RecordNotFound, StaticTokenSource, classify_response, iter_values
from ce_poller.config import parse_connection
from ce_poller.limiter import UserBudget
from ce_poller.stores import FakeKnownKeys
from ce_poller.streams import ConnectionSync, EntityResult
from normalizer.mappers.dynamics_ce import map_record
from servicekit.connections import Connection, FakeCursorStore
from servicekit.errors import ConfigError
from servicekit.kafka import OutMessage
from servicekit.settings import FlashSettings

pytestmark = pytest.mark.unit

DOCS = Path(__file__).parents[1] / "fixtures" / "vendor-docs" / "dynamics-ce"
USD = "228f42f8-e646-e111-8eb7-78e7d162ced1"


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DOCS / name).read_text(encoding="utf-8"), parse_float=Decimal)
    assert data["source"], f"{name} names no source"
    return data


def as_served(body: dict[str, Any], prefer: str) -> str:
    """The body as Dataverse would send it for ``prefer``: only the requested instance annotations."""
    m = re.search(r'odata\.include-annotations="([^"]*)"', prefer)
    terms = [t.strip() for t in m.group(1).split(",")] if m else []

    def keep(key: str) -> bool:
        if "@" not in key or key.startswith("@odata"):
            return True
        term = key.split("@", 1)[1]
        return "*" in terms or term in terms

    def clean(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items() if keep(k)}
        if isinstance(obj, list):
            return [clean(x) for x in obj]
        return obj

    return json.dumps(clean(body), default=str)


class Publisher:
    def __init__(self) -> None:
        self.messages: list[OutMessage] = []

    async def send_all(self, messages: Sequence[OutMessage]) -> None:
        self.messages += messages


def make_sync(entities: list[str]) -> tuple[ConnectionSync, Publisher]:
    conn = Connection("acme", "ce-docs", "dynamics-ce", "https://contoso.example",
                      {"tenant_id": "t", "client_id": "c", "client_secret": "s"},
                      {"entities": entities, "return_source": {"kind": "none"}})
    cc = parse_connection(conn)
    http = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(500)))
    client = DataverseClient(http, cc.api, StaticTokenSource("t"), UserBudget(), max_attempts=1)
    pub = Publisher()
    sync = ConnectionSync(cc, client, pub, FakeCursorStore(), FakeKnownKeys(), FlashSettings())
    sync.currencies = {USD: "USD"}
    return sync, pub


async def through_poller(entity: str, body: dict[str, Any]) -> list[RawRecord]:
    """One documented response page through the poller's record handling, as its own request would get it."""
    sync, pub = make_sync([entity])
    prefer = f"odata.maxpagesize=5000,{sync._ann()}"
    text = as_served(body, prefer)
    page = Page("https://contoso.example/api/data/v9.2/x", text,
                None, None, {})
    await sync._publish_page(sync.conn.spec(entity), page, 1, EntityResult(entity))
    return [RawRecord.model_validate_json(m.value) for m in pub.messages]


# --------------------------------------------------------------------------------------------- orders

ORDERS = [
    # fixture, lifecycle, status, status_label, customer kind, total, tax, shipping, discount
    ("salesorder-fulfilled-complete.json", "awardable", "100001", "Complete", "account", "130.99", "21", "9.99", "0"),
    ("salesorder-invoiced.json", "awardable", "100003", "Invoiced", "contact", "99", "9", "0", "0"),
    ("salesorder-canceled-no-money.json", "cancelled", "4", "No Money", "account", "55", "5", "0", "0"),
    ("salesorder-submitted-in-progress.json", "pending", "3", "In Progress", "account", "110", "10", "0", "10"),
    ("salesorder-active-org-defined-reason.json", "pending", "700970000", "In Progress", "account", "20", "0", "0",
     "0"),
]


@pytest.mark.parametrize(("name", "life", "status", "label", "kind", "total", "tax", "ship", "disc"), ORDERS)
async def test_documented_orders_through_poller_and_mapper(name: str, life: str, status: str, label: str, kind: str,
                                                         total: str, tax: str, ship: str, disc: str) -> None:
    body = fixture(name)["response"]["body"]
    [raw] = await through_poller("salesorder", body)
    assert raw.source_id == body["value"][0]["salesorderid"] and raw.op == "upsert"
    res = map_record(raw, {})
    assert not res.dead, res.dead
    [(_, ev)] = res.events
    assert isinstance(ev, OrderUpserted)
    o = ev.order
    assert (o.lifecycle, o.status, o.status_label, o.customer_entity) == (life, status, label, kind)
    assert (o.total_amount, o.tax_amount, o.shipping_amount, o.discount_amount) == (
        Decimal(total), Decimal(tax), Decimal(ship), Decimal(disc))
    assert o.currency == "USD" and o.order_number == body["value"][0]["ordernumber"]


def test_poller_asks_for_the_annotations_the_mapper_reads() -> None:
    sync, _ = make_sync(["salesorder"])
    assert "OData.Community.Display.V1.FormattedValue" in sync._ann()
    assert "Microsoft.Dynamics.CRM.lookuplogicalname" in sync._ann()


# --------------------------------------------------------------------------------------------- returns

RETURNS = [
    # fixture, settings, lifecycle, amount, lines
    ("msdyn_rma-products-received.json", {}, "effective", "121", 2),
    ("msdyn_rma-canceled.json", {}, "cancelled", "60.5", 1),
    ("msdyn_rma-pending.json", {}, "pending", "60.5", 1),
    ("msdyn_rma-partly-credited.json", {}, "effective", "60.5", 1),
    ("msdyn_rma-partly-credited.json", {"return_source": {"credited_only": False}}, "effective", "121", 2),
]


@pytest.mark.parametrize(("name", "settings", "life", "amount", "lines"), RETURNS)
def test_documented_returns_through_mapper(name: str, settings: dict[str, Any], life: str, amount: str,
                                           lines: int) -> None:
    row = fixture(name)["payload"]
    raw = RawRecord(tenant_id="acme", connection_id="ce-docs", source="dynamics-ce", entity="msdyn_rma",
                    source_id=row["msdyn_rmaid"], source_version=str(row["versionnumber"]),
                    payload=json.dumps(row, default=str), order_source_id="7a1d1c35-70c2-ee11-9079-000d3a341d5e")
    res = map_record(raw, {"currencies": {USD: "USD"}, **settings})
    assert not res.dead, res.dead
    [(_, ev)] = res.events
    assert isinstance(ev, ReturnUpserted)
    r = ev.return_
    assert (r.lifecycle, r.amount, len(r.lines)) == (life, Decimal(amount), lines)
    assert r.original_order_number == row["msdyn_referenceno"]
    assert r.customer_source_id == row["_msdyn_serviceaccount_value"]


# ------------------------------------------------------------------------------------ paging and tracking


def test_documented_next_links_are_followed_unchanged() -> None:
    for name in ("contacts-page-1.json", "contacts-page-2.json"):
        body = fixture(name)["response"]["body"]
        text = json.dumps(body)
        page = Page("u", text, None, None, {})
        from ce_poller.client import _link

        assert _link("next", text) == body["@odata.nextLink"]
        assert [o["contactid"] for _, o in iter_values(page.text)] == [r["contactid"] for r in body["value"]]
    assert fixture("contacts-page-2.json")["request"]["url"] == fixture("contacts-page-1.json")["response"]["body"][
        "@odata.nextLink"]


async def test_documented_change_tracking_upserts_and_tombstones() -> None:
    initial = fixture("accounts-track-changes-initial.json")["response"]["body"]
    [up] = await through_poller("account", initial)
    assert (up.op, up.source_id) == ("upsert", "60c4e274-0d87-e711-80e5-00155db19e6d")
    delta = fixture("accounts-delta.json")["response"]["body"]
    raws = await through_poller("account", delta)
    assert [(r.op, r.source_id) for r in raws] == [
        ("upsert", "60c4e274-0d87-e711-80e5-00155db19e6d"), ("delete", "2e451703-c686-e711-80e5-00155db19e6d")]
    from ce_poller.client import _link

    assert _link("delta", json.dumps(initial)) == initial["@odata.deltaLink"]
    assert _link("delta", json.dumps(delta)) == delta["@odata.deltaLink"]


@pytest.mark.parametrize(("name", "error"), [("error-resource-not-found.json", RecordNotFound),
                                             ("error-unknown-property.json", ConfigError)])
def test_documented_errors_are_classified(name: str, error: type[Exception]) -> None:
    resp = fixture(name)["response"]
    err = classify_response(httpx.Response(resp["status"], json=resp["body"]), "GET")
    assert isinstance(err, error)
    assert resp["body"]["error"]["message"] in str(err)
