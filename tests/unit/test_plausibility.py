"""Implausible values are refused at the schema, and no order earns unbounded points (issue 15)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal

import pytest
from pydantic import ValidationError

from canonical import limits
from canonical.events import OrderData, ReturnData, decode_event
from points import rules
from points.rules import OrderState, Program, order_points
from servicekit.consumer import decode_or_raise
from servicekit.errors import SchemaViolation
from servicekit.settings import FlashSettings


@pytest.fixture(autouse=True)
def default_limits() -> Iterator[None]:
    yield
    limits.configure(**{f: getattr(limits.Limits(), f) for f in ("max_amount", "min_exchange_rate",
                                                                  "max_exchange_rate", "max_json_depth")})
    rules.configure(default_per_order_cap=rules.DEFAULT_PER_ORDER_CAP)


def order(**kw: object) -> OrderData:
    base: dict[str, object] = {"status": "100001", "lifecycle": "awardable", "currency": "EUR",
                               "total_amount": Decimal(100)}
    return OrderData.model_validate({**base, **kw})


@pytest.mark.parametrize("rate", ["0", "-1", "1e-20", "1e20", "NaN", "Infinity"])
def test_implausible_exchange_rates_are_refused(rate: str) -> None:
    with pytest.raises(ValidationError, match=r"exchange.rate"):
        order(exchange_rate=Decimal(rate))
    with pytest.raises(ValidationError, match=r"exchange.rate"):
        ReturnData(status="x", lifecycle="effective", currency="EUR", amount=Decimal(1), exchange_rate=Decimal(rate),
                   original_order_number="SO-1")


def test_plausible_rates_pass() -> None:
    for rate in ("1", "0.00004", "25000", "1.0842"):
        assert order(exchange_rate=Decimal(rate)).exchange_rate == Decimal(rate)


def test_an_implausible_amount_is_refused_and_the_limit_is_a_setting() -> None:
    with pytest.raises(ValidationError, match="FLASH_MAX_AMOUNT"):
        order(total_amount=Decimal("999999999999999999"))
    with pytest.raises(ValidationError, match="amount"):
        order(lines=[{"line_id": "l1", "amount": "-999999999999999999"}])
    FlashSettings(max_amount=Decimal(10) ** 18).apply_limits()
    assert order(total_amount=Decimal("999999999999999999")).total_amount == Decimal("999999999999999999")


def test_a_body_with_an_implausible_order_is_a_schema_violation() -> None:
    body = {"event_type": "order.upserted", "tenant_id": "acme", "connection_id": "c", "source": "dynamics-ce",
            "entity": "salesorder", "source_id": "o1", "source_version": "1",
            "order": {"status": "x", "lifecycle": "awardable", "currency": "EUR", "total_amount": "5",
                      "exchange_rate": "0"}}
    with pytest.raises(SchemaViolation, match=r"exchange.rate"):
        decode_or_raise(json.dumps(body).encode(), decode_event)


def _state(total: str) -> OrderState:
    return OrderState(tenant_id="acme", order_source_id="o1", source="dynamics-ce", member_id="m1", status="s",
                      lifecycle="awardable", currency="EUR", total_amount=Decimal(total), known=True)


def test_an_order_earns_at_most_the_default_cap() -> None:
    program = Program(tenant_id="acme", base_currency="EUR", basis="total")
    assert order_points(program, _state("999999999999"), {}) == rules.DEFAULT_PER_ORDER_CAP == 1_000_000
    assert order_points(program.model_copy(update={"per_order_cap": 5_000_000}), _state("999999999999"), {}) == \
        5_000_000, "a program's own cap is the operator's choice"
    rules.configure(default_per_order_cap=0)
    assert order_points(program, _state("999999999999"), {}) == 999_999_999_999, "0 = no default cap"


def test_every_limit_setting_is_read() -> None:
    from types import SimpleNamespace

    from canonical.limits import json_depth_exceeds
    from points.app import build_service

    FlashSettings(max_json_depth=10, min_exchange_rate=Decimal("0.5"), max_exchange_rate=Decimal(2)).apply_limits()
    assert json_depth_exceeds("[" * 11 + "]" * 11) and not json_depth_exceeds("[" * 10 + "]" * 10)
    with pytest.raises(ValidationError, match="exchange rate"):
        order(exchange_rate=Decimal("0.4"))
    with pytest.raises(ValidationError, match="exchange rate"):
        order(exchange_rate=Decimal("2.1"))
    infra = SimpleNamespace(settings=FlashSettings(points_max_per_order=7), pool=None, publisher=None)
    build_service().consumers(infra)  # type: ignore[arg-type]
    program = Program(tenant_id="acme", base_currency="EUR", basis="total")
    assert order_points(program, _state("100"), {}) == 7, "the points engine reads FLASH_POINTS_MAX_PER_ORDER"
