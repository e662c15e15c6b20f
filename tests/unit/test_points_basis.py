"""One basis for earn and clawback (points.rules module docstring), as properties over random orders.

Returning everything an order had leaves zero points for that order, whatever its tax, shipping, line and
order discounts, currency, program basis, rounding and points rate; a return of part of it takes back at
most its share. The old rule (returned / gross total) fails the first property as soon as an order has
freight.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from points.rules import LineState, OrderState, Program, ReturnState, reconcile

pytestmark = pytest.mark.unit

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
cents = st.integers(0, 500_000).map(lambda c: Decimal(c) / 100)


@st.composite
def orders(draw: Any) -> tuple[Program, OrderState, list[Decimal]]:
    """An awarded order built the way vendors total one, and the amounts of its lines as a return carries them
    (after line discount, with their tax: canonical ReturnData.amount is on the basis of the order's total)."""
    n = draw(st.integers(1, 5))
    gross = [draw(st.integers(1, 200_000).map(lambda c: Decimal(c) / 100)) for _ in range(n)]
    line_disc = [min(g, draw(cents)) for g in gross]
    net = [g - d for g, d in zip(gross, line_disc, strict=True)]
    rate = draw(st.sampled_from([Decimal(0), Decimal("0.07"), Decimal("0.2"), Decimal("0.25")]))
    tax = [(x * rate).quantize(Decimal("0.01")) for x in net]
    subtotal = sum(net, Decimal(0))
    header_disc = min(subtotal, draw(cents)) if draw(st.booleans()) else Decimal(0)
    shipping = draw(cents) if draw(st.booleans()) else Decimal(0)
    tax_total = sum(tax, Decimal(0))
    total = subtotal - header_disc + tax_total + shipping
    currency = draw(st.sampled_from(["EUR", "USD"]))
    program = Program(
        tenant_id="acme", base_currency="EUR",
        points_per_unit=draw(st.sampled_from([Decimal(1), Decimal("1.5"), Decimal("0.1"), Decimal(10)])),
        basis=draw(st.sampled_from(["total", "total_ex_tax", "total_ex_tax_shipping"])),
        rounding=draw(st.sampled_from(["floor", "ceil", "half_up", "half_even"])),
    )
    order = OrderState(
        tenant_id="acme", order_source_id="o1", source="dynamics-ce", member_id="m1", status="100001",
        lifecycle="awardable", currency=currency,
        exchange_rate=None if currency == "EUR" else Decimal("1.0870000000"),
        total_amount=total, tax_amount=tax_total, shipping_amount=shipping, known=True,
        lines={f"l{i}": LineState(f"l{i}", None, x, "1") for i, x in enumerate(net)},
    )
    returned = [x + t for x, t in zip(net, tax, strict=True)]
    return program, order, returned


def _ret(i: int, amount: Decimal, order: OrderState) -> ReturnState:
    return ReturnState(
        tenant_id="acme", return_source_id=f"r{i}", anchor_order_source_id="o1", anchor_order_number=None,
        version_key="1", lifecycle="effective", currency=order.currency, exchange_rate=order.exchange_rate,
        amount=amount,
    )


@settings(max_examples=400, deadline=None)
@given(orders(), st.booleans())
def test_returning_everything_leaves_zero_points(case: tuple[Program, OrderState, list[Decimal]],
                                                 one_return: bool) -> None:
    program, order, returned = case
    returns = [_ret(0, sum(returned, Decimal(0)), order)] if one_return else [
        _ret(i, x, order) for i, x in enumerate(returned)]
    res = reconcile(program, order, {}, returns, now=NOW)
    assert res.stage == "awardable"
    assert res.earn_delta + res.claw_delta == 0, (
        f"earned {res.earn_delta}, clawed back {-res.claw_delta} after every line came back")


@settings(max_examples=300, deadline=None)
@given(orders(), st.data())
def test_a_partial_return_takes_back_at_most_everything(case: tuple[Program, OrderState, list[Decimal]],
                                                        data: st.DataObject) -> None:
    program, order, returned = case
    keep = data.draw(st.lists(st.booleans(), min_size=len(returned), max_size=len(returned)))
    part = [x for x, k in zip(returned, keep, strict=True) if not k]
    res = reconcile(program, order, {}, [_ret(i, x, order) for i, x in enumerate(part)], now=NOW)
    assert 0 <= -res.claw_delta <= res.earn_delta
    if not part:
        assert res.claw_delta == 0


def test_full_return_of_an_order_with_freight() -> None:
    """The example from issue 11: 100 net, 21 tax, 9.99 freight; every line returned (121 with its tax)."""
    program = Program(tenant_id="acme", base_currency="EUR")
    order = OrderState(tenant_id="acme", order_source_id="o1", source="dynamics-ce", member_id="m1",
                       status="100001", lifecycle="awardable", currency="EUR", total_amount=Decimal("130.99"),
                       tax_amount=Decimal(21), shipping_amount=Decimal("9.99"), known=True)
    res = reconcile(program, order, {}, [_ret(0, Decimal(121), order)], now=NOW)
    assert (res.earn_delta, res.claw_delta) == (100, -100)


def test_a_full_return_in_parts_under_an_exchange_rate_takes_everything() -> None:
    """Found by the property above: parts converted one by one summed to 0.99999... of the whole (199 of 200)."""
    program = Program(tenant_id="acme", base_currency="EUR", basis="total")
    order = OrderState(tenant_id="acme", order_source_id="o1", source="dynamics-ce", member_id="m1",
                       status="100001", lifecycle="awardable", currency="USD", exchange_rate=Decimal("1.0870000000"),
                       total_amount=Decimal("217.48"), tax_amount=Decimal("14.23"), known=True)
    parts = [Decimal("0.01"), Decimal("0.01"), Decimal("0.00"), Decimal("217.46")]
    res = reconcile(program, order, {}, [_ret(i, x, order) for i, x in enumerate(parts)], now=NOW)
    assert (res.earn_delta, res.claw_delta) == (200, -200)


def test_a_return_in_another_currency_is_valued_through_the_base_currency() -> None:
    program = Program(tenant_id="acme", base_currency="EUR", basis="total", exchange_rates={"GBP": Decimal("0.8")})
    order = OrderState(tenant_id="acme", order_source_id="o1", source="dynamics-ce", member_id="m1",
                       status="100001", lifecycle="awardable", currency="USD", exchange_rate=Decimal("1.25"),
                       total_amount=Decimal("125"), known=True)
    half = ReturnState(tenant_id="acme", return_source_id="r", anchor_order_source_id="o1", anchor_order_number=None,
                       version_key="1", lifecycle="effective", currency="GBP", exchange_rate=None,
                       amount=Decimal("40"))  # 50 EUR = 62.50 USD: half the order
    res = reconcile(program, order, {}, [half], now=NOW)
    assert (res.earn_delta, res.claw_delta) == (100, -50)


def test_exact_thirds_are_not_lost_to_division() -> None:
    """9 points, a third of the order returned: 3 points back (earned x returned / returnable, not 2.99...)."""
    from points.rules import clawback_points

    program = Program(tenant_id="acme", base_currency="EUR")
    assert clawback_points(program, 9, Decimal(2), Decimal(6)) == 3
    assert clawback_points(program, 200, Decimal("217.479999999999"), Decimal("217.48")) == 200
