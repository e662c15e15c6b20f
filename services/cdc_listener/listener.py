"""Change Data Capture listener: an aiohttp CometD (Bayeux long-polling) client per live connection.

The client, governor and SOQL fetch-back/reconcile code are shared with the poller through
:mod:`sfconnect` (services never import each other); ``python -m cdc_listener`` runs
:data:`cdc_listener.app.SERVICE`.

* ``/meta/handshake`` -> ``/meta/subscribe`` to ``/data/<Object>ChangeEvent`` of every synced object with
  ``ext.replay`` = the stored replay id of that channel -> ``/meta/connect`` long polls, following the
  server's ``advice``. ``403::Unknown client`` (or ``advice.reconnect = handshake``), a dropped connection or
  a 401 re-handshakes (re-authenticating when the session expired) and resubscribes from the stored replay
  ids, so a drop loses nothing.
* First start: the channels are subscribed at ``-1`` and ``cdc:subscribed`` is saved; the poller starts its
  backfill only after that row exists, so nothing between snapshot and stream is lost. A later start
  without a replay id for a channel uses ``-2`` (everything retained).
* Events are handled per ``/meta/connect`` batch, transactions in arrival (commit) order and the changes of
  one transaction in ``sequenceNumber`` order. CREATE/UPDATE/UNDELETE/DELETE and ``GAP_*`` events become a
  fetch of the full records (``queryAll ... WHERE Id IN (..)``, 200 ids a call): CometD updates carry only
  changed fields, gap events none. A record deleted for good is published as a tombstone. ``GAP_OVERFLOW``
  (record id ``000000000000000AAA``) or a wildcard id runs a SOQL reconcile of that object since the last
  commit time seen. The records go out as the same RawRecords the poller publishes.
* After the broker acknowledged a batch, the replay id of each channel (and the last commit time) is saved
  in ``cursors`` (entity ``cdc:/data/OrderChangeEvent``). A crash before that replays the batch: the same
  record versions, the same event ids, nothing counted twice downstream.
* Pipelined: while batch N publishes and saves, batch N+1 (the next ``/meta/connect``) already fetches its
  records back; N+1 publishes only after N's records were acknowledged and saves only after N saved, so
  records reach the broker and replay ids reach ``cursors`` in batch order. N+1 applies its UPDATEs to the
  records N built (N reaches the published store only after its acks). A batch publishes at once: one
  published-store read and write per object and one broker round trip. A batch with a SOQL reconcile
  (and the one after it) runs alone. Per-stage times are in the ``flash_cdc_stage_seconds`` histogram
  (delivery, wait, fetch, publish, save).
* A stored replay id past the 72 h retention is rejected by the server: the listener says so (log
  ``replay id past retention``), subscribes that channel at ``-1`` and reconciles the object by SOQL since
  the stored commit time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client import Histogram

from servicekit.connections import CursorStore
from servicekit.errors import ConfigError, Transient
from servicekit.logging import get_logger
from sfconnect.cdc import apply_event as _apply
from sfconnect.cdc import commit_of as _commit_of
from sfconnect.cdc import read_event as _read_event
from sfconnect.cdc import replay_of as _replay_of
from sfconnect.client import SalesforceClient
from sfconnect.config import CDC_SUBSCRIBED, SfConnection
from sfconnect.cursors import ReplayPosition, checked
from sfconnect.deadletters import DeadLetterSink, FakeDeadLetters, SourceLetter
from sfconnect.reader import RecordReader
from sfconnect.records import field_value, select_fields, ts_of_ms
from sfconnect.shape import PARENT_OBJECT

__all__ = ["EMPTY_ID", "CdcListener", "StreamDropped"]

log = get_logger(__name__)

EMPTY_ID = "000000000000000AAA"
_RECONCILE_MARGIN_MS = 1000


STAGE_SECONDS = Histogram(
    "flash_cdc_stage_seconds",
    "CDC listener time per stage: delivery (commit -> event received, per event), wait (received -> handled, "
    "behind the previous batch), fetch (fetch-back), publish (until the broker acked), save (replay ids)",
    ["stage"],
    buckets=(0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10),
)


class StreamDropped(Transient):
    """The server forgot this client (or the connection broke): handshake again."""


class ReplayPastRetention(Exception):
    pass


_IN_FLIGHT = 2
"""Batches handled at once: one fetching its records back while the one before it publishes and saves."""


_Item = tuple[str, dict[str, Any], str | None]
"""(object, record as REST would return it, request url of a fetch-back or None)."""
_States = dict[tuple[str, str], dict[str, Any]]
"""(object, record id) -> the record's newest known state."""


