"""Incremental SOQL sync on a compound cursor, with Bulk 2.0 for large initial loads.

Cursor (``cursors`` row per tenant, connection, object; saved only after the broker acknowledged every
record it covers)::

    {"phase": "incremental", "ts": "2024-05-01T10:00:00.000Z" | null, "id": "801..." | null}
    {"phase": "bulk", "bulk": {"job_id": .., "api_version": .., "created_at": epoch_s, "locator": .. | null},
     "ts": .., "id": ..}

* Incremental: ``queryAll`` (so deleted rows come back with ``IsDeleted = true`` and are published as
  ``op = delete``) of ``WHERE SystemModstamp > :ts OR (SystemModstamp = :ts AND Id > :id) ORDER BY
  SystemModstamp, Id``. Rows sharing the last timestamp are never skipped (a plain ``> :ts`` watermark loses
  the rest of a batch committed in the same millisecond), and the cursor moves after every acknowledged page.
* Overlap: a transaction stamps its rows with its start time but they become visible at its commit, so a
  long one can commit rows *behind* a cursor that already moved past that time. With ``overlap_s`` > 0
  the query starts ``overlap_s`` before the cursor (``WHERE SystemModstamp >= :ts - overlap``); rows at or
  behind the cursor that this process already published at that ``(Id, SystemModstamp)`` are dropped, the
  others (late commits) are published, and the cursor never moves back. The dedupe memory is this
  process's own: after a restart the window is published once more, with the same event ids.
* A page that is empty while the server says more rows exist (``done`` false, or fewer rows than
  ``totalSize``) is never taken as the end: the cycle fails as Transient without saving.
* ``QUERY_TIMEOUT``: the object's window narrows (1 day, then halves) and the cycle fails as Transient; the
  next cycles query ``[ts, ts + window]`` slices, widening again after each success. A timeout of the very
  first (unbounded) load switches that object to Bulk.
* Initial load: the first REST page's ``totalSize`` above ``bulk_threshold`` starts a Bulk 2.0 job instead
  (:mod:`sf_poller.bulk`).
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from canonical.events import RawRecord
from servicekit.connections import CursorStore
from servicekit.errors import Transient
from servicekit.kafka import OutMessage
from servicekit.logging import get_logger
from servicekit.settings import FlashSettings
from sf_poller.client import QueryTimeout, SalesforceClient
from sf_poller.config import SfConnection
from sf_poller.records import field_value, norm_ts, out_message, raw_record, select_soql, soql_ts

__all__ = ["ConnectionSync", "EntityResult", "Publisher", "compound_where"]

log = get_logger(__name__)

_DAY = 86_400.0
ID_CHUNK = 200
RECENT_MAX = 10_000
"""Most rows per object remembered for the overlap dedupe; a row forgotten early is only published again
(same event id), never lost."""


class Publisher(Protocol):
    async def send_all(self, messages: Sequence[OutMessage]) -> Any: ...


@dataclass
class EntityResult:
    entity: str
    upserts: int = 0
    deletes: int = 0
    pages: int = 0
    phase: str = "incremental"
    skipped: str = ""


def compound_where(ts: str | None, last_id: str | None, upper: str | None = None, *, overlap_s: float = 0.0) -> str:
    """The compound-cursor predicate (module docstring); ``upper`` bounds a narrowed window, ``overlap_s``
    re-reads that far behind the cursor instead."""
    parts: list[str] = []
    if ts and overlap_s > 0:
        parts.append(f"SystemModstamp >= {_fmt(_parse_ts(soql_ts(ts)) - dt.timedelta(seconds=overlap_s))}")
    elif ts:
        t = soql_ts(ts)
        parts.append(f"(SystemModstamp > {t} OR (SystemModstamp = {t} AND Id > '{last_id or ''}'))")
    if upper:
        parts.append(f"SystemModstamp <= {soql_ts(upper)}")
    return (" WHERE " + " AND ".join(parts)) if parts else ""


def _parse_ts(s: str) -> dt.datetime:
    return dt.datetime.fromisoformat(s.replace("Z", "+00:00"))


def _fmt(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


@dataclass
class ConnectionSync:
    """Syncs the configured objects of one connection; :meth:`run_cycle` is one run of the poller."""

    conn: SfConnection
    client: SalesforceClient
    publisher: Publisher
    cursors: CursorStore
    settings: FlashSettings
    ready_for_backfill: Callable[[], Awaitable[bool]] | None = None
    """With CDC on: true once the listener subscribed, so nothing between snapshot and stream is lost."""
    windows: dict[str, float] = field(default_factory=dict)
    force_bulk: set[str] = field(default_factory=set)
    published: int = 0
    recent: dict[str, dict[str, str]] = field(default_factory=dict)
    """Per object: ``Id -> SystemModstamp`` published within ``overlap_s`` of the cursor (the dedupe of
    the overlap window)."""
    late: int = 0
    """Rows found behind the cursor that this process had not published (late commits)."""

    @property
    def tenant(self) -> str:
        return self.conn.tenant_id

    async def load(self, obj: str) -> dict[str, Any]:
        return await self.cursors.load(self.conn.tenant_id, self.conn.connection_id, obj) or {}

    async def save(self, obj: str, cursor: dict[str, Any]) -> None:
        await self.cursors.save(self.conn.tenant_id, self.conn.connection_id, obj, cursor)

    # ------------------------------------------------------------------------------------------ cycle
    async def run_cycle(self) -> dict[str, EntityResult]:
        self.client.governor.begin_run()
        results: dict[str, EntityResult] = {}
        for obj in self.conn.objects:
            results[obj] = await self.sync_entity(obj)
        return results

    async def backfilled(self) -> bool:
        for obj in self.conn.objects:
            cur = await self.load(obj)
            if not cur or cur.get("phase") != "incremental" or not cur.get("ts"):
                return False
        return True

    async def sync_entity(self, obj: str) -> EntityResult:
        from sf_poller.bulk import run_bulk  # bulk imports this module

        res = EntityResult(obj)
        cur = await self.load(obj)
        if not cur and self.ready_for_backfill is not None and not await self.ready_for_backfill():
            res.skipped = "waiting for the CDC listener to subscribe before the backfill"
            log.info("backfill deferred", entity=obj, reason=res.skipped)
            return res
        if cur.get("phase") == "bulk" or (not cur.get("ts") and obj in self.force_bulk):
            res.phase = "bulk"
            cur = await run_bulk(self, obj, cur, res)
            if cur.get("phase") == "bulk":
                return res
        try:
            await self._incremental(obj, cur, res)
        except QueryTimeout as exc:
            if not cur.get("ts"):
                self.force_bulk.add(obj)
                raise Transient(f"{obj}: initial query timed out; switching to Bulk 2.0 ({exc})") from exc
            w = self.windows.get(obj)
            self.windows[obj] = _DAY if w is None else max(1.0, w / 2)
            raise Transient(f"{obj}: QUERY_TIMEOUT; narrowing the window to {self.windows[obj]:.0f}s") from exc
        return res

    async def _incremental(self, obj: str, cur: dict[str, Any], res: EntityResult) -> None:
        from sf_poller.bulk import start_bulk

        while True:
            ts, last_id = cur.get("ts"), cur.get("id")
            window = self.windows.get(obj)
            upper = _fmt(_parse_ts(ts) + dt.timedelta(seconds=window)) if ts and window else None
            where = compound_where(ts, last_id, upper, overlap_s=self.conn.overlap_s)
            soql = f"{select_soql(obj)}{where} ORDER BY SystemModstamp, Id"
            body, url = await self.client.query_page(soql, all_rows=True, batch_size=self.conn.page_size)
            if (not ts and not cur.get("bulk_failed") and body["totalSize"] > self.conn.bulk_threshold
                    and self.conn.bulk_threshold > 0):
                res.phase = "bulk"
                cur = await start_bulk(self, obj, res)
                if cur.get("phase") == "bulk" or cur.get("ts"):
                    return  # still running (resumes next cycle), or finished: incremental from the next cycle
                continue  # the job was abandoned: REST from the start
            seen = advanced = 0
            total = int(body["totalSize"])
            while True:
                records = body["records"]
                if not records and (not body["done"] or seen < total):
                    raise Transient(f"{obj}: empty page while {total - seen} of {total} rows are outstanding; "
                                    "not treating it as the end of the query")
                fresh = self._unseen(obj, records, cur) if ts and self.conn.overlap_s > 0 else records
                seen += len(records)
                if fresh:
                    cur = await self.publish(obj, fresh, url, cur)
                    advanced += len(fresh)
                    res.pages += 1
                    for r in fresh:
                        if field_value(r, "IsDeleted") is True:
                            res.deletes += 1
                        else:
                            res.upserts += 1
                if body["done"]:
                    break
                body, url = await self.client.query_page(next_url=body["nextRecordsUrl"])
            if seen < total:
                raise Transient(f"{obj}: query ended after {seen} of {total} rows; retrying from the cursor")
            if upper is None:
                return
            # a narrowed window finished: move past it and widen again
            if not advanced:
                cur = {**cur, "phase": "incremental", "ts": upper, "id": ""}
                await self.save(obj, cur)
            self.windows[obj] = window * 2 if window else _DAY
            if self.windows[obj] >= 30 * _DAY:
                del self.windows[obj]

    async def publish(self, obj: str, records: Sequence[dict[str, Any]], url: str | None,
                      cur: dict[str, Any] | None = None, *, save: bool = True) -> dict[str, Any]:
        """Publish records, wait for the broker's acks, THEN move the cursor to the last record (never
        back: rows of the overlap window sort before it)."""
        raws = await self.to_raw(obj, records, url)
        await self.publisher.send_all([out_message(self.settings, r) for r in raws])
        self.published += len(raws)
        if self.conn.overlap_s > 0:
            self._remember(obj, records)
        new = dict(cur or {})
        last = records[-1]
        key = (norm_ts(field_value(last, "SystemModstamp")) or "", str(field_value(last, "Id") or ""))
        held = (str(new.get("ts") or ""), str(new.get("id") or ""))
        if new.get("phase", "incremental") == "incremental" and held > key:
            key = held
        new.update(phase="incremental", ts=key[0] or None, id=key[1] or None)
        new.pop("bulk", None)
        if save:
            await self.save(obj, new)
        return new

    def _unseen(self, obj: str, records: Sequence[dict[str, Any]], cur: dict[str, Any]) -> list[dict[str, Any]]:
        """The rows of an overlapping read not yet published: everything past the cursor, and rows at or
        behind it that this process has not published at that version (late commits)."""
        mark = (norm_ts(cur.get("ts")) or "", str(cur.get("id") or ""))
        recent = self.recent.get(obj, {})
        out = []
        for r in records:
            stamp, rid = norm_ts(field_value(r, "SystemModstamp")) or "", str(field_value(r, "Id"))
            if (stamp, rid) > mark:
                out.append(r)
            elif recent.get(rid) != stamp:
                self.late += 1
                log.info("row committed behind the cursor; publishing it", entity=obj, id=rid, system_modstamp=stamp)
                out.append(r)
        return out

    def _remember(self, obj: str, records: Sequence[dict[str, Any]]) -> None:
        recent = self.recent.setdefault(obj, {})
        newest = ""
        for r in records:
            stamp = norm_ts(field_value(r, "SystemModstamp")) or ""
            recent[str(field_value(r, "Id"))] = stamp
            newest = max(newest, stamp)
        if len(recent) > 2 * len(records) and newest:  # forget what fell out of the window
            floor = _fmt(_parse_ts(newest) - dt.timedelta(seconds=self.conn.overlap_s))
            for rid in [rid for rid, stamp in recent.items() if stamp < floor]:
                del recent[rid]
        if len(recent) > 2 * RECENT_MAX:  # bounded memory (a dense backfill): forgotten rows are re-sent once
            keep = sorted(recent.items(), key=lambda kv: kv[1])[-RECENT_MAX:]
            self.recent[obj] = dict(keep)

    async def to_raw(self, obj: str, records: Sequence[dict[str, Any]], url: str | None) -> list[RawRecord]:
        anchors = await self.anchors(obj, records)
        out = []
        for r in records:
            text = json.dumps(r, separators=(",", ":"))
            out.append(raw_record(self.conn.tenant_id, self.conn.connection_id, obj, r, text=text,
                                  request_url=url, order_source_id=anchors.get(str(field_value(r, "Id")))))
        return out

    async def anchors(self, obj: str, records: Sequence[dict[str, Any]]) -> dict[str, str]:
        """Order Management credit memos reference an OrderSummary: key them by its original order."""
        if obj != "CreditMemo":
            return {}
        refs = {str(v) for r in records if (v := field_value(r, "ReferenceEntityId")) and str(v).startswith("1Os")}
        if not refs:
            return {}
        summaries: dict[str, str] = {}
        ids = sorted(refs)
        for i in range(0, len(ids), ID_CHUNK):
            chunk = ", ".join(f"'{x}'" for x in ids[i:i + ID_CHUNK])
            soql = f"SELECT Id, OriginalOrderId FROM OrderSummary WHERE Id IN ({chunk})"
            body, _ = await self.client.query_page(soql, all_rows=True)
            summaries.update({r["Id"]: r["OriginalOrderId"] for r in body["records"] if r.get("OriginalOrderId")})
        return {str(field_value(r, "Id")): summaries[ref] for r in records
                if (ref := str(field_value(r, "ReferenceEntityId") or "")) in summaries}

    # ------------------------------------------------------------------------------------------ CDC support
    async def fetch_by_ids(self, obj: str, ids: Sequence[str]) -> tuple[list[dict[str, Any]], str | None]:
        """Full current records (deleted ones included) for ids, in batches of :data:`ID_CHUNK`."""
        out: list[dict[str, Any]] = []
        url: str | None = None
        uniq = list(dict.fromkeys(ids))
        for i in range(0, len(uniq), ID_CHUNK):
            chunk = ", ".join(f"'{x}'" for x in uniq[i:i + ID_CHUNK])
            body, url = await self.client.query_page(f"{select_soql(obj)} WHERE Id IN ({chunk})", all_rows=True)
            while True:
                out.extend(body["records"])
                if body["done"]:
                    break
                body, url = await self.client.query_page(next_url=body["nextRecordsUrl"])
        return out, url

    async def reconcile(self, obj: str, since: str) -> int:
        """Re-read and publish every row of ``obj`` modified at or after ``since`` (CDC overflow / replay
        past retention). The poller's own cursor is left alone."""
        cur: dict[str, Any] = {"ts": _fmt(_parse_ts(since) - dt.timedelta(milliseconds=1)), "id": ""}
        n = 0
        started = time.monotonic()
        while True:
            soql = f"{select_soql(obj)}{compound_where(cur['ts'], cur['id'])} ORDER BY SystemModstamp, Id"
            body, url = await self.client.query_page(soql, all_rows=True, batch_size=self.conn.page_size)
            while True:
                if body["records"]:
                    cur = await self.publish(obj, body["records"], url, cur, save=False)
                    n += len(body["records"])
                elif not body["done"]:
                    raise Transient(f"{obj}: empty reconcile page with more rows outstanding")
                if body["done"]:
                    break
                body, url = await self.client.query_page(next_url=body["nextRecordsUrl"])
            log.info("reconciled by SOQL", entity=obj, since=since, records=n,
                     seconds=round(time.monotonic() - started, 2))
            return n
