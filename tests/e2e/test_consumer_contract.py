"""What a downstream loyalty consumer meets (docs/events.md), end to end: `flash demo` runs both sources
through every service; then consumers nobody here wrote read the topics with librdkafka (confluent-kafka).

* every message of every topic but the dead letters validates (jsonschema) against the published schema of
  its ``event_type``, and carries the documented headers: zero invalid;
* the example consumer (examples/member_balances.py) keeps member balances from points.member-ledger.v1
  alone, and they equal the ledger's, per member;
* orders assembled by examples/order_view.py from resolved.order.v1 have the lines the points engine holds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from canonical.topics import TOPICS
from controlplane.demo import run_demo
from servicekit.runtime import Infra

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))

from kafka_settings import CONSUMER_SETTINGS  # noqa: E402
from member_balances import keep_balances  # noqa: E402
from order_view import OrderViews  # noqa: E402

VALIDATORS = {
    p.name.removesuffix(".v1.json"): jsonschema.Draft202012Validator(json.loads(p.read_text()))
    for p in (ROOT / "schemas" / "events").glob("*.json")
}
HEADERS = ("tenant_id", "correlation_id", "event_type", "event_id")


def read_everything(bootstrap: str, topics: list[str]) -> dict[str, list[Any]]:
    """Every message of ``topics`` from the beginning, partition by partition in offset order; stops when
    librdkafka reports the end of every partition (the embedded broker's high watermarks can trail)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "contract-check", **CONSUMER_SETTINGS})
    try:
        meta = consumer.list_topics(timeout=10)
        parts = [TopicPartition(t, p, OFFSET_BEGINNING) for t in topics if t in meta.topics
                 for p in meta.topics[t].partitions]
        consumer.assign(parts)  # no group membership needed to read everything once
        pending = {(p.topic, p.partition) for p in parts}
        out: dict[str, list[Any]] = {t: [] for t in topics}
        idle = 0
        while pending and idle < 60:
            msg = consumer.poll(0.5)
            if msg is None:
                idle += 1
                continue
            idle = 0
            err = msg.error()
            if err is not None:
                assert err.code() == KafkaError._PARTITION_EOF, err
                pending.discard((msg.topic(), msg.partition()))
                continue
            out[msg.topic()].append(msg)
        assert not pending, f"no end reported for {sorted(pending)}"
        return out
    finally:
        consumer.close()


@pytest.mark.timeout(420)
async def test_a_downstream_consumer_reads_valid_documented_topics(
    infra: Infra, capsys: pytest.CaptureFixture[str]
) -> None:
    args = argparse.Namespace(orders=40, mutate_every=0, duration=200, until_landed=True)
    assert await run_demo(infra.settings, args) == 0
    prefix = infra.settings.topic_prefix
    out = capsys.readouterr().out
    assert f"examples/member_balances.py --bootstrap {infra.bootstrap} --prefix {prefix}" in out, out[:3000]
    public = [prefix + t.name for t in TOPICS if not t.name.startswith("dlq.")]
    messages = await asyncio.to_thread(read_everything, infra.bootstrap, public)

    invalid: list[str] = []
    counts: Counter[str] = Counter()
    for topic, msgs in messages.items():
        spec = next(t for t in TOPICS if prefix + t.name == topic)
        for m in msgs:
            body = json.loads(m.value())
            event_type = body.get("event_type")
            validator = VALIDATORS.get(event_type)
            if validator is None or event_type not in spec.event_types:
                invalid.append(f"{topic}@{m.offset()}: event_type {event_type!r} not documented on this topic")
                continue
            invalid += [f"{topic}@{m.offset()} {event_type} {list(e.absolute_path)}: {e.message}"
                        for e in validator.iter_errors(body)]
            headers = dict(m.headers() or [])
            for h in HEADERS:
                if headers.get(h) != str(body[h]).encode():
                    invalid.append(f"{topic}@{m.offset()}: header {h} {headers.get(h)!r} != body {body[h]!r}")
            counts[spec.name] += 1
    assert invalid == [], invalid[:20]
    for name in ("canonical.order.v1", "resolved.order.v1", "points.ledger.v1", "points.member-ledger.v1",
                 "canonical.customer.v1", "canonical.return.v1"):
        assert counts[name] > 0, (name, counts)

    # The example consumer: balances from the member-keyed topic equal the ledger's, per member.
    balances = await asyncio.to_thread(keep_balances, infra.bootstrap, prefix, "example-balances", once=True)
    rows = await infra.pool.fetch("SELECT tenant_id, member_id, sum(points)::bigint AS n FROM ledger GROUP BY 1, 2")
    ledger = {(r["tenant_id"], r["member_id"]): int(r["n"]) for r in rows}
    assert ledger and {"acme", "globex"} <= {t for t, _ in ledger}
    assert {k: b for k, (_, b) in balances.held.items()} == ledger
    assert balances.jumps == 0

    # Orders assembled from resolved.order.v1 carry the lines the points engine holds.
    views = OrderViews()
    for m in messages[prefix + "resolved.order.v1"]:
        views.apply(json.loads(m.value()))
    held = await infra.pool.fetch("SELECT tenant_id, order_source_id, lines FROM orders WHERE known")
    assert held
    for r in held:
        live = {ln[0]: Decimal(ln[2]) for ln in json.loads(r["lines"]) if not ln[4]}
        doc = views.view(r["tenant_id"], r["order_source_id"])
        assert doc is not None and doc["header"] is not None
        assert {ln["line_id"]: Decimal(ln["amount"]) for ln in doc["lines"]} == live, r["order_source_id"]
