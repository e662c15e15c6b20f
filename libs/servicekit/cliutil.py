"""Helpers for CLI commands: open the database the way services do, print tables or JSON."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from decimal import Decimal
from typing import Any

import asyncpg

from servicekit.db import CORE_MIGRATIONS, Migrations, create_pool, migrate
from servicekit.embedded import resolve_database_url
from servicekit.settings import FlashSettings

__all__ = ["open_db", "print_json", "print_table", "run_with_db"]


@contextlib.asynccontextmanager
async def open_db(settings: FlashSettings, migrations: Sequence[Migrations] = ()) -> AsyncIterator[asyncpg.Pool]:
    """The configured (or local, or embedded) database, migrated, as a small pool."""
    dsn = await resolve_database_url(settings.database_url, settings.state_dir)
    pool = await create_pool(dsn, schema=settings.db_schema, max_size=4)
    try:
        await migrate(pool, [CORE_MIGRATIONS, *migrations])
        yield pool
    finally:
        await pool.close()


def run_with_db(job: Callable[[asyncpg.Pool], Awaitable[int]], migrations: Sequence[Migrations] = ()) -> int:
    """Run one CLI job against the configured database (migrated first); returns its exit code."""

    async def go() -> int:
        async with open_db(FlashSettings(), migrations) as pool:
            return await job(pool)

    return asyncio.run(go())


def _default(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, default=_default, indent=2)
    sys.stdout.write("\n")


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, *, empty: str = "(none)") -> None:
    if not rows:
        print(empty)
        return
    cols = list(columns or rows[0].keys())
    cells = [[_cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, float):
        return f"{value:,.1f}"
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."
