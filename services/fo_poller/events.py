"""Business Events received over HTTPS: authenticated, deduplicated by control number, turned into call-backs.

F&O sends business events to an HTTPS endpoint it is given (``docs/vendor-facts.md``, F&O); how that
endpoint authenticates is not documented, so the endpoint URL carries a per-connection secret, the way an
Azure Functions URL does::

    https://<our host>:<FLASH_FO_EVENTS_PORT>/fo/business-events/<tenant>/<connection>?code=<secret>

``credentials.business_events_secret`` holds the secret (encrypted at rest, never logged). A request is:

* **refused 401** without the right ``code`` (compared in constant time): a forged event;
* **refused 400** when its body is not an event (no ``BusinessEventId`` / ``ControlNumber``);
* **refused 409** when its ``ControlNumber`` was already received for the connection: a replay (the
  control number is unique and upwardly increasing, with gaps, so gaps and out-of-order delivery are fine);
* **refused 422** when its ``EventTime`` is older than ``business_events.max_age_s`` (a replay of an old
  capture; the periodic scans still cover anything older);
* **accepted 200, ignored** when its ``BusinessEventId`` is not one the connection maps;
* **accepted 202** otherwise: stored as pending in ``fo_business_events`` and queued; the connection's next
  cycle calls back for the full record (the event's own payload is never trusted as data), publishes it,
  and marks the event done. Pending events survive a restart.

One :class:`EventReceiver` (aiohttp, HTTPS) serves every connection of the process; each connection's
:class:`EventInbox` registers with it while the connection runs.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hmac
import json
import re
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import asyncpg
from aiohttp import web
from prometheus_client import Counter

from fo_poller.config import FoConnection
from servicekit.db import db_errors
from servicekit.logging import get_logger

__all__ = [
    "Announcement",
    "EventInbox",
    "EventReceiver",
    "EventStore",
    "FakeEventStore",
    "PgEventStore",
    "event_time",
]

log = get_logger(__name__)

EVENTS = Counter("flash_fo_business_events_total", "Business Events received by the fo-poller, by outcome",
                 ["outcome"])  # no tenant label: unbounded series (tests/unit/test_metric_labels.py)

_MS_DATE = re.compile(r"^/Date\((-?\d+)\)/$")


@dataclass(frozen=True)
class Announcement:
    """An event that names a record to call back for: ``company`` (dataAreaId) and ``number``."""

    control_number: int
    business_event_id: str
    company: str
    number: str


class EventStore(Protocol):
    """Control numbers received per connection. ``accept`` returns False for one already received."""

    async def accept(self, tenant_id: str, connection_id: str, a: Announcement, event_time: dt.datetime) -> bool: ...

    async def done(self, tenant_id: str, connection_id: str, control_numbers: list[int]) -> None: ...

    async def pending(self, tenant_id: str, connection_id: str) -> list[Announcement]: ...


class PgEventStore:
    """``fo_business_events`` (fo_poller migration 0070)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def accept(self, tenant_id: str, connection_id: str, a: Announcement, event_time: dt.datetime) -> bool:
        async with db_errors("business event accept"):
            row = await self.pool.fetchrow(
                """INSERT INTO fo_business_events (tenant_id, connection_id, control_number, business_event_id,
                       legal_entity, record_key, event_time)
                   VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING RETURNING control_number""",
                tenant_id, connection_id, a.control_number, a.business_event_id, a.company, a.number, event_time)
        return row is not None

    async def done(self, tenant_id: str, connection_id: str, control_numbers: list[int]) -> None:
        if not control_numbers:
            return
        async with db_errors("business event done"):
            await self.pool.execute(
                """UPDATE fo_business_events SET handled_at = now()
                   WHERE tenant_id = $1 AND connection_id = $2 AND control_number = ANY($3::bigint[])""",
                tenant_id, connection_id, control_numbers)

    async def pending(self, tenant_id: str, connection_id: str) -> list[Announcement]:
        async with db_errors("business events pending"):
            rows = await self.pool.fetch(
                """SELECT control_number, business_event_id, legal_entity, record_key FROM fo_business_events
                   WHERE tenant_id = $1 AND connection_id = $2 AND handled_at IS NULL ORDER BY control_number""",
                tenant_id, connection_id)
        return [Announcement(int(r["control_number"]), r["business_event_id"], r["legal_entity"], r["record_key"])
                for r in rows]


