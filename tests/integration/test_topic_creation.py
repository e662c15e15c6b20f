"""Topic creation on a real broker: the admin creates each topic with the replication factor asked for
(the embedded single-node broker accepts any factor, so the broker's own description is the proof)."""

from __future__ import annotations

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from canonical.topics import TopicSpec
from servicekit.kafka import ensure_topics
from servicekit.settings import FlashSettings

pytestmark = pytest.mark.integration


async def _replicas(bootstrap: str, topics: list[str]) -> dict[str, set[int]]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(topics)
    finally:
        await admin.close()
    return {d["topic"]: {len(p["replicas"]) for p in d["partitions"]} for d in described}


async def test_topics_are_created_with_the_configured_replication(settings: FlashSettings) -> None:
    bootstrap = settings.kafka_bootstrap
    assert bootstrap
    spec = TopicSpec("rf.spec.v1", ("x",), "k", 2, 60_000, replication_factor=3, min_insync_replicas=2)
    await ensure_topics(bootstrap, settings, [spec])
    await ensure_topics(bootstrap, settings.model_copy(update={"kafka_replication_factor": 2}), [],
                        extra=["rf.override.v1"])
    await ensure_topics(bootstrap, settings, [], extra=["rf.embedded.v1"], embedded=True)
    got = await _replicas(bootstrap, [settings.topic(n) for n in ("rf.spec.v1", "rf.override.v1", "rf.embedded.v1")])
    assert got == {settings.topic("rf.spec.v1"): {3}, settings.topic("rf.override.v1"): {2},
                   settings.topic("rf.embedded.v1"): {1}}
    # a second call (another copy starting) finds them and changes nothing
    await ensure_topics(bootstrap, settings, [spec])
