"""Compatibility with the last release (schemas/released/v1, copied from main before the contract changed):
the current schemas break no one built on it, and deliberately breaking changes are caught."""

from __future__ import annotations

import copy
import json
import shutil
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from canonical import compat
from canonical.events import Money, OrderData, OrderUpserted, PointsLedgerEntry
from canonical.schemas import event_schema

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
RELEASED = ROOT / "schemas" / "released" / "v1"


def released(event_type: str) -> dict[str, Any]:
    return dict(json.loads((RELEASED / "events" / f"{event_type}.v1.json").read_text()))


def test_the_current_contract_breaks_no_consumer_or_producer_of_the_last_release() -> None:
    assert sorted(p.name for p in (RELEASED / "events").glob("*.json")), "the released schemas must be kept"
    assert compat.compare_releases(RELEASED, ROOT / "schemas") == []
    assert compat.main([str(RELEASED), str(ROOT / "schemas")]) == 0


# ------------------------------------------------------------------- deliberately breaking: read direction


def _current(event_type: str) -> dict[str, Any]:
    return copy.deepcopy(event_schema(event_type))


def test_removing_a_field_consumers_read_is_breaking() -> None:
    new = _current("order.upserted")
    del new["$defs"]["OrderData"]["properties"]["total_amount"]
    new["$defs"]["OrderData"]["required"].remove("total_amount")
    reasons = compat.breaking_changes(released("order.upserted"), new, "read")
    assert any("/order/total_amount: field removed" in r for r in reasons), reasons


def test_retyping_a_field_is_breaking() -> None:
    # The model itself changed: points become a decimal string instead of an integer.
    class Retyped(PointsLedgerEntry):
        points: Money  # type: ignore[assignment]

    new = Retyped.model_json_schema(mode="serialization")
    reasons = compat.breaking_changes(released("points.ledger_entry"), new, "read")
    assert any(r.startswith("/points: the new schema allows string") for r in reasons), reasons


def test_making_an_always_present_field_nullable_is_breaking_for_readers() -> None:
    class Loose(OrderUpserted):
        pass

    new = Loose.model_json_schema(mode="serialization")
    assert compat.breaking_changes(released("order.upserted"), new, "read") == []  # control: same shape
    total = new["$defs"]["OrderData"]["properties"]["total_amount"]
    new["$defs"]["OrderData"]["properties"]["total_amount"] = {"anyOf": [total, {"type": "null"}]}
    reasons = compat.breaking_changes(released("order.upserted"), new, "read")
    assert reasons == ["/order/total_amount: the new schema allows null, the release did not (only string)"]


def test_a_new_enum_value_is_breaking_for_readers_but_not_for_writers() -> None:
    class MoreKinds(PointsLedgerEntry):
        kind: Literal["earn", "void", "adjust", "clawback", "expire"]  # type: ignore[assignment]

    new = MoreKinds.model_json_schema(mode="serialization")
    reasons = compat.breaking_changes(released("points.ledger_entry"), new, "read")
    assert any('"expire"' in r for r in reasons), reasons
    as_read = MoreKinds.model_json_schema(mode="validation")  # what we would accept if others wrote it
    assert compat.breaking_changes(released("points.ledger_entry"), as_read, "write") == []


def test_adding_an_optional_field_breaks_no_one() -> None:
    class WithChannel(OrderUpserted):
        channel: str | None = None

    new = WithChannel.model_json_schema(mode="serialization")
    assert compat.breaking_changes(released("order.upserted"), new, "read") == []
    new_v = WithChannel.model_json_schema(mode="validation")
    assert compat.breaking_changes(released("order.upserted"), new_v, "write") == []


# ------------------------------------------------------------------ deliberately breaking: write direction


def test_a_newly_required_field_breaks_the_loyalty_core_producing_members() -> None:
    from canonical.events import MemberUpserted

    class WithTier(MemberUpserted):
        tier: str  # no default: a v1 producer does not send it

    new = WithTier.model_json_schema(mode="validation")
    reasons = compat.breaking_changes(released("member.upserted"), new, "write")
    assert "/tier: required, but the release allowed messages without it" in reasons, reasons

    class WithDefaultTier(MemberUpserted):
        tier: str = "basic"  # with a default, old producers keep working

    ok = WithDefaultTier.model_json_schema(mode="validation")
    assert [r for r in compat.breaking_changes(released("member.upserted"), ok, "write") if "tier" in r] == []


def test_a_new_pattern_breaks_producers_and_a_dropped_one_breaks_readers() -> None:
    old = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    strict = {"type": "object", "properties": {"a": {"type": "string", "pattern": "^x$"}}, "required": ["a"]}
    assert compat.breaking_changes(old, strict, "write") == ["/a: pattern None -> '^x$'"]
    assert compat.breaking_changes(old, strict, "read") == []
    assert compat.breaking_changes(strict, old, "read") == ["/a: pattern None -> '^x$'"]


# ------------------------------------------------------------------------------------ the whole release


def test_compare_releases_catches_a_breaking_edit_of_the_checked_in_files(tmp_path: Path) -> None:
    current = tmp_path / "schemas"
    shutil.copytree(ROOT / "schemas", current, ignore=shutil.ignore_patterns("released"))
    assert compat.compare_releases(RELEASED, current) == []
    # 1. a consumer-facing field removed
    path = current / "events" / "points.ledger_entry.v1.json"
    schema = json.loads(path.read_text())
    del schema["properties"]["member_id"]
    path.write_text(json.dumps(schema))
    # 2. a topic re-keyed and re-partitioned
    topics = yaml.safe_load((current / "topics.yaml").read_text())
    ledger = next(t for t in topics["topics"] if t["name"] == "points.ledger.v1")
    ledger["key"], ledger["partitions"] = "tenant_id:member_id", 8
    (current / "topics.yaml").write_text(yaml.safe_dump(topics))
    # 3. an event type removed
    (current / "events" / "order.deleted.v1.json").unlink()
    changes = compat.compare_releases(RELEASED, current)
    assert "points.ledger_entry (read): /member_id: field removed" in changes
    assert "topic points.ledger.v1: key 'tenant_id:order_source_id' -> 'tenant_id:member_id'" in changes
    assert "topic points.ledger.v1: partitions 4 -> 8" in changes
    assert "order.deleted: event type removed" in changes
    assert compat.main([str(RELEASED), str(current)]) == 1


def test_decimal_defaults_are_what_the_schema_promises() -> None:
    # The money default on the wire is the documented representation, not "0".
    body = json.loads(OrderData(status="s", lifecycle="pending", currency="EUR",
                                total_amount=Decimal(1)).model_dump_json())
    assert body["tax_amount"] == "0.0000"
