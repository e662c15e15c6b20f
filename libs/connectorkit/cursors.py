"""Typed cursors and the published-versions ledger, with PostgreSQL adapters that wait out our own outages.

A connector's position in one stream is a pydantic model (its own ``Cursor`` class). :class:`Checkpoint`
binds one to the ``cursors`` table row of (tenant, connection, stream):

- ``load()`` -> the model or None (first run);
- ``observe(position)`` after handing the records up to that position to the publisher;
- ``checkpoint()`` after the broker ACKNOWLEDGED them (``await publisher.send_all(...)`` returned): only then
  is the last observed position saved. :func:`publish_then_checkpoint` does the three in order.

So a crash anywhere re-reads from the last acknowledged position: records may be re-read, never skipped.
A re-read must not re-publish unchanged records: :class:`PublishedVersions` remembers the last version
published per record (in PostgreSQL, so it holds across processes and at any table size); ``unseen``
filters a page before publishing, ``record`` is called after the acknowledgement.

Every PostgreSQL call is wrapped in ``servicekit.db.db_errors``: an outage of our database raises
``InfrastructureUnavailable`` (a Transient), which the connector runner waits out and retries.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import asyncpg
from pydantic import BaseModel, ValidationError

from servicekit.connections import CursorStore
from servicekit.db import db_errors
from servicekit.errors import ConfigError
from servicekit.kafka import OutMessage

__all__ = [
    "Checkpoint",
    "FakePublishedVersions",
    "PgCursorStore",
    "PgPublishedVersions",
    "PublishedVersions",
    "Publisher",
    "publish_then_checkpoint",
]

C = TypeVar("C", bound=BaseModel)


class Publisher(Protocol):
    """What connectors publish through: returns once the broker acknowledged every message."""

    async def send_all(self, messages: Sequence[OutMessage]) -> Any: ...


class PgCursorStore:
    """``cursors`` rows (``servicekit.connections.CursorStore`` contract), database errors translated."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def load(self, tenant_id: str, connection_id: str, entity: str) -> dict[str, Any] | None:
        async with db_errors("cursor load"):
            raw = await self.pool.fetchval(
                "SELECT cursor FROM cursors WHERE tenant_id = $1 AND connection_id = $2 AND entity = $3",
                tenant_id, connection_id, entity,
            )
        if raw is None:
            return None
        return dict(json.loads(raw) if isinstance(raw, str) else raw)

    async def save(self, tenant_id: str, connection_id: str, entity: str, cursor: dict[str, Any]) -> None:
        async with db_errors("cursor save"):
            await self.pool.execute(
                """INSERT INTO cursors (tenant_id, connection_id, entity, cursor) VALUES ($1, $2, $3, $4::jsonb)
                   ON CONFLICT (tenant_id, connection_id, entity)
                   DO UPDATE SET cursor = EXCLUDED.cursor, updated_at = now()""",
                tenant_id, connection_id, entity, json.dumps(cursor),
            )

    async def clear(self, tenant_id: str, connection_id: str, entity: str) -> None:
        async with db_errors("cursor clear"):
            await self.pool.execute(
                "DELETE FROM cursors WHERE tenant_id = $1 AND connection_id = $2 AND entity = $3",
                tenant_id, connection_id, entity,
            )


