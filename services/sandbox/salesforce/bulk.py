"""Bulk API 2.0 query jobs: lifecycle, and CSV results streamed in locator-addressed chunks.

A job's query is parsed at creation (SOQL errors answer the POST with 400) and evaluated once when the
job completes; result chunks are slices of that id list, so locators are stable and re-readable.
Lifecycle: UploadComplete -> (first poll) InProgress -> (after ``bulk_polls_to_complete`` polls, or
``bulk_seconds_to_complete`` seconds) JobComplete. A "stuck" job stays InProgress. Results are CSV with
every value quoted (RFC 4180), LF line endings, datetimes as ``2024-05-01T10:00:00.000Z``, booleans
``true``/``false``, nulls as ``""``. Locators are base64 of the next offset (``MTAwMDA`` = 10000).
Simulator choices (unconfirmed): a version mismatch answers 409 ``INVALIDJOB``; results before
completion answer 400 ``JOB_NOT_COMPLETE``.
"""

from __future__ import annotations

import base64
import csv
import io
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sandbox.salesforce.clock import cdc_datetime, rest_datetime
from sandbox.salesforce.errors import SalesforceError
from sandbox.salesforce.ids import base62, to_18
from sandbox.salesforce.org import Org
from sandbox.salesforce.soql import Query

__all__ = ["BulkJob", "csv_chunks", "decode_locator", "encode_locator"]


@dataclass
class BulkJob:
    id: str
    operation: str
    query: Query
    api_version: str
    created_ms: int
    created_by: str
    state: str = "UploadComplete"
    polls: int = 0
    stuck: bool = False
    ids: list[str] | None = None
    modstamp_ms: int = 0
    started: float = field(default_factory=time.monotonic)
    error_message: str | None = None

    @property
    def object(self) -> str:
        return self.query.sobject.name

    def info(self, *, detail: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "operation": self.operation,
            "object": self.object,
            "createdById": self.created_by,
            "createdDate": rest_datetime(self.created_ms),
            "systemModstamp": rest_datetime(self.modstamp_ms or self.created_ms),
            "state": self.state,
            "concurrencyMode": "Parallel",
            "contentType": "CSV",
            "apiVersion": float(self.api_version),
            "lineEnding": "LF",
            "columnDelimiter": "COMMA",
        }
        if detail:
            out.update(
                jobType="V2Query",
                numberRecordsProcessed=len(self.ids or []),
                retries=0,
                totalProcessingTime=0 if self.ids is None else 120,
            )
            if self.error_message:
                out["errorMessage"] = self.error_message
        return out

    def advance(self, org: Org, polls_needed: int, seconds_needed: float | None) -> None:
        """One poll's worth of progress."""
        if self.state not in ("UploadComplete", "InProgress"):
            return
        self.polls += 1
        if self.state == "UploadComplete":
            self.state = "InProgress"
            self.modstamp_ms = org.clock.now_ms()
            if polls_needed > 1 or seconds_needed is not None:
                return
        if self.stuck:
            return
        elapsed = time.monotonic() - self.started
        due = self.polls >= polls_needed if seconds_needed is None else elapsed >= seconds_needed
        if due:
            self.ids = org.execute(self.query, include_deleted=self.operation == "queryAll")
            self.state = "JobComplete"
            self.modstamp_ms = org.clock.now_ms()


def new_job_id(org: Org) -> str:
    n = org.stats.get("seq:bulk", 0) + 1
    org.stats["seq:bulk"] = n
    return to_18(f"750{org.org_id[3:5]}0000{base62(n * 7919 + 1000, 6)}")


def encode_locator(offset: int) -> str:
    return base64.b64encode(str(offset).encode()).decode().rstrip("=")


def decode_locator(locator: str) -> int:
    try:
        padded = locator + "=" * (-len(locator) % 4)
        return int(base64.b64decode(padded.encode(), validate=True).decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise SalesforceError(400, "INVALIDLOCATOR", f"Invalid locator: {locator}") from exc


def _csv_value(ftype: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if ftype == "datetime":
        return cdc_datetime(value)
    return str(value)


def csv_chunks(org: Org, job: BulkJob, start: int, end: int, rows_per_chunk: int = 1000) -> Iterator[bytes]:
    """Header row, then rows ``[start, end)`` of the job's result, a few hundred rows per bytes chunk."""
    assert job.ids is not None
    fields = job.query.fields
    buf = io.StringIO()
    writer = csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n")
    writer.writerow([fp.label for fp in fields])
    table = org.tables[job.object]
    for i in range(start, end):
        rec = table[job.ids[i]]
        writer.writerow([_csv_value(fp.field.type, org.get_path(rec, fp)) for fp in fields])
        if (i - start + 1) % rows_per_chunk == 0:
            yield buf.getvalue().encode()
            buf.seek(0)
            buf.truncate()
    if buf.tell():
        yield buf.getvalue().encode()
