"""The normalizer's batch handler: settings per connection (cached), map, emit; poison on unmappable."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from canonical.events import RawRecord
from normalizer.mappers import MapResult, mapper_for
from servicekit.consumer import Delivery, UnitOfWork
from servicekit.errors import Poison

__all__ = ["SettingsCache", "make_handler", "map_raw"]


class SettingsCache:
    """Connection settings by (tenant, connection), read from ``connections`` and kept ``ttl_s`` seconds."""

    def __init__(self, ttl_s: float = 30.0) -> None:
        self.ttl_s = ttl_s
        self._items: dict[tuple[str, str], tuple[float, dict[str, Any]]] = {}

    async def get_many(self, uow: UnitOfWork, keys: set[tuple[str, str]]) -> dict[tuple[str, str], dict[str, Any]]:
        now = time.monotonic()
        missing = [k for k in keys if k not in self._items or self._items[k][0] < now]
        if missing:
            rows = await uow.conn.fetch(
                """SELECT tenant_id, connection_id, settings FROM connections
                   WHERE (tenant_id, connection_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))""",
                [k[0] for k in missing], [k[1] for k in missing],
            )
            found = {(r["tenant_id"], r["connection_id"]): r["settings"] for r in rows}
            for k in missing:
                s = found.get(k)
                self._items[k] = (now + self.ttl_s, (json.loads(s) if isinstance(s, str) else dict(s)) if s else {})
        return {k: self._items[k][1] for k in keys}


def map_raw(raw: RawRecord, settings: dict[str, Any]) -> MapResult:
    mapper = mapper_for(raw.source)
    if mapper is None:
        module = f"normalizer.mappers.{raw.source.replace('-', '_')}"
        return MapResult(dead=[f"no mapper for source {raw.source!r} ({module} does not exist)"])
    return mapper.map_record(raw, settings)


def make_handler(cache: SettingsCache) -> Any:
    async def normalize(batch: Sequence[Delivery[RawRecord]], uow: UnitOfWork) -> None:
        settings = await cache.get_many(uow, {(d.event.tenant_id, d.event.connection_id) for d in batch})
        for d in batch:
            e = d.event
            result = map_raw(e, settings[(e.tenant_id, e.connection_id)])
            if result.dead:
                raise Poison("; ".join(result.dead))
            for topic, event in result.events:
                uow.emit(topic, event)

    return normalize
