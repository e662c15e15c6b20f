"""The example consumers' rules (examples/), without a broker: how a member's balance and an order view are
kept right under redelivery, reordering across sources and tombstones."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from member_balances import Balances
from order_view import OrderViews

pytestmark = pytest.mark.unit


def entry(member: str, seq: int, points: int, after: int, tenant: str = "acme") -> dict[str, Any]:
    return {"event_type": "points.ledger_entry", "tenant_id": tenant, "member_id": member, "points": points,
            "member_sequence": seq, "balance_after": after}


def test_balances_skip_redeliveries_and_check_the_running_sum() -> None:
    b = Balances()
    for e in (entry("m1", 1, 100, 100), entry("m1", 2, -30, 70), entry("m1", 1, 100, 100), entry("m2", 1, 5, 5)):
        b.apply(e)
    assert b.balance("acme", "m1") == 70 and b.balance("acme", "m2") == 5
    assert (b.applied, b.redelivered) == (3, 1)
    assert b.balance("globex", "m1") == 0  # tenants never mix
    with pytest.raises(ValueError, match="says balance"):
        b.apply(entry("m1", 3, 10, 999))


def test_balances_take_balance_after_across_a_gap_and_skip_unknown_types() -> None:
    b = Balances()
    b.apply(entry("m1", 7, 10, 510))  # joined after retention dropped entries 1-6
    b.apply({"event_type": "points.something_new", "tenant_id": "acme"})
    assert b.balance("acme", "m1") == 510 and b.jumps == 1


def header(oid: str, seq: str, total: str = "10.0000", lines: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"event_type": "order.resolved", "tenant_id": "acme", "source_id": oid, "source_sequence": seq,
            "member_id": "m1", "order": {"total_amount": total, "lines": lines}}


def line(oid: str, lid: str, amount: str, seq: str) -> dict[str, Any]:
    return {"event_type": "order.line_upserted", "tenant_id": "acme", "source_id": lid, "order_id": oid,
            "source_sequence": seq, "line": {"line_id": lid, "amount": amount}}


def test_order_view_assembles_lines_arriving_before_and_after_the_header() -> None:
    v = OrderViews()
    v.apply(line("o1", "a", "4.0000", "01"))
    assert v.view("acme", "o1") == {"tenant_id": "acme", "order_source_id": "o1", "member_id": None, "header": None,
                                    "lines": [{"line_id": "a", "amount": "4.0000"}], "lines_amount": "4.0000"}
    v.apply(header("o1", "02"))
    v.apply(line("o1", "b", "6.0000", "03"))
    v.apply(header("o1", "01", total="1.0000"))           # older header redelivered: ignored
    v.apply(line("o1", "a", "1.0000", "00"))              # older line version: ignored
    doc = v.view("acme", "o1")
    assert doc is not None
    assert doc["header"]["total_amount"] == "10.0000" and doc["member_id"] == "m1"
    assert [ln["line_id"] for ln in doc["lines"]] == ["a", "b"] and doc["lines_amount"] == "10.0000"
    # A change-tracking tombstone that names only the line still finds its order.
    v.apply({"event_type": "order.line_deleted", "tenant_id": "acme", "source_id": "a", "order_id": None})
    assert [ln["line_id"] for ln in v.view("acme", "o1")["lines"]] == ["b"]  # type: ignore[index]


def test_order_view_inline_lines_replace_and_deletes_are_final() -> None:
    v = OrderViews()
    v.apply(header("o2", "05", lines=[{"line_id": "x", "amount": "2.0000"}]))
    assert [ln["line_id"] for ln in v.view("acme", "o2")["lines"]] == ["x"]  # type: ignore[index]
    v.apply({"event_type": "order.deleted", "tenant_id": "acme", "source_id": "o2"})
    v.apply(line("o2", "y", "1.0000", "06"))
    assert v.view("acme", "o2") is None and v.orders() == []
