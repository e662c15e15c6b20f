"""``flash points …`` commands (registered by the control-plane CLI).

``points program set FILE`` validates a program (JSON or YAML, fields in :class:`points.rules.Program`)
and stores it for its tenant; ``program show`` prints it. ``balance`` and ``history`` read the ledger.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import yaml
from pydantic import ValidationError

from points.app import MIGRATIONS
from points.rules import Program
from servicekit.cliutil import run_with_db

__all__ = [
    "balances",
    "cmd_balance",
    "cmd_history",
    "cmd_program_set",
    "cmd_program_show",
    "history",
    "load_program",
    "register",
    "set_program",
]


def _run_db(job: Callable[[asyncpg.Pool], Awaitable[int]]) -> int:
    return run_with_db(job, [MIGRATIONS])


def register(subparsers: Any) -> None:
    """Add the ``points`` command group to an argparse subparsers object."""
    points = subparsers.add_parser("points", help="points programs, balances and the ledger")
    sub = points.add_subparsers(dest="points_command", required=True)
    bal = sub.add_parser("balance", help="balances (and pending points) of a tenant's members")
    bal.add_argument("--tenant", required=True)
    bal.add_argument("--member", default=None)
    bal.set_defaults(func=cmd_balance)
    hist = sub.add_parser("history", help="ledger entries of one member")
    hist.add_argument("--tenant", required=True)
    hist.add_argument("--member", required=True)
    hist.add_argument("--limit", type=int, default=100)
    hist.set_defaults(func=cmd_history)
    prog = sub.add_parser("program", help="a tenant's points program")
    psub = prog.add_subparsers(dest="program_command", required=True)
    pset = psub.add_parser("set", help="validate and store a program from a JSON or YAML file")
    pset.add_argument("file", type=Path)
    pset.set_defaults(func=cmd_program_set)
    pshow = psub.add_parser("show", help="print a tenant's program")
    pshow.add_argument("--tenant", required=True)
    pshow.set_defaults(func=cmd_program_show)


def load_program(path: Path) -> Program:
    """Parse and validate a program file; ValueError says what is wrong."""
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text) if path.suffix.lower() in {".yaml", ".yml"} else json.loads(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: not valid {'YAML' if path.suffix in {'.yaml', '.yml'} else 'JSON'}: {exc}") from exc
    try:
        return Program.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"{path}: invalid program: {problems}") from exc


async def set_program(pool: asyncpg.Pool, program: Program) -> None:
    await pool.execute(
        """INSERT INTO programs (tenant_id, config) VALUES ($1, $2::jsonb)
           ON CONFLICT (tenant_id) DO UPDATE SET config = EXCLUDED.config, updated_at = now()""",
        program.tenant_id,
        program.model_dump_json(),
    )


async def balances(pool: asyncpg.Pool, tenant: str, member: str | None = None) -> list[dict[str, Any]]:
    """Per member: balance (sum of the ledger), pending points, shortfall recorded."""
    rows = await pool.fetch(
        """WITH l AS (SELECT member_id, sum(points)::bigint AS balance FROM ledger
                      WHERE tenant_id = $1 AND ($2::text IS NULL OR member_id = $2) GROUP BY member_id),
                o AS (SELECT member_id, sum(pending_points)::bigint AS pending, sum(shortfall)::bigint AS shortfall
                      FROM orders WHERE tenant_id = $1 AND known AND ($2::text IS NULL OR member_id = $2)
                      GROUP BY member_id)
           SELECT coalesce(l.member_id, o.member_id) AS member_id, coalesce(l.balance, 0) AS balance,
                  coalesce(o.pending, 0) AS pending, coalesce(o.shortfall, 0) AS shortfall
           FROM l FULL JOIN o ON o.member_id = l.member_id ORDER BY 1""",
        tenant,
        member,
    )
    return [dict(r.items()) for r in rows]


async def history(pool: asyncpg.Pool, tenant: str, member: str, limit: int = 100) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        """SELECT created_at, order_source_id, kind, points, reason, source_version, source_event_ids
           FROM ledger WHERE tenant_id = $1 AND member_id = $2 ORDER BY id DESC LIMIT $3""",
        tenant,
        member,
        limit,
    )
    return [dict(r.items()) for r in rows]


def cmd_program_set(args: argparse.Namespace) -> int:
    try:
        program = load_program(args.file)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    async def job(pool: asyncpg.Pool) -> int:
        await set_program(pool, program)
        print(f"program of tenant {program.tenant_id} stored")
        return 0

    return _run_db(job)


def cmd_program_show(args: argparse.Namespace) -> int:
    async def job(pool: asyncpg.Pool) -> int:
        raw = await pool.fetchval("SELECT config FROM programs WHERE tenant_id = $1", args.tenant)
        if raw is None:
            print(f"tenant {args.tenant} has no points program", file=sys.stderr)
            return 1
        print(json.dumps(json.loads(raw), indent=2, sort_keys=True))
        return 0

    return _run_db(job)


def cmd_balance(args: argparse.Namespace) -> int:
    async def job(pool: asyncpg.Pool) -> int:
        rows = await balances(pool, args.tenant, args.member)
        print(f"{'member_id':<28} {'balance':>10} {'pending':>10} {'shortfall':>10}")
        for r in rows:
            print(f"{r['member_id']:<28} {r['balance']:>10} {r['pending']:>10} {r['shortfall']:>10}")
        return 0

    return _run_db(job)


def cmd_history(args: argparse.Namespace) -> int:
    async def job(pool: asyncpg.Pool) -> int:
        for r in await history(pool, args.tenant, args.member, args.limit):
            print(
                f"{r['created_at']:%Y-%m-%d %H:%M:%S} {r['order_source_id']:<20} {r['kind']:<8} "
                f"{r['points']:>8}  {r['reason']}"
            )
        return 0

    return _run_db(job)
