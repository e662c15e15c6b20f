"""CE poller on httpx.MockTransport (no sockets): checkpoints after acks, resume, errors, resync, budget."""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import json
import tracemalloc
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from ce_poller.client import DataverseClient, StaticTokenSource, iter_values
from ce_poller.config import parse_connection
from ce_poller.limiter import UserBudget
from ce_poller.stores import FakeKnownKeys, KnownKey
from ce_poller.streams import ConnectionSync
from servicekit.connections import Connection, FakeCursorStore
from servicekit.errors import ConfigError, Transient
from servicekit.kafka import OutMessage
from servicekit.settings import FlashSettings

FIX = Path(__file__).parents[1] / "fixtures" / "dataverse"
ORG = "https://contoso.example/orgs/contoso"
API = f"{ORG}/api/data/v9.2/"
DELTA = f"{API}accounts?$deltatoken=900%2111%2f01%2f2026%2000%3a00%3a00"
NEXT_DELTA = f"{API}accounts?$deltatoken=901%2111%2f02%2f2026%2000%3a00%3a00"
USD = "db5b5fab-8f4d-4e27-9da1-494c73cf256d"


def _acc(i: int, v: int = 1) -> dict[str, Any]:
    return {"@odata.etag": f'W/"{v}"', "accountid": f"00000000-0000-0000-0000-{i:012d}", "name": f"A{i}",
            "accountnumber": f"C{i}", "_transactioncurrencyid_value": USD, "versionnumber": v}


def _page(rows: list[dict[str, Any]], *, next_link: str | None = None, delta: str | None = None) -> str:
    body: dict[str, Any] = {"@odata.context": f"{API}$metadata#accounts", "value": rows}
    if next_link:
        body["@odata.nextLink"] = next_link
    if delta:
        body["@odata.deltaLink"] = delta
    return json.dumps(body)


class FakeDataverse:
    """Two pages of accounts with change tracking; scripted failures by URL fragment."""

    def __init__(self) -> None:
        self.rows = [_acc(i) for i in range(1, 6)]
        self.requests: list[httpx.Request] = []
        self.failures: list[tuple[str, httpx.Response]] = []
        self.delta_body = _page([], delta=NEXT_DELTA)

    def fail(self, fragment: str, resp: httpx.Response) -> None:
        self.failures.append((fragment, resp))

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        url = str(request.url)
        for i, (frag, resp) in enumerate(self.failures):
            if frag in url:
                del self.failures[i]
                return resp
        if "transactioncurrencies" in url:
            return httpx.Response(200, text=json.dumps({"value": [{"transactioncurrencyid": USD,
                                                                   "isocurrencycode": "USD"}]}))
        if "organizations" in url:
            return httpx.Response(200, text=json.dumps({"value": [{"expirechangetrackingindays": 7}]}))
        if "$deltatoken" in url:
            return httpx.Response(200, text=self.delta_body)
        if "$filter=modifiedon" in url or "%24filter=modifiedon" in url:
            return httpx.Response(200, text=_page([]))
        assert "odata.track-changes" in request.headers.get("Prefer", "")
        if "skiptoken=2" in url:
            return httpx.Response(200, text=_page(self.rows[3:], delta=DELTA))
        return httpx.Response(200, text=_page(self.rows[:3], next_link=f"{API}accounts?$select=name&$skiptoken=2"))


class Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []


class RecordingPublisher:
    def __init__(self, log: Log) -> None:
        self.log = log
        self.messages: list[OutMessage] = []

    async def send_all(self, messages: Sequence[OutMessage]) -> None:
        self.messages += messages
        self.log.events.append(("published", [json.loads(m.value)["source_id"] for m in messages]))


class RecordingCursors(FakeCursorStore):
    def __init__(self, log: Log) -> None:
        super().__init__()
        self.log = log

    async def save(self, tenant_id: str, connection_id: str, entity: str, cursor: dict[str, Any]) -> None:
        await super().save(tenant_id, connection_id, entity, cursor)
        self.log.events.append(("saved", dict(cursor)))


