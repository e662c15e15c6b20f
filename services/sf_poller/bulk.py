"""Bulk API 2.0 backfill: job id persisted in the cursor, results streamed as CSV, stuck jobs fall back.

* ``start_bulk`` creates a ``queryAll`` job (``... ORDER BY SystemModstamp, Id``; like the REST reads, it
  returns deleted and archived rows too, with ``IsDeleted = true``, published as deletes) and saves
  ``{"phase": "bulk", "bulk": {"job_id", "api_version", "created_at", "locator": null}}`` before reading
  anything, so a restart polls the same job instead of creating another one.
* ``run_bulk`` polls the job until ``JobComplete``, then reads ``results?maxRecords=N&locator=L`` chunk by
  chunk. Each chunk is streamed (``httpx`` stream + incremental CSV parsing: a record ends at a newline
  outside quotes), published in sub-batches, and after the whole chunk was acknowledged the next
  ``Sforce-Locator`` is saved: an interrupted backfill resumes at the chunk it was reading (re-read rows
  produce the same event ids). Locators stay readable while the job exists.
* A job still not complete ``bulk_timeout_s`` after creation is aborted and the object falls back to the
  REST incremental query from the start (``{"phase": "incremental", "ts": null, "bulk_failed": true}``).
  A Failed/Aborted job is recreated once, then falls back the same way.
* When the locator is ``"null"`` the cursor becomes incremental at the last row's ``(SystemModstamp, Id)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

import httpx

from connectorkit.http import Response
from servicekit.errors import Transient
from servicekit.logging import get_logger
from sf_poller.results import EntityResult
from sfconnect.client import RecordNotFound, SalesforceClient, ShapeMismatch
from sfconnect.config import SfConnection
from sfconnect.shape import OrgShape

__all__ = ["BulkHost", "iter_csv_rows", "run_bulk", "start_bulk"]


class BulkHost(Protocol):
    """What the backfill needs of the sync that runs it (``sf_poller.sync.ConnectionSync``); a protocol so
    this module does not import the sync (which imports it)."""

    conn: SfConnection
    client: SalesforceClient
    force_bulk: set[str]

    def select(self, obj: str) -> str: ...

    async def learn_shape(self) -> OrgShape: ...

    async def save(self, obj: str, cursor: dict[str, Any]) -> None: ...

    async def publish(self, obj: str, records: Sequence[dict[str, Any]], url: str | None,
                      cur: dict[str, Any] | None = None, *, save: bool = True) -> dict[str, Any]: ...

log = get_logger(__name__)

PUBLISH_BATCH = 2000


async def iter_csv_rows(resp: httpx.Response) -> AsyncIterator[dict[str, str]]:
    """Rows of a streamed CSV body as dicts (header -> string), never holding more than one record."""
    header: list[str] | None = None
    pending = ""
    async for line in resp.aiter_lines():
        pending = f"{pending}\n{line}" if pending else line
        if pending.count('"') % 2:
            continue  # inside a quoted value spanning lines
        record, pending = pending, ""
        if not record:
            continue
        values = next(csv.reader([record]))
        if header is None:
            header = values
            continue
        yield dict(zip(header, values, strict=False))
    if pending:
        values = next(csv.reader([pending]))
        if header is not None:
            yield dict(zip(header, values, strict=False))


async def start_bulk(sync: BulkHost, obj: str, res: EntityResult, *, attempt: int = 1) -> dict[str, Any]:
    async def create() -> Response:
        soql = f"{sync.select(obj)} ORDER BY SystemModstamp, Id"
        return await sync.client.request("POST", f"{sync.client.data_path}/jobs/query", json={
            "operation": "queryAll", "query": soql, "contentType": "CSV", "columnDelimiter": "COMMA",
            "lineEnding": "LF"})

    try:
        resp = await create()
    except ShapeMismatch:  # the org changed since verify: learn its shape once, then try again
        await sync.learn_shape()
        resp = await create()
    job = resp.json()
    cur: dict[str, Any] = {"phase": "bulk", "ts": None, "id": None, "bulk": {
        "job_id": job["id"], "api_version": sync.client.api_version, "created_at": time.time(), "locator": None,
        "attempt": attempt}}
    await sync.save(obj, cur)
    log.info("bulk backfill started", entity=obj, job_id=job["id"])
    return await run_bulk(sync, obj, cur, res)


async def _fallback(sync: BulkHost, obj: str, reason: str) -> dict[str, Any]:
    log.warning("bulk backfill abandoned; falling back to REST", entity=obj, reason=reason)
    sync.force_bulk.discard(obj)
    cur = {"phase": "incremental", "ts": None, "id": None, "bulk_failed": True}
    await sync.save(obj, cur)
    return cur


async def run_bulk(sync: BulkHost, obj: str, cur: dict[str, Any], res: EntityResult) -> dict[str, Any]:
    """Drive the job in ``cur`` to the end; returns the new cursor (``phase`` incremental when finished)."""
    job = cur.get("bulk")
    if not job:
        return await start_bulk(sync, obj, res)
    job_path = f"/services/data/v{job['api_version']}/jobs/query/{job['job_id']}"
    while True:
        try:
            info = await sync.client.get_json(job_path)
        except RecordNotFound:
            log.warning("bulk job gone; starting a new one", entity=obj, job_id=job["job_id"])
            return await start_bulk(sync, obj, res)
        state = info.get("state")
        if state == "JobComplete":
            break
        if state in ("Failed", "Aborted"):
            if job.get("attempt", 1) >= 2:
                return await _fallback(sync, obj, f"job {job['job_id']} {state}: {info.get('errorMessage')}")
            return await start_bulk(sync, obj, res, attempt=int(job.get("attempt", 1)) + 1)
        if time.time() - float(job["created_at"]) > sync.conn.bulk_timeout_s:
            try:
                await sync.client.request("PATCH", job_path, json={"state": "Aborted"})
            except Transient:
                raise
            except Exception as exc:  # noqa: BLE001 - aborting is best effort; the fallback matters
                log.warning("could not abort stuck bulk job", job_id=job["job_id"], error=str(exc)[:200])
            return await _fallback(sync, obj, f"job {job['job_id']} still {state} after {sync.conn.bulk_timeout_s}s")
        await sync.client.sleep(sync.conn.bulk_poll_s)
    locator = job.get("locator")
    while True:
        params: dict[str, Any] = {"maxRecords": sync.conn.bulk_max_records}
        if locator:
            params["locator"] = locator
        batch: list[dict[str, Any]] = []
        chunk_cur = dict(cur)
        # pipelined: sub-batch N publishes (dedupe, broker acks, published store) while N+1 is read and
        # parsed; N+1 publishes only after N finished, so the published store and the cursor see them in order
        pending: asyncio.Task[dict[str, Any]] | None = None
        try:
            async with sync.client.stream(f"{job_path}/results", params=params) as resp:
                next_locator = resp.headers.get("Sforce-Locator", "null")
                url = str(resp.request.url)
                async for row in iter_csv_rows(resp):
                    batch.append(row)
                    if len(batch) >= PUBLISH_BATCH:
                        if pending is not None:
                            chunk_cur = await pending
                        pending = asyncio.ensure_future(sync.publish(obj, batch, url, chunk_cur, save=False))
                        res.upserts += len(batch)
                        batch = []
            if pending is not None:
                chunk_cur = await pending
            if batch:
                chunk_cur = await sync.publish(obj, batch, url, chunk_cur, save=False)
                res.upserts += len(batch)
        finally:
            if pending is not None and not pending.done():  # the read failed: nothing is saved for this chunk
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending
        res.pages += 1
        if next_locator in ("null", "", None):
            cur = {"phase": "incremental", "ts": chunk_cur.get("ts") or cur.get("ts"),
                   "id": chunk_cur.get("id") or cur.get("id")}
            await sync.save(obj, cur)
            try:
                await sync.client.request("DELETE", job_path)
            except Exception as exc:  # noqa: BLE001 - cleanup only; terminal jobs expire after 7 days anyway
                log.debug("bulk job delete failed", error=str(exc)[:200])
            log.info("bulk backfill finished", entity=obj, job_id=job["job_id"], records=res.upserts)
            return cur
        locator = next_locator
        cur = {"phase": "bulk", "ts": chunk_cur.get("ts"), "id": chunk_cur.get("id"),
               "bulk": {**job, "locator": locator}}
        await sync.save(obj, cur)
