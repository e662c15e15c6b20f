"""The normalizer's batch handler: settings per connection (cached, bounded), map, emit; poison on
unmappable records and on records of a tenant or connection that does not exist."""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from canonical.events import RawRecord
from canonical.limits import json_depth_exceeds
from normalizer.mappers import MapResult, mapper_for
from servicekit.consumer import Delivery, UnitOfWork
from servicekit.errors import Poison
from servicekit.logging import get_logger

__all__ = ["SettingsCache", "UnknownConnection", "make_handler", "map_raw"]

log = get_logger(__name__)


class UnknownConnection(Poison):
    """The record names a tenant/connection with no row in ``connections``: never mapped with empty settings."""


class SettingsCache:
    """Connection settings by (tenant, connection), read from ``connections``.

    Found settings are kept ``ttl_s`` seconds, a miss ``missing_ttl_s`` (so a connection added a moment
    ago is found soon); at most ``max_entries`` are kept, least recently used evicted first, so records
    naming ever new (or hostile) tenants cannot grow the process."""

    def __init__(self, ttl_s: float = 30.0, *, max_entries: int = 10_000, missing_ttl_s: float = 5.0) -> None:
        self.ttl_s = ttl_s
        self.missing_ttl_s = missing_ttl_s
        self.max_entries = max_entries
        self._items: OrderedDict[tuple[str, str], tuple[float, dict[str, Any] | None]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    async def get_many(
        self, uow: UnitOfWork, keys: set[tuple[str, str]]
    ) -> dict[tuple[str, str], dict[str, Any] | None]:
        """Settings of each key; None for a connection that does not exist."""
        now = time.monotonic()
        items = self._items
        missing = [k for k in keys if k not in items or items[k][0] < now]
        if missing:
            rows = await uow.conn.fetch(
                """SELECT tenant_id, connection_id, settings FROM connections
                   WHERE (tenant_id, connection_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))""",
                [k[0] for k in missing], [k[1] for k in missing],
            )
            found = {(r["tenant_id"], r["connection_id"]): r["settings"] for r in rows}
            for k in missing:
                if k in found:
                    s = found[k]
                    items[k] = (now + self.ttl_s, (json.loads(s) if isinstance(s, str) else dict(s)) if s else {})
                else:
                    items[k] = (now + self.missing_ttl_s, None)
                items.move_to_end(k)
            while len(items) > self.max_entries:
                items.popitem(last=False)
        out: dict[tuple[str, str], dict[str, Any] | None] = {}
        for k in keys:
            entry = items.get(k)
            out[k] = entry[1] if entry is not None else None
        return out


def map_raw(raw: RawRecord, settings: Mapping[str, Any]) -> MapResult:
    if json_depth_exceeds(raw.payload):
        return MapResult(dead=["payload nests deeper than the allowed JSON depth (FLASH_MAX_JSON_DEPTH)"])
    mapper = mapper_for(raw.source)
    if mapper is None:
        module = f"normalizer.mappers.{raw.source.replace('-', '_')}"
        return MapResult(dead=[f"no mapper for source {raw.source!r} ({module} does not exist)"])
    try:
        return mapper.map_record(raw, settings)
    except Exception as exc:  # noqa: BLE001 - mapping is pure: whatever it raises, this record (or its settings) is at fault
        # A mapper should say what is wrong itself; one that raises still costs only this record, and the
        # reason names the defect for whoever fixes the mapper or the connection's settings.
        log.warning("mapper raised; record dead-lettered", source=raw.source, entity=raw.entity,
                    error_class=type(exc).__name__, error=str(exc)[:300])
        return MapResult(dead=[
            f"{raw.source} {raw.entity} {raw.source_id}: the mapper could not read this record "
            f"({type(exc).__name__}: {str(exc)[:300]}); check the record and the connection's settings"
        ])


def make_handler(cache: SettingsCache) -> Any:
    async def normalize(batch: Sequence[Delivery[RawRecord]], uow: UnitOfWork) -> None:
        settings = await cache.get_many(uow, {(d.event.tenant_id, d.event.connection_id) for d in batch})
        for d in batch:
            e = d.event
            conn_settings = settings[(e.tenant_id, e.connection_id)]
            if conn_settings is None:
                raise UnknownConnection(
                    f"no connection {e.connection_id!r} for tenant {e.tenant_id!r}: the record cannot be normalised "
                    "without its connection's settings; add the connection (flash connections add), then replay"
                )
            result = map_raw(e, conn_settings)
            if result.dead:
                raise Poison("; ".join(result.dead))
            for topic, event in result.events:
                uow.emit(topic, event)

    return normalize
