"""flash_points_total counts the absolute points written per kind (no tenant label)."""

from __future__ import annotations

from prometheus_client import REGISTRY

from points.handlers import _count_points


def _value(kind: str) -> float:
    return REGISTRY.get_sample_value("flash_points_total", {"kind": kind}) or 0.0


def test_points_written_are_counted_by_kind() -> None:
    earn, claw = _value("earn"), _value("clawback")
    rows = [("acme", "m1", "o1", "salesforce", "earn", 120, "", "", [], "e1"),
            ("globex", "m2", "o2", "salesforce", "earn", 30, "", "", [], "e2"),
            ("acme", "m1", "o1", "salesforce", "clawback", -40, "", "", [], "e3")]
    _count_points(rows)  # type: ignore[arg-type]
    assert _value("earn") - earn == 150
    assert _value("clawback") - claw == 40
