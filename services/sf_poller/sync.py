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
  the query starts ``overlap_s`` before the cursor (``WHERE SystemModstamp >= :ts - overlap``). Every row
  read is checked against the published-version store (:mod:`sfconnect.published`, PostgreSQL): a row whose
  version was already published, by this or any other process (the CDC listener included), is not sent
  again, whatever the table size and across restarts; late commits are published; the cursor moves to the
  last row read and never back.
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from servicekit.errors import Transient
from servicekit.logging import get_logger
from sf_poller.bulk import run_bulk, start_bulk
from sf_poller.results import EntityResult
from sfconnect.client import QueryTimeout
from sfconnect.reader import Publisher, RecordReader, compound_where, fmt_ts, parse_ts
from sfconnect.records import field_value, norm_ts

__all__ = ["ConnectionSync", "EntityResult", "Publisher", "compound_where"]

log = get_logger(__name__)

_DAY = 86_400.0


@dataclass
class ConnectionSync(RecordReader):
    """Syncs the configured objects of one connection; :meth:`run_cycle` is one run of the poller."""

    ready_for_backfill: Callable[[], Awaitable[bool]] | None = None
    """With CDC on: true once the listener subscribed, so nothing between snapshot and stream is lost."""
    windows: dict[str, float] = field(default_factory=dict)
    force_bulk: set[str] = field(default_factory=set)
    late: int = 0
    """Rows found behind the cursor that this process had not published (late commits)."""

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
        while True:
            ts, last_id = cur.get("ts"), cur.get("id")
            window = self.windows.get(obj)
            upper = fmt_ts(parse_ts(ts) + dt.timedelta(seconds=window)) if ts and window else None
            where = compound_where(ts, last_id, upper, overlap_s=self.conn.overlap_s)
            body, url = await self.query_shaped(obj, f"{where} ORDER BY SystemModstamp, Id", all_rows=True,
                                                batch_size=self.conn.page_size)
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
                seen += len(records)
                if records:
                    mark = (norm_ts(cur.get("ts")) or "", str(cur.get("id") or ""))
                    cur = await self.publish(obj, records, url, cur)
                    fresh = self.last_published
                    advanced += len(fresh)
                    res.pages += 1
                    for r in fresh:
                        if (norm_ts(field_value(r, "SystemModstamp")) or "", str(field_value(r, "Id"))) <= mark:
                            self.late += 1
                            log.info("row committed behind the cursor; publishing it", entity=obj,
                                     id=field_value(r, "Id"), system_modstamp=field_value(r, "SystemModstamp"))
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