@dataclass
class _Flight:
    """A batch being handled: ``published`` resolves once the broker acknowledged its records, ``task``
    ends once its replay ids were saved."""

    published: asyncio.Future[None]
    task: asyncio.Future[None] = field(init=False)
    serial: bool = False
    built: asyncio.Future[_States] | None = None
    """The records this batch leaves (resolves once they were built, before they publish): the batch after
    it applies its UPDATEs to these, not to the published-version store, which holds them only after this
    batch's acknowledgement (an UPDATE applied to the state before them would undo their changes)."""


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # the failure surfaces through the batch's task; don't log it twice


@dataclass
class BatchStats:
    events: int = 0
    from_events: int = 0
    """Records built from the event alone (no API call)."""
    fetched: int = 0
    reconciled: int = 0
    tombstones: int = 0


@dataclass
class CdcListener:
    """One connection's streaming client. :meth:`run` until ``stop``."""

    conn: SfConnection
    client: SalesforceClient
    sync: RecordReader
    cursors: CursorStore
    session: aiohttp.ClientSession
    replay: dict[str, int | None] = field(default_factory=dict)
    commit_ms: dict[str, int] = field(default_factory=dict)
    client_id: str | None = None
    seq: int = 0
    handshakes: int = 0
    reconciles: list[tuple[str, str]] = field(default_factory=list)
    stats: BatchStats = field(default_factory=BatchStats)
    advice_timeout_s: float = 110.0
    dead_letters: DeadLetterSink = field(default_factory=FakeDeadLetters)
    on_batch: Any = None
    """Test hook: ``async (events) -> None`` called after a batch was published, before the save."""

    @property
    def channels(self) -> list[str]:
        return [f"/data/{obj}ChangeEvent" for obj in self.conn.objects]

    @property
    def url(self) -> str:
        assert self.client.token is not None
        return f"{self.client.token.instance_url}/cometd/{self.conn.api_version}"

    def _key(self, channel: str) -> str:
        return f"cdc:{channel}"

    async def load(self) -> None:
        t, c = self.conn.tenant_id, self.conn.connection_id
        for ch in self.channels:
            raw = await self.cursors.load(t, c, self._key(ch))
            cur = checked(ReplayPosition, raw, where=f"{c}/{ch}") if raw else {}
            self.replay[ch] = cur.get("replay_id")
            if cur.get("commit_ms"):
                self.commit_ms[ch] = int(cur["commit_ms"])

    # -------------------------------------------------------------------------------------------- Bayeux
    async def _send(self, *messages: dict[str, Any]) -> list[dict[str, Any]]:
        await self.client.ensure_token()
        assert self.client.token is not None
        self.client.pin().check(self.url, what="CometD")  # the bearer token goes to pinned hosts only
        out = []
        for m in messages:
            self.seq += 1
            out.append({"id": str(self.seq), **({"clientId": self.client_id} if self.client_id else {}), **m})
        try:
            async with self.session.post(
                self.url, json=out, headers={"Authorization": f"Bearer {self.client.token.access_token}"},
                timeout=aiohttp.ClientTimeout(total=self.advice_timeout_s + 30, sock_connect=15),
            ) as resp:
                if resp.status == 401:
                    await self.client.authenticate()
                    raise StreamDropped("streaming session rejected (401); re-authenticated")
                if resp.status >= 500:
                    raise StreamDropped(f"CometD answered {resp.status}")
                body = await resp.json(content_type=None)
                if isinstance(body, list) and body and isinstance(body[0], dict) and "errorCode" in body[0]:
                    code = str(body[0]["errorCode"])  # a REST-style error (limits, server trouble), not Bayeux
                    wait = self.conn.quota.limit_backoff_s if code == "REQUEST_LIMIT_EXCEEDED" else None
                    raise StreamDropped(f"CometD answered {resp.status} {code}: {body[0].get('message')}",
                                        retry_after=wait)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise StreamDropped(f"CometD request failed: {type(exc).__name__}: {exc}") from exc
        return list(body) if isinstance(body, list) else [body]

    async def handshake(self) -> None:
        self.client_id = None
        for attempt in range(2):
            reply = (await self._send({"channel": "/meta/handshake", "version": "1.0", "minimumVersion": "1.0",
                                       "supportedConnectionTypes": ["long-polling"]}))[0]
            if reply.get("successful"):
                self.client_id = str(reply["clientId"])
                self.handshakes += 1
                timeout = (reply.get("advice") or {}).get("timeout")
                if timeout:
                    self.advice_timeout_s = float(timeout) / 1000
                return
            reason = str((reply.get("ext") or {}).get("sfdc", {}).get("failureReason") or reply.get("error"))
            if "401" in reason and attempt == 0:
                await self.client.authenticate()
                continue
            if "403" in reason and "Handshake denied" not in reason:
                raise ConfigError(f"CometD handshake refused ({reason}): the Run As user needs the API and "
                                  "streaming permissions and View All on the change event objects")
            raise StreamDropped(f"CometD handshake failed: {reason}")

    async def subscribe_all(self) -> None:
        t, c = self.conn.tenant_id, self.conn.connection_id
        first_time = await self.cursors.load(t, c, CDC_SUBSCRIBED) is None
        for ch in self.channels:
            stored = self.replay.get(ch)
            replay = stored if stored is not None else (-1 if first_time else -2)
            reply = await self._subscribe(ch, replay)
            if reply.get("successful"):
                continue
            error = str(reply.get("error") or "")
            if "replayId" in error and stored is not None:
                since = self.commit_ms.get(ch)
                log.warning("replay id past retention; subscribing to new events and reconciling by SOQL",
                            channel=ch, replay_id=stored, since=ts_of_ms(since) if since else None)
                reply = await self._subscribe(ch, -1)
                if not reply.get("successful"):
                    raise StreamDropped(f"subscribe {ch} failed: {reply.get('error')}")
                obj = ch[len("/data/"):-len("ChangeEvent")]
                await self._reconcile(obj, since)
                continue
            if "403::Unknown client" in error or (reply.get("advice") or {}).get("reconnect") == "handshake":
                raise StreamDropped(f"subscribe {ch}: {error}")
            raise ConfigError(f"cannot subscribe to {ch} ({error}): select the object for Change Data Capture "
                              "in Setup and give the Run As user View All on it")
        if first_time:
            await self.cursors.save(t, c, CDC_SUBSCRIBED, {"at": dt.datetime.now(dt.UTC).isoformat(),
                                                           "channels": self.channels})

    async def _subscribe(self, channel: str, replay: int) -> dict[str, Any]:
        replies = await self._send({"channel": "/meta/subscribe", "subscription": channel,
                                    "ext": {"replay": {channel: replay}}})
        return next((r for r in replies if r.get("channel") == "/meta/subscribe"), replies[0])

    async def _connect(self) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        replies = await self._send({"channel": "/meta/connect", "connectionType": "long-polling"})
        meta = next((r for r in replies if r.get("channel") == "/meta/connect"), None)
        return [r for r in replies if str(r.get("channel", "")).startswith("/data/")], meta

    async def stream(self, stop: asyncio.Event) -> None:
        """Connect loop, pipelined (module docstring): the next long poll waits while batches are handled,
        and up to two batches are in flight, the newer one fetching back while the older one publishes and
        saves. Publishes and replay-id saves still happen strictly in batch order."""
        inflight: collections.deque[_Flight] = collections.deque()
        stopped = False
        try:
            while not stop.is_set():
                events, meta = await self._connect()
                received = time.time()
                while inflight and (inflight[0].task.done() or len(inflight) >= _IN_FLIGHT):
                    await inflight.popleft().task  # re-raises a failed batch: the stream reconnects
                if events:
                    inflight.append(self._start(events, received, inflight[-1] if inflight else None))
                if meta is not None and not meta.get("successful"):
                    raise StreamDropped(f"connect: {meta.get('error')} (advice {meta.get('advice')})")
                interval = ((meta or {}).get("advice") or {}).get("interval") or 0
                if interval:
                    await asyncio.sleep(float(interval) / 1000)
            stopped = True
        finally:
            if not stopped:  # killed or failed: the replay ids of unfinished batches are simply not saved
                for f in inflight:
                    f.task.cancel()
            await asyncio.gather(*(f.task for f in inflight), return_exceptions=True)

    def _start(self, events: Sequence[dict[str, Any]], received_at: float, prev: _Flight | None) -> _Flight:
        loop = asyncio.get_running_loop()
        flight = _Flight(loop.create_future(), built=loop.create_future())
        flight.published.add_done_callback(_retrieve)
        assert flight.built is not None
        flight.built.add_done_callback(_retrieve)
        flight.task = asyncio.ensure_future(self.handle(events, received_at=received_at, after=prev, flight=flight))
        return flight

    # -------------------------------------------------------------------------------------------- events
    async def handle(self, events: Sequence[dict[str, Any]], *, received_at: float | None = None,
                     after: _Flight | None = None, flight: _Flight | None = None) -> None:
        """Publish what a batch of change events says, then (after the acks) save the replay ids.

        ``after`` is the batch before this one, still in flight: this batch fetches its records back
        meanwhile, publishes only once that one was acknowledged, and saves only once that one saved. A
        batch that reconciles by SOQL (or follows one that does) waits for the previous batch to finish
        first, so a reconcile never runs alongside an older batch's fetch-back."""
        try:
            if received_at is not None:
                STAGE_SECONDS.labels("wait").observe(time.time() - received_at)
                delivery = STAGE_SECONDS.labels("delivery")
                for ev in events:
                    commit = _commit_of(ev)
                    if commit:
                        delivery.observe(max(0.0, received_at - int(commit) / 1000))
            steps = self._plan(events)
            serial = any(kind == "reconcile" for kind, _ in steps)
            if flight is not None:
                flight.serial = serial
            if after is not None and (serial or after.serial):
                await after.task
                after = None
            known: _States = {}
            if after is not None and after.built is not None:
                known = dict(await after.built)  # the previous batch, not yet in the published store
            prepared: list[tuple[str, Any]] = []
            for kind, arg in steps:
                if kind in ("reconcile", "dead") or serial:
                    prepared.append((kind, arg))
                else:
                    items = await self._build(arg, known)
                    known.update(((obj, str(field_value(rec, "Id"))), rec) for obj, rec, _ in items)
                    prepared.append(("publish", items))
            if flight is not None and flight.built is not None and not flight.built.done():
                flight.built.set_result(known)
            if after is not None:
                await after.published
            publishing = time.time()
            for kind, arg in prepared:
                if kind == "publish":
                    await self._publish(arg)
                elif kind == "fetch":  # serial: built only now, between the reconciles
                    await self._publish(await self._build(arg, {}))
                elif kind == "dead":  # before the replay id that covers it is saved
                    await self.dead_letters.write(arg)
                else:
                    await self._reconcile_from(*arg)
            STAGE_SECONDS.labels("publish").observe(time.time() - publishing)
            if self.on_batch is not None:
                await self.on_batch(events)
            if flight is not None:
                flight.published.set_result(None)
            if after is not None:
                await after.task
            await self._save(events)
        except BaseException as exc:
            if flight is not None:
                for fut in (flight.published, flight.built):
                    if fut is None or fut.done():
                        continue
                    if isinstance(exc, asyncio.CancelledError):
                        fut.cancel()
                    else:
                        fut.set_exception(exc)
            raise

    def _plan(self, events: Sequence[dict[str, Any]]) -> list[tuple[str, Any]]:
        """The batch as steps: ``("fetch", [(object, record id, header, body)..])`` for runs of record
        changes, ``("reconcile", (object, since_ms))`` for overflow / wildcard events and ``("dead",
        [SourceLetter])`` for messages that cannot be read (no ``ChangeEventHeader``, no entity, change type
        or record ids); transactions in arrival order and the changes of one transaction in
        ``sequenceNumber`` order."""
        first_seen: dict[str, int] = {}
        keyed = []
        steps: list[tuple[str, Any]] = []
        dead: list[SourceLetter] = []
        for i, ev in enumerate(events):
            read = _read_event(ev)
            if isinstance(read, str):
                dead.append(self._letter(ev, read))
                continue
            header = read[0]
            tx = str(header.get("transactionKey") or f"#{i}")
            first_seen.setdefault(tx, i)
            keyed.append(((first_seen[tx], int(header.get("sequenceNumber") or 0), i), read))
        if dead:
            steps.append(("dead", dead))
        ordered = [read for _, read in sorted(keyed, key=lambda p: p[0])]
        segment: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = []  # (object, record id, header, body)
        for header, body in ordered:
            obj = str(header["entityName"])
            if obj not in self.conn.objects:
                continue
            self.stats.events += 1
            ids = [str(x) for x in header.get("recordIds") or []]
            if header.get("changeType") == "GAP_OVERFLOW" or any(x == EMPTY_ID or "*" in x for x in ids) or not ids:
                if segment:
                    steps.append(("fetch", segment))
                segment = []
                steps.append(("reconcile", (obj, header.get("commitTimestamp"))))
                continue
            segment.extend((obj, rid, header, body) for rid in ids)
        if segment:
            steps.append(("fetch", segment))
        return steps

    def _letter(self, ev: Any, reason: str) -> SourceLetter:
        channel = str(ev.get("channel") or "") if isinstance(ev, dict) else ""
        obj = channel[len("/data/"):-len("ChangeEvent")] if channel.startswith("/data/") and channel.endswith(
            "ChangeEvent") else ""
        try:
            body = json.dumps(ev, default=str)
        except (TypeError, ValueError):
            body = repr(ev)
        return SourceLetter("cdc-listener", self.conn.tenant_id, self.conn.connection_id, obj,
                            f"change event cannot be read: {reason}", error_class="UnreadableChangeEvent",
                            channel=channel or None, replay_id=_replay_of(ev), since_ms=self.commit_ms.get(channel),
                            body=body)

    async def _save(self, events: Sequence[dict[str, Any]]) -> None:
        """The newest replay id (and commit time) of each channel in the batch, one upsert each, at once."""
        latest: dict[str, tuple[int, int]] = {}
        for ev in events:
            rid = _replay_of(ev)
            if rid is None or not isinstance(ev, dict) or not ev.get("channel"):
                continue  # dead-lettered; nothing to position on
            ch = str(ev["channel"])
            commit = _commit_of(ev) or 0
            prev = latest.get(ch)
            latest[ch] = (max(rid, prev[0]) if prev else rid, max(commit, prev[1]) if prev else commit)
        t, c = self.conn.tenant_id, self.conn.connection_id
        saving = time.time()
        for ch, (rid, commit) in latest.items():
            self.replay[ch] = rid
            if commit:
                self.commit_ms[ch] = commit
        await asyncio.gather(*(
            self.cursors.save(t, c, self._key(ch), checked(ReplayPosition, {
                "replay_id": self.replay[ch], "commit_ms": self.commit_ms.get(ch)}, where=f"{c}/{ch}"))
            for ch in latest))
        STAGE_SECONDS.labels("save").observe(time.time() - saving)

    async def _build(self, segment: list[tuple[str, str, dict[str, Any], dict[str, Any]]],
                     known: _States) -> list[_Item]:
        """The records a run of changes leaves, in the order of each record's last change.

        CREATE / UNDELETE: the event body is the record (docs/vendor-facts.md, Salesforce: body by
        operation), parent fields filled from the parents' last published state. UPDATE: changed and nulled
        fields applied to the record's last published state. DELETE: that state marked deleted. A record is
        fetched back (one query per object per 200 ids) only when the event cannot give it: a gap event, no
        last known state, a changed lookup whose parent fields we read, ``diffFields``, or a parent whose
        state we do not hold. A record gone for good after a delete becomes a tombstone. ``known`` holds
        states newer than the published store's (the batch before, still publishing); they win."""
        t, c = self.conn.tenant_id, self.conn.connection_id
        keys_needing_state: dict[str, set[str]] = {}
        for obj, rid, header, _ in segment:
            if header.get("changeType") in ("UPDATE", "DELETE"):
                keys_needing_state.setdefault(obj, set()).add(rid)
        states: dict[tuple[str, str], dict[str, Any]] = {}
        for obj, ids in keys_needing_state.items():
            held = {rid for rid in ids if (obj, rid) in known}
            states.update(((obj, rid), known[(obj, rid)]) for rid in held)
            for rid, pub in (await self.sync.store.load(t, c, obj, sorted(ids - held))).items():
                if pub.payload:
                    with contextlib.suppress(ValueError):
                        states[(obj, rid)] = json.loads(pub.payload)
        work: dict[tuple[str, str], dict[str, Any] | None] = {}
        headers: dict[tuple[str, str], dict[str, Any]] = {}
        last_pos: dict[tuple[str, str], int] = {}
        need: dict[tuple[str, str], None] = {}  # ordered: fetch-backs in the order of the changes
        for pos, (obj, rid, header, body) in enumerate(segment):
            key = (obj, rid)
            last_pos[key], headers[key] = pos, header
            ct = str(header.get("changeType") or "")
            base = work.get(key) if key in work else states.get(key)
            if ct in ("CREATE", "UNDELETE"):
                work[key] = _apply({}, rid, header, body, created=True)
                need.pop(key, None)
            elif ct == "UPDATE" and base is not None and key not in need and not self._needs_fetch(obj, header):
                work[key] = _apply(base, rid, header, body)
            elif ct == "DELETE" and base is not None and key not in need:
                work[key] = {**base, "Id": rid, "IsDeleted": True,
                             "SystemModstamp": ts_of_ms(int(header.get("commitTimestamp") or 0))}
            else:  # gap events, or nothing known to apply the change to: read it
                work[key] = None
                need[key] = None
        # parent fields (``Account.PersonEmail``..) of records built from events, from the parents' state
        built = {key: rec for key, rec in work.items() if rec is not None and key not in need}
        parents = await self._parent_states(built, {**known, **built})  # a parent created in this batch too
        for key, record in built.items():
            if not self._fill_parents(key[0], record, parents):
                need[key] = None
        if need:
            by_obj: dict[str, list[str]] = {}
            for obj, rid in need:
                by_obj.setdefault(obj, []).append(rid)
            fetching = time.time()
            found: dict[tuple[str, str], dict[str, Any]] = {}
            urls: dict[str, str | None] = {}

            async def fetch(obj: str, ids: list[str]) -> None:
                records, url = await self.sync.fetch_by_ids(obj, ids)
                urls[obj] = url
                for r in records:
                    found[(obj, str(field_value(r, "Id")))] = r
                self.stats.fetched += len(records)

            await asyncio.gather(*(fetch(obj, ids) for obj, ids in by_obj.items()))
            STAGE_SECONDS.labels("fetch").observe(time.time() - fetching)
            for key in need:
                work[key] = found.get(key)
        else:
            urls = {}
        out: list[_Item] = []
        for key in sorted(last_pos, key=lambda k: last_pos[k]):
            rec = work.get(key)
            if rec is None:
                header = headers[key]
                ct = str(header.get("changeType", ""))
                if ct not in ("DELETE", "GAP_DELETE"):  # UNDELETE is not a delete
                    log.info("changed record no longer readable; skipped", entity=key[0], id=key[1], change=ct)
                    continue
                rec = {"Id": key[1], "IsDeleted": True,
                       "SystemModstamp": ts_of_ms(int(header.get("commitTimestamp") or 0))}
                self.stats.tombstones += 1
            else:
                self.stats.from_events += key not in need
            out.append((key[0], rec, urls.get(key[0]) if key in need else None))
        return out

    def _needs_fetch(self, obj: str, header: dict[str, Any]) -> bool:
        """An UPDATE the event cannot give: ``diffFields`` (text diffs), or a changed lookup whose parent
        fields the connector reads (``AccountId`` changed on an Order: ``Account.PersonEmail`` is stale)."""
        if header.get("diffFields"):
            return True
        changed = {str(f) for f in (header.get("changedFields") or []) + (header.get("nulledFields") or [])}
        rels = {p.split(".", 1)[0] for p in select_fields(obj, self.sync.shape, self.conn.own_ids(obj)) if "." in p}
        return any(f"{rel}Id" in changed for rel in rels)

    def _parent_paths(self, obj: str) -> list[str]:
        return [p for p in select_fields(obj, self.sync.shape, self.conn.own_ids(obj)) if "." in p]

    async def _parent_states(self, records: dict[tuple[str, str], dict[str, Any]],
                             known: _States) -> dict[tuple[str, str], Any]:
        """The last published state of every parent the records' ``Parent.Field`` paths name: one
        published-store read per parent object for the whole batch."""
        wanted: dict[str, set[str]] = {}
        for (obj, _), rec in records.items():
            for path in self._parent_paths(obj):
                rel = path.split(".", 1)[0]
                parent_obj, parent_id = PARENT_OBJECT.get(rel), rec.get(f"{rel}Id")
                if parent_obj and parent_id and field_value(rec, path) is None:
                    wanted.setdefault(parent_obj, set()).add(str(parent_id))
        out: dict[tuple[str, str], Any] = {}
        t, c = self.conn.tenant_id, self.conn.connection_id
        for parent_obj, ids in wanted.items():
            held = {rid for rid in ids if (parent_obj, rid) in known}
            out.update(((parent_obj, rid), known[(parent_obj, rid)]) for rid in held)
            if not ids - held:
                continue
            for rid, got in (await self.sync.store.load(t, c, parent_obj, sorted(ids - held))).items():
                if got.payload:
                    with contextlib.suppress(ValueError):
                        out[(parent_obj, rid)] = json.loads(got.payload)
        return out

    def _fill_parents(self, obj: str, rec: dict[str, Any], parents: dict[tuple[str, str], Any]) -> bool:
        """Set the ``Parent.Field`` values of the select list from the parents' last published state;
        False when a parent's state is not held (the record is then fetched back)."""
        for path in self._parent_paths(obj):
            rel, _, name = path.partition(".")
            if field_value(rec, path) is not None:
                continue
            parent_id = rec.get(f"{rel}Id")
            if not parent_id:
                continue  # no parent: the value is null, as SOQL would return it
            parent = parents.get((PARENT_OBJECT.get(rel) or "", str(parent_id)))
            if not isinstance(parent, dict) or name not in parent:
                return False
            nested = rec.setdefault(rel, {})
            if isinstance(nested, dict):
                nested[name] = parent[name]
        return True

    async def _publish(self, items: Sequence[_Item]) -> None:
        """Publish the batch's records at once, skipping versions already published
        (:meth:`sfconnect.reader.RecordReader.publish_items`: one read and one write per object, one broker
        round trip); each object's records keep their order."""
        await self.sync.publish_items(items)

    async def _reconcile_from(self, obj: str, commit_ms: Any) -> None:
        ch = f"/data/{obj}ChangeEvent"
        stamps = [int(x) for x in (self.commit_ms.get(ch), commit_ms) if x]
        await self._reconcile(obj, min(stamps) if stamps else None)

    async def _reconcile(self, obj: str, since_ms: int | None) -> None:
        since = ts_of_ms(max(0, since_ms - _RECONCILE_MARGIN_MS)) if since_ms else "1970-01-01T00:00:00.000Z"
        self.reconciles.append((obj, since))
        self.stats.reconciled += await self.sync.reconcile(obj, since)

    # -------------------------------------------------------------------------------------------- loop
    async def run(self, stop: asyncio.Event) -> None:
        await self.load()
        failures = 0
        while not stop.is_set():
            try:
                await self.handshake()
                await self.subscribe_all()
                failures = 0
                await self.stream(stop)
            except (StreamDropped, Transient) as exc:
                failures += 1
                delay = 0.0 if isinstance(exc, StreamDropped) and failures == 1 else min(30.0, 0.2 * 2 ** failures)
                if exc.retry_after:
                    delay = exc.retry_after
                log.warning("stream interrupted; reconnecting with replay", error=str(exc)[:300],
                            retry_in_s=delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
