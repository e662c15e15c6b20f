"""librdkafka (confluent-kafka) consumer settings that work on every broker Flash Connect runs on, including
the embedded Tansu broker of `flash demo` and the tests (docs/events.md, "Attaching a consumer")."""

from __future__ import annotations

from typing import Any

CONSUMER_SETTINGS: dict[str, Any] = {
    # The embedded broker answers a JoinGroup only after about half the member's session timeout: with
    # librdkafka's default (45 s) every group join and rebalance takes ~23 s; with 6 s it takes ~3 s.
    # Heartbeats come from librdkafka's own thread, so a short session timeout is safe for a Python loop.
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 500,
    # Read a topic from its first retained message the first time this group.id is seen.
    "auto.offset.reset": "earliest",
    # The embedded broker's high watermark trails the log when producers batch (it reports the last batch's
    # first offset + 1), so "lag = high watermark - position" can go negative there. Ask librdkafka to say
    # when a partition has been read to its end instead.
    "enable.partition.eof": True,
    # At least once: offsets are committed after the handler ran (see the consumers in this folder).
    "enable.auto.commit": False,
}
"""Merge with ``bootstrap.servers`` and ``group.id``."""