@dataclass
class Checkpoint(Generic[C]):
    """The typed cursor of one stream of one connection (see the module docstring)."""

    store: CursorStore
    model: type[C]
    tenant_id: str
    connection_id: str
    stream: str
    _pending: C | None = field(default=None, init=False, repr=False)

    async def load(self) -> C | None:
        raw = await self.store.load(self.tenant_id, self.connection_id, self.stream)
        if raw is None:
            return None
        try:
            return self.model.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(
                f"stored cursor of {self.connection_id}/{self.stream} is not a valid {self.model.__name__} "
                f"({exc.error_count()} errors); reset it with `flash connections reset-cursor` or delete the row"
            ) from exc

    def observe(self, position: C) -> None:
        """The position reached by records already handed to the publisher (not yet acknowledged)."""
        self._pending = position

    @property
    def pending(self) -> C | None:
        return self._pending

    async def checkpoint(self) -> None:
        """Save the last observed position; call only after the broker acknowledged what it covers."""
        if self._pending is None:
            return
        await self.store.save(self.tenant_id, self.connection_id, self.stream,
                              self._pending.model_dump(mode="json", exclude_none=True))
        self._pending = None

    async def save(self, position: C) -> None:
        """``observe`` + ``checkpoint`` for positions that cover no unpublished record (phase changes)."""
        self.observe(position)
        await self.checkpoint()

    async def clear(self) -> None:
        self._pending = None
        await self.store.clear(self.tenant_id, self.connection_id, self.stream)


async def publish_then_checkpoint(
    publisher: Publisher, messages: Sequence[OutMessage], checkpoint: Checkpoint[C], position: C
) -> None:
    """Publish, wait for the broker's acknowledgement, then save ``position``: the one safe order."""
    checkpoint.observe(position)
    if messages:
        await publisher.send_all(messages)
    await checkpoint.checkpoint()


class PublishedVersions(Protocol):
    """The last version published per record of (tenant, connection, stream).

    Contract: ``unseen`` returns the source ids of ``items`` ((source_id, version) pairs) whose version
    differs from the one recorded (or that were never recorded); ``record`` is called only after the
    broker acknowledged the records it names. Deletes are recorded with their tombstone version.
    """

    async def unseen(self, tenant_id: str, connection_id: str, stream: str,
                     items: Sequence[tuple[str, str]]) -> set[str]: ...

    async def record(self, tenant_id: str, connection_id: str, stream: str,
                     items: Sequence[tuple[str, str]]) -> None: ...


class PgPublishedVersions:
    """``connector_published_versions`` (connectorkit migration 0010)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def unseen(self, tenant_id: str, connection_id: str, stream: str,
                     items: Sequence[tuple[str, str]]) -> set[str]:
        if not items:
            return set()
        ids = [i for i, _ in items]
        async with db_errors("published versions lookup"):
            rows = await self.pool.fetch(
                """SELECT source_id, version FROM connector_published_versions
                   WHERE tenant_id = $1 AND connection_id = $2 AND stream = $3 AND source_id = ANY($4::text[])""",
                tenant_id, connection_id, stream, ids,
            )
        known = {r["source_id"]: r["version"] for r in rows}
        return {i for i, v in items if known.get(i) != v}

    async def record(self, tenant_id: str, connection_id: str, stream: str,
                     items: Sequence[tuple[str, str]]) -> None:
        if not items:
            return
        latest = dict(items)
        async with db_errors("published versions record"):
            await self.pool.execute(
                """INSERT INTO connector_published_versions (tenant_id, connection_id, stream, source_id, version)
                   SELECT $1, $2, $3, s, v FROM unnest($4::text[], $5::text[]) AS u(s, v)
                   ON CONFLICT (tenant_id, connection_id, stream, source_id)
                   DO UPDATE SET version = EXCLUDED.version, published_at = now()""",
                tenant_id, connection_id, stream, list(latest), list(latest.values()),
            )


@dataclass
class FakePublishedVersions:
    """In-memory :class:`PublishedVersions` for unit tests."""

    rows: dict[tuple[str, str, str, str], str] = field(default_factory=dict)

    async def unseen(self, tenant_id: str, connection_id: str, stream: str,
                     items: Sequence[tuple[str, str]]) -> set[str]:
        return {i for i, v in items if self.rows.get((tenant_id, connection_id, stream, i)) != v}

    async def record(self, tenant_id: str, connection_id: str, stream: str,
                     items: Sequence[tuple[str, str]]) -> None:
        for i, v in items:
            self.rows[(tenant_id, connection_id, stream, i)] = v
