"""The compound-cursor poller without sockets: rows sharing the last SystemModstamp are never skipped, the
cursor moves only after the broker acknowledged, suspicious empty pages and QUERY_TIMEOUT are never
success, Bulk CSV is parsed as a stream."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from canonical.events import decode_raw
from servicekit.connections import Connection, FakeCursorStore
from servicekit.errors import Transient
from servicekit.kafka import OutMessage
from servicekit.settings import FlashSettings
from sf_poller.bulk import iter_csv_rows
from sf_poller.sync import ConnectionSync, compound_where
from sfconnect.client import QuotaGovernor, SalesforceClient
from sfconnect.config import Quota, parse_connection
from sfconnect.records import norm_ts

FIX = Path(__file__).parents[1] / "fixtures" / "salesforce"
PAGE = json.loads((FIX / "query_orders_page1.json").read_text())
ROWS: list[dict[str, Any]] = PAGE["records"]
INSTANCE = "https://acme.my.salesforce.com"
_CUR = re.compile(r"SystemModstamp > (\S+) OR \(SystemModstamp = \S+ AND Id > '([^']*)'\)")
_UPPER = re.compile(r"SystemModstamp <= (\S+)")
_FROM = re.compile(r"SystemModstamp >= (\S+)")


class Log:
    def __init__(self) -> None:
        self.entries: list[tuple[str, Any]] = []


class RecordingPublisher:
    def __init__(self, log: Log, fail_on_call: int | None = None) -> None:
        self.log = log
        self.calls = 0
        self.fail_on_call = fail_on_call
        self.ids: list[str] = []

    async def send_all(self, messages: Sequence[OutMessage]) -> list[tuple[int, int]]:
        self.calls += 1
        if self.fail_on_call == self.calls:
            raise Transient("broker down")
        ids = [decode_raw(m.value).source_id for m in messages]
        self.ids.extend(ids)
        self.log.entries.append(("send", ids))
        return [(0, i) for i in range(len(messages))]


class LoggingCursors(FakeCursorStore):
    def __init__(self, log: Log) -> None:
        super().__init__()
        self.log = log

    async def save(self, tenant_id: str, connection_id: str, entity: str, cursor: dict[str, Any]) -> None:
        await super().save(tenant_id, connection_id, entity, cursor)
        self.log.entries.append(("save", dict(cursor)))


def _key(r: dict[str, Any]) -> tuple[str, str]:
    return norm_ts(r["SystemModstamp"]) or "", r["Id"]


class QueryServer:
    """Answers queryAll with the fixture rows, evaluating the compound predicate, pages of ``page``."""

    def __init__(self, rows: list[dict[str, Any]], page: int = 7) -> None:
        self.rows = sorted(rows, key=_key)
        self.page = page
        self.cursors: dict[str, list[dict[str, Any]]] = {}
        self.queries: list[str] = []
        self.faults: list[httpx.Response] = []
        self.empty_page = False

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/services/oauth2/token":
            return httpx.Response(200, json={"access_token": "t", "instance_url": INSTANCE, "id": "x/id/00D/005"})
        if self.faults:
            return self.faults.pop(0)
        if "/queryAll/" in request.url.path:
            cid, _, offset = request.url.path.rsplit("/", 1)[1].rpartition("-")
            return self._page(cid, int(offset))
        assert request.url.path.endswith("/queryAll"), "incremental reads use queryAll (deletes included)"
        q = request.url.params["q"]
        self.queries.append(q)
        rows = self.rows
        m = _CUR.search(q)
        if m:
            ts, last = norm_ts(m.group(1)) or "", m.group(2)
            rows = [r for r in rows if _key(r) > (ts, last) and (_key(r)[0] > ts or r["Id"] > last)]
        f = _FROM.search(q)
        if f:
            rows = [r for r in rows if _key(r)[0] >= (norm_ts(f.group(1)) or "")]
        u = _UPPER.search(q)
        if u:
            rows = [r for r in rows if _key(r)[0] <= (norm_ts(u.group(1)) or "")]
        cid = f"01g{len(self.cursors)}"
        self.cursors[cid] = rows
        return self._page(cid, 0)

    def _page(self, cid: str, start: int) -> httpx.Response:
        rows = self.cursors[cid]
        end = min(len(rows), start + self.page)
        body: dict[str, Any] = {"totalSize": len(rows), "done": end >= len(rows),
                                "records": [] if self.empty_page and start > 0 else rows[start:end]}
        if end < len(rows):
            body["nextRecordsUrl"] = f"/services/data/v66.0/queryAll/{cid}-{end}"
        return httpx.Response(200, json=body, headers={"Sforce-Limit-Info": "api-usage=10/100000"})


def _sync(server: QueryServer, log: Log, publisher: RecordingPublisher | None = None,
          **settings: Any) -> tuple[ConnectionSync, LoggingCursors, RecordingPublisher]:
    conn = parse_connection(Connection("acme", "sf1", "salesforce", INSTANCE, {"client_id": "c", "client_secret": "s"},
                                       {"objects": ["Order"], "bulk_threshold": 0, "cdc": False, **settings}))

    async def no_sleep(s: float) -> None:
        return None

    client = SalesforceClient(httpx.AsyncClient(transport=httpx.MockTransport(server)), conn.my_domain, "c", "s",
                              governor=QuotaGovernor(Quota()), sleep=no_sleep)
    cursors = LoggingCursors(log)
    pub = publisher or RecordingPublisher(log)
    return ConnectionSync(conn, client, pub, cursors, FlashSettings()), cursors, pub


def test_fixture_has_timestamp_collisions() -> None:
    stamps = [r["SystemModstamp"] for r in ROWS]
    assert len(set(stamps)) < len(stamps)


def test_compound_where() -> None:
    assert compound_where(None, None) == ""
    w = compound_where("2025-10-08T01:02:21.846+0000", "801x")
    assert w == (" WHERE (SystemModstamp > 2025-10-08T01:02:21.846Z OR "
                 "(SystemModstamp = 2025-10-08T01:02:21.846Z AND Id > '801x'))")


async def test_compound_cursor_never_skips_rows_sharing_the_last_timestamp() -> None:
    ordered = sorted(ROWS, key=_key)
    i = next(i for i in range(len(ordered) - 1) if _key(ordered[i])[0] == _key(ordered[i + 1])[0])
    log = Log()
    server = QueryServer(ROWS, page=i + 1)  # the first page ends inside a group sharing one timestamp
    # the exact compound cursor (no overlap window: a new process would re-read the window once)
    sync, cursors, pub = _sync(server, log, RecordingPublisher(log, fail_on_call=2), overlap_s=0)
    with pytest.raises(Transient):
        await sync.run_cycle()
    saved = cursors.cursors[("acme", "sf1", "Order")]
    assert (saved["ts"], saved["id"]) == _key(ordered[i])
    assert _key(ordered[i + 1])[0] == saved["ts"]  # the next row has the same SystemModstamp
    sync2, _, pub2 = _sync(server, log, overlap_s=0)
    sync2.cursors = cursors
    await sync2.run_cycle()
    assert ordered[i + 1]["Id"] in pub2.ids  # a plain "> ts" watermark would have skipped it
    assert pub.ids + pub2.ids == [r["Id"] for r in ordered]  # every row exactly once, in order
    assert "SystemModstamp = " in server.queries[-1] and "ORDER BY SystemModstamp, Id" in server.queries[-1]


async def test_overlap_window_publishes_rows_committed_behind_the_cursor_once() -> None:
    rows = sorted(ROWS, key=_key)
    log = Log()
    server = QueryServer(rows, page=50)
    sync, cursors, pub = _sync(server, log, overlap_s=60)
    await sync.run_cycle()
    n = len(pub.ids)
    assert n == len(rows)
    await sync.run_cycle()  # the window behind the cursor is re-read, nothing in it is published again
    assert len(pub.ids) == n and "SystemModstamp >= " in server.queries[-1]
    # a long transaction commits a row stamped 5 s before the cursor, after the cursor passed that time
    last = _key(rows[-1])
    stamp = dt.datetime.fromisoformat(last[0].replace("Z", "+00:00")) - dt.timedelta(seconds=5)
    late = {**rows[-1], "Id": "801f900000000LATE", "SystemModstamp": stamp.strftime("%Y-%m-%dT%H:%M:%S.000+0000")}
    server.rows = sorted([*rows, late], key=_key)
    await sync.run_cycle()
    assert pub.ids[n:] == [late["Id"]] and sync.late == 1
    saved = cursors.cursors[("acme", "sf1", "Order")]
    assert (saved["ts"], saved["id"]) == last  # the cursor never moves back
    await sync.run_cycle()
    assert pub.ids[n:] == [late["Id"]]  # published once


async def test_every_cursor_save_follows_the_ack_of_the_records_it_covers() -> None:
    log = Log()
    sync, _, _ = _sync(QueryServer(ROWS, page=5), log)
    await sync.run_cycle()
    acked: set[str] = set()
    order = [r["Id"] for r in sorted(ROWS, key=_key)]
    for kind, value in log.entries:
        if kind == "send":
            acked.update(value)
        else:
            covered = order[: order.index(value["id"]) + 1]
            assert set(covered) <= acked


async def test_deleted_rows_are_published_as_deletes() -> None:
    rows = [dict(r) for r in ROWS[:6]]
    rows[2]["IsDeleted"] = True
    log = Log()
    sync, _, _ = _sync(QueryServer(rows), log)
    res = await sync.run_cycle()
    assert (res["Order"].upserts, res["Order"].deletes) == (5, 1)


async def test_suspicious_empty_page_is_not_success() -> None:
    log = Log()
    server = QueryServer(ROWS, page=7)
    server.empty_page = True
    sync, cursors, _ = _sync(server, log)
    with pytest.raises(Transient, match="empty page"):
        await sync.run_cycle()
    first = cursors.cursors[("acme", "sf1", "Order")]
    assert first["id"] == server.rows[6]["Id"]  # only the real first page was checkpointed


async def test_query_timeout_narrows_the_window_and_never_reports_success() -> None:
    log = Log()
    server = QueryServer(ROWS, page=50)
    sync, cursors, pub = _sync(server, log, overlap_s=0)
    cursors.cursors[("acme", "sf1", "Order")] = {"phase": "incremental", "ts": norm_ts(ROWS[0]["SystemModstamp"]),
                                                 "id": ROWS[0]["Id"]}
    server.faults.append(httpx.Response(400, json=[{"errorCode": "QUERY_TIMEOUT", "message": "too long"}]))
    with pytest.raises(Transient, match="narrowing the window"):
        await sync.run_cycle()
    assert pub.ids == [] and cursors.saves == []
    await sync.run_cycle()
    assert any("SystemModstamp <= " in q for q in server.queries)
    assert set(pub.ids) == {r["Id"] for r in ROWS[1:]}


async def test_large_initial_load_switches_to_bulk() -> None:
    log = Log()
    server = QueryServer(ROWS, page=50)
    posted: list[dict[str, Any]] = []
    inner = server.__call__

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/jobs/query") and request.method == "POST":
            posted.append(json.loads(request.content))
            return httpx.Response(200, json={"id": "750x", "state": "UploadComplete"})
        if "/jobs/query/750x" in request.url.path:
            if request.url.path.endswith("/results"):
                assert request.url.params["maxRecords"] == "50000"
                return httpx.Response(200, text=(FIX / "bulk_orders.csv").read_text(),
                                      headers={"Sforce-Locator": "null", "Sforce-NumberOfRecords": "12"})
            if request.method == "DELETE":
                return httpx.Response(204)
            return httpx.Response(200, json={"id": "750x", "state": "JobComplete"})
        return inner(request)

    sync, cursors, pub = _sync(server, log, bulk_threshold=10)
    sync.client.http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    await sync.run_cycle()
    assert posted and posted[0]["operation"] == "queryAll"  # deleted / archived rows too, as REST reads them
    assert len(pub.ids) == 12
    cur = cursors.cursors[("acme", "sf1", "Order")]
    assert cur["phase"] == "incremental" and cur["ts"].endswith("Z")
    assert next(c[3]["phase"] for c in cursors.saves) == "bulk"  # the job id was persisted first


class _Chunks(httpx.AsyncByteStream):
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def __aiter__(self):  # type: ignore[no-untyped-def]
        for c in self.chunks:
            yield c


async def test_csv_rows_are_streamed_with_quoted_newlines_across_chunks() -> None:
    body = b'"Id","Description","Amount"\n"1","plain","1.5"\n"2","two\nlines, ""quoted""","2"\n"3","","3"\n'
    chunks = [body[i:i + 7] for i in range(0, len(body), 7)]
    resp = httpx.Response(200, stream=_Chunks(chunks))
    rows = [r async for r in iter_csv_rows(resp)]
    assert rows == [
        {"Id": "1", "Description": "plain", "Amount": "1.5"},
        {"Id": "2", "Description": 'two\nlines, "quoted"', "Amount": "2"},
        {"Id": "3", "Description": "", "Amount": "3"},
    ]
