"""Standing fuzz suite (hypothesis): every decoder and mapper turns ANY input into canonical events or a
dead letter with a reason - never an exception that escapes, never an unclassified one (issue 15).

- The consumer's decode step (``PipeConsumer.decode``: size, nesting, JSON, schema, plausibility, key vs
  tenant) over arbitrary bytes and over mutations of valid events of every type.
- The normalizer's entry (its batch handler, as the consumer runs it) over mutations of recorded Dataverse
  and Salesforce records and of the connection's settings: the handler either emits events that every
  downstream consumer decodes, or raises Poison (a dead letter with its reason).
"""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from canonical.events import (
    EVENT_TYPES,
    CustomerData,
    CustomerUpserted,
    MemberData,
    MemberUpserted,
    OrderData,
    OrderLineData,
    OrderUpserted,
    PointsLedgerEntry,
    ProductData,
    ProductUpserted,
    RawRecord,
    ReturnData,
    ReturnLineData,
    ReturnUpserted,
    decode_event,
    encode,
)
from normalizer.handlers import SettingsCache, make_handler
from servicekit.consumer import DeadLetter, Delivery, PipeConsumer, decode_or_raise
from servicekit.errors import DecodeError, Poison, classify
from servicekit.settings import FlashSettings

FIX = Path(__file__).parents[1] / "fixtures"
SETTINGS = FlashSettings(kafka_bootstrap="x:1", database_url="postgresql://x", max_message_bytes=64 * 1024)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------------------------------ values

_NUMBERS = st.one_of(
    st.integers(), st.integers(min_value=-(2**80), max_value=2**80), st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["1e999999", "-0", "1e-400", "NaN", "Infinity", "9" * 40, "0.0000000000000000001", ""]),
)
_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["a\x00b", "\ud800", "\u202eevil", "", " ", "null", "2026-13-45T99:99:99Z", "SO-1\n",
                     "x" * 600, "Pending", "Received", "Canceled", "Activated", "Draft"]),
)
_SCALARS = st.one_of(st.none(), st.booleans(), _NUMBERS, _TEXT)
JSON_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                             st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)


