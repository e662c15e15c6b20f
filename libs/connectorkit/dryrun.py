"""Dry-run: what a connection would deliver, without writing anything anywhere.

``sample`` (bounded vendor read, no cursor) -> ``normalize`` (the normalizer's mapping) -> ``resolve``
(member resolution, read-only) -> ``points`` (the tenant's earn rules, read-only) -> a report:

- records per stream, canonical events per topic;
- member match rate over orders and returns, with samples of unresolved ones and why;
- points that would be earned and clawed back / voided, with samples;
- what would be dead-lettered, and why (the connector's own letters from ``Sample.letters``, the mapping's
  reasons, the points rules' rejections).

Stages are found through the registry (entry point group ``flash_connect.previews``: ``normalize``,
``resolve``, ``points``); a missing stage is reported as skipped. Database reads run inside one
``READ ONLY`` transaction, so PostgreSQL itself refuses any write; nothing is published and no cursor
moves (``sample`` is read-only by the connector contract).

Stage protocols (implemented by the normalizer, resolver and points services):

- ``normalize(raw: RawRecord, settings: Mapping) -> result`` with ``result.events``
  (``[(logical topic, Envelope)]``) and ``result.dead`` (reasons);
- ``await resolve(conn, tenant_id, events) -> list[Resolution]`` for the order and return events;
- ``await points(conn, tenant_id, resolved: list[(Envelope, member_id)]) -> list[PointsPreview]``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg

from canonical.envelope import Envelope
from canonical.events import RawRecord
from connectorkit.registry import load_preview
from servicekit.connections import Connection
from servicekit.db import DbConnection, db_errors
from servicekit.settings import FlashSettings

__all__ = ["MapOutcome", "NormalizeStage", "PointsPreview", "PointsStage", "Resolution", "ResolveStage", "dry_run"]


class MapOutcome(Protocol):
    events: list[tuple[str, Envelope]]
    dead: list[str]


class NormalizeStage(Protocol):
    def __call__(self, raw: RawRecord, settings: dict[str, Any]) -> MapOutcome: ...


@dataclass(frozen=True)
class Resolution:
    """Which member an order or return would resolve to (None: it would park), and how / why not."""

    event: Envelope
    member_id: str | None
    how: str


class ResolveStage(Protocol):
    def __call__(self, conn: DbConnection, tenant_id: str, events: Sequence[Envelope]) -> Awaitable[list[Resolution]]:
        ...


@dataclass(frozen=True)
class PointsPreview:
    """Points one resolved order or return would move: ``kind`` earn | clawback | void | none."""

    source_id: str
    member_id: str
    kind: str
    points: int
    reason: str = ""


class PointsStage(Protocol):
    def __call__(self, conn: DbConnection, tenant_id: str,
                 resolved: Sequence[tuple[Envelope, str]]) -> Awaitable[list[PointsPreview]]: ...


def _is_order_or_return(topic: str) -> bool:
    return topic.startswith(("canonical.order", "canonical.return"))


async def dry_run(
    connector: Any, conn: Connection, settings: FlashSettings, pool: asyncpg.Pool | None, *, limit: int = 20,
    samples: int = 5,
) -> dict[str, Any]:
    """The dry-run report of one connection (see the module docstring). Writes nothing."""
    config = connector.parse(conn)
    records: Mapping[str, list[RawRecord]] = await connector.sample(config, settings, limit=limit)
    normalize: NormalizeStage | None = load_preview("normalize")
    resolve: ResolveStage | None = load_preview("resolve")
    points: PointsStage | None = load_preview("points")
    report: dict[str, Any] = {
        "connection_id": conn.connection_id, "source": conn.source, "tenant_id": conn.tenant_id,
        "written": "nothing (no topic, ledger, member link or cursor changed)",
        "stages": {"sample": "done", "normalize": "done" if normalize else "skipped (normalizer not installed)",
                   "resolve": "done" if resolve and pool else "skipped", "points": "done" if points and pool
                   else "skipped"},
        "records": {stream: len(items) for stream, items in records.items()},
    }
    dead: list[dict[str, Any]] = [
        {"stream": letter.refetch.stream, "source_id": letter.refetch.source_id, "stage": "connector",
         "reason": str(letter.error)}
        for letter in getattr(records, "letters", [])  # a connector's Sample carries them
    ]
    events: list[Envelope] = []
    per_topic: Counter[str] = Counter()
    if normalize is not None:
        for stream, items in records.items():
            for raw in items:
                result = normalize(raw, dict(conn.settings))
                if result.dead:
                    dead.append({"stream": stream, "source_id": raw.source_id, "stage": "normalizer",
                                 "reason": "; ".join(result.dead)})
                for topic, event in result.events:
                    per_topic[topic] += 1
                    if _is_order_or_return(topic) or topic.startswith("canonical.customer"):
                        events.append(event)
    report["canonical"] = dict(per_topic)
    report["would_dead_letter"] = dead
    if resolve is not None and pool is not None and events:
        async with pool.acquire() as db:
            try:
                async with db_errors("dry-run member resolution"), db.transaction(readonly=True):
                    resolutions = await resolve(db, conn.tenant_id, events)
            except asyncpg.PostgresError as exc:
                report["stages"]["resolve"] = f"failed: {type(exc).__name__}: {exc} (run `flash migrate`?)"
                return report
            matched = [r for r in resolutions if r.member_id]
            unresolved = [r for r in resolutions if not r.member_id]
            report["members"] = {
                "orders_and_returns": len(resolutions), "matched": len(matched),
                "match_rate": round(len(matched) / len(resolutions), 3) if resolutions else None,
                "how": dict(Counter(r.how for r in matched)),
                "unresolved_samples": [{"entity": r.event.entity, "source_id": r.event.source_id, "why": r.how}
                                       for r in unresolved[:samples]],
            }
            if points is not None and matched:
                try:
                    async with db_errors("dry-run points"), db.transaction(readonly=True):
                        moves = await points(db, conn.tenant_id, [(r.event, r.member_id or "") for r in matched])
                except asyncpg.PostgresError as exc:
                    report["stages"]["points"] = f"failed: {type(exc).__name__}: {exc} (run `flash migrate`?)"
                    return report
                earned = sum(m.points for m in moves if m.kind == "earn")
                back = sum(m.points for m in moves if m.kind in ("clawback", "void"))
                report["points"] = {
                    "would_earn": earned, "would_claw_back": back,
                    "by_kind": dict(Counter(m.kind for m in moves)),
                    "samples": [{"source_id": m.source_id, "member_id": m.member_id, "kind": m.kind,
                                 "points": m.points, "reason": m.reason} for m in moves[:samples]],
                }
                dead += [{"stream": "points", "source_id": m.source_id, "stage": "points", "reason": m.reason}
                         for m in moves if m.kind == "dead-letter"]
    return report
