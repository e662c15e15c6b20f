"""Kafka adapters: a publisher that sends a batch without awaiting each send, topic creation, a broker
factory. aiokafka errors are translated here into our error tree."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from faststream.kafka import KafkaBroker

from canonical.topics import TOPICS, TopicSpec
from servicekit.errors import InfrastructureUnavailable
from servicekit.logging import get_logger
from servicekit.settings import FlashSettings

__all__ = ["KafkaPublisher", "OutMessage", "ensure_topics", "make_broker"]

log = get_logger(__name__)

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class OutMessage:
    topic: str
    value: bytes
    key: bytes | None = None
    headers: Headers = field(default_factory=list)


class KafkaPublisher:
    """Publishes batches: every send is issued, then all acknowledgements are awaited together."""

    def __init__(self, bootstrap: str, *, client_id: str = "flash") -> None:
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            client_id=client_id,
            acks="all",
            linger_ms=5,
            max_batch_size=512 * 1024,
            request_timeout_ms=30000,
            # No idempotent producer: the embedded broker lacks it. Exactly-once is ours, by event ids.
            enable_idempotence=False,
        )
        self._started = False

    async def start(self) -> None:
        try:
            await self._producer.start()
        except (KafkaError, OSError) as exc:
            raise InfrastructureUnavailable(f"Kafka unavailable: {exc}") from exc
        self._started = True

    async def stop(self) -> None:
        if self._started:
            await self._producer.stop()
            self._started = False

    async def send_all(self, messages: Sequence[OutMessage]) -> list[tuple[int, int]]:
        """Send every message and wait until the broker acknowledged all; returns (partition, offset)."""
        if not messages:
            return []
        try:
            futures = [
                await self._producer.send(m.topic, m.value, key=m.key, headers=m.headers or None)
                for m in messages
            ]
            results = await asyncio.gather(*futures)
        except (KafkaError, OSError) as exc:
            raise InfrastructureUnavailable(f"Kafka publish failed: {exc}") from exc
        return [(r.partition, r.offset) for r in results]


async def ensure_topics(
    bootstrap: str, settings: FlashSettings, specs: Iterable[TopicSpec] = TOPICS, *, extra: Iterable[str] = ()
) -> None:
    """Create the topics of the pipe (with their partition counts) if they do not exist yet."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="flash-admin")
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        wanted = [NewTopic(settings.topic(s.name), s.partitions, 1) for s in specs]
        wanted += [NewTopic(settings.topic(n), 4, 1) for n in extra]
        missing = [t for t in wanted if t.name not in existing]
        if missing:
            try:
                await admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass  # another process created them first
    except (KafkaError, OSError) as exc:
        raise InfrastructureUnavailable(f"Kafka admin failed: {exc}") from exc
    finally:
        await admin.close()


def make_broker(bootstrap: str, **kwargs: Any) -> KafkaBroker:
    """The FastStream broker every service uses; logging goes through our structlog setup."""
    # FastStream logs every batch at INFO; our runtime logs what matters (failures, dead letters).
    kwargs.setdefault("logger", None)
    return KafkaBroker(bootstrap, client_id="flash", **kwargs)
