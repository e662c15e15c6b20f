"""Table tests of the Dataverse mapper on recorded payloads (tests/fixtures/dataverse)."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from canonical.events import (
    CustomerDeleted,
    CustomerUpserted,
    OrderDeleted,
    OrderLineDeleted,
    OrderLineUpserted,
    OrderUpserted,
    ProductUpserted,
    RawRecord,
    ReturnUpserted,
)
from canonical.topics import CANONICAL_CUSTOMER, CANONICAL_ORDER, CANONICAL_PRODUCT, CANONICAL_RETURN
from normalizer.cli import main as cli_main
from normalizer.mappers import mapper_for, sources_with_mappers
from normalizer.mappers.dynamics_ce import CURRENCY_ANNOTATION, lifecycle, map_record

FIX = Path(__file__).parents[1] / "fixtures" / "dataverse"
CUR = {
    r["transactioncurrencyid"]: r["isocurrencycode"]
    for r in json.loads((FIX / "transactioncurrencies.json").read_text())["value"]
}


def _rows(name: str) -> list[str]:
    """Rows of a recorded page as their exact texts."""
    text = (FIX / name).read_text()
    dec = json.JSONDecoder()
    i = text.index("[", text.index('"value"')) + 1
    out: list[str] = []
    while True:
        while text[i] in " ,\n":
            i += 1
        if text[i] == "]":
            return out
        _, end = dec.raw_decode(text, i)
        out.append(text[i:end])
        i = end


def _annotate(text: str) -> str:
    cur = json.loads(text).get("_transactioncurrencyid_value")
    return text if not cur else '{"' + CURRENCY_ANNOTATION + f'":"{CUR[cur]}",' + text[1:]


def _raw(
    entity: str, payload: str, *, op: str = "upsert", order: str | None = None, sid: str | None = None
) -> RawRecord:
    rec = json.loads(payload) if sid is None else {}
    return RawRecord(tenant_id="acme", connection_id="ce-1", source="dynamics-ce", entity=entity,
                     source_id=sid or rec.get(f"{entity}id") or rec.get("id"),
                     source_version=str(rec.get("versionnumber", "1")), op=op, payload=payload, order_source_id=order)


ORDERS = {json.loads(t)["statuscode"]: t for t in _rows("salesorders_page.json")}


@pytest.mark.parametrize(
    ("statuscode", "overrides", "expected"),
    [
        (1, None, "pending"),
        (2, None, "pending"),
        (700970000, None, "pending"),          # 2024 "In Progress" under Active: by statecode
        (3, None, "pending"),
        (4, None, "cancelled"),
        (100000002, None, "cancelled"),        # org-defined "Fraud Suspected" under Canceled
        (100001, None, "awardable"),
        (100002, None, "awardable"),
        (100000001, None, "awardable"),        # org-defined "Delivered" under Fulfilled
        (100000001, {"100000001": "pending"}, "pending"),
        (100003, None, "awardable"),
    ],
)
def test_order_lifecycle_from_recorded_orders(statuscode: int, overrides: dict[str, str] | None, expected: str) -> None:
    payload = _annotate(ORDERS[statuscode])
    settings: dict[str, Any] = {"status_overrides": overrides} if overrides else {}
    res = map_record(_raw("salesorder", payload), settings)
    assert not res.dead, res.dead
    [(topic, ev)] = res.events
    assert topic == CANONICAL_ORDER
    assert isinstance(ev, OrderUpserted)
    assert ev.order.lifecycle == expected
    assert ev.order.status == str(statuscode)


def test_order_money_customer_and_currency_exact() -> None:
    for text in ORDERS.values():
        rec = json.loads(text, parse_float=Decimal)
        res = map_record(_raw("salesorder", _annotate(text)), {})
        ev = res.events[0][1]
        assert isinstance(ev, OrderUpserted)
        o = ev.order
        assert isinstance(o.total_amount, Decimal)
        assert o.total_amount == rec["totalamount"]
        assert str(o.total_amount) == text.split('"totalamount":')[1].split(",")[0]   # digits as sent
        assert o.tax_amount == rec["totaltax"] and o.shipping_amount == rec["freightamount"]
        assert o.exchange_rate == rec["exchangerate"]
        assert o.currency == CUR[rec["_transactioncurrencyid_value"]]
        assert o.customer_entity == rec["_customerid_value@Microsoft.Dynamics.CRM.lookuplogicalname"]
        assert o.customer_source_id == rec["_customerid_value"]
        assert o.status_label == rec["statuscode@OData.Community.Display.V1.FormattedValue"]
        assert ev.key == f"acme:{rec['salesorderid']}".encode()
    events = [e for t in ORDERS.values() for _, e in map_record(_raw("salesorder", _annotate(t)), {}).events]
    assert {e.order.currency for e in events if isinstance(e, OrderUpserted)} >= {"USD", "EUR"}


def test_lines_are_keyed_by_their_order_and_net_of_discount() -> None:
    raws = json.loads((FIX / "raw_salesorderdetail.json").read_text())
    for r in raws:
        raw = RawRecord.model_validate(r)
        rec = json.loads(raw.payload, parse_float=Decimal)
        [(topic, ev)] = map_record(raw, {}).events
        assert topic == CANONICAL_ORDER and isinstance(ev, OrderLineUpserted)
        assert ev.order_id == rec["_salesorderid_value"]
        assert ev.key == f"acme:{rec['_salesorderid_value']}".encode()
        assert ev.line.amount == rec["baseamount"] - rec["manualdiscountamount"]
        assert ev.line.quantity == rec["quantity"]


def test_rma_with_products_becomes_a_return_on_the_original_order() -> None:
    for r in json.loads((FIX / "raw_msdyn_rma.json").read_text()):
        raw = RawRecord.model_validate(r)
        rec = json.loads(raw.payload, parse_float=Decimal)
        [(topic, ev)] = map_record(raw, {}).events
        assert topic == CANONICAL_RETURN and isinstance(ev, ReturnUpserted)
        credited = [p for p in rec["msdyn_rmaproducts"] if p["msdyn_credittoaccount"]]
        if len(credited) == len(rec["msdyn_rmaproducts"]):  # documented RMA total: all products including tax
            assert ev.return_.amount == rec["msdyn_totalamount"]
        else:
            assert ev.return_.amount == sum((p["msdyn_totalamount"] for p in credited), Decimal(0))
        assert ev.return_.original_order_number == rec["msdyn_referenceno"]
        assert ev.return_.original_order_source_id == raw.order_source_id
        assert ev.key == f"acme:{raw.order_source_id}".encode()
        assert ev.return_.lifecycle == {690970000: "pending", 690970001: "cancelled", 690970002: "effective"}[
            rec["msdyn_systemstatus"]]
        all_items = map_record(raw, {"return_source": {"credited_only": False}}).events[0][1]
        assert isinstance(all_items, ReturnUpserted)
        assert len(all_items.return_.lines) == len(rec["msdyn_rmaproducts"])


def test_customers_products_with_settings() -> None:
    [acc] = list(_rows("accounts_page.json"))[:1]
    ev = map_record(_raw("account", acc), {}).events[0][1]
    assert isinstance(ev, CustomerUpserted)
    assert ev.customer.kind == "account" and ev.customer.external_id == json.loads(acc)["accountnumber"]
    assert ev.customer.email == json.loads(acc)["emailaddress1"]
    con = _rows("contacts_page.json")[0]
    [(topic, cev)] = map_record(_raw("contact", con), {"external_id_field": {"contact": "emailaddress1"}}).events
    assert topic == CANONICAL_CUSTOMER and isinstance(cev, CustomerUpserted)
    assert cev.customer.kind == "contact" and cev.customer.external_id == json.loads(con)["emailaddress1"]
    prods = [t for t in _rows("products_page.json") if json.loads(t).get("price") is not None]
    [(ptopic, pev)] = map_record(_raw("product", _annotate(prods[0])), {}).events
    assert ptopic == CANONICAL_PRODUCT and isinstance(pev, ProductUpserted)
    assert pev.product.category == json.loads(prods[0])["new_category"] and pev.product.currency == "USD"
    assert pev.product.sku == json.loads(prods[0])["productnumber"]


def test_tombstones_become_deleted_events() -> None:
    delta = _rows("accounts_delta.json")
    tomb = next(t for t in delta if '"reason":"deleted"' in t)
    [(_, ev)] = map_record(_raw("account", tomb, op="delete"), {}).events
    assert isinstance(ev, CustomerDeleted) and ev.source_id == json.loads(tomb)["id"]
    [(_, oev)] = map_record(_raw("salesorder", tomb, op="delete"), {}).events
    assert isinstance(oev, OrderDeleted)
    [(_, lev)] = map_record(_raw("salesorderdetail", tomb, op="delete", order="order-1"), {}).events
    assert isinstance(lev, OrderLineDeleted) and lev.order_id == "order-1" and lev.key == b"acme:order-1"


@pytest.mark.parametrize(
    ("mutate", "entity", "settings", "reason"),
    [
        (lambda r: r.pop("_customerid_value@Microsoft.Dynamics.CRM.lookuplogicalname"), "salesorder", {},
         "lookuplogicalname"),
        (lambda r: r.pop(CURRENCY_ANNOTATION), "salesorder", {}, "settings.currencies"),
        (lambda r: r.update(statecode=9), "salesorder", {}, "status_overrides"),
        (lambda r: r.update(totalamount=None), "salesorder", {}, "totalamount is missing"),
        (lambda r: r.update(totalamount="12,5"), "salesorder", {}, "not an amount"),
        (lambda r: None, "salesorder", {"status_overrides": {"100001": "gold"}}, "use one of"),
        (lambda r: None, "invoice", {}, "has no mapping"),
    ],
)
def test_unmappable_records_say_what_to_fix(mutate: Any, entity: str, settings: dict[str, Any], reason: str) -> None:
    rec = json.loads(_annotate(ORDERS[100001]))
    mutate(rec)
    res = map_record(_raw(entity, json.dumps(rec), sid="x"), settings)
    assert not res.events
    assert reason in res.dead[0], res.dead


def test_currency_fallback_from_settings_and_bad_json() -> None:
    text = ORDERS[100003]
    cur = json.loads(text)["_transactioncurrencyid_value"]
    res = map_record(_raw("salesorder", text), {"currencies": {cur: "GBP"}})
    ev = res.events[0][1]
    assert isinstance(ev, OrderUpserted) and ev.order.currency == "GBP"
    bad = map_record(_raw("salesorder", '{"salesorderid":"x"', sid="x"), {})
    assert "not JSON" in bad.dead[0]


def test_custom_return_source_by_field_mapping() -> None:
    settings = {"return_source": {"kind": "custom", "entity_set": "new_returns", "entity": "new_return",
                                  "fields": {"id": "new_returnid", "number": "new_name",
                                             "order_number": "new_ordernumber", "amount": "new_amount",
                                             "status": "statuscode"},
                                  "effective_statuses": [2], "cancelled_statuses": [3]}}
    payload = json.dumps({"new_returnid": "r1", "new_name": "RET-1", "new_ordernumber": "ORD-1", "statuscode": 2,
                          CURRENCY_ANNOTATION: "EUR", "_transactioncurrencyid_value": "c"}).replace(
        '"statuscode"', '"new_amount": 12.3400, "statuscode"')
    [(topic, ev)] = map_record(_raw("new_return", payload, sid="r1"), settings).events
    assert topic == CANONICAL_RETURN and isinstance(ev, ReturnUpserted)
    assert ev.return_.amount == Decimal("12.3400") and ev.return_.lifecycle == "effective"
    assert ev.return_.original_order_number == "ORD-1"


def test_lifecycle_rules_and_dispatch() -> None:
    assert lifecycle(3, 123456789) == "awardable"
    assert lifecycle(0, 100000001, {"100000001": "awardable"}) == "awardable"
    assert mapper_for("dynamics-ce") is not None
    assert "dynamics-ce" in sources_with_mappers()


def test_event_ids_are_stable_for_the_same_record() -> None:
    raw = _raw("salesorder", _annotate(ORDERS[100001]))
    a = map_record(raw, {}).events[0][1]
    b = map_record(raw.model_copy(), {}).events[0][1]
    assert a.event_id == b.event_id


def test_cli_prints_events_and_dead_letters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["normalize", str(FIX / "salesorders_page.json"), "--source", "dynamics-ce", "--entity",
                     "salesorder", "--settings", json.dumps({"currencies": CUR})]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == len(_rows("salesorders_page.json"))
    assert all(x["topic"] == CANONICAL_ORDER for x in lines)
    raw_file = tmp_path / "rma.json"
    raw_file.write_text(json.dumps(json.loads((FIX / "raw_msdyn_rma.json").read_text())[0]))
    assert cli_main(["normalize", str(raw_file)]) == 0
    assert json.loads(capsys.readouterr().out)["event"]["event_type"] == "return.upserted"
    assert cli_main(["normalize", str(FIX / "salesorders_page.json"), "--entity", "salesorder"]) == 1
    assert "settings.currencies" in capsys.readouterr().out