@dataclass
class FakeEventStore:
    rows: dict[tuple[str, str, int], tuple[Announcement, bool]] = field(default_factory=dict)

    async def accept(self, tenant_id: str, connection_id: str, a: Announcement, event_time: dt.datetime) -> bool:
        k = (tenant_id, connection_id, a.control_number)
        if k in self.rows:
            return False
        self.rows[k] = (a, False)
        return True

    async def done(self, tenant_id: str, connection_id: str, control_numbers: list[int]) -> None:
        for n in control_numbers:
            k = (tenant_id, connection_id, n)
            if k in self.rows:
                self.rows[k] = (self.rows[k][0], True)

    async def pending(self, tenant_id: str, connection_id: str) -> list[Announcement]:
        return [a for (t, c, _), (a, d) in sorted(self.rows.items()) if (t, c) == (tenant_id, connection_id) and not d]


def event_time(body: Mapping[str, Any]) -> dt.datetime | None:
    """``EventTimeIso8601`` or ``EventTime`` (``/Date(ms)/`` or ISO 8601), as an aware datetime."""
    for name in ("EventTimeIso8601", "EventTime"):
        v = body.get(name)
        if not isinstance(v, str) or not v:
            continue
        m = _MS_DATE.match(v)
        if m:
            return dt.datetime.fromtimestamp(int(m.group(1)) / 1000, dt.UTC)
        text = v.replace("Z", "+00:00")
        text = re.sub(r"\.(\d{6})\d+", r".\1", text)  # .NET writes 7 fractional digits
        try:
            t = dt.datetime.fromisoformat(text)
        except ValueError:
            continue
        return t if t.tzinfo else t.replace(tzinfo=dt.UTC)
    return None


class EventInbox:
    """One connection's side of the receiver: checks, stores and queues its events."""

    def __init__(self, cc: FoConnection, store: EventStore, *, now: Any = None) -> None:
        self.cc = cc
        self.store = store
        self._queue: dict[tuple[str, str], list[Announcement]] = {}
        """Per record, every event announcing it (one call back serves them all)."""
        self._inflight: list[Announcement] = []
        self._now = now or (lambda: dt.datetime.now(dt.UTC))
        self.stats: dict[str, int] = {"accepted": 0, "forged": 0, "replayed": 0, "stale": 0, "ignored": 0,
                                      "malformed": 0}

    def count(self, outcome: str) -> None:
        """One more event with this outcome (stats and the ``flash_fo_business_events_total`` metric)."""
        self.stats[outcome] += 1
        EVENTS.labels(outcome).inc()

    def authentic(self, code: str | None) -> bool:
        secret = self.cc.events_secret
        ok = bool(secret) and code is not None and hmac.compare_digest(code.encode(), (secret or "").encode())
        if not ok:
            self.count("forged")
        return ok

    async def restore(self) -> None:
        """Queue the events accepted but not handled before a restart."""
        for a in await self.store.pending(self.cc.tenant_id, self.cc.connection_id):
            self._queue.setdefault((a.company, a.number), []).append(a)

    async def receive(self, body: Any) -> tuple[int, str]:
        """(HTTP status, message) for one authentic request body (see the module docstring)."""
        if not isinstance(body, dict) or not body.get("BusinessEventId") or "ControlNumber" not in body:
            self.count("malformed")
            return 400, "not a business event: BusinessEventId and ControlNumber are required"
        try:
            number = int(body["ControlNumber"])
        except (TypeError, ValueError):
            self.count("malformed")
            return 400, "ControlNumber is not a number"
        when = event_time(body)
        if when is None:
            self.count("malformed")
            return 400, "EventTime is missing or not a date"
        if (self._now() - when).total_seconds() > self.cc.events_max_age_s:
            self.count("stale")
            return 422, f"event {number} is older than business_events.max_age_s ({self.cc.events_max_age_s:g} s)"
        spec = self.cc.events.get(str(body["BusinessEventId"]))
        if spec is None:
            self.count("ignored")
            return 200, f"{body['BusinessEventId']} is not mapped by this connection; ignored"
        company, key = body.get(spec["company"]) or body.get("BusinessEventLegalEntity"), body.get(spec["order"])
        if not company or not key:
            self.count("malformed")
            return 400, f"event lacks {spec['company']} or {spec['order']}"
        a = Announcement(number, str(body["BusinessEventId"]), str(company).lower(), str(key))
        if not await self.store.accept(self.cc.tenant_id, self.cc.connection_id, a, when):
            self.count("replayed")
            return 409, f"control number {number} was already received"
        self.count("accepted")
        self._queue.setdefault((a.company, a.number), []).append(a)
        return 202, "accepted"

    def drain(self) -> list[Announcement]:
        """The queued announcements, one per record; :meth:`handled` after their records are published."""
        out = [events[0] for events in self._queue.values()]
        self._inflight += [a for events in self._queue.values() for a in events]
        self._queue.clear()
        return out

    def requeue(self) -> None:
        """Put the drained announcements back (their cycle failed)."""
        for a in self._inflight:
            self._queue.setdefault((a.company, a.number), []).append(a)
        self._inflight = []

    async def handled(self) -> None:
        numbers = [a.control_number for a in self._inflight]
        self._inflight = []
        await self.store.done(self.cc.tenant_id, self.cc.connection_id, numbers)


