"""SOQL reads that publish records, shared by the poller and the CDC listener.

:class:`RecordReader` publishes vendor records as RawRecords (waiting for the broker's acknowledgement before
any cursor moves), resolves credit-memo anchors, fetches records back by id and reconciles an object by
SOQL since a time. The poller's incremental sync (``sf_poller.sync``) builds on it; the CDC listener uses it
for fetch-backs and overflow reconciles.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from canonical.events import RawRecord
from servicekit.connections import CursorStore
from servicekit.errors import Transient
from servicekit.kafka import OutMessage
from servicekit.logging import get_logger
from servicekit.settings import FlashSettings
from sfconnect.client import SalesforceClient, ShapeMismatch
from sfconnect.config import SfConnection
from sfconnect.cursors import SfCursor, checked
from sfconnect.deadletters import DeadLetterSink, FakeDeadLetters, SourceLetter
from sfconnect.published import FakePublishedStore, Published, PublishedStore
from sfconnect.records import field_value, norm_ts, out_message, raw_record, select_soql, soql_ts, version_of
from sfconnect.shape import OrgShape, learn_shape, load_shape, save_shape

__all__ = ["ID_CHUNK", "Publisher", "RecordReader", "compound_where", "fmt_ts", "parse_ts"]

log = get_logger(__name__)

ID_CHUNK = 200


class Publisher(Protocol):
    async def send_all(self, messages: Sequence[OutMessage]) -> Any: ...


def compound_where(ts: str | None, last_id: str | None, upper: str | None = None, *, overlap_s: float = 0.0) -> str:
    """The compound-cursor predicate (module docstring); ``upper`` bounds a narrowed window, ``overlap_s``
    re-reads that far behind the cursor instead."""
    parts: list[str] = []
    if ts and overlap_s > 0:
        parts.append(f"SystemModstamp >= {fmt_ts(parse_ts(soql_ts(ts)) - dt.timedelta(seconds=overlap_s))}")
    elif ts:
        t = soql_ts(ts)
        parts.append(f"(SystemModstamp > {t} OR (SystemModstamp = {t} AND Id > '{last_id or ''}'))")
    if upper:
        parts.append(f"SystemModstamp <= {soql_ts(upper)}")
    return (" WHERE " + " AND ".join(parts)) if parts else ""


def parse_ts(s: str) -> dt.datetime:
    return dt.datetime.fromisoformat(s.replace("Z", "+00:00"))


def fmt_ts(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


@dataclass
class RecordReader:
    """Publishes the records of one connection; see the module docstring."""

    conn: SfConnection
    client: SalesforceClient
    publisher: Publisher
    cursors: CursorStore
    settings: FlashSettings
    shape: OrgShape | None = None
    """The org's shape (:mod:`sfconnect.shape`); None: the full field lists."""
    store: PublishedStore = field(default_factory=FakePublishedStore)
    """Versions and payloads already published (services pass the PostgreSQL store)."""
    published: int = 0
    skipped: int = 0
    """Records read again whose version was already published (not sent)."""
    last_published: list[dict[str, Any]] = field(default_factory=list)
    dead_letters: DeadLetterSink = field(default_factory=FakeDeadLetters)
    """Where records that cannot be published go (services pass the PostgreSQL + DLQ sink)."""
    consumer: str = "sf-poller"
    """The dead-letter consumer name (``sf-poller`` or ``cdc-listener``)."""

    @property
    def tenant(self) -> str:
        return self.conn.tenant_id

    async def ensure_shape(self) -> OrgShape:
        """The shape saved with the connection (by verify, or by the other service), or learned now and saved:
        a start learns it only when none was saved (a connection that went live without verify)."""
        if self.shape is None:
            self.shape = await load_shape(self.cursors, self.conn.tenant_id, self.conn.connection_id)
        return self.shape or await self.learn_shape(reason="no shape saved with the connection (not verified)")

    async def learn_shape(self, *, reason: str = "a query named a field or object the org lacks") -> OrgShape:
        """Describe the org and save the shape with the connection (none saved yet, or INVALID_FIELD /
        INVALID_TYPE). Only a re-learn (the org changed since verify) is a warning."""
        first = self.shape is None
        self.shape = await learn_shape(self.client, self.conn.objects)
        await save_shape(self.cursors, self.conn.tenant_id, self.conn.connection_id, self.shape)
        if first:
            log.info("org shape learned", reason=reason, **self.shape.summary())
        else:
            log.warning("org shape learned again", reason=reason, **self.shape.summary())
        return self.shape

    async def query_shaped(self, obj: str, tail: str, **kw: Any) -> tuple[dict[str, Any], str]:
        """First page of ``<select of obj><tail>``; a ShapeMismatch learns the shape once and retries."""
        try:
            return await self.client.query_page(f"{self.select(obj)}{tail}", **kw)
        except ShapeMismatch:
            await self.learn_shape()
            return await self.client.query_page(f"{self.select(obj)}{tail}", **kw)

    def select(self, obj: str) -> str:
        """``SELECT .. FROM obj`` from the org's shape, with the connection's own-ID field."""
        return select_soql(obj, self.shape, self.conn.own_ids(obj))

    async def load(self, obj: str) -> dict[str, Any]:
        """The object's cursor (:class:`sfconnect.cursors.SfCursor`, validated), or ``{}`` on the first run."""
        raw = await self.cursors.load(self.conn.tenant_id, self.conn.connection_id, obj)
        return checked(SfCursor, raw, where=f"{self.conn.connection_id}/{obj}") if raw else {}

    async def save(self, obj: str, cursor: dict[str, Any]) -> None:
        """Save a cursor, validated as :class:`sfconnect.cursors.SfCursor`."""
        await self.cursors.save(self.conn.tenant_id, self.conn.connection_id, obj,
                                checked(SfCursor, cursor, where=f"{self.conn.connection_id}/{obj}"))

    async def fresh(self, obj: str, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """The records whose version was not published yet, by any process (:mod:`sfconnect.published`)."""
        if not records:
            return []
        known = await self.store.load(self.conn.tenant_id, self.conn.connection_id, obj,
                                      [str(field_value(r, "Id")) for r in records], payloads=False)
        out = []
        for r in records:
            got = known.get(str(field_value(r, "Id")))
            if got is None or got.version < version_of(r):
                out.append(r)
        self.skipped += len(records) - len(out)
        return out

    async def publish(self, obj: str, records: Sequence[dict[str, Any]], url: str | None,
                      cur: dict[str, Any] | None = None, *, save: bool = True) -> dict[str, Any]:
        """Publish the records not published yet (:meth:`fresh`), wait for the broker's acks, remember them,
        THEN move the cursor to the last record read (published or not; never back: rows of the overlap
        window sort before it). ``last_published`` holds what went out."""
        fresh = await self.fresh(obj, records)
        await self.send(obj, fresh, url)
        new = dict(cur or {})
        if not records:
            return new
        last = records[-1]
        key = (norm_ts(field_value(last, "SystemModstamp")) or "", str(field_value(last, "Id") or ""))
        held = (str(new.get("ts") or ""), str(new.get("id") or ""))
        if new.get("phase", "incremental") == "incremental" and held > key:
            key = held
        new.update(phase="incremental", ts=key[0] or None, id=key[1] or None)
        new.pop("bulk", None)
        if save and new != (cur or {}):
            await self.save(obj, new)
        return new

    async def send(self, obj: str, records: Sequence[dict[str, Any]], url: str | None) -> list[RawRecord]:
        """Publish records as they are (no dedupe), wait for the acks, then remember their versions and
        payloads in the published-version store. A record that cannot be published (no ``Id``, or a credit
        memo whose OrderSummary cannot be resolved to its order) is dead-lettered instead
        (:mod:`sfconnect.deadletters`), before the caller's cursor moves past it."""
        self.last_published = list(records)
        if not records:
            return []
        raws, letters = await self.to_raw_checked(obj, records, url)
        if raws:
            await self.publisher.send_all([out_message(self.settings, r) for r in raws])
            self.published += len(raws)
            await self.store.remember(self.conn.tenant_id, self.conn.connection_id, obj,
                                      [Published(r.source_id, r.source_version, r.payload) for r in raws])
        if letters:
            await self._dead(obj, letters, records)
        return raws

    async def publish_items(self, items: Sequence[tuple[str, dict[str, Any], str | None]]) -> int:
        """Publish a batch of ``(object, record, request url)`` of several objects at once: one
        published-version read per object (versions already published are skipped), ONE ``send_all`` for
        the whole batch (order kept per object: each object has its own topic, so no order across objects
        exists for a consumer), then one write per object and the dead letters, all before returning.

        The CDC listener used to publish every run of consecutive same-object records on its own (a read,
        a broker round trip and a write each): an Order / OrderItem / Order transaction is three runs, so a
        500-event batch waited for hundreds of sequential round trips. Returns the records sent."""
        by_obj: dict[str, list[dict[str, Any]]] = {}
        urls: dict[str, str | None] = {}
        for obj, rec, url in items:
            by_obj.setdefault(obj, []).append(rec)
            urls[obj] = url
        self.last_published = []
        messages: list[OutMessage] = []
        sent: dict[str, list[RawRecord]] = {}
        letters: dict[str, tuple[list[SourceLetter], list[dict[str, Any]]]] = {}
        for obj, records in by_obj.items():
            fresh = await self.fresh(obj, records)
            self.last_published.extend(fresh)
            raws, dead = await self.to_raw_checked(obj, fresh, urls[obj])
            if raws:
                sent[obj] = raws
                messages.extend(out_message(self.settings, r) for r in raws)
            if dead:
                letters[obj] = (dead, fresh)
        if messages:
            await self.publisher.send_all(messages)
            self.published += len(messages)
        for obj, raws in sent.items():
            await self.store.remember(self.conn.tenant_id, self.conn.connection_id, obj,
                                      [Published(r.source_id, r.source_version, r.payload) for r in raws])
        for obj, (dead, fresh) in letters.items():
            await self._dead(obj, dead, fresh)
        return len(messages)

    async def _dead(self, obj: str, letters: list[SourceLetter], records: Sequence[dict[str, Any]]) -> None:
        await self.dead_letters.write(letters)
        # a re-read of the same version (overlap window, reconcile) does not dead-letter it again; a
        # replay re-reads it and publishes whatever Salesforce holds then
        dead_ids = {x.source_id for x in letters}
        await self.store.remember(self.conn.tenant_id, self.conn.connection_id, obj, [
            Published(str(field_value(r, "Id")), version_of(r)) for r in records
            if field_value(r, "Id") and str(field_value(r, "Id")) in dead_ids])

    async def to_raw(self, obj: str, records: Sequence[dict[str, Any]], url: str | None) -> list[RawRecord]:
        return (await self.to_raw_checked(obj, records, url))[0]

    async def to_raw_checked(self, obj: str, records: Sequence[dict[str, Any]],
                             url: str | None) -> tuple[list[RawRecord], list[SourceLetter]]:
        anchors = await self.anchors(obj, records)
        out: list[RawRecord] = []
        letters: list[SourceLetter] = []
        for r in records:
            text = json.dumps(r, separators=(",", ":"))
            rid = field_value(r, "Id")
            reason = None
            if not rid:
                reason = f"{obj} record without Id: cannot be keyed or re-read"
            elif obj == "CreditMemo" and str(field_value(r, "ReferenceEntityId") or "").startswith("1Os") and (
                    str(rid) not in anchors):
                reason = (f"CreditMemo {rid} references OrderSummary {field_value(r, 'ReferenceEntityId')}, which "
                          "this connection cannot read (not visible to the Run As user, or not there yet): "
                          "grant access to OrderSummary, then replay this dead letter (it is read again)")
            if reason is not None:
                letters.append(SourceLetter(self.consumer, self.conn.tenant_id, self.conn.connection_id, obj, reason,
                                            error_class="SourceUnreadable", source_id=str(rid) if rid else None,
                                            body=text))
                continue
            out.append(raw_record(self.conn.tenant_id, self.conn.connection_id, obj, r, text=text,
                                  request_url=url, order_source_id=anchors.get(str(rid))))
        return out, letters

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
            body, url = await self.query_shaped(obj, f" WHERE Id IN ({chunk})", all_rows=True)
            while True:
                out.extend(body["records"])
                if body["done"]:
                    break
                body, url = await self.client.query_page(next_url=body["nextRecordsUrl"])
        return out, url

    async def reconcile(self, obj: str, since: str) -> int:
        """Re-read and publish every row of ``obj`` modified at or after ``since`` (CDC overflow / replay
        past retention). The poller's own cursor is left alone."""
        cur: dict[str, Any] = {"ts": fmt_ts(parse_ts(since) - dt.timedelta(milliseconds=1)), "id": ""}
        n = 0
        started = time.monotonic()
        while True:
            tail = f"{compound_where(cur['ts'], cur['id'])} ORDER BY SystemModstamp, Id"
            body, url = await self.query_shaped(obj, tail, all_rows=True, batch_size=self.conn.page_size)
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