def _sync(server: FakeDataverse, *, tokens: StaticTokenSource | None = None, sleeps: list[float] | None = None,
          now: Callable[[], dt.datetime] | None = None) -> tuple[ConnectionSync, Log, RecordingPublisher]:
    conn = Connection("acme", "ce-1", "dynamics-ce", ORG, {"tenant_id": "t", "client_id": "c", "client_secret": "s"},
                      {"entities": ["account"], "return_source": {"kind": "none"}, "page_size": 3})
    cc = parse_connection(conn)
    log = Log()

    t = [0.0]

    async def fake_sleep(s: float) -> None:
        (sleeps if sleeps is not None else []).append(s)
        t[0] += s

    http = httpx.AsyncClient(transport=httpx.MockTransport(server))
    budget = UserBudget(sleep=fake_sleep, clock=lambda: t[0])
    client = DataverseClient(http, cc.api, tokens or StaticTokenSource("t1", "t2"), budget,
                             sleep=fake_sleep, max_attempts=3)
    pub = RecordingPublisher(log)
    sync = ConnectionSync(cc, client, pub, RecordingCursors(log), FakeKnownKeys(), FlashSettings())
    if now is not None:
        sync.now = now
    return sync, log, pub


async def test_pages_are_published_before_their_checkpoint_then_delta_link() -> None:
    server = FakeDataverse()
    sync, log, pub = _sync(server)
    await sync.load_currencies()
    res = await sync.sync_entity(sync.conn.spec("account"))
    assert res.upserts == 5 and res.phase == "reread"
    kinds = [k for k, _ in log.events]
    assert kinds == ["published", "saved", "published", "saved", "saved"]
    assert log.events[1][1]["next"].endswith("skiptoken=2")          # page position checkpointed after page 1
    assert log.events[3][1]["phase"] == "reread" and log.events[3][1]["delta_link"] == DELTA
    assert log.events[4][1] == {"phase": "delta", "delta_link": DELTA, "delta_at": log.events[4][1]["delta_at"],
                                "generation": 1}
    first = json.loads(pub.messages[0].value)
    assert first["payload"].startswith('{"_transactioncurrencyid_value@flash.isocurrencycode":"USD",')
    assert json.loads(first["payload"])["accountid"] == first["source_id"]
    assert first["source_version"] == "1" and pub.messages[0].topic == "raw.dynamics-ce.account.v1"
    listing = next(r for r in server.requests if "/accounts" in str(r.url))
    prefer = listing.headers["Prefer"]
    assert "odata.track-changes" in prefer and "odata.maxpagesize=3" in prefer and "lookuplogicalname" in prefer
    assert listing.headers["OData-Version"] == "4.0"


async def test_resume_from_checkpointed_page_not_from_zero() -> None:
    server = FakeDataverse()
    sync, _, pub = _sync(server)
    await sync.cursors.save("acme", "ce-1", "account", {"phase": "initial", "generation": 1,
                                                       "next": f"{API}accounts?$select=name&$skiptoken=2",
                                                       "started_at": "2026-01-01T00:00:00Z"})
    await sync.sync_entity(sync.conn.spec("account"))
    listed = [str(r.url) for r in server.requests if "accounts" in str(r.url)]
    assert "skiptoken=2" in listed[0]
    assert [json.loads(m.value)["source_id"][-1] for m in pub.messages] == ["4", "5"]


