"""The CE poller's streams: one per table, initial load -> re-read -> change tracking, resync on expiry.

Cursor (:class:`CeCursor`, a typed ``connectorkit.cursors.Checkpoint`` per tenant, connection, entity; saved
only after the page it covers was acknowledged by the broker)::

    {"phase": "initial", "next": <nextLink or null>, "started_at": iso, "generation": n, "resync": bool}
    {"phase": "reread",  "next": <nextLink or null>, "started_at": iso, "delta_link": ..., "generation": n}
    {"phase": "delta",   "delta_link": ..., "delta_at": iso, "generation": n}

* initial: ``GET <set>?$select=...`` with ``Prefer: odata.track-changes,odata.maxpagesize=N``; after every
  acknowledged page the nextLink is the checkpoint, so a crash resumes at that page, not at zero.
* reread: after the first delta link, rows with ``modifiedon ge started_at`` (sync start minus a margin) are
  read again with a plain ``$filter`` query, so edits made during a long initial load are not lost
  whichever way the server's tracking treats them. A re-read row whose version was already published (its
  version in ``ce_known_keys``, recorded after the broker's ack, in PostgreSQL: any process, any table size)
  is not published again; a changed one is.
* delta: ``GET <deltaLink>``; upserts, then ``$deletedEntity`` tombstones (published as ``op=delete``,
  order lines keyed by the order they belonged to, from the known-key table). The new delta link is saved
  after the whole delta was acknowledged (a crash re-reads it; duplicates collapse on event ids).
* ExpiredVersionStamp (0x80044352): the generation is bumped and the initial load runs again; every row seen
  is stamped with the new generation, and the keys left on an older one are published as deletes (deletes
  missed during the gap). Rows whose version was already published are not sent again (only changed rows
  are), and any that are re-sent produce the same event ids, so nothing lands twice downstream.
* A row that cannot be delivered (no key; larger than ``max_record_bytes``) is dead-lettered on
  ``dlq.ce-poller.v1`` with a re-fetch locator (``ce_poller.records.source_letter``) before the cursor moves
  past its page; the stream goes on.
* Before the organisation's ``expirechangetrackingindays`` closes on a stored delta link, the poller warns
  (log ``delta token near expiry`` + gauge ``flash_ce_delta_token_age_days``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import urllib.parse
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from prometheus_client import Counter, Gauge
from pydantic import BaseModel

from ce_poller.client import DataverseClient, DeltaTokenExpired, Page, iter_values
from ce_poller.config import CeConnection, EntitySpec
from ce_poller.records import PRODUCER, SOURCE, raw_message, source_letter
from ce_poller.stores import KnownKey, KnownKeys
from connectorkit.cursors import Checkpoint, Publisher
from connectorkit.deadletters import FakeSourceDeadLetters, SourceDeadLetters, SourceLetter
from servicekit import metrics
from servicekit.connections import CursorStore
from servicekit.errors import Poison
from servicekit.kafka import OutMessage
from servicekit.logging import get_logger
from servicekit.settings import FlashSettings

__all__ = [
    "CURRENCY_ANNOTATION",
    "RETURNS_TOPIC_ENTITY",
    "RMA_PRODUCTS_PROPERTY",
    "CeCursor",
    "ConnectionSync",
    "EntityResult",
    "Publisher",
    "token_issued_at",
]

log = get_logger(__name__)

CURRENCY_ANNOTATION = "_transactioncurrencyid_value@flash.isocurrencycode"
RMA_PRODUCTS_PROPERTY = "msdyn_rmaproducts"
RETURNS_TOPIC_ENTITY = "msdyn_rma"
"""Raw topic entity that carries every return record (RMAs and custom return tables alike)."""
REREAD_MARGIN = dt.timedelta(minutes=5)
CHUNK = 25

# No tenant or connection labels (unbounded): the oldest token per entity, and the log names the connection.
TOKEN_AGE = Gauge("flash_ce_delta_token_age_days", "Age of the stored change-tracking token", ["entity"])
TOKEN_EXPIRING = Gauge("flash_ce_delta_token_expiring", "1 when the token is within the warning window",
                       ["entity"])
RESYNCS = Counter("flash_ce_resyncs_total", "Full resyncs after an expired delta token", ["entity"])


class CeCursor(BaseModel):
    """Position of one table: ``phase`` and what that phase needs (see the module docstring)."""

    phase: Literal["initial", "reread", "delta"] = "initial"
    next: str | None = None
    started_at: str | None = None
    delta_link: str | None = None
    delta_at: str | None = None
    generation: int = 1
    resync: bool | None = None


@dataclass
class EntityResult:
    entity: str
    upserts: int = 0
    deletes: int = 0
    pages: int = 0
    phase: str = ""
    resynced: bool = False
    dead_letters: int = 0
    unchanged: int = 0
    """Rows re-read (re-read window, resync) whose version was already published: not published again."""


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_DELTA_RE = re.compile(r"[?&]\$deltatoken=([^&]+)")


def token_issued_at(delta_link: str) -> dt.datetime | None:
    """When a delta token was issued, from its ``<version>!<MM/dd/yyyy HH:mm:ss>`` form (None if opaque)."""
    m = _DELTA_RE.search(delta_link)
    if not m:
        return None
    token = urllib.parse.unquote(m.group(1))
    _, _, stamp = token.partition("!")
    try:
        return dt.datetime.strptime(stamp, "%m/%d/%Y %H:%M:%S").replace(tzinfo=dt.UTC)
    except ValueError:
        return None


def _version(obj: dict[str, Any]) -> str:
    v = obj.get("versionnumber")
    if v is not None:
        return str(v)
    return str(obj.get("modifiedon") or "0")


_ASSEMBLY_FIELDS = frozenset({
    "versionnumber", "modifiedon", "_transactioncurrencyid_value", "msdyn_rmaid", "msdyn_rmaproductid",
    "_msdyn_rma_value", "salesorderid", "ordernumber",
})


def _slim(obj: dict[str, Any], keep: frozenset[str]) -> dict[str, Any]:
    """The columns of a parsed row the RMA assembly reads (the row's text is kept whole for the payload)."""
    return {k: v for k, v in obj.items() if k in keep}


def _int_version(v: str | None) -> int:
    try:
        return int(v or 0)
    except ValueError:
        return 0


@dataclass
class ConnectionSync:
    """Syncs every configured table of one connection; one :meth:`run_cycle` call = one poll."""

    conn: CeConnection
    client: DataverseClient
    publisher: Publisher
    cursors: CursorStore
    keys: KnownKeys
    settings: FlashSettings
    dead_letters: SourceDeadLetters | None = None
    now: Callable[[], dt.datetime] = field(default=lambda: dt.datetime.now(dt.UTC))
    currencies: dict[str, str] = field(default_factory=dict)
    expiry_days: int | None = None
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.dead_letters is None:  # unit tests: letters are kept in memory
            self.dead_letters = FakeSourceDeadLetters(self.settings, PRODUCER)

    def checkpoint(self, entity: str) -> Checkpoint[CeCursor]:
        """The typed cursor of one table of this connection."""
        return Checkpoint(self.cursors, CeCursor, self.conn.tenant_id, self.conn.connection_id, entity)

    # ------------------------------------------------------------------------------------------- cycle

    async def run_cycle(self) -> dict[str, EntityResult]:
        await self.load_currencies()
        if self.expiry_days is None:
            await self.load_expiry()
        first = [s for s in self.conn.entities if s.logical not in ("msdyn_rma", "msdyn_rmaproduct")
                 and not self._is_custom_return(s)]
        second = [s for s in self.conn.entities if s not in first]
        results: dict[str, EntityResult] = {}
        # At most ``entity_concurrency`` tables at a time: each holds up to two pages (one being published,
        # one prefetched), which bounds memory whatever the size of the tables.
        gate = asyncio.Semaphore(self.conn.entity_concurrency)

        async def one(spec: EntitySpec) -> EntityResult:
            async with gate:
                return await self.sync_entity(spec)

        # Returns after orders: an RMA names its order by number, resolved from the orders already published.
        for group in (first, second):
            for r in await asyncio.gather(*(one(s) for s in group)):
                results[r.entity] = r
        return results

    def _is_custom_return(self, spec: EntitySpec) -> bool:
        return self.conn.return_source.get("kind") == "custom" and spec.entity_set == self.conn.return_source.get(
            "entity_set")

    async def load_currencies(self) -> None:
        page = await self.client.get("transactioncurrencies?$select=isocurrencycode", what="transactioncurrencies")
        for _, obj in iter_values(page.text):
            if obj.get("transactioncurrencyid") and obj.get("isocurrencycode"):
                self.currencies[str(obj["transactioncurrencyid"]).lower()] = str(obj["isocurrencycode"])

    async def load_expiry(self) -> None:
        page = await self.client.get("organizations?$select=expirechangetrackingindays", what="organizations")
        for _, obj in iter_values(page.text):
            if obj.get("expirechangetrackingindays") is not None:
                self.expiry_days = int(obj["expirechangetrackingindays"])

    async def check_token_ages(self) -> list[str]:
        """Warn for every stored delta link within ``expiry_warning_days`` of the org's expiry window."""
        if self.expiry_days is None:
            await self.load_expiry()
        out: list[str] = []
        for spec in self.conn.entities:
            cur = await self.checkpoint(spec.logical).load()
            if cur is None or cur.phase != "delta" or not cur.delta_link:
                continue
            issued = token_issued_at(cur.delta_link)
            if issued is None and cur.delta_at:
                issued = dt.datetime.fromisoformat(cur.delta_at.replace("Z", "+00:00"))
            if issued is None or self.expiry_days is None:
                continue
            age = (self.now() - issued).total_seconds() / 86400
            labels = (spec.logical,)
            TOKEN_AGE.labels(*labels).set(age)
            expiring = age >= self.expiry_days - self.conn.expiry_warning_days
            TOKEN_EXPIRING.labels(*labels).set(1 if expiring else 0)
            if expiring:
                msg = (f"{spec.logical}: change-tracking token is {age:.1f} days old; the organisation keeps "
                       f"changes {self.expiry_days} days (expirechangetrackingindays), after which a full resync "
                       "is needed")
                log.warning("delta token near expiry", tenant_id=self.conn.tenant_id,
                            connection_id=self.conn.connection_id, entity=spec.logical, age_days=round(age, 2),
                            expiry_days=self.expiry_days)
                out.append(msg)
        self.warnings.extend(out)
        return out

    # ------------------------------------------------------------------------------------------ entity

    async def sync_entity(self, spec: EntitySpec) -> EntityResult:
        res = EntityResult(spec.logical)
        cp = self.checkpoint(spec.logical)
        cur = await cp.load() or CeCursor()
        while True:
            res.phase = cur.phase
            gen = cur.generation
            if cur.phase == "initial":
                if not cur.next:
                    cur = cur.model_copy(update={"started_at": _iso(self.now() - REREAD_MARGIN)})
                url = cur.next or f"{spec.entity_set}?$select={','.join(spec.select)}"
                prefer = f"odata.track-changes,odata.maxpagesize={self.conn.page_size},{self._ann()}"
                delta_link: str | None = None
                async for page in self._pages(url, prefer, spec.logical):
                    # A resync re-reads the whole table: what was published unchanged is not sent again.
                    await self._publish_page(spec, page, gen, res, skip_published=bool(cur.resync))
                    if page.next_link:
                        cur = cur.model_copy(update={"next": page.next_link})
                        await cp.save(cur)
                    else:
                        delta_link = page.delta_link
                if delta_link is None:
                    raise Poison(f"{spec.entity_set}: the last page carried no @odata.deltaLink; is change tracking "
                                 "enabled on the table (Advanced options > Track changes)?")
                if cur.resync:
                    res.deletes += await self._infer_deletes(spec, gen)
                cur = CeCursor(phase="reread", started_at=cur.started_at, delta_link=delta_link, generation=gen)
                await cp.save(cur)
            elif cur.phase == "reread":
                url = cur.next or (
                    f"{spec.entity_set}?$select={','.join(spec.select)}&$filter=modifiedon ge {cur.started_at}"
                )
                prefer = f"odata.maxpagesize={self.conn.page_size},{self._ann()}"
                async for page in self._pages(url, prefer, spec.logical):
                    await self._publish_page(spec, page, gen, res, skip_published=True)
                    if page.next_link:
                        cur = cur.model_copy(update={"next": page.next_link})
                        await cp.save(cur)
                cur = CeCursor(phase="delta", delta_link=cur.delta_link, delta_at=_iso(self.now()), generation=gen)
                await cp.save(cur)
                return res
            else:
                try:
                    new_link = await self._delta(spec, str(cur.delta_link), gen, res)
                except DeltaTokenExpired as exc:
                    log.warning("delta token expired, resyncing", tenant_id=self.conn.tenant_id,
                                connection_id=self.conn.connection_id, entity=spec.logical, error=str(exc))
                    RESYNCS.labels(spec.logical).inc()
                    res.resynced = True
                    cur = CeCursor(phase="initial", generation=gen + 1, resync=True)
                    await cp.save(cur)
                    continue
                await cp.save(CeCursor(phase="delta", delta_link=new_link, delta_at=_iso(self.now()), generation=gen))
                return res

    async def _delta(self, spec: EntitySpec, link: str, gen: int, res: EntityResult) -> str:
        prefer = f"odata.track-changes,odata.maxpagesize={self.conn.page_size},{self._ann()}"
        new_link: str | None = None
        async for page in self._pages(link, prefer, spec.logical):
            await self._publish_page(spec, page, gen, res)
            if not page.next_link:
                new_link = page.delta_link
        if new_link is None:
            raise Poison(f"{spec.entity_set}: the delta response carried no new @odata.deltaLink")
        return new_link

    def _ann(self) -> str:
        return f'odata.include-annotations="{self.conn.annotations}"'

    async def _pages(self, url: str, prefer: str, what: str) -> AsyncIterator[Page]:
        """Pages following nextLink, fetching the next page while the caller publishes the current one."""
        task: asyncio.Task[Page] | None = asyncio.ensure_future(self.client.get(url, prefer=prefer, what=what))
        try:
            while task is not None:
                page = await task
                task = None
                if page.next_link:
                    task = asyncio.ensure_future(self.client.get(page.next_link, prefer=prefer, what=what))
                yield page
        finally:
            if task is not None:
                task.cancel()

    # ----------------------------------------------------------------------------------------- publish

    def _annotate(self, text: str, obj: dict[str, Any]) -> str:
        cur = obj.get("_transactioncurrencyid_value")
        if not cur:
            return text
        iso = self.currencies.get(str(cur).lower())
        if iso is None:
            return text
        return '{"' + CURRENCY_ANNOTATION + '":"' + iso + '",' + text[1:].lstrip()

    def _message(self, entity: str, source_id: str, version: str, payload: str, url: str,
                 op: Literal["upsert", "delete"],
                 order_source_id: str | None, topic_entity: str | None = None) -> OutMessage:
        return raw_message(self.settings, tenant_id=self.conn.tenant_id, connection_id=self.conn.connection_id,
                           entity=entity, source_id=source_id, version=version, payload=payload, url=url, op=op,
                           order_source_id=order_source_id, observed_at=self.now(), topic_entity=topic_entity)

    async def _publish_page(self, spec: EntitySpec, page: Page, gen: int, res: EntityResult, *,
                            skip_published: bool = False) -> None:
        """Publish one page (returns after the broker's ack), dead-letter what cannot be delivered, record keys.

        ``skip_published`` (re-read window, resync): rows whose version the known-key table says was already
        published (recorded only after an ack) are not published again; their keys are still recorded.
        """
        tenant, cid = self.conn.tenant_id, self.conn.connection_id
        msgs: list[OutMessage] = []
        candidates: list[tuple[int, str, str]] = []
        known: list[KnownKey] = []
        deleted: list[tuple[str, str]] = []
        # Parsed rows are kept only where they are assembled after the loop (RMA headers); elsewhere each parsed
        # row is dropped as soon as its message is built. A parsed row (with formatted-value annotations) takes
        # several times its text, so keeping a page of them dominated the poller's memory.
        rma_rows: dict[str, tuple[str, dict[str, Any]]] = {}
        n_up = 0
        dead: list[SourceLetter] = []
        is_custom = self._is_custom_return(spec)
        for text, obj in iter_values(page.text):
            if obj.get("reason") == "deleted" and "id" in obj and spec.key not in obj:
                deleted.append((str(obj["id"]).lower(), text))
                continue
            sid = obj.get(spec.key)
            problem = self._undeliverable(spec, obj, text)
            if problem is not None:
                dead.append(source_letter(
                    self.settings, tenant_id=tenant, connection_id=cid, entity=spec.logical,
                    entity_set=spec.entity_set, key=str(sid).lower() if sid else None, error=Poison(problem),
                    body=text, topic_entity=RETURNS_TOPIC_ENTITY if is_custom else None))
                continue
            sid = str(sid).lower()
            version = _version(obj)
            parent = obj.get(spec.parent_column) if spec.parent_column else None
            if spec.logical == "salesorder":
                parent = obj.get("ordernumber")  # orders: parent_id holds the number RMAs refer to
            known.append(KnownKey(sid, None if parent is None else str(parent).lower()
                                  if spec.logical != "salesorder" else str(parent), version))
            n_up += 1
            if spec.logical == "msdyn_rma":
                rma_rows[sid] = (text, _slim(obj, self._assembly_fields()))
            if spec.publish and spec.logical != "msdyn_rma":
                order_id = str(parent).lower() if spec.logical == "salesorderdetail" and parent else None
                if is_custom:
                    order_id = str(parent).lower() if parent else None
                candidates.append((len(msgs), sid, version))
                msgs.append(self._message(spec.logical, sid, version, self._annotate(text, obj), page.url, "upsert",
                                          order_id, RETURNS_TOPIC_ENTITY if is_custom else None))
        if skip_published and candidates:
            seen = await self.keys.lookup(tenant, cid, spec.logical, [c[1] for c in candidates])
            drop = {i for i, sid_, v in candidates if (k := seen.get(sid_)) is not None and k.version == v}
            if drop:
                msgs = [m for i, m in enumerate(msgs) if i not in drop]
                res.unchanged += len(drop)
        prior = await self.keys.lookup(tenant, cid, spec.logical, [d for d, _ in deleted]) if deleted else {}
        if spec.logical == "msdyn_rma":
            built, rma_known = await self._assemble_rmas(rma_rows, set())
            msgs += built
            known = rma_known
        elif spec.logical == "msdyn_rmaproduct":
            touched = {k.parent_id for k in known if k.parent_id}
            bumped = {p.parent_id for p in prior.values() if p.parent_id}
            built, rma_known = await self._assemble_rmas(None, touched | bumped, bump=bumped)
            msgs += built
            await self.keys.record(tenant, cid, "msdyn_rma", rma_known, gen)
        for did, text in deleted:
            p = prior.get(did)
            if not spec.publish:
                continue
            version = str(_int_version(p.version) + 1) if p else "0"
            order_id = p.parent_id if p and spec.logical in ("salesorderdetail", "msdyn_rma") else None
            msgs.append(self._message(spec.logical, did, version, text, page.url, "delete", order_id,
                                      RETURNS_TOPIC_ENTITY if is_custom else None))
        if msgs:
            await self.publisher.send_all(msgs)
        if dead and self.dead_letters is not None:
            await self.dead_letters.send(dead)  # on the DLQ and indexed before the cursor moves past them
        await self.keys.record(tenant, cid, spec.logical, known, gen)
        if deleted:
            await self.keys.forget(tenant, cid, spec.logical, [d for d, _ in deleted])
        res.upserts += n_up
        res.deletes += len(deleted)
        res.pages += 1
        res.dead_letters += len(dead)
        metrics.RECORDS_FETCHED.labels(SOURCE, spec.logical).inc(n_up + len(deleted))

    def _undeliverable(self, spec: EntitySpec, obj: dict[str, Any], text: str) -> str | None:
        """Why a row cannot be published (None: it can). Checked the same way on a dead-letter re-fetch."""
        if not obj.get(spec.key):
            return f"{spec.entity_set} row without its key {spec.key}; it cannot be keyed or re-fetched"
        limit = self.conn.max_record_bytes
        if len(text) * 4 <= limit:  # UTF-8 takes at most 4 bytes a character: no need to encode the row
            return None
        size = len(text.encode())
        if size > limit:
            longest = max(((k, len(str(v))) for k, v in obj.items()), key=lambda kv: kv[1], default=("?", 0))
            return (f"{spec.entity_set}({obj.get(spec.key)}) is {size} bytes, over settings.max_record_bytes "
                    f"({self.conn.max_record_bytes}); its longest column is {longest[0]} ({longest[1]} characters): "
                    "shorten it in Dynamics or remove it from settings.select, then `flash dlq replay` the letter")
        return None

    async def _infer_deletes(self, spec: EntitySpec, gen: int) -> int:
        """After a full resync: keys not seen in it were deleted while the token was expired."""
        tenant, cid = self.conn.tenant_id, self.conn.connection_id
        total = 0
        while True:
            stale = await self.keys.stale(tenant, cid, spec.logical, gen, 5000)
            if not stale:
                return total
            if spec.publish:
                msgs = []
                for k in stale:
                    body = json.dumps({"id": k.source_id, "reason": "deleted", "@flash.inferred": "resync"})
                    order_id = k.parent_id if spec.logical in ("salesorderdetail", "msdyn_rma") else None
                    msgs.append(self._message(spec.logical, k.source_id, str(_int_version(k.version) + 1), body,
                                              "", "delete", order_id,
                                              RETURNS_TOPIC_ENTITY if self._is_custom_return(spec) else None))
                await self.publisher.send_all(msgs)
            await self.keys.forget(tenant, cid, spec.logical, [k.source_id for k in stale])
            total += len(stale)
            log.info("inferred deletes after resync", entity=spec.logical, count=len(stale))

    # -------------------------------------------------------------------------------------------- RMAs

    async def _filter_all(self, entity_set: str, select: Sequence[str], column: str, values: Sequence[str],
                          quote: bool = False) -> list[tuple[str, dict[str, Any]]]:
        out: list[tuple[str, dict[str, Any]]] = []
        keep = self._assembly_fields()
        vals = sorted(set(values))
        for i in range(0, len(vals), CHUNK):
            chunk = vals[i:i + CHUNK]
            lit = [("'" + v.replace("'", "''") + "'") if quote else v for v in chunk]
            flt = " or ".join(f"{column} eq {x}" for x in lit)
            url: str | None = f"{entity_set}?$select={','.join(select)}&$filter={urllib.parse.quote(flt, safe=' ')}"
            prefer = f"odata.maxpagesize=5000,{self._ann()}"
            while url:
                page = await self.client.get(url, prefer=prefer, what=entity_set)
                out.extend((text, _slim(obj, keep)) for text, obj in iter_values(page.text))
                url = page.next_link
        return out

    def _assembly_fields(self) -> frozenset[str]:
        """Returns are assembled a page of RMAs with all their products at once, and a parsed row with its
        formatted values takes several times its text: only these columns of those rows stay parsed."""
        return _ASSEMBLY_FIELDS | {str(self.conn.return_source.get("order_number_field", "msdyn_referenceno"))}

    async def _assemble_rmas(
        self, headers: dict[str, tuple[str, dict[str, Any]]] | None, ids: set[str], *, bump: set[str] | None = None
    ) -> tuple[list[OutMessage], list[KnownKey]]:
        """One raw ``msdyn_rma`` record per RMA: the RMA row with its products, keyed by the original order."""
        tenant, cid = self.conn.tenant_id, self.conn.connection_id
        rma_spec = self.conn.spec("msdyn_rma")
        prod_spec = self.conn.spec("msdyn_rmaproduct")
        order_field = str(self.conn.return_source.get("order_number_field", "msdyn_referenceno"))
        if headers is None:
            headers = {}
            if ids:
                for text, obj in await self._filter_all("msdyn_rmas", rma_spec.select, "msdyn_rmaid", list(ids)):
                    headers[str(obj["msdyn_rmaid"]).lower()] = (text, obj)
        if not headers:
            return [], []
        products: dict[str, list[tuple[str, dict[str, Any]]]] = {k: [] for k in headers}
        for text, obj in await self._filter_all("msdyn_rmaproducts", prod_spec.select, "_msdyn_rma_value",
                                                list(headers)):
            products.setdefault(str(obj.get("_msdyn_rma_value") or "").lower(), []).append((text, obj))
        numbers = [str(o.get(order_field)) for _, o in headers.values() if o.get(order_field)]
        orders = await self.keys.orders_by_number(tenant, cid, numbers) if numbers else {}
        missing = [n for n in numbers if n not in orders]
        if missing:
            for _, obj in await self._filter_all("salesorders", ("salesorderid", "ordernumber"), "ordernumber",
                                                 missing, quote=True):
                orders[str(obj["ordernumber"])] = str(obj["salesorderid"]).lower()
        prev = await self.keys.lookup(tenant, cid, "msdyn_rma", list(headers)) if bump else {}
        msgs: list[OutMessage] = []
        known: list[KnownKey] = []
        for rid, (text, obj) in sorted(headers.items()):
            items = sorted(products.get(rid, []), key=lambda x: str(x[1].get("msdyn_rmaproductid")))
            version = max([_int_version(_version(obj))] + [_int_version(_version(o)) for _, o in items])
            if bump and rid in bump and rid in prev:
                version = max(version, _int_version(prev[rid].version) + 1)
            body = text.rstrip()
            payload = body[:-1].rstrip() + f',"{RMA_PRODUCTS_PROPERTY}":[' + ",".join(t for t, _ in items) + "]}"
            order_id = orders.get(str(obj.get(order_field) or ""))
            msgs.append(self._message("msdyn_rma", rid, str(version), self._annotate(payload, obj), "", "upsert",
                                      order_id))
            known.append(KnownKey(rid, order_id, str(version)))
        return msgs, known
