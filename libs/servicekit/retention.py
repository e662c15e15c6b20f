"""Retention: tables that grow with every failure or replay are pruned like ``processed``.

``dead_letters`` (each row holds a full body) after ``FLASH_DEAD_LETTER_RETENTION_DAYS`` since the last
failure, ``dlq_replays`` audits after ``FLASH_DLQ_REPLAY_RETENTION_DAYS``; services prune their own tables
with :func:`prune_older_than` (the resolver its ``parked`` rows). Deletes run in chunks so a long backlog
never holds a long transaction or lock; each setting at 0 keeps its rows forever.
"""

from __future__ import annotations

import datetime as dt
import re

import asyncpg

from servicekit.db import db_errors
from servicekit.logging import get_logger
from servicekit.settings import FlashSettings

__all__ = ["prune_older_than", "prune_platform_tables"]

log = get_logger(__name__)

_IDENT = re.compile(r"^[a-z_][a-z0-9_]*$")


async def prune_older_than(
    pool: asyncpg.Pool, table: str, column: str, retention_days: int, *, chunk: int = 5_000
) -> int:
    """Delete up to ``chunk`` rows of ``table`` whose ``column`` is older than the retention; returns how many."""
    if retention_days <= 0:
        return 0
    if not (_IDENT.match(table) and _IDENT.match(column)):
        raise ValueError(f"not a plain identifier: {table}.{column}")
    cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(days=retention_days)
    async with db_errors(f"{table} pruning"), pool.acquire() as conn:
        status = await conn.execute(
            f"""DELETE FROM {table} WHERE ctid = ANY(ARRAY(
                   SELECT ctid FROM {table} WHERE {column} < $1 LIMIT $2))""",
            cutoff, chunk,
        )
    deleted = int(status.split()[-1])
    if deleted:
        log.info("pruned expired rows", table=table, rows=deleted, retention_days=retention_days)
    return deleted


async def prune_platform_tables(pool: asyncpg.Pool, settings: FlashSettings) -> int:
    """One chunk of each platform table past its retention; returns the rows deleted (0: nothing left)."""
    return (
        await prune_older_than(pool, "dead_letters", "last_failed_at", settings.dead_letter_retention_days)
        + await prune_older_than(pool, "dlq_replays", "started_at", settings.dlq_replay_retention_days)
    )