async def test_retry_after_401_renewal_and_config_errors() -> None:
    server = FakeDataverse()
    sleeps: list[float] = []
    tokens = StaticTokenSource("old", "new")
    sync, _, _ = _sync(server, tokens=tokens, sleeps=sleeps)
    server.fail("accounts", httpx.Response(429, headers={"Retry-After": "7"},
                                           json={"error": {"code": "0x80072322", "message": "Number of requests"}}))
    server.fail("skiptoken=2", httpx.Response(401, text=(FIX / "error_unauthorized.json").read_text()))
    res = await sync.sync_entity(sync.conn.spec("account"))
    assert res.upserts == 5
    assert 7.0 in sleeps and sync.client.budget.throttled == 1
    assert tokens.renewals == 1
    assert [r.headers["Authorization"] for r in server.requests if "skiptoken=2" in str(r.url)] == [
        "Bearer old", "Bearer new"]

    server2 = FakeDataverse()
    sync2, _, _ = _sync(server2)
    server2.fail("accounts", httpx.Response(403, text=(FIX / "error_forbidden.json").read_text()))
    with pytest.raises(ConfigError, match="organisation-level prvReadSalesOrder"):
        await sync2.sync_entity(sync2.conn.spec("account"))

    server3 = FakeDataverse()
    sync3, _, _ = _sync(server3)
    for _ in range(2):
        server3.fail("accounts", httpx.Response(401, text=(FIX / "error_unauthorized.json").read_text()))
    with pytest.raises(ConfigError, match="refused the access token"):
        await sync3.sync_entity(sync3.conn.spec("account"))

    server4 = FakeDataverse()
    sync4, _, _ = _sync(server4)
    for _ in range(3):
        server4.fail("accounts", httpx.Response(503, json={"error": {"code": "", "message": "busy"}}))
    with pytest.raises(Transient, match="503"):
        await sync4.sync_entity(sync4.conn.spec("account"))


async def test_delta_upserts_and_tombstones_keyed_by_known_parent() -> None:
    server = FakeDataverse()
    sync, _, pub = _sync(server)
    await sync.sync_entity(sync.conn.spec("account"))
    pub.messages.clear()
    gone = _acc(2)["accountid"]
    server.delta_body = _page([_acc(1, v=9), {"@odata.context": f"{API}$metadata#accounts/$deletedEntity",
                                               "id": gone, "reason": "deleted"}], delta=NEXT_DELTA)
    res = await sync.sync_entity(sync.conn.spec("account"))
    assert (res.upserts, res.deletes) == (1, 1)
    msgs = [json.loads(m.value) for m in pub.messages]
    assert [(m["op"], m["source_id"][-1], m["source_version"]) for m in msgs] == [("upsert", "1", "9"),
                                                                                  ("delete", "2", "2")]
    cur = await sync.cursors.load("acme", "ce-1", "account")
    assert cur is not None and cur["delta_link"] == NEXT_DELTA
    assert gone not in await sync.keys.lookup("acme", "ce-1", "account", [gone])


async def test_the_reread_window_publishes_only_changed_rows() -> None:
    """Rows edited during the initial load are read again; those whose version was already published are
    not published twice (the known-key table holds the versions, after the broker's ack)."""
    server = FakeDataverse()
    sync, _, pub = _sync(server)
    reread = [_acc(1), _acc(4, v=3)]  # account 4 changed during the load; account 1 did not

    def with_reread(request: httpx.Request) -> httpx.Response:
        if "filter=modifiedon" in str(request.url):
            server.requests.append(request)
            return httpx.Response(200, text=_page(reread))
        return server(request)

    sync.client.vendor.http._transport = httpx.MockTransport(with_reread)
    res = await sync.sync_entity(sync.conn.spec("account"))
    assert res.phase == "reread" and res.unchanged == 1
    published = [(json.loads(m.value)["source_id"][-1], json.loads(m.value)["source_version"]) for m in pub.messages]
    assert published == [("1", "1"), ("2", "1"), ("3", "1"), ("4", "1"), ("5", "1"), ("4", "3")]


