"""Keep every loyalty member's points balance from the topics alone (docs/events.md, "Member ledger").

    python examples/member_balances.py --bootstrap 127.0.0.1:9092 [--prefix demo-1a2b3c.] [--group my-app]
                                       [--once]

Reads ``points.member-ledger.v1``: every ledger entry, keyed ``<tenant_id>:<member_id>``, so one member's
entries are in one partition in the order they were appended. Each carries ``member_sequence`` (1, 2, 3 ...
per member, no gaps) and ``balance_after`` (the member's balance including the entry). The rule that keeps a
balance right under at-least-once delivery, redeliveries and restarts:

* an entry whose ``member_sequence`` is not above the one held is a redelivery: skip it;
* the next one (held + 1) moves the balance by ``points``, and ``balance_after`` must then agree;
* a jump (the group started after retention dropped the member's first entries) takes ``balance_after``.

Only confluent-kafka and the standard library: a consumer need not share any code with the producer.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

try:
    from kafka_settings import CONSUMER_SETTINGS
except ImportError:  # imported as examples.member_balances
    from examples.kafka_settings import CONSUMER_SETTINGS

TOPIC = "points.member-ledger.v1"


@dataclass
class Balances:
    """(tenant_id, member_id) -> (member_sequence, balance) as of the last entry applied."""

    held: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    applied: int = 0
    redelivered: int = 0
    jumps: int = 0

    def apply(self, entry: dict[str, Any]) -> None:
        if entry.get("event_type") != "points.ledger_entry":
            return  # consumers skip event types they do not know (docs/events.md, "Compatibility")
        key = (entry["tenant_id"], entry["member_id"])
        seq, after = entry["member_sequence"], entry["balance_after"]
        cur_seq, cur_balance = self.held.get(key, (0, 0))
        if seq <= cur_seq:
            self.redelivered += 1
            return
        if seq == cur_seq + 1 and cur_balance + entry["points"] != after:
            raise ValueError(f"{key}: entry {seq} says balance {after}, held {cur_balance} + {entry['points']}")
        if seq > cur_seq + 1:
            self.jumps += 1
        self.held[key] = (seq, after)
        self.applied += 1

    def balance(self, tenant_id: str, member_id: str) -> int:
        return self.held.get((tenant_id, member_id), (0, 0))[1]


def read(consumer: Consumer, topics: list[str], *, once: bool, idle_s: float = 30.0) -> Iterator[Message]:
    """Messages of ``topics`` (subscribed in ``consumer``'s group); with ``once``, stop when every assigned
    partition has reported its end (``enable.partition.eof``), or after ``idle_s`` without any message."""
    assigned: set[tuple[str, int]] = set()
    at_end: set[tuple[str, int]] = set()

    def on_assign(c: Consumer, parts: list[TopicPartition]) -> None:
        assigned.update((p.topic, p.partition) for p in parts)

    def on_revoke(c: Consumer, parts: list[TopicPartition]) -> None:
        assigned.difference_update((p.topic, p.partition) for p in parts)

    consumer.subscribe(topics, on_assign=on_assign, on_revoke=on_revoke)
    idle = 0.0
    while True:
        msg = consumer.poll(0.5)
        if msg is None:
            idle += 0.5
            if once and idle >= idle_s:
                return
            continue
        idle = 0.0
        err = msg.error()
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:
                at_end.add((msg.topic(), msg.partition()))
                if once and assigned and assigned <= at_end:
                    return
                continue
            raise RuntimeError(f"{msg.topic()}: {err}")
        at_end.discard((msg.topic(), msg.partition()))
        yield msg


def keep_balances(bootstrap: str, prefix: str = "", group: str = "member-balances", *, once: bool = False,
                  balances: Balances | None = None) -> Balances:
    balances = balances or Balances()
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, **CONSUMER_SETTINGS})
    try:
        for msg in read(consumer, [prefix + TOPIC], once=once):
            balances.apply(json.loads(msg.value() or b"{}"))
            consumer.commit(message=msg, asynchronous=True)  # after applying: at least once
    finally:
        consumer.close()
    return balances


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bootstrap", required=True, help="Kafka bootstrap servers, host:port[,host:port]")
    parser.add_argument("--prefix", default="", help="topic prefix of the installation (FLASH_TOPIC_PREFIX)")
    parser.add_argument("--group", default="member-balances", help="consumer group id")
    parser.add_argument("--once", action="store_true", help="stop at the end of the topic instead of following it")
    args = parser.parse_args(argv)
    balances = Balances()
    try:
        keep_balances(args.bootstrap, args.prefix, args.group, once=args.once, balances=balances)
    except KeyboardInterrupt:
        pass
    for (tenant, member), (seq, balance) in sorted(balances.held.items()):
        print(f"{tenant}\t{member}\t{balance}\t(after entry {seq})")
    print(f"{len(balances.held)} members, {balances.applied} entries applied, {balances.redelivered} redelivered",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
