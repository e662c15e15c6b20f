"""``flash members …`` and ``flash resolver …`` commands (registered by the control-plane CLI).

Members come from the loyalty core: ``flash members import FILE --tenant T`` writes them straight to
PostgreSQL (no broker needed) with ``relinked = false``; the running resolver picks them up within a
second, re-links customers and lets parked orders flow on. The ``loyalty.member.v1`` topic is the other
way in (the loyalty core publishing ``MemberUpserted``); both end in the same table and the same re-link.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
from pydantic import ValidationError

from canonical.envelope import TENANT_ID_PATTERN
from canonical.events import MemberData
from resolver.adapters import PgResolverStore
from resolver.app import MIGRATIONS
from resolver.handlers import member_row
from servicekit.cliutil import run_with_db

__all__ = ["cmd_members_import", "cmd_members_list", "cmd_resolver_stats", "read_members", "register"]

_TRUE = {"1", "true", "yes", "y", "on", "t"}


def _run_db(job: Callable[[asyncpg.Pool], Awaitable[int]]) -> int:
    return run_with_db(job, [MIGRATIONS])


def register(subparsers: Any) -> None:
    """Add ``members`` and ``resolver`` command groups to an argparse subparsers object."""
    members = subparsers.add_parser("members", help="members imported from the loyalty core")
    msub = members.add_subparsers(dest="members_command", required=True)
    imp = msub.add_parser("import", help="import members from a CSV or JSONL file")
    imp.add_argument("file", type=Path)
    imp.add_argument("--tenant", required=True)
    imp.add_argument("--format", choices=("csv", "jsonl"), default=None, help="default: from the file suffix")
    imp.set_defaults(func=cmd_members_import)
    lst = msub.add_parser("list", help="list members of a tenant")
    lst.add_argument("--tenant", required=True)
    lst.add_argument("--limit", type=int, default=100)
    lst.set_defaults(func=cmd_members_list)

    resolver = subparsers.add_parser("resolver", help="member resolver")
    rsub = resolver.add_subparsers(dest="resolver_command", required=True)
    stats = rsub.add_parser("stats", help="customer match counts and parked orders/returns")
    stats.add_argument("--tenant", default=None)
    stats.set_defaults(func=cmd_resolver_stats)


def read_members(path: Path, fmt: str | None = None) -> Iterator[tuple[int, MemberData]]:
    """Yield (line number, member); raise ValueError naming the line of the first invalid row."""
    fmt = fmt or ("jsonl" if path.suffix.lower() in {".jsonl", ".ndjson", ".json"} else "csv")
    with path.open(newline="", encoding="utf-8") as fh:
        if fmt == "jsonl":
            rows: Iterator[tuple[int, dict[str, Any]]] = (
                (n, json.loads(line)) for n, line in enumerate(fh, 1) if line.strip()
            )
        else:
            rows = ((n, dict(r)) for n, r in enumerate(csv.DictReader(fh), 2))
        for n, raw in rows:
            data = {k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in raw.items() if k}
            for flag in ("consent_marketing", "consent_profiling"):
                if isinstance(data.get(flag), str):
                    data[flag] = data[flag].lower() in _TRUE
            data = {k: v for k, v in data.items() if v not in ("", None)}
            try:
                yield n, MemberData.model_validate(data)
            except ValidationError as exc:
                raise ValueError(
                    f"{path}:{n}: invalid member: {exc.errors()[0]['msg']} "
                    f"({'.'.join(str(p) for p in exc.errors()[0]['loc'])})"
                ) from exc


async def import_members(pool: asyncpg.Pool, tenant: str, members: list[MemberData]) -> int:
    version = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    async with pool.acquire() as conn, conn.transaction():
        store = PgResolverStore(conn)
        for start in range(0, len(members), 5000):
            chunk = members[start : start + 5000]
            await store.upsert_members([member_row(tenant, m, version) for m in chunk], relinked=False)
    return len(members)


def _check_tenant(tenant: str) -> None:
    import re

    if not re.fullmatch(TENANT_ID_PATTERN, tenant):
        raise SystemExit(f"invalid tenant id {tenant!r}: lowercase letters, digits, '-' and '_'")


def cmd_members_import(args: argparse.Namespace) -> int:
    _check_tenant(args.tenant)
    try:
        members = [m for _, m in read_members(args.file, args.format)]
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    n = _run_db(lambda pool: import_members(pool, args.tenant, members))
    print(f"imported {n} members into tenant {args.tenant}; the resolver re-links them within seconds")
    return 0


def cmd_members_list(args: argparse.Namespace) -> int:
    async def job(pool: asyncpg.Pool) -> int:
        rows = await pool.fetch(
            """SELECT member_id, external_id, email_normalized, consent_marketing, consent_profiling, status
               FROM members WHERE tenant_id = $1 ORDER BY member_id LIMIT $2""",
            args.tenant,
            args.limit,
        )
        print(f"{'member_id':<24} {'external_id':<20} {'email':<32} mkt prof status")
        for r in rows:
            print(
                f"{r['member_id']:<24} {r['external_id'] or '-':<20} {r['email_normalized'] or '-':<32} "
                f"{'y' if r['consent_marketing'] else 'n':<3} {'y' if r['consent_profiling'] else 'n':<4} "
                f"{r['status']}"
            )
        return 0

    return _run_db(job)


async def resolver_stats(pool: asyncpg.Pool, tenant: str | None) -> dict[str, Any]:
    """Match and park counts per tenant (what ``flash resolver stats`` prints)."""
    out: dict[str, Any] = {}
    for r in await pool.fetch(
        """SELECT tenant_id, match, count(*) AS n FROM customer_links
           WHERE $1::text IS NULL OR tenant_id = $1 GROUP BY 1, 2""",
        tenant,
    ):
        out.setdefault(r["tenant_id"], {}).setdefault("customers", {})[r["match"]] = r["n"]
    for r in await pool.fetch(
        """SELECT tenant_id, kind, count(*) AS n FROM parked
           WHERE $1::text IS NULL OR tenant_id = $1 GROUP BY 1, 2""",
        tenant,
    ):
        out.setdefault(r["tenant_id"], {}).setdefault("parked", {})[r["kind"]] = r["n"]
    for r in await pool.fetch(
        """SELECT tenant_id, count(*) AS n FROM order_members
           WHERE $1::text IS NULL OR tenant_id = $1 GROUP BY 1""",
        tenant,
    ):
        out.setdefault(r["tenant_id"], {})["orders_resolved"] = r["n"]
    for r in await pool.fetch(
        """SELECT tenant_id, customer_source_id, note FROM customer_links
           WHERE match = 'ambiguous' AND ($1::text IS NULL OR tenant_id = $1) ORDER BY 1, 2 LIMIT 50""",
        tenant,
    ):
        out.setdefault(r["tenant_id"], {}).setdefault("ambiguous", []).append(
            {"customer_source_id": r["customer_source_id"], "note": r["note"]}
        )
    return out


def cmd_resolver_stats(args: argparse.Namespace) -> int:
    async def job(pool: asyncpg.Pool) -> int:
        print(json.dumps(await resolver_stats(pool, args.tenant), indent=2, sort_keys=True))
        return 0

    return _run_db(job)
