"""PostgreSQL on asyncpg: a pool, versioned SQL migrations, and error translation.

Migrations are plain ``NNNN_name.sql`` files in a package's ``migrations/`` folder, applied in order
under an advisory lock and recorded in ``schema_migrations(component, version)``; re-running is a no-op.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Iterable
from importlib import resources
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from servicekit.errors import ConfigError, FlashError, InfrastructureUnavailable, classify
from servicekit.logging import get_logger

__all__ = ["DbConnection", "Migrations", "create_pool", "db_errors", "migrate"]

if TYPE_CHECKING:
    DbConnection: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]
    """A connection as handlers see it: acquired from a pool, or opened directly."""
else:
    DbConnection = asyncpg.Connection | PoolConnectionProxy

log = get_logger(__name__)

_MIGRATION_RE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


class Migrations:
    """The ordered SQL files of one component (a package with a ``migrations/`` folder)."""

    def __init__(self, component: str, package: str) -> None:
        self.component = component
        self.package = package

    def files(self) -> list[tuple[int, str, str]]:
        folder = resources.files(self.package).joinpath("migrations")
        out = []
        for entry in folder.iterdir():
            m = _MIGRATION_RE.match(entry.name)
            if m:
                out.append((int(m.group(1)), entry.name, entry.read_text()))
        return sorted(out)


CORE_MIGRATIONS = Migrations("servicekit", "servicekit")


@contextlib.asynccontextmanager
async def db_errors(what: str) -> AsyncIterator[None]:
    """Translate asyncpg/OS errors at the adapter edge into our error tree (by the one table,
    :data:`servicekit.errors.CLASSIFICATION`). Poison and unclassified errors pass through unchanged, for
    the consumer runtime to dead-letter (poison) or retry a bounded number of times (unclassified)."""
    try:
        yield
    except FlashError:
        raise
    except Exception as exc:
        kind = classify(exc)
        if issubclass(kind, InfrastructureUnavailable):
            raise InfrastructureUnavailable(f"PostgreSQL unavailable during {what}: {exc}") from exc
        if isinstance(exc, asyncpg.InsufficientPrivilegeError):
            raise ConfigError(f"PostgreSQL refused {what}: {exc}. Grant the role access.") from exc
        # Anything else passes unchanged: callers may handle a PostgresError themselves (a dry run reports a
        # missing table as a stage that failed); the consumer runtime classifies what reaches it by the table.
        raise


async def create_pool(
    dsn: str, *, schema: str | None = None, min_size: int = 1, max_size: int = 10
) -> asyncpg.Pool:
    """Open a pool; with ``schema`` every connection works inside it (created if missing)."""
    server_settings: dict[str, str] = {"application_name": "flash-connect"}
    if schema:
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", schema):
            raise ConfigError(f"invalid schema name {schema!r}: use lowercase letters, digits, _")
        async with db_errors("connect"):
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            finally:
                await conn.close()
        server_settings["search_path"] = schema
    async with db_errors("connect"):
        pool = await asyncpg.create_pool(
            dsn, min_size=min_size, max_size=max_size, server_settings=server_settings
        )
    assert pool is not None
    return pool


async def migrate(pool: asyncpg.Pool, components: Iterable[Migrations]) -> list[str]:
    """Apply pending migrations of each component in order; returns the names applied."""
    applied: list[str] = []
    async with db_errors("migrate"), pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext(current_schema() || ':flash-migrate'))")
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   component text NOT NULL, version int NOT NULL, name text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (component, version))"""
        )
        for comp in components:
            done = {
                r["version"]
                for r in await conn.fetch(
                    "SELECT version FROM schema_migrations WHERE component = $1", comp.component
                )
            }
            for version, name, sql in comp.files():
                if version in done:
                    continue
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_migrations(component, version, name) VALUES ($1, $2, $3)",
                    comp.component, version, name,
                )
                applied.append(f"{comp.component}/{name}")
    if applied:
        log.info("migrations applied", applied=applied)
    return applied


def record_to_dict(record: Any) -> dict[str, Any]:
    return dict(record.items())
