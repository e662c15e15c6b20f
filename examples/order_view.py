"""Assemble each order with its lines from the order topic (docs/events.md, "Assembling an order").

    python examples/order_view.py --bootstrap 127.0.0.1:9092 [--prefix demo-1a2b3c.] [--topic resolved.order.v1]
                                  [--once]

Sources track lines as records of their own (Dataverse salesorderdetail, Salesforce OrderItem), so an order
arrives as a header event with ``order.lines = null`` plus one ``order.line_upserted`` per line and
``order.line_deleted`` per removed line, all keyed ``<tenant_id>:<order_source_id>``: one partition, in the
order the connector read them. The rules (one dict per order, one per line):

* ``order.upserted`` / ``order.resolved`` replace the header, unless the held header's ``source_sequence`` is
  higher (an older version redelivered); a non-null ``order.lines`` replaces the lines.
* ``order.line_upserted`` upserts ``line`` under ``line.line_id`` in the order ``order_id``, unless that line
  holds a higher ``source_sequence``.
* ``order.line_deleted`` removes the line ``source_id``; its ``order_id`` can be null (a change-tracking
  tombstone names only the line): then the line's order is the one that holds it.
* ``order.deleted`` removes the order; lines of a removed order that arrive later are ignored.

Lines may arrive before their header: the view then has lines and no header yet.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from confluent_kafka import Consumer

try:
    from kafka_settings import CONSUMER_SETTINGS
    from member_balances import read
except ImportError:  # imported as examples.order_view
    from examples.kafka_settings import CONSUMER_SETTINGS
    from examples.member_balances import read

Key = tuple[str, str]


def _newer(seq: str | None, held: str | None) -> bool:
    """Apply unless both sequences are known and the held one is not older (sequences sort as strings)."""
    return seq is None or held is None or seq > held


@dataclass
class OrderViews:
    headers: dict[Key, dict[str, Any]] = field(default_factory=dict)
    lines: dict[Key, dict[str, dict[str, Any]]] = field(default_factory=dict)
    line_order: dict[Key, str] = field(default_factory=dict)
    """(tenant, line id) -> order id, for tombstones that name no order."""
    deleted: set[Key] = field(default_factory=set)

    def apply(self, e: dict[str, Any]) -> None:
        kind, tenant = e.get("event_type"), e["tenant_id"]
        if kind in ("order.upserted", "order.resolved"):
            key = (tenant, e["source_id"])
            if key in self.deleted:
                return
            held = self.headers.get(key)
            if held is None or _newer(e.get("source_sequence"), held.get("source_sequence")):
                self.headers[key] = e
                if e["order"].get("lines") is not None:
                    self.lines[key] = {}
                    for ln in e["order"]["lines"]:
                        self._put(key, ln, e.get("source_sequence"))
        elif kind == "order.line_upserted":
            key = (tenant, e["order_id"])
            if key in self.deleted:
                return
            held_line = self.lines.get(key, {}).get(e["line"]["line_id"])
            if held_line is None or _newer(e.get("source_sequence"), held_line.get("_sequence")):
                self._put(key, e["line"], e.get("source_sequence"))
        elif kind == "order.line_deleted":
            order_id = e.get("order_id") or self.line_order.get((tenant, e["source_id"]))
            if order_id is not None:
                self.lines.get((tenant, order_id), {}).pop(e["source_id"], None)
        elif kind == "order.deleted":
            key = (tenant, e["source_id"])
            self.deleted.add(key)
            self.headers.pop(key, None)
            self.lines.pop(key, None)
        # any other event_type: skipped (docs/events.md, "Compatibility")

    def _put(self, key: Key, line: dict[str, Any], seq: str | None) -> None:
        self.lines.setdefault(key, {})[line["line_id"]] = {**line, "_sequence": seq}
        self.line_order[(key[0], line["line_id"])] = key[1]

    def view(self, tenant_id: str, order_source_id: str) -> dict[str, Any] | None:
        """The order as one document: header fields, ``member_id`` when resolved, lines sorted by id."""
        key = (tenant_id, order_source_id)
        header = self.headers.get(key)
        if header is None and key not in self.lines:
            return None
        lines = [{k: v for k, v in ln.items() if k != "_sequence"} for _, ln in sorted(self.lines.get(key, {}).items())]
        doc: dict[str, Any] = {"tenant_id": tenant_id, "order_source_id": order_source_id,
                               "member_id": header.get("member_id") if header else None,
                               "header": header["order"] if header else None, "lines": lines,
                               "lines_amount": str(sum((Decimal(ln["amount"]) for ln in lines), Decimal("0.0000")))}
        return doc

    def orders(self) -> list[Key]:
        return sorted(set(self.headers) | {k for k, v in self.lines.items() if v})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bootstrap", required=True, help="Kafka bootstrap servers, host:port[,host:port]")
    parser.add_argument("--prefix", default="", help="topic prefix of the installation (FLASH_TOPIC_PREFIX)")
    parser.add_argument("--topic", default="resolved.order.v1", help="resolved.order.v1 or canonical.order.v1")
    parser.add_argument("--group", default="order-view", help="consumer group id")
    parser.add_argument("--once", action="store_true", help="stop at the end of the topic instead of following it")
    args = parser.parse_args(argv)
    views = OrderViews()
    consumer = Consumer({"bootstrap.servers": args.bootstrap, "group.id": args.group, **CONSUMER_SETTINGS})
    try:
        for msg in read(consumer, [args.prefix + args.topic], once=args.once):
            views.apply(json.loads(msg.value() or b"{}"))
            consumer.commit(message=msg, asynchronous=True)
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
    for tenant, order in views.orders():
        print(json.dumps(views.view(tenant, order)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
