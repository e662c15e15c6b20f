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


def test_flash_migrate_topics_creates_every_topic(settings: FlashSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    """The deployment job's command (`flash migrate --topics`) creates the pipe's topics with the
    replication of the environment (FLASH_KAFKA_REPLICATION_FACTOR)."""
    import asyncio

    from canonical.topics import TOPICS
    from controlplane.cli import main

    assert settings.kafka_bootstrap and settings.database_url
    for name, value in {"FLASH_KAFKA_BOOTSTRAP": settings.kafka_bootstrap, "FLASH_DATABASE_URL": settings.database_url,
                        "FLASH_DB_SCHEMA": settings.db_schema or "", "FLASH_TOPIC_PREFIX": settings.topic_prefix,
                        "FLASH_STATE_DIR": str(settings.state_dir), "FLASH_KAFKA_REPLICATION_FACTOR": "2"}.items():
        monkeypatch.setenv(name, value)
    try:
        assert main(["migrate", "--topics"]) == 0
        names = [settings.topic(t.name) for t in TOPICS]
        assert asyncio.run(_replicas(settings.kafka_bootstrap, names)) == {n: {2} for n in names}
    finally:
        asyncio.run(_drop_schema(settings.database_url, settings.db_schema or ""))


async def _drop_schema(dsn: str, schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()