def mutate(data: st.DataObject, obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` with some fields replaced, removed or added (keys of the real record mostly)."""
    out = dict(obj)
    keys = sorted(out)
    for _ in range(data.draw(st.integers(0, 4), label="mutations")):
        action = data.draw(st.sampled_from(["replace", "replace", "delete", "add"]), label="action")
        if action == "add" or not keys:
            out[data.draw(st.text(max_size=10), label="new key")] = data.draw(JSON_VALUES, label="new value")
            continue
        key = data.draw(st.sampled_from(keys), label="key")
        if action == "delete":
            out.pop(key, None)
        else:
            out[key] = data.draw(JSON_VALUES, label="value")
    return out


# ------------------------------------------------------------------------------------------ decode


def _valid_events() -> list[bytes]:
    env = {"tenant_id": "acme", "connection_id": "c", "source": "dynamics-ce", "entity": "e", "source_id": "s1",
           "source_version": "7"}
    order = OrderData(order_number="SO-1", status="100001", lifecycle="awardable", currency="EUR",
                      exchange_rate=Decimal("1.1"), total_amount=Decimal("12.5"),
                      lines=(OrderLineData(line_id="l1", amount=Decimal("12.5")),))
    ret = ReturnData(original_order_number="SO-1", status="x", lifecycle="effective", currency="EUR",
                     amount=Decimal(3), lines=(ReturnLineData(line_id="r1", amount=Decimal(3)),))
    events = [
        RawRecord(**env, payload='{"a": 1}'), CustomerUpserted(**env, customer=CustomerData(kind="account")),
        ProductUpserted(**env, product=ProductData(sku="A", price=Decimal(2))), OrderUpserted(**env, order=order),
        ReturnUpserted(**env, return_=ret),
        MemberUpserted(**{**env, "source": "loyalty-core"}, member=MemberData(member_id="M1")),
        PointsLedgerEntry(**{**env, "source": "flash"}, member_id="M1", order_source_id="o1", kind="earn", points=5,
                          reason="r", created_at="2026-01-01T00:00:00Z"),
    ]
    return [encode(e) for e in events]


VALID = _valid_events()


class Rec:
    def __init__(self, value: bytes | None, key: bytes | None) -> None:
        self.topic, self.partition, self.offset, self.timestamp = "t", 0, 0, 0
        self.value, self.key, self.headers = value, key, []


CONSUMER: PipeConsumer[Any] = PipeConsumer("fuzz", ["t"], lambda b, u: None, settings=SETTINGS,  # type: ignore[arg-type]
                                           pool=None, publisher=None)  # type: ignore[arg-type]


def _check_decoded(value: bytes | None, key: bytes | None) -> None:
    out = CONSUMER.decode(Rec(value, key))
    if isinstance(out, Delivery):
        assert out.event.event_type in EVENT_TYPES and out.digest
        decode_event(encode(out.event))  # what passed re-encodes and decodes
        return
    assert isinstance(out, DeadLetter)
    assert out.error_message and out.stage == "decode"
    assert out.error_class in {c.__name__ for c in _decode_errors()}, f"unclassified: {out.error_class}"


def _decode_errors() -> set[type[DecodeError]]:
    seen: set[type[DecodeError]] = set()
    todo: list[type[DecodeError]] = [DecodeError]
    while todo:
        cls = todo.pop()
        seen.add(cls)
        todo.extend(cls.__subclasses__())
    return seen


@FUZZ
@given(value=st.one_of(st.none(), st.binary(max_size=300)), key=st.one_of(st.none(), st.binary(max_size=20)))
def test_any_bytes_decode_to_an_event_or_a_reasoned_dead_letter(value: bytes | None, key: bytes | None) -> None:
    _check_decoded(value, key)


@FUZZ
@given(data=st.data())
def test_mutated_events_decode_to_an_event_or_a_reasoned_dead_letter(data: st.DataObject) -> None:
    body = json.loads(data.draw(st.sampled_from(VALID), label="event"))
    mutated = mutate(data, body)
    for nested in ("order", "return", "product", "customer", "member"):
        if isinstance(mutated.get(nested), dict) and data.draw(st.booleans(), label=f"mutate {nested}"):
            mutated[nested] = mutate(data, mutated[nested])
    depth = data.draw(st.sampled_from([0, 0, 0, 70, 3000]), label="depth")
    text = json.dumps(mutated, default=str)
    if depth:
        text = text[:-1] + ', "deep": ' + "[" * depth + "]" * depth + "}"
    key = data.draw(st.sampled_from([None, b"acme:s1", b"other:s1", b"k"]), label="key")
    _check_decoded(text.encode("utf-8", "surrogatepass"), key)


def test_the_decode_helper_alone_raises_only_decode_errors() -> None:
    for value in (b"[" * 5000, b'{"event_type": "order.upserted", "x": ' + b"{" * 3000, b"\xff\xfe", b"1e99999"):
        with pytest.raises(DecodeError):
            decode_or_raise(value, decode_event)


# ------------------------------------------------------------------------------------------ mappers


def _page(name: str) -> list[dict[str, Any]]:
    return list(json.loads((FIX / "dataverse" / name).read_text())["value"])


def _ce_seeds() -> list[tuple[str, dict[str, Any]]]:
    seeds = [("salesorder", r) for r in _page("salesorders_page.json")[:6]]
    seeds += [("account", r) for r in _page("accounts_page.json")[:3]]
    seeds += [("contact", r) for r in _page("contacts_page.json")[:3]]
    seeds += [("product", r) for r in _page("products_page.json")[:3]]
    for name in ("raw_salesorderdetail.json", "raw_msdyn_rma.json"):
        for rec in json.loads((FIX / "dataverse" / name).read_text()):
            seeds.append((rec["entity"], json.loads(rec["payload"])))
    return seeds


def _sf_seeds() -> list[tuple[str, str, dict[str, Any]]]:
    records = json.loads((FIX / "salesforce" / "records.json").read_text())
    return [(mode, obj, rec) for mode, objs in records.items() for obj, recs in objs.items() for rec in recs[:2]]


CE_SEEDS = _ce_seeds()
SF_SEEDS = _sf_seeds()
CE_SETTINGS: list[dict[str, Any]] = [{}, {"return_source": {"credited_only": False}},
                                     {"status_overrides": {"100001": "awardable"}}, {"customer_id_field": "name"}]
SF_SETTINGS: list[dict[str, Any]] = [{"mode": "order", "price_currency": "EUR"},
                                     {"mode": "order_management", "price_currency": "EUR"}]


class FakeConn:
    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings

    async def fetch(self, sql: str, tenants: list[str], ids: list[str]) -> list[dict[str, Any]]:
        return [{"tenant_id": t, "connection_id": c, "settings": json.dumps(self.settings)}
                for t, c in zip(tenants, ids, strict=True)]


class FakeUow:
    """Emits the way the real unit of work does: the event is encoded into the outbox."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.conn = FakeConn(settings)
        self.out: list[bytes] = []

    def emit(self, topic: str, event: Any, *, key: bytes | None = None) -> None:
        self.out.append(encode(event))


def _normalize(raw: RawRecord, conn_settings: dict[str, Any]) -> None:
    handler = make_handler(SettingsCache())
    uow = FakeUow(conn_settings)
    failure: Exception | None = None
    try:
        asyncio.run(handler([Delivery(raw, None)], uow))  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - the property: only poison, with a reason
        failure = exc
    if failure is not None:
        assert issubclass(classify(failure), Poison), f"{failure!r} would be retried, not dead-lettered"
        assert str(failure), "a dead letter says why"
        return
    for body in uow.out:  # what the normalizer emits, the resolver and points engine decode
        decode_or_raise(body, decode_event)


def _raw(source: str, entity: str, payload: str, op: str, order: str | None) -> RawRecord:
    return RawRecord(tenant_id="acme", connection_id="c1", source=source, entity=entity,  # type: ignore[arg-type]
                     source_id="id-1", source_version="1", op=op, payload=payload,  # type: ignore[arg-type]
                     order_source_id=order)


def _payload(data: st.DataObject, rec: dict[str, Any]) -> str:
    if data.draw(st.integers(0, 9), label="free text payload") == 0:
        return data.draw(st.text(max_size=60), label="payload")
    return json.dumps(mutate(data, rec), default=str)


@FUZZ
@given(data=st.data())
def test_dynamics_ce_mapper_never_lets_an_exception_escape(data: st.DataObject) -> None:
    entity, rec = data.draw(st.sampled_from(CE_SEEDS), label="seed")
    conn_settings = mutate(data, data.draw(st.sampled_from(CE_SETTINGS), label="settings"))
    op = data.draw(st.sampled_from(["upsert", "upsert", "upsert", "delete"]), label="op")
    _normalize(_raw("dynamics-ce", entity, _payload(data, rec), op, data.draw(st.sampled_from([None, "o-1"]))),
               conn_settings)


@FUZZ
@given(data=st.data())
def test_salesforce_mapper_never_lets_an_exception_escape(data: st.DataObject) -> None:
    mode, obj, rec = data.draw(st.sampled_from(SF_SEEDS), label="seed")
    conn_settings = mutate(data, next(s for s in SF_SETTINGS if s["mode"] == mode))
    op = data.draw(st.sampled_from(["upsert", "upsert", "upsert", "delete"]), label="op")
    _normalize(_raw("salesforce", obj, _payload(data, rec), op, data.draw(st.sampled_from([None, "801xx"]))),
               conn_settings)


def test_the_content_digest_ignores_when_and_where_a_record_was_read() -> None:
    from servicekit.consumer import content_digest

    a = RawRecord(tenant_id="acme", connection_id="c", source="dynamics-ce", entity="salesorder", source_id="o1",
                  source_version="1", payload='{"x": 1}', request_url="https://org/api/salesorders?page=1")
    again = a.model_copy(update={"observed_at": "2030-01-01T00:00:00Z", "correlation_id": "other",
                                 "request_url": "https://org/api/salesorders?delta=2"})
    assert content_digest(a) == content_digest(again)
    assert content_digest(a) != content_digest(a.model_copy(update={"payload": '{"x": 2}'}))
    assert content_digest(a) != content_digest(a.model_copy(update={"op": "delete"}))
    body = json.loads(VALID[3])
    spaced = json.dumps({**body, "observed_at": "2031-01-01T00:00:00Z"}, indent=2).encode()
    first, second = CONSUMER.decode(Rec(VALID[3], None)), CONSUMER.decode(Rec(spaced, None))
    assert isinstance(first, Delivery) and isinstance(second, Delivery)
    assert first.digest == second.digest, "the same content in another layout is the same content"
