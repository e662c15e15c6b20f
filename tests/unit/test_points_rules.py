"""Pure points rules: no sockets."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest

from points.rules import (
    LineState,
    OrderState,
    Program,
    ReturnState,
    clawback_points,
    order_points,
    reconcile,
    version_key,
)
from servicekit.errors import Poison

NOW = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)


def prog(**kw) -> Program:
    return Program.model_validate({"tenant_id": "acme", "base_currency": "EUR", **kw})


def o(**kw) -> OrderState:
    base = {
        "tenant_id": "acme",
        "order_source_id": "o1",
        "source": "dynamics-ce",
        "member_id": "m1",
        "status": "s",
        "lifecycle": "awardable",
        "currency": "EUR",
        "total_amount": Decimal("121"),
        "tax_amount": Decimal("21"),
        "known": True,
    }
    return OrderState(**{**base, **kw})


def test_basis_rounding_cap_and_minimum() -> None:
    assert order_points(prog(basis="total"), o(), {}) == 121
    assert order_points(prog(basis="total_ex_tax"), o(), {}) == 100
    assert order_points(prog(points_per_unit="0.015", rounding="floor"), o(), {}) == 1
    assert order_points(prog(points_per_unit="0.015", rounding="ceil"), o(), {}) == 2
    assert order_points(prog(points_per_unit="0.025", rounding="half_even"), o(), {}) == 2
    assert order_points(prog(points_per_unit="0.025", rounding="half_up"), o(), {}) == 3
    assert order_points(prog(per_order_cap=50), o(), {}) == 50
    assert order_points(prog(minimum_order="101"), o(), {}) == 0


def test_category_multipliers_weight_by_line_amount() -> None:
    lines = {
        "a": LineState("a", "tv", Decimal(75), "1"),
        "b": LineState("b", "sock", Decimal(25), "1"),
        "c": LineState("c", "tv", Decimal(500), "1", deleted=True),
    }
    assert order_points(prog(category_multipliers={"electronics": "3"}), o(lines=lines), {"tv": "electronics"}) == 250


def test_currency_conversion_by_order_rate_program_rate_or_poison() -> None:
    assert (
        order_points(
            prog(),
            o(currency="USD", exchange_rate=Decimal("1.25"), tax_amount=Decimal(0), total_amount=Decimal(125)),
            {},
        )
        == 100
    )
    assert order_points(prog(exchange_rates={"USD": "2"}), o(currency="USD", tax_amount=Decimal(0)), {}) == 60
    with pytest.raises(Poison, match="o1 is in USD but carries no exchange rate"):
        order_points(prog(), o(currency="USD"), {})


def test_clawback_is_proportional_and_capped() -> None:
    p = prog()
    assert clawback_points(p, 100, Decimal(25), Decimal(100)) == 25
    assert clawback_points(p, 100, Decimal(500), Decimal(100)) == 100
    assert clawback_points(p, 0, Decimal(5), Decimal(100)) == 0
    assert clawback_points(p, 7, Decimal(1), Decimal(0)) == 7


def test_reconcile_pending_window_then_award_then_cancel() -> None:
    p = prog(return_window_days=14)
    order = o()
    r = reconcile(p, order, {}, [], now=NOW, at=NOW)
    assert (r.earn_kind, r.earn_delta, order.pending_points) == (None, 0, 100)
    r = reconcile(p, order, {}, [], now=NOW + dt.timedelta(days=14))
    assert (r.earn_kind, r.earn_delta) == ("earn", 100)
    order.earned = 100
    ret = ReturnState("acme", "r1", "o1", None, "1", "effective", "EUR", None, Decimal("60.5"))
    r = reconcile(p, order, {}, [ret], now=NOW + dt.timedelta(days=15))
    assert (r.earn_kind, r.claw_delta) == (None, -50)
    order.clawed = -50
    order.lifecycle = "cancelled"
    r = reconcile(p, order, {}, [ret], now=NOW + dt.timedelta(days=16))
    assert (r.earn_kind, r.earn_delta, r.claw_delta, order.pending_points) == ("void", -100, 50, 0)


def test_awardable_statuses_per_source_override_lifecycle() -> None:
    p = prog(awardable_statuses={"dynamics-ce": ["100003"]})
    assert reconcile(p, o(status="100001"), {}, [], now=NOW).earn_kind is None
    assert reconcile(p, o(status="100003", lifecycle="pending"), {}, [], now=NOW).earn_kind == "earn"
    assert reconcile(p, o(source="salesforce", status="Activated"), {}, [], now=NOW).earn_kind == "earn"


def test_version_key_orders_numbers_and_timestamps() -> None:
    assert version_key("10") > version_key("9")
    assert version_key("2025-01-02T00:00:00Z") > version_key("2025-01-01T23:59:59Z")


def test_program_rejects_bad_config() -> None:
    with pytest.raises(ValueError, match="exchange rates must be > 0"):
        prog(exchange_rates={"USD": "0"})
    with pytest.raises(ValueError, match="Extra inputs"):
        prog(points_per_euro=1)
