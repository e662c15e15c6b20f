"""PostgreSQL adapters of the Salesforce services with our own outage translated: every database error
goes through :func:`servicekit.db.db_errors`, so a PostgreSQL outage surfaces as a Transient and the
connector's loop waits it out (``servicekit.connectors.poll_forever``) instead of crashing."""

from __future__ import annotations

from typing import Any

from servicekit.connections import CursorStore
from servicekit.db import db_errors

__all__ = ["GuardedCursorStore"]


class GuardedCursorStore:
    def __init__(self, inner: CursorStore) -> None:
        self.inner = inner

    async def load(self, tenant_id: str, connection_id: str, entity: str) -> dict[str, Any] | None:
        async with db_errors("cursor load"):
            return await self.inner.load(tenant_id, connection_id, entity)

    async def save(self, tenant_id: str, connection_id: str, entity: str, cursor: dict[str, Any]) -> None:
        async with db_errors("cursor save"):
            await self.inner.save(tenant_id, connection_id, entity, cursor)

    async def clear(self, tenant_id: str, connection_id: str, entity: str) -> None:
        async with db_errors("cursor clear"):
            await self.inner.clear(tenant_id, connection_id, entity)
