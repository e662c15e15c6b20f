"""The published event contract (docs/events.md): every event the mappers produce from recorded vendor payloads
validates against its checked-in JSON Schema (jsonschema, not pydantic), ``event_type`` is required and
constant, and money and quantities have one representation whatever the source."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from canonical.envelope import source_sequence
from canonical.events import (
    EVENT_TYPES,
    OrderData,
    OrderLineData,
    OrderLineUpserted,
    OrderUpserted,
    RawRecord,
    decode_event,
    encode,
)
from canonical.schemas import JSON_SCHEMA_DIALECT
from normalizer.mappers import dynamics_ce, salesforce

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DV = ROOT / "tests" / "fixtures" / "dataverse"
SF = ROOT / "tests" / "fixtures" / "salesforce"
SCHEMAS = {p.name.removesuffix(".v1.json"): json.loads(p.read_text()) for p in (ROOT / "schemas/events").glob("*.json")}
VALIDATORS = {t: jsonschema.Draft202012Validator(s) for t, s in SCHEMAS.items()}
MONEY = r"^-?(0|[1-9][0-9]*)\.[0-9]{4}$"


def _dataverse_rows(name: str) -> list[dict[str, Any]]:
    return list(json.loads((DV / name).read_text(), parse_float=Decimal)["value"])


def _dataverse_events() -> list[Any]:
    cur = {r["transactioncurrencyid"]: r["isocurrencycode"] for r in _dataverse_rows("transactioncurrencies.json")}
    raws: list[RawRecord] = []
    for page, entity in (("salesorders_page.json", "salesorder"), ("accounts_page.json", "account"),
                         ("contacts_page.json", "contact"), ("products_page.json", "product")):
        for rec in json.loads((DV / page).read_text())["value"]:
            if c := rec.get("_transactioncurrencyid_value"):
                rec = {dynamics_ce.CURRENCY_ANNOTATION: cur[c], **rec}
            raws.append(RawRecord(
                tenant_id="acme", connection_id="ce-1", source="dynamics-ce", entity=entity,
                source_id=rec[f"{entity}id"], source_version=str(rec.get("versionnumber", "1")),
                payload=json.dumps(rec),
            ))
    for name in ("raw_salesorderdetail.json", "raw_msdyn_rma.json"):
        raws += [RawRecord.model_validate(r) for r in json.loads((DV / name).read_text())]
    out = []
    for raw in raws:
        result = dynamics_ce.map_record(raw, {})
        out += [e for _, e in result.events]
    return out


def _salesforce_events() -> list[Any]:
    records: dict[str, dict[str, list[dict[str, Any]]]] = json.loads((SF / "records.json").read_text())
    out = []
    for mode, objects in records.items():
        for obj, recs in objects.items():
            for rec in recs:
                raw = RawRecord(
                    tenant_id="acme", connection_id="sf1", source="salesforce", entity=obj, source_id=rec["Id"],
                    source_version="2026-11-20T10:00:00.000Z", payload=json.dumps(rec),
                    order_source_id=rec.get("OrderId") or rec.get("ReturnOrder", {}).get("OrderId"),
                )
                result = salesforce.map_record(raw, {"mode": mode, "price_currency": "EUR"})
                out += [e for _, e in result.events]
    return out


DATAVERSE = _dataverse_events()
SALESFORCE = _salesforce_events()


def test_every_schema_names_its_dialect_and_requires_a_constant_event_type() -> None:
    assert set(SCHEMAS) == set(EVENT_TYPES)
    for event_type, schema in SCHEMAS.items():
        assert schema["$schema"] == JSON_SCHEMA_DIALECT
        assert schema["properties"]["event_type"]["const"] == event_type
        assert "event_type" in schema["required"]
        jsonschema.Draft202012Validator.check_schema(schema)


def test_a_body_of_another_type_or_without_its_type_is_invalid() -> None:
    body = json.loads(encode(next(e for e in DATAVERSE if e.event_type == "order.upserted")))
    assert VALIDATORS["order.upserted"].is_valid(body)
    assert not VALIDATORS["order.upserted"].is_valid({**body, "event_type": "order.deleted"})
    assert not VALIDATORS["order.upserted"].is_valid({k: v for k, v in body.items() if k != "event_type"})


@pytest.mark.parametrize("source", ["dynamics-ce", "salesforce"])
def test_every_mapped_event_validates_against_its_published_schema(source: str) -> None:
    events = DATAVERSE if source == "dynamics-ce" else SALESFORCE
    kinds = {e.event_type for e in events}
    assert {"order.upserted", "order.line_upserted", "return.upserted", "customer.upserted"} <= kinds, kinds
    for e in events:
        body = json.loads(encode(e))
        errors = [f"{list(x.absolute_path)}: {x.message}" for x in VALIDATORS[e.event_type].iter_errors(body)]
        assert not errors, (e.event_type, errors)


def _numbers(events: list[Any], event_type: str, path: tuple[str, ...]) -> list[str]:
    out = []
    for e in events:
        if e.event_type == event_type:
            v: Any = json.loads(encode(e))
            for p in path:
                v = v[p]
            out.append(v)
    return out


def test_money_has_four_decimals_and_quantities_no_trailing_zeros_from_every_source() -> None:
    import re

    for events in (DATAVERSE, SALESFORCE):
        totals = _numbers(events, "order.upserted", ("order", "total_amount"))
        amounts = _numbers(events, "order.line_upserted", ("line", "amount"))
        quantities = _numbers(events, "order.line_upserted", ("line", "quantity"))
        returned = _numbers(events, "return.upserted", ("return", "amount"))
        assert totals and amounts and quantities and returned
        assert all(re.match(MONEY, v) for v in totals + amounts + returned), (totals, amounts, returned)
        assert all(not ("." in q and q.endswith("0")) for q in quantities), quantities


@pytest.fixture
def wide_amount_limit() -> Any:
    """The representation of an 18-digit amount, beyond the default plausibility limit (FLASH_MAX_AMOUNT)."""
    from canonical import limits

    before = limits.LIMITS.max_amount
    limits.configure(max_amount=Decimal(10) ** 19)
    yield
    limits.configure(max_amount=before)


@pytest.mark.parametrize(
    ("given", "money", "plain"),
    [
        ("140.0200", "140.0200", "140.02"),     # Dataverse money (precision 4)
        ("980.54", "980.5400", "980.54"),       # Salesforce currency (2 decimals)
        ("7.00000", "7.0000", "7"),             # Dataverse quantity (precision 5)
        ("1.00", "1.0000", "1"),                # Salesforce quantity
        ("1E+2", "100.0000", "100"),            # never scientific notation on the wire
        ("-0.00", "0.0000", "0"),
        ("0.123456789", "0.1235", "0.123456789"),  # more than 4 decimals: rounded half-even
        ("123456789012345678.12", "123456789012345678.1200", "123456789012345678.12"),
    ],
)
def test_one_representation_of_money_and_quantities(
    given: str, money: str, plain: str, wide_amount_limit: None
) -> None:
    line = OrderLineData(line_id="l", amount=Decimal(given), quantity=Decimal(given))
    body = json.loads(line.model_dump_json())
    assert body["amount"] == money
    assert body["quantity"] == plain
    again = OrderLineData.model_validate_json(line.model_dump_json())
    assert again.model_dump_json() == line.model_dump_json()  # stable on the next hop


def test_tiny_quantities_never_print_in_scientific_notation() -> None:
    line = OrderLineData(line_id="l", amount=Decimal("1E-8"), quantity=Decimal("1E-8"))
    assert json.loads(line.model_dump_json())["quantity"] == "0.00000001"
    assert json.loads(line.model_dump_json())["amount"] == "0.0000"


@pytest.mark.parametrize(
    ("source", "version", "expected"),
    [
        ("dynamics-ce", "1000169", "00000000000001000169"),
        ("salesforce", "2026-11-20T10:00:00.000Z", "2026-11-20T10:00:00.000Z"),
        ("salesforce", "2026-11-20T10:00:00Z", None),       # not the connectors' fixed-width form
        ("dynamics-fo", "1234567", None),                  # RecVersion is a change token, not a counter
        ("flash", "earn:order@1", None),
    ],
)
def test_source_sequence_per_source(source: str, version: str, expected: str | None) -> None:
    assert source_sequence(source, version) == expected


def test_source_sequence_sorts_in_change_order_and_travels_on_the_wire() -> None:
    nine, ten = source_sequence("dynamics-ce", "9"), source_sequence("dynamics-ce", "10")
    assert nine is not None and ten is not None and nine < ten
    ev = OrderUpserted(
        tenant_id="acme", connection_id="ce-1", source="dynamics-ce", entity="salesorder", source_id="o1",
        source_version="10", order=OrderData(status="1", lifecycle="pending", currency="EUR", total_amount=Decimal(1)),
    )
    assert json.loads(encode(ev))["source_sequence"] == ten
    assert decode_event(encode(ev)) == ev
    assert OrderLineUpserted  # the line event carries it too (same envelope)