class EventReceiver:
    """The process's HTTPS endpoint for Business Events (see the module docstring)."""

    def __init__(self) -> None:
        self.inboxes: dict[tuple[str, str], EventInbox] = {}
        self.app = web.Application(client_max_size=256 * 1024)
        self.app.router.add_post("/fo/business-events/{tenant}/{connection}", self._handle)
        self.port: int | None = None

    def register(self, inbox: EventInbox) -> None:
        self.inboxes[(inbox.cc.tenant_id, inbox.cc.connection_id)] = inbox

    def unregister(self, inbox: EventInbox) -> None:
        key = (inbox.cc.tenant_id, inbox.cc.connection_id)
        if self.inboxes.get(key) is inbox:
            del self.inboxes[key]

    async def _handle(self, request: web.Request) -> web.Response:
        inbox = self.inboxes.get((request.match_info["tenant"], request.match_info["connection"]))
        if inbox is None:
            return web.json_response({"error": "no live connection with business events here"}, status=404)
        if not inbox.authentic(request.query.get("code")):
            log.warning("business event refused: bad code", tenant_id=inbox.cc.tenant_id,
                        connection_id=inbox.cc.connection_id, peer=request.remote)
            return web.json_response({"error": "unauthorized"}, status=401)
        try:
            body = json.loads(await request.text())
        except ValueError:
            inbox.count("malformed")
            return web.json_response({"error": "body is not JSON"}, status=400)
        status, message = await inbox.receive(body)
        if status >= 400:
            log.warning("business event refused", tenant_id=inbox.cc.tenant_id,
                        connection_id=inbox.cc.connection_id, status=status, reason=message)
        return web.json_response({"status": status, "message": message}, status=status)

    @contextlib.asynccontextmanager
    async def serve(self, host: str, port: int, ssl_context: ssl.SSLContext | None) -> AsyncIterator[int]:
        """Listen until the block exits; yields the bound port. ``ssl_context`` None is refused outside tests:
        events carry the connection's secret in their URL, so the endpoint is HTTPS."""
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        await site.start()
        sockets = getattr(site._server, "sockets", None)  # aiohttp has no public accessor for the bound port
        self.port = int(sockets[0].getsockname()[1]) if sockets else port
        try:
            yield self.port
        finally:
            await runner.cleanup()
