"""Composition root of the normalizer: one consumer over the raw topics of every source with a mapper."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from canonical.events import decode_raw
from canonical.topics import RAW_ENTITIES, raw
from normalizer.handlers import SettingsCache, make_handler
from normalizer.mappers import sources_with_mappers
from servicekit.consumer import PipeConsumer
from servicekit.runtime import Infra, Service

__all__ = ["CONSUMER", "SERVICE", "raw_topics"]

CONSUMER = "normalizer"


def raw_topics() -> list[str]:
    return [raw(src, ent) for src in sources_with_mappers() for ent in RAW_ENTITIES[src]]


def consumers(infra: Infra) -> Sequence[PipeConsumer[Any]]:
    return [
        PipeConsumer(
            CONSUMER, raw_topics(), make_handler(SettingsCache()), settings=infra.settings, pool=infra.pool,
            publisher=infra.publisher, decoder=decode_raw, accepted=frozenset({"raw.record"}),
        )
    ]


SERVICE = Service(CONSUMER, consumers=consumers)