async def test_expired_delta_token_resyncs_and_infers_missed_deletes() -> None:
    server = FakeDataverse()
    sync, _, pub = _sync(server)
    await sync.sync_entity(sync.conn.spec("account"))
    ghost = "00000000-0000-0000-0000-000000000099"
    await sync.keys.record("acme", "ce-1", "account", [KnownKey(ghost, None, "4")], 1)  # deleted during the gap
    pub.messages.clear()
    server.fail("$deltatoken", httpx.Response(400, text=(FIX / "error_expired_token.json").read_text()))
    server.rows[1] = _acc(2, v=2)  # changed while the token was expired
    res = await sync.sync_entity(sync.conn.spec("account"))
    assert res.resynced and res.upserts == 5 and res.deletes == 1 and res.unchanged == 4
    msgs = [json.loads(m.value) for m in pub.messages]
    deletes = [m for m in msgs if m["op"] == "delete"]
    assert [(d["source_id"], d["source_version"]) for d in deletes] == [(ghost, "5")]
    # The full re-read publishes only what changed; its event id is the one a fresh sync gives that version.
    upserts = [m for m in msgs if m["op"] == "upsert"]
    assert [(m["source_id"][-1], m["source_version"]) for m in upserts] == [("2", "2")]
    fresh = FakeDataverse()
    fresh.rows[1] = _acc(2, v=2)
    sync_again, _, pub_again = _sync(fresh)
    await sync_again.sync_entity(sync_again.conn.spec("account"))
    assert upserts[0]["event_id"] in {json.loads(m.value)["event_id"] for m in pub_again.messages}
    assert sorted(k for k in await sync.keys.lookup("acme", "ce-1", "account", [a["accountid"] for a in server.rows])
                  ) == sorted(a["accountid"] for a in server.rows)
    cur = await sync.cursors.load("acme", "ce-1", "account")
    assert cur is not None and cur["generation"] == 2 and cur["phase"] == "delta"


async def test_token_age_warning_before_the_expiry_window() -> None:
    server = FakeDataverse()
    clock = [dt.datetime(2026, 11, 2, tzinfo=dt.UTC)]
    sync, _, _ = _sync(server, now=lambda: clock[0])
    await sync.sync_entity(sync.conn.spec("account"))   # stored token issued 11/01/2026
    assert await sync.check_token_ages() == []
    clock[0] = dt.datetime(2026, 11, 6, 12, tzinfo=dt.UTC)  # 5.5 days of 7: inside the 2-day warning window
    [warning] = await sync.check_token_ages()
    assert "5.5 days old" in warning and "expirechangetrackingindays" in warning


async def test_budget_window_and_concurrency_are_shared() -> None:
    t = [0.0]
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)
        t[0] += s

    budget = UserBudget(requests_per_window=3, window_seconds=10, concurrent=2, clock=lambda: t[0], sleep=sleep)
    for _ in range(3):
        async with budget:
            pass
    async with budget:           # 4th request in the window waits for the oldest to leave it
        pass
    assert sum(slept) == pytest.approx(10)
    gate = asyncio.Event()
    budget2 = UserBudget(concurrent=2)

    async def hold() -> None:
        async with budget2:
            await gate.wait()

    tasks = [asyncio.ensure_future(hold()) for _ in range(5)]
    await asyncio.sleep(0.01)
    assert budget2.inflight == 2
    gate.set()
    await asyncio.gather(*tasks)
    assert budget2.peak_inflight == 2
    budget2.observe({"x-ms-ratelimit-burst-remaining-xrm-requests": "3"})
    assert budget2._paused_until > 0


class PagedDataverse:
    """``pages`` pages of ``rows`` wide accounts, bodies streamed in chunks as a real connection delivers them."""

    def __init__(self, pages: int, rows: int) -> None:
        self.pages = pages
        self.rows = rows
        self.body_bytes = 0

    def body(self, n: int) -> bytes:
        rows = [{**_acc(n * self.rows + i), "description": f"{n}-{i}-" + "x" * 2000} for i in range(self.rows)]
        last = n == self.pages - 1
        return _page(rows, next_link=None if last else f"{API}accounts?$select=name&$skiptoken={n + 1}",
                     delta=DELTA if last else None).encode()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        url = str(request.url)
        if "transactioncurrencies" in url or "organizations" in url or "filter=modifiedon" in url:
            return httpx.Response(200, text=_page([]))
        n = int(url.rsplit("skiptoken=", 1)[1]) if "skiptoken=" in url else 0
        body = self.body(n)
        self.body_bytes += len(body)

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(body), 65536):
                yield body[i:i + 65536]

        return httpx.Response(200, content=chunks())


class CountingPublisher:
    def __init__(self) -> None:
        self.sent = 0

    async def send_all(self, messages: Sequence[OutMessage]) -> None:
        self.sent += len(messages)


class CountingKnownKeys(FakeKnownKeys):
    """Counts the keys recorded instead of keeping them (PostgreSQL keeps them in production)."""

    recorded = 0

    async def record(self, tenant: str, conn: str, entity: str, keys: Sequence[KnownKey], generation: int) -> None:
        self.recorded += len(keys)


