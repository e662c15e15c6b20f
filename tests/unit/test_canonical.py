"""Canonical events: deterministic ids, keys, round trips, and schemas that match the checked-in files."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import ValidationError

from canonical import schemas
from canonical.events import (
    OrderData,
    OrderLineData,
    OrderLineUpserted,
    OrderUpserted,
    ReturnData,
    ReturnUpserted,
    decode_event,
    encode,
)

ROOT = Path(__file__).resolve().parents[2]


def order(**over: object) -> OrderUpserted:
    fields: dict[str, object] = {
        "tenant_id": "acme", "connection_id": "ce-1", "source": "dynamics-ce", "entity": "salesorder",
        "source_id": "9f0c", "source_version": "2024-05-01T10:00:00Z",
        "order": OrderData(status="100001", lifecycle="awardable", currency="EUR", total_amount=Decimal("120.50"),
                           exchange_rate=Decimal("0.92")),
    }
    fields.update(over)
    return OrderUpserted(**fields)  # type: ignore[arg-type]


def test_event_id_is_deterministic_and_depends_on_version() -> None:
    assert order().event_id == order().event_id
    assert order().event_id != order(source_version="2024-05-01T10:00:01Z").event_id
    assert order().event_id != order(tenant_id="globex").event_id


def test_round_trip_keeps_decimal_money_exact() -> None:
    ev = order()
    body = encode(ev)
    assert json.loads(body)["order"]["total_amount"] == "120.5000"  # money: always 4 decimals
    assert decode_event(body) == ev


def test_decode_picks_the_model_by_prefix_and_still_checks_the_type() -> None:
    ev = order()
    body = encode(ev)
    assert body.startswith(b'{"event_type":"order.upserted"')
    # Another field order (another producer) goes through the tagged union and decodes the same.
    reordered = json.dumps(dict(reversed(list(json.loads(body).items())))).encode()
    assert decode_event(reordered) == ev
    # A prefix naming another type is that type's validation error, not a silently different event.
    wrong = body.replace(b'"order.upserted"', b'"order.deleted"', 1)
    with pytest.raises(ValidationError):
        decode_event(body.replace(b'"order.upserted"', b'"order.resolved"', 1))
    assert type(decode_event(wrong)).__name__ == "OrderDeleted"  # extra fields are ignored by design
    with pytest.raises(ValidationError):
        decode_event(b'{"event_type":"no.such.type","tenant_id":"acme"}')


def test_order_lines_and_returns_share_the_order_key() -> None:
    line = OrderLineUpserted(
        tenant_id="acme", connection_id="ce-1", source="dynamics-ce", entity="salesorderdetail", source_id="l1",
        source_version="1", order_id="9f0c", line=OrderLineData(line_id="l1", amount=Decimal("10")),
    )
    ret = ReturnUpserted(
        tenant_id="acme", connection_id="ce-1", source="dynamics-ce", entity="msdyn_rma", source_id="r1",
        source_version="1", **{"return": ReturnData(original_order_source_id="9f0c", status="1",
                                                    lifecycle="effective", currency="EUR", amount=Decimal(5))},
    )
    assert order().key == line.key == ret.key == b"acme:9f0c"


def test_tenant_id_is_validated() -> None:
    with pytest.raises(ValidationError):
        order(tenant_id="Bad Tenant!")


def test_checked_in_schemas_match_the_models() -> None:
    assert schemas.main(["--check", str(ROOT / "schemas")]) == 0, "run `make schemas` and commit the result"


def test_murmur2_matches_the_kafka_default_partitioner() -> None:
    import random

    from aiokafka.partitioner import murmur2 as reference

    from servicekit.kafka import murmur2

    rnd = random.Random(7)
    keys = [b"", b"a", b"ab", b"abc", b"acme:ORD-1", "ünïcode:ключ".encode()]
    keys += [rnd.randbytes(rnd.randint(0, 80)) for _ in range(5000)]
    for key in keys:
        assert murmur2(key) == reference(key), key
    # Values the Java client's Utils.murmur2 gives (as used by every Kafka producer's default partitioner).
    assert murmur2(b"21") == (-973932308 & 0xFFFFFFFF)
    assert murmur2(b"foobar") == (-790332482 & 0xFFFFFFFF)
