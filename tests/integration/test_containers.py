"""The same exactly-once relay on Apache Kafka and PostgreSQL in containers (testcontainers).

Runs only where a Docker engine answers; elsewhere it is skipped with the reason. The rest of the suite runs
on the embedded broker and the local PostgreSQL.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal

import pytest

from canonical.events import ProductData, ProductUpserted, encode
from servicekit.consumer import PipeConsumer
from servicekit.db import migrate
from servicekit.kafka import ensure_topics
from servicekit.runtime import open_infra
from servicekit.settings import FlashSettings
from servicekit.testing.infra import docker_available
from servicekit.testing.relay import MIGRATIONS, hop2

pytestmark = pytest.mark.skipif(
    not docker_available(), reason="no Docker engine answers here, so testcontainers cannot start Kafka/PostgreSQL"
)


@dataclass
class Rec:
    value: bytes
    offset: int
    topic: str = "relay.mid"
    partition: int = 0
    key: bytes | None = b"k"
    headers: Sequence[tuple[str, bytes]] = field(default_factory=list)
    timestamp: int = 0


@pytest.mark.timeout(600)
async def test_relay_on_container_kafka_and_postgres(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from testcontainers.kafka import KafkaContainer
    from testcontainers.postgres import PostgresContainer

    with KafkaContainer().with_kraft() as kafka, PostgresContainer("postgres:16", driver=None) as pg:
        settings = FlashSettings(kafka_bootstrap=kafka.get_bootstrap_server(), database_url=pg.get_connection_url(),
                                 db_schema="containers", topic_prefix=f"c{uuid.uuid4().hex[:6]}.", state_dir=tmp_path)
        async with open_infra(settings, create_topics=False) as infra:
            await migrate(infra.pool, [MIGRATIONS])
            await ensure_topics(infra.bootstrap, settings, (), extra=["relay.mid", "dlq.containers.v1"])
            consumer = PipeConsumer("containers", ["relay.mid"], hop2, settings=settings, pool=infra.pool,
                                    publisher=infra.publisher)
            events = [ProductUpserted(tenant_id="acme", connection_id="c", source="flash", entity="p",
                                      source_id=f"p{i}", source_version="1", product=ProductData(price=Decimal(1)))
                      for i in range(100)]
            records = [Rec(encode(e), i) for i, e in enumerate(events)]
            await consumer.process_batch(records)
            await consumer.process_batch(records)  # redelivery changes nothing
            assert await infra.pool.fetchval("SELECT count(*) FROM relay_effects") == 100