async def test_a_sync_holds_a_few_pages_not_the_data_set() -> None:
    """Initial load of 40 pages (~4.5 MB of bodies) with the cyclic garbage collector off, as a service's raised
    thresholds nearly do: anything of a page that only the collector can free (httpx responses and their
    streams reference each other) stays allocated, and memory grows page after page."""
    server = PagedDataverse(pages=40, rows=50)
    conn = Connection("acme", "ce-1", "dynamics-ce", ORG, {"tenant_id": "t", "client_id": "c", "client_secret": "s"},
                      {"entities": ["account"], "return_source": {"kind": "none"}, "page_size": 50})
    cc = parse_connection(conn)
    pub = CountingPublisher()
    keys = CountingKnownKeys()
    async with httpx.AsyncClient(transport=httpx.MockTransport(server)) as http:
        client = DataverseClient(http, cc.api, StaticTokenSource(), UserBudget())
        sync = ConnectionSync(cc, client, pub, FakeCursorStore(), keys, FlashSettings())
        page = len(server.body(0))
        gc.collect()
        gc.disable()
        tracemalloc.start()
        try:
            res = await sync.sync_entity(cc.spec("account"))
            current, peak = tracemalloc.get_traced_memory()
            gc.collect()
            collectable = current - tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
            gc.enable()
    assert res.upserts == pub.sent == keys.recorded == 40 * 50 and res.pages == 40 + 1
    assert server.body_bytes >= 40 * page
    # A page is parsed and published while the next one is fetched: a few page sizes at most, not 40 of them.
    assert peak < 20 * page, (peak, page)
    # What waited for the collector: httpx's small per-request cycles only (page bodies there would be 2 x 40).
    assert collectable < 10 * page, (collectable, page)


FMT = "@OData.Community.Display.V1.FormattedValue"


class FormattedPages(PagedDataverse):
    """Pages as Dataverse sends them with ``odata.include-annotations="...FormattedValue"``: UTF-8 (not
    ASCII-escaped) with a formatted value beside each column, money formatted in the row's currency ("€").
    Bodies are built once, before anything is measured (building them is the server's memory, not ours)."""

    def __init__(self, pages: int, rows: int) -> None:
        super().__init__(pages, rows)
        self.bodies = [self.build(n) for n in range(pages)]

    def body(self, n: int) -> bytes:
        return self.bodies[n]

    def build(self, n: int) -> bytes:
        rows = []
        for i in range(self.rows):
            row: dict[str, Any] = {**_acc(n * self.rows + i), f"_transactioncurrencyid_value{FMT}": "Euro"}
            for c in range(24):
                row[f"new_amount{c}{FMT}"] = f"€{c * 1000 + i:,}.00"
                row[f"new_amount{c}"] = c * 1000 + i
            rows.append(row)
        last = n == self.pages - 1
        return json.dumps({"@odata.context": f"{API}$metadata#accounts", "value": rows,
                           **({"@odata.deltaLink": DELTA} if last else
                              {"@odata.nextLink": f"{API}accounts?$select=name&$skiptoken={n + 1}"})},
                          ensure_ascii=False).encode()


async def test_a_page_with_formatted_values_is_held_at_about_its_utf8_size() -> None:
    """With formatted values (a "€" in the page), what a table holds while it publishes a page and prefetches
    the next stays a few UTF-8 page sizes: no page decoded into one two-bytes-a-character ``str`` (CPython
    stores a str at the width of its widest character) and no page of parsed rows (a parsed row with its
    annotations takes several times its text) kept while the page is published. Before: 10.4 page sizes, after: 5.2."""
    server = FormattedPages(pages=6, rows=400)
    conn = Connection("acme", "ce-1", "dynamics-ce", ORG, {"tenant_id": "t", "client_id": "c", "client_secret": "s"},
                      {"entities": ["account"], "return_source": {"kind": "none"}, "page_size": 400})
    cc = parse_connection(conn)
    pub = CountingPublisher()
    async with httpx.AsyncClient(transport=httpx.MockTransport(server)) as http:
        client = DataverseClient(http, cc.api, StaticTokenSource(), UserBudget())
        client.vendor.check_addresses = False
        sync = ConnectionSync(cc, client, pub, FakeCursorStore(), CountingKnownKeys(), FlashSettings())
        page = len(server.body(0))
        gc.collect()
        gc.disable()
        tracemalloc.start()
        try:
            res = await sync.sync_entity(cc.spec("account"))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            gc.enable()
    assert res.upserts == pub.sent == 6 * 400
    assert server.body_bytes >= 6 * page
    assert peak < 7 * page, peak / page


