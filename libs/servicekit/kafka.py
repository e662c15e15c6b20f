"""Kafka adapters: a publisher that sends a batch without awaiting each send, topic creation, a broker
factory. aiokafka errors are translated here into our error tree."""

from __future__ import annotations

import asyncio
import struct
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

__all__ = ["KafkaPublisher", "OutMessage", "ensure_topics", "make_broker", "murmur2"]

log = get_logger(__name__)

Headers = list[tuple[str, bytes]]


_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 key hash (the Java client's ``Utils.murmur2``), as aiokafka's default partitioner
    computes it, in ~40% of the time of aiokafka's pure-Python version: whole words are unpacked at once
    and the masks are folded. It runs for every keyed message we publish."""
    length = len(data)
    h = 0x9747B28C ^ length
    n4 = length & ~3
    for (k,) in struct.iter_unpack("<I", data[:n4]):
        k = (k * _M) & _MASK
        k ^= k >> 24
        h = ((h * _M) ^ (k * _M)) & _MASK
    extra = length & 3
    if extra:
        if extra >= 3:
            h ^= data[n4 + 2] << 16
        if extra >= 2:
            h ^= data[n4 + 1] << 8
        h = ((h ^ data[n4]) * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    return h ^ (h >> 15)


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

    async def send_all(self, messages: Sequence[OutMessage]) -> None:
        """Send every message and return once the broker acknowledged all of them.

        Messages are packed into one record batch per partition (aiokafka's batch API: ~3x less CPU per
        message than one ``send`` each), keys mapped to partitions exactly as the default partitioner
        does (murmur2, so producers in other languages agree), and per-partition order is kept.
        """
        if not messages:
            return
        try:
            futures: list[asyncio.Future[Any]] = []
            builders: dict[tuple[str, int], Any] = {}
            partitions: dict[str, list[int]] = {}
            for i, m in enumerate(messages):
                parts = partitions.get(m.topic)
                if parts is None:
                    parts = partitions[m.topic] = sorted(await self._producer.partitions_for(m.topic))
                if m.key is None:
                    partition = parts[i % len(parts)]
                else:
                    partition = parts[(murmur2(m.key) & 0x7FFFFFFF) % len(parts)]
                slot = (m.topic, partition)
                builder = builders.get(slot)
                if builder is None:
                    builder = builders[slot] = self._producer.create_batch()
                if builder.append(key=m.key, value=m.value, timestamp=None, headers=m.headers) is None:
                    if builder.record_count():
                        futures.append(await self._producer.send_batch(builder, m.topic, partition=partition))
                    builder = builders[slot] = self._producer.create_batch()
                    if builder.append(key=m.key, value=m.value, timestamp=None, headers=m.headers) is None:
                        # Larger than a batch: the producer sends it on its own (or says it is too large).
                        futures.append(await self._producer.send(m.topic, m.value, key=m.key, partition=partition,
                                                                 headers=m.headers or None))
            for (topic, partition), builder in builders.items():
                if builder.record_count():
                    futures.append(await self._producer.send_batch(builder, topic, partition=partition))
            await asyncio.gather(*futures)
        except (KafkaError, OSError) as exc:
            raise InfrastructureUnavailable(f"Kafka publish failed: {exc}") from exc


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
