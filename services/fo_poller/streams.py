"""One connection's sync: initial load, then incremental reads that combine what the environment offers.

The sales order header has no modified date (``docs/vendor-facts.md``, F&O), so each cycle of the
``orders`` stream reads, in this order, and funnels every order it meets into one publish step:

1. a **mapped change date** (``field_map.change_date``, e.g. a customer extension) window, when mapped;
2. the **creation date** window (``field_map.created``): new orders;
3. the **invoice date** window on the invoice headers (``field_map.invoice_date``): orders invoiced since,
   and credit notes, which refresh their return orders;
4. **Business Events** received since the last cycle: a call back for each announced record;
5. a **full scan** every ``scan_interval_s`` (paged, every order), which is what finds changes no window
   sees (a status change without a change date).

Every window reaches back ``overlap_s`` before the previous cycle started. The publish step assembles
each order with its lines, computes its content version and asks the kit's published-versions ledger which
versions are new: unchanged orders publish nothing, whichever path met them. Cursors are saved only after
the broker acknowledged the records they cover (``connectorkit.cursors``).

``customers`` and ``products`` have no change date either: they are scanned (paged, hashed) every
``scan_interval_s``. ``returns`` are scanned the same way and refreshed early by credit notes and events.
All reads are cross-company and every id carries ``dataAreaId``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel

from canonical.topics import raw
from connectorkit.cursors import Checkpoint, PublishedVersions, Publisher
from connectorkit.deadletters import FakeSourceDeadLetters, Refetch, SourceDeadLetters, SourceLetter
from fo_poller.client import FoClient, odata_literal
from fo_poller.config import FoConnection
from fo_poller.events import EventInbox
from fo_poller.metadata import EntityInfo
from fo_poller.records import (
    CREDIT_NOTE,
    LINES,
    ORIGINAL_ORDERS,
    PRODUCER,
    RETURN_LINES,
    SOURCE,
    TOPIC_ENTITY,
    content_version,
    dumps,
    raw_message,
    source_id,
    source_version,
)
from servicekit.connections import CursorStore
from servicekit.errors import Poison
from servicekit.kafka import OutMessage
from servicekit.logging import get_logger
from servicekit.settings import FlashSettings

__all__ = ["Assembled", "FoSync", "StreamCursor"]

log = get_logger(__name__)

Row = dict[str, Any]


class StreamCursor(BaseModel):
    """Where one stream stands (``cursors`` row of (tenant, connection, stream))."""

    phase: Literal["initial", "incremental"] = "initial"
    next_link: str | None = None
    """Initial load / scan: the nextLink to resume at."""
    scanning: bool = False
    started_at: dt.datetime | None = None
    since: dt.datetime | None = None
    """Start of the previous incremental cycle (the windows reach back from it)."""
    last_scan: dt.datetime | None = None


@dataclass
class Assembled:
    stream: str
    sid: str
    payload: Row
    order_source_id: str | None
    url: str


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class CycleResult:
    published: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    read: dict[str, int] = field(default_factory=lambda: defaultdict(int))


class FoSync:
    """See the module docstring. ``meta`` is the environment's entity info, read from ``$metadata``."""

    def __init__(self, cc: FoConnection, client: FoClient, publisher: Publisher, cursors: CursorStore,
                 versions: PublishedVersions, settings: FlashSettings, meta: dict[str, EntityInfo], *,
                 inbox: EventInbox | None = None, dead_letters: SourceDeadLetters | None = None,
                 now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)) -> None:
        self.cc = cc
        self.client = client
        self.publisher = publisher
        self.cursors = cursors
        self.versions = versions
        self.settings = settings
        self.meta = meta
        self.inbox = inbox
        self.now = now
        self._last_observed: dt.datetime | None = None
        self._invoices_seen: list[tuple[str, str]] = []
        self._deferred = False
        self.dead_letters: SourceDeadLetters = dead_letters or FakeSourceDeadLetters(settings, PRODUCER)

    # ---------------------------------------------------------------------------------------- helpers

    def es(self, role: str) -> str:
        return self.cc.entity_sets[role]

    def _companies(self, flt: str | None) -> str | None:
        if not self.cc.companies:
            return flt
        comp = " or ".join(f"dataAreaId eq {odata_literal(c)}" for c in self.cc.companies)
        return f"({comp})" + (f" and ({flt})" if flt else "")

    def checkpoint(self, stream: str) -> Checkpoint[StreamCursor]:
        return Checkpoint(self.cursors, StreamCursor, self.cc.tenant_id, self.cc.connection_id, stream)

    async def _by_numbers(self, role: str, field_name: str, keys: Iterable[tuple[str, str]],
                          extra_filter: str | None = None) -> list[Row]:
        """Rows of ``role`` whose ``field_name`` is one of the (company, value) pairs: ``or`` batches per
        company (the service supports no ``in``), ``settings.concurrency`` requests at a time."""
        by_company: dict[str, list[str]] = defaultdict(list)
        for company, value in dict.fromkeys(keys):
            by_company[company].append(value)
        filters: list[str] = []
        for company, values in by_company.items():
            for i in range(0, len(values), self.cc.batch_size):
                batch = values[i:i + self.cc.batch_size]
                ors = " or ".join(f"{field_name} eq {odata_literal(v)}" for v in batch)
                flt = f"dataAreaId eq {odata_literal(company)} and ({ors})"
                filters.append(flt + (f" and ({extra_filter})" if extra_filter else ""))
        gate = asyncio.Semaphore(self.cc.concurrency)

        async def one(flt: str) -> list[Row]:
            async with gate:
                return await self.client.rows(self.es(role), flt)

        out: list[Row] = []
        for rows in await asyncio.gather(*(one(f) for f in filters)):
            out += rows
        return out

    # ---------------------------------------------------------------------------------------- assembly

    async def assemble_orders(self, headers: Sequence[Row]) -> list[Assembled]:
        num, lnum = self.cc.f("order_number"), self.cc.f("line_order_number")
        keys = [(str(h["dataAreaId"]).lower(), str(h[num])) for h in headers]
        lines: dict[tuple[str, str], list[Row]] = defaultdict(list)
        for ln in await self._by_numbers("lines", lnum, keys):
            lines[(str(ln["dataAreaId"]).lower(), str(ln[lnum]))].append(ln)
        out = []
        for h, k in zip(headers, keys, strict=True):
            rec = dict(h)
            rec[LINES] = sorted(lines.get(k, []), key=lambda r: str(r.get(self.cc.f("line_id"))))
            out.append(Assembled("orders", source_id(*k), rec, source_id(*k), self.es("orders")))
        return out

    async def assemble_returns(self, headers: Sequence[Row]) -> list[Assembled]:
        cc = self.cc
        num = cc.f("return_number")
        keys = [(str(h["dataAreaId"]).lower(), str(h[num])) for h in headers]
        rl_num, ref = cc.f("return_line_order_number"), cc.f("return_reference")
        lines: dict[tuple[str, str], list[Row]] = defaultdict(list)
        for ln in await self._by_numbers("return_lines", rl_num, keys):
            lines[(str(ln["dataAreaId"]).lower(), str(ln[rl_num]))].append(ln)
        inv_num = cc.f("invoice_order_number")
        credits: dict[tuple[str, str], Row] = {}
        for inv in await self._by_numbers("invoices", inv_num, keys):
            credits[(str(inv["dataAreaId"]).lower(), str(inv[inv_num]))] = inv
        lots = [(c, str(ln[ref])) for (c, _), ls in lines.items() for ln in ls if ln.get(ref)]
        line_id, line_order = cc.f("line_id"), cc.f("line_order_number")
        originals: dict[tuple[str, str], str] = {}
        for ol in await self._by_numbers("lines", line_id, lots):
            originals[(str(ol["dataAreaId"]).lower(), str(ol[line_id]))] = str(ol[line_order])
        out = []
        for h, k in zip(headers, keys, strict=True):
            rec = dict(h)
            mine = sorted(lines.get(k, []), key=lambda r: str(r.get(cc.f("return_line_id"))))
            rec[RETURN_LINES] = mine
            rec[CREDIT_NOTE] = credits.get(k)
            rec[ORIGINAL_ORDERS] = {str(ln[ref]): originals[(k[0], str(ln[ref]))] for ln in mine
                                    if ln.get(ref) and (k[0], str(ln[ref])) in originals}
            anchor = next(iter(rec[ORIGINAL_ORDERS].values()), None)
            out.append(Assembled("returns", source_id(*k), rec, source_id(k[0], anchor) if anchor else None,
                                 self.es("returns")))
        return out

    def assemble_plain(self, stream: str, rows: Sequence[Row]) -> list[Assembled]:
        key = self.cc.f("customer_account" if stream == "customers" else "product_item")
        role = "customers" if stream == "customers" else "products"
        return [Assembled(stream, source_id(r["dataAreaId"], r[key]), dict(r), None, self.es(role)) for r in rows]

    _KEY_FIELD = {"orders": "order_number", "returns": "return_number", "customers": "customer_account",
                  "products": "product_item"}

    async def deliverable(self, stream: str, rows: Sequence[Row]) -> list[Row]:
        """The rows that carry their company and key; the others go to ``dlq.fo-poller.v1`` with the reason
        (before the cursor moves past them), never silently dropped."""
        key = self.cc.f(self._KEY_FIELD[stream])
        good: list[Row] = []
        dead: list[SourceLetter] = []
        for r in rows:
            company, value = r.get("dataAreaId"), r.get(key)
            if company and value not in (None, ""):
                good.append(r)
                continue
            missing = " and ".join(n for n, v in (("dataAreaId", company), (key, value)) if not v)
            sid = source_id(company, value) if company and value else "?"
            ref = Refetch(SOURCE, self.cc.tenant_id, self.cc.connection_id, stream, sid,
                          {"stream": stream, "entity_set": self.es(stream)})
            dead.append(SourceLetter(ref, self.settings.topic(raw(SOURCE, TOPIC_ENTITY[stream])), Poison(
                f"{self.es(stream)} row without {missing}: every record needs its company and key (read with "
                f"cross-company=true; settings.field_map.{self._KEY_FIELD[stream]} = {key})"), dumps(r)))
        if dead:
            await self.dead_letters.send(dead)
        return good

    async def assemble(self, stream: str, rows: Sequence[Row]) -> list[Assembled]:
        rows = await self.deliverable(stream, rows)
        if stream == "orders":
            return await self.assemble_orders(rows)
        if stream == "returns":
            return await self.assemble_returns(rows)
        return self.assemble_plain(stream, rows)

    # ---------------------------------------------------------------------------------------- publish

    def _observed(self) -> dt.datetime:
        """Now, strictly after the previous call: source versions of this connection never tie or go back."""
        t = self.now()
        if self._last_observed is not None and t <= self._last_observed:
            t = self._last_observed + dt.timedelta(microseconds=1)
        self._last_observed = t
        return t

    async def publish(self, items: Sequence[Assembled], result: CycleResult) -> None:
        """Publish what is new (content version unseen), wait for the broker, then record the versions."""
        if not items:
            return
        by_stream: dict[str, list[tuple[Assembled, str]]] = defaultdict(list)
        for a in items:
            by_stream[a.stream].append((a, content_version(a.payload)))
        for stream, pairs in by_stream.items():
            latest = {a.sid: (a, v) for a, v in pairs}  # one record met twice in a cycle publishes once
            fresh = await self.versions.unseen(self.cc.tenant_id, self.cc.connection_id, stream,
                                               [(sid, v) for sid, (_, v) in latest.items()])
            messages: list[OutMessage] = []
            done: list[tuple[str, str]] = []
            observed = self._observed()
            for sid, (a, v) in latest.items():
                result.read[stream] += 1
                if sid not in fresh:
                    continue
                messages.append(raw_message(
                    self.settings, tenant_id=self.cc.tenant_id, connection_id=self.cc.connection_id, stream=stream,
                    sid=sid, version=source_version(observed, v), payload=dumps(a.payload),
                    url=self.cc.data_url + a.url, order_source_id=a.order_source_id, observed_at=observed))
                done.append((sid, v))
            if messages:
                await self.publisher.send_all(messages)
                await self.versions.record(self.cc.tenant_id, self.cc.connection_id, stream, done)
                result.published[stream] += len(messages)

    # ---------------------------------------------------------------------------------------- streams

    async def scan(self, stream: str, cp: Checkpoint[StreamCursor], cur: StreamCursor, result: CycleResult) -> None:
        """Page through the whole entity (resuming at the saved nextLink), publishing what changed."""
        start = cur.next_link
        if not cur.scanning:
            cur.scanning, cur.started_at = True, self.now()
        what = "initial load" if cur.phase == "initial" else "scan"
        pages = 0
        async for page, nxt in self.client.pages(self.es(stream), self._companies(None), start=start):
            await self.publish(await self.assemble(stream, page), result)
            cur.next_link = nxt
            await cp.save(cur)  # the page is acknowledged: a restart resumes after it
            pages += 1
            if nxt and (cur.phase == "initial" or pages % 20 == 0):
                log.info(f"{what} in progress", stream=stream, pages=pages, read=result.read.get(stream, 0),
                         published=result.published.get(stream, 0), resumed=start is not None)
        cur.scanning, cur.next_link = False, None
        cur.last_scan = cur.started_at
        if cur.phase == "initial":
            cur.phase, cur.since = "incremental", cur.started_at
        await cp.save(cur)
        log.info(f"{what} done", stream=stream, pages=pages, read=result.read.get(stream, 0),
                 published=result.published.get(stream, 0))

    def _scan_due(self, cur: StreamCursor) -> bool:
        if cur.phase == "initial" or cur.scanning or cur.last_scan is None:
            return True
        return (self.now() - cur.last_scan).total_seconds() >= self.cc.scan_interval_s

    async def orders_cycle(self, result: CycleResult, announced: dict[str, list[tuple[str, str]]]) -> list[
            tuple[str, str]]:
        """The incremental reads of the orders stream; returns (company, number) of credit notes met."""
        cp = self.checkpoint("orders")
        cur = await cp.load() or StreamCursor()
        if cur.phase == "initial" or cur.scanning:
            await self.scan("orders", cp, cur, result)
            # Announced records may have been read before they changed: they wait for the next cycle.
            self._deferred = bool(announced.get("orders"))
            return []
        started = self.now()
        since = (cur.since or started) - dt.timedelta(seconds=self.cc.overlap_s)
        headers: dict[tuple[str, str], Row] = {}
        num = self.cc.f("order_number")

        def keep(rows: Iterable[Row]) -> None:
            for r in rows:
                headers[(str(r["dataAreaId"]).lower(), str(r[num]))] = r

        change = self.cc.field_map.get("change_date")
        if change:
            keep(await self.client.rows(self.es("orders"), self._companies(f"{change} ge {_iso(since)}")))
        keep(await self.client.rows(self.es("orders"), self._companies(f"{self.cc.f('created')} ge {_iso(since)}")))
        inv_date, inv_order = self.cc.f("invoice_date"), self.cc.f("invoice_order_number")
        day = since.date().isoformat() if self.meta[self.es("invoices")].fields.get(inv_date) == "Edm.Date" \
            else _iso(since)
        # The invoice date is a date: the window re-reads the day's invoices every cycle. The ledger of invoice
        # rows already acted on (stream "invoices", never published) keeps that to one lookup.
        inv_rows = await self.client.rows(self.es("invoices"), self._companies(f"{inv_date} ge {day}"))
        inv_num = self.cc.f("invoice_number")
        index = {source_id(r["dataAreaId"], r[inv_num]): (r, content_version(r)) for r in inv_rows}
        new = await self.versions.unseen(self.cc.tenant_id, self.cc.connection_id, "invoices",
                                         [(k, v) for k, (_, v) in index.items()])
        self._invoices_seen = [(k, index[k][1]) for k in new]
        invoiced = [(str(r["dataAreaId"]).lower(), str(r[inv_order])) for k, (r, _) in index.items() if k in new]
        wanted = [k for k in invoiced + announced.get("orders", []) if k not in headers]
        found = await self._by_numbers("orders", num, wanted)
        keep(found)
        await self.publish(await self.assemble("orders", list(headers.values())), result)
        missing = [k for k in wanted if k not in headers]  # invoices of return orders, events about returns
        if self._scan_due(cur):
            cur.since = started
            await cp.save(cur)
            await self.scan("orders", cp, cur, result)
        cur.since = started
        await cp.save(cur)
        return missing

    async def returns_cycle(self, result: CycleResult, refresh: Sequence[tuple[str, str]]) -> None:
        cp = self.checkpoint("returns")
        cur = await cp.load() or StreamCursor()
        if refresh and cur.phase == "incremental":
            rows = await self._by_numbers("returns", self.cc.f("return_number"), refresh)
            await self.publish(await self.assemble("returns", rows), result)
        if self._scan_due(cur):
            await self.scan("returns", cp, cur, result)

    async def plain_cycle(self, stream: str, result: CycleResult) -> None:
        cp = self.checkpoint(stream)
        cur = await cp.load() or StreamCursor()
        if self._scan_due(cur):
            await self.scan(stream, cp, cur, result)

    async def run_cycle(self) -> CycleResult:
        """One pass over every stream of the connection (customers and products first: orders resolve
        against them)."""
        result = CycleResult()
        announced: dict[str, list[tuple[str, str]]] = {"orders": []}
        if self.inbox is not None:
            announced["orders"] = [(a.company, a.number) for a in self.inbox.drain()]
        try:
            for stream in ("customers", "products"):
                if stream in self.cc.streams:
                    await self.plain_cycle(stream, result)
            refresh: list[tuple[str, str]] = []
            if "orders" in self.cc.streams:
                refresh = await self.orders_cycle(result, announced)
            if "returns" in self.cc.streams:
                await self.returns_cycle(result, refresh)
        except BaseException:
            if self.inbox is not None:
                self.inbox.requeue()  # the announced records are called back on the next attempt
            raise
        if self._invoices_seen:
            await self.versions.record(self.cc.tenant_id, self.cc.connection_id, "invoices", self._invoices_seen)
            self._invoices_seen = []
        if self.inbox is not None:
            if self._deferred:
                self.inbox.requeue()
                self._deferred = False
            else:
                await self.inbox.handled()
        return result

    # ---------------------------------------------------------------------------------------- sample

    async def sample(self, limit: int) -> dict[str, list[Assembled]]:
        """Up to ``limit`` records per stream, assembled as published; moves no cursor, publishes nothing."""
        out: dict[str, list[Assembled]] = {}
        for stream in self.cc.streams:
            role = stream
            async for page, _ in self.client.pages(self.es(role), self._companies(None), page_size=limit,
                                                   extra={"$top": str(limit)}):
                out[stream] = await self.assemble(stream, page[:limit])
                break
        return out