@pytest.mark.parametrize("window", [7, 64, 1000, 1 << 20])
def test_iter_values_reads_a_utf8_page_window_by_window(monkeypatch: pytest.MonkeyPatch, window: int) -> None:
    """Records cut by a window's end, wider than a window, or with a multi-byte character on the cut come out
    whole and exactly as received, the same as from the decoded text."""
    import ce_poller.client as client_module

    rows = [{"id": i, "name": "Zoë " * i, f"m{FMT}": f"€{i},00", "note": "✓" * (i % 5) + " 🙂 "} for i in range(40)]
    text = json.dumps({"@odata.context": "x", "value": rows, "@odata.nextLink": f"{API}x?$skiptoken=2"},
                      ensure_ascii=False, indent=1)
    monkeypatch.setattr(client_module, "WINDOW", window)
    got = list(iter_values(text.encode()))
    assert got == list(iter_values(text))
    assert [o for _, o in got] == rows and [json.loads(t) for t, _ in got] == rows
    assert all(t in text for t, _ in got)


def test_iter_values_keeps_record_texts_exactly() -> None:
    text = (FIX / "salesorders_page.json").read_text()
    rows = list(iter_values(text))
    assert rows and all(t in text for t, _ in rows)
    assert all(json.loads(t) == o for t, o in rows)
    assert '"totalamount":' in rows[0][0] and rows[0][0].split('"totalamount":')[1].split(",")[0].count(".") == 1


def test_connection_settings_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    base = {"tenant_id": "t", "client_id": "c", "client_secret": "s"}
    with pytest.raises(ConfigError, match=r"credentials\.client_secret is missing; put"):
        parse_connection(Connection("a", "b", "dynamics-ce", ORG, {"tenant_id": "t", "client_id": "c"}, {}))
    with pytest.raises(ConfigError, match=r"settings\.entities names an unknown table 'nope'; put"):
        parse_connection(Connection("a", "b", "dynamics-ce", ORG, base, {"entities": ["nope"]}))
    with pytest.raises(ConfigError, match=r"page_size is 9000; put a whole number 1\.\.5000"):
        parse_connection(Connection("a", "b", "dynamics-ce", ORG, base, {"page_size": 9000}))
    # The endpoint policy (production: FLASH_ALLOW_SANDBOX_ENDPOINTS unset) refuses a non-Dataverse host.
    with monkeypatch.context() as m:
        m.delenv("FLASH_ALLOW_SANDBOX_ENDPOINTS", raising=False)
        with pytest.raises(ConfigError, match=r"not a dynamics-ce endpoint; put https://\*\.crm\*\.dynamics\.com"):
            parse_connection(Connection("a", "b", "dynamics-ce", ORG, base, {}))
        with pytest.raises(ConfigError, match=r"settings\.authority"):
            parse_connection(Connection("a", "b", "dynamics-ce", "https://contoso.crm.dynamics.com", base,
                                        {"authority": "https://login.evil.example/t"}))
        ok = parse_connection(Connection("a", "b", "dynamics-ce", "https://contoso.crm4.dynamics.com", base, {}))
        assert ok.api == "https://contoso.crm4.dynamics.com/api/data/v9.2/"
    cc = parse_connection(Connection("a", "b", "dynamics-ce", ORG + "/", base, {}))
    assert cc.scope == f"{ORG}/.default" and cc.authority == "https://login.microsoftonline.com/t"
    assert [s.logical for s in cc.entities][-2:] == ["msdyn_rma", "msdyn_rmaproduct"]
    assert "accountnumber" in cc.spec("account").select and "new_category" in cc.spec("product").select
