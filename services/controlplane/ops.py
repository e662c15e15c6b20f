"""Control-plane operations, shared by the ``flash`` CLI and the HTTP API (one answer, one code path).

Every operation takes the :class:`~controlplane.tokens.Actor` making it: a tenant actor sees and changes
only its own tenant's connections and dead letters (another tenant's look exactly like missing ones: 404,
never 403, so ids do not leak across tenants); an operator sees every tenant. Every change writes an
``audit_log`` row (who, what, which tenant and target, when).

Credentials are write-only: they go in through :meth:`Operations.create_connection` /
:meth:`Operations.update_connection`, are encrypted at rest (``servicekit.connections``), and no result
of any operation carries them; every text a connector returns (reports, errors) is scrubbed of the
connection's secret values before it leaves this module.
"""

from __future__ import annotations

import datetime as dt
import json
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg

from connectorkit.dryrun import dry_run as kit_dry_run
from connectorkit.endpoints import check_endpoint, check_resolved
from connectorkit.registry import connector_sources, load_connector
from connectorkit.registry import validate_connection as kit_validate_connection
from connectorkit.replay import source_rewriter
from controlplane.tokens import Actor
from servicekit import dlq as dlq_ops
from servicekit import metrics
from servicekit.connections import Connection, CredentialCipher, PgConnectionStore
from servicekit.db import Migrations
from servicekit.errors import ConfigError, FlashError
from servicekit.kafka import KafkaPublisher
from servicekit.settings import FlashSettings

__all__ = [
    "CONTROLPLANE_MIGRATIONS",
    "SOURCES",
    "Conflict",
    "Invalid",
    "NotFound",
    "OpError",
    "Operations",
    "check_connection_endpoint",
]

#: api_tokens and audit_log (component "controlplane", numbers 0050-0059).
CONTROLPLANE_MIGRATIONS = Migrations("controlplane", "controlplane")

SOURCES = ("dynamics-ce", "dynamics-fo", "salesforce")
#: Connectors come from the kit's registry (entry points ``flash_connect.connectors``).


class OpError(ConfigError):
    """An operation refused, with the HTTP status the API answers and a message saying what to do."""

    status = 400


class Invalid(OpError):
    status = 400


class NotFound(OpError):
    status = 404


class Conflict(OpError):
    status = 409


# ------------------------------------------------------------------------------------ endpoint policy


def check_connection_endpoint(source: str, endpoint: str, *, allow_sandbox: bool | None = None) -> None:
    """THE endpoint gate of the control plane: called before a connection is stored and before verify,
    dry-run or go-live make any request. The policy is the connector kit's (``connectorkit.endpoints``):
    https only, the vendor's host patterns, no IP address; ``FLASH_ALLOW_SANDBOX_ENDPOINTS=1`` admits the
    simulators on loopback. Raises :class:`Invalid` with the policy's message."""
    try:
        check_endpoint(endpoint, kinds=[source], setting="endpoint", allow_sandbox=allow_sandbox)
    except ConfigError as exc:
        raise Invalid(str(exc)) from None


async def check_connection_host(source: str, endpoint: str) -> None:
    """Before a request: the endpoint's host must not resolve to a private, loopback or link-local address."""
    host = urllib.parse.urlsplit(endpoint.strip()).hostname or ""
    try:
        await check_resolved(host, setting="endpoint")
    except ConfigError as exc:
        raise Invalid(str(exc)) from None


# ------------------------------------------------------------------------------------------- helpers


#: Credential fields that identify rather than authenticate (an app's id, a directory id): shown in reports
#: (an authority URL carries the directory id). Every other credential value is treated as a secret.
IDENTIFIERS = frozenset({"client_id", "tenant_id", "username", "user", "instance_url"})


def _scrub(value: Any, secrets: Mapping[str, str]) -> Any:
    """``value`` with every secret credential value replaced by ``***`` (reports and errors from connectors)."""
    needles = sorted((v for k, v in secrets.items() if k not in IDENTIFIERS and isinstance(v, str) and len(v) >= 4),
                     key=len, reverse=True)
    if not needles:
        return value

    def text(s: str) -> str:
        for n in needles:
            s = s.replace(n, "***")
        return s

    def walk(v: Any) -> Any:
        if isinstance(v, str):
            return text(v)
        if isinstance(v, dict):
            return {text(str(k)): walk(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [walk(x) for x in v]
        return v

    return walk(value)


def _public(c: Connection) -> dict[str, Any]:
    """A connection as the API and CLI show it: credential names only, never values."""
    out = c.redacted()  # credentials: {name: "***"}
    out["last_error"] = _scrub(c.last_error, c.credentials)
    return out


def _json_safe(v: Any) -> Any:
    def default(o: Any) -> str:
        return o.isoformat() if isinstance(o, dt.datetime | dt.date) else str(o)

    return json.loads(json.dumps(v, default=default))


@dataclass(frozen=True)
class ConnectionInput:
    tenant_id: str
    connection_id: str
    source: str
    endpoint: str
    credentials: dict[str, str]
    settings: dict[str, Any]

    @classmethod
    def parse(cls, body: Mapping[str, Any], *, tenant_id: str | None) -> ConnectionInput:
        def text(name: str) -> str:
            v = body.get(name)
            if not isinstance(v, str) or not v.strip():
                raise Invalid(f"{name} is required (a non-empty string)")
            return v.strip()

        tenant = tenant_id or text("tenant_id")
        if tenant_id and body.get("tenant_id") not in (None, "", tenant_id):
            raise Invalid("tenant_id must be your own tenant (or left out)")
        source = text("source")
        if source not in SOURCES:
            raise Invalid(f"source must be one of {', '.join(SOURCES)}")
        creds = body.get("credentials") or {}
        settings = body.get("settings") or {}
        if not isinstance(creds, dict) or not all(isinstance(v, str | int) for v in creds.values()):
            raise Invalid("credentials must be an object of strings")
        if not isinstance(settings, dict):
            raise Invalid("settings must be a JSON object")
        cid = text("connection_id")
        if not all(ch.isalnum() or ch in "-_." for ch in cid):
            raise Invalid("connection_id may hold letters, digits, '-', '_' and '.' only")
        return cls(tenant, cid, source, text("endpoint"), {k: str(v) for k, v in creds.items()}, settings)


# ---------------------------------------------------------------------------------------- operations


class Operations:
    """What an operator can do with connections and dead letters; see the module docstring for the rules."""

    def __init__(self, pool: asyncpg.Pool, settings: FlashSettings, publisher: KafkaPublisher | None = None) -> None:
        self.pool = pool
        self.settings = settings
        self.publisher = publisher
        self.store = PgConnectionStore(pool, CredentialCipher.from_settings(settings))

    async def _audit(self, actor: Actor, tenant_id: str | None, action: str, target: str | None,
                     detail: Mapping[str, Any] | None = None) -> None:
        await self.pool.execute(
            "INSERT INTO audit_log (actor, tenant_id, action, target, detail) VALUES ($1, $2, $3, $4, $5::jsonb)",
            actor.name, tenant_id, action, target, json.dumps(_json_safe(dict(detail or {}))),
        )

    async def _get(self, actor: Actor, tenant_id: str, connection_id: str) -> Connection:
        if not actor.may_see(tenant_id):
            raise NotFound(f"no connection {connection_id!r} for tenant {tenant_id!r}")
        try:
            return await self.store.get(tenant_id, connection_id)
        except ConfigError as exc:
            exists = await self.pool.fetchval(
                "SELECT true FROM connections WHERE tenant_id = $1 AND connection_id = $2", tenant_id, connection_id)
            if exists:  # stored, but its credentials cannot be decrypted (a key dropped too early)
                raise Conflict(str(exc)) from None
            raise NotFound(str(exc)) from None

    # -------------------------------------------------------------------------------- connections

    async def list_connections(self, actor: Actor, *, source: str | None = None) -> list[dict[str, Any]]:
        # Unreadable credentials are one connection's problem: listed with the reason, never an error for all.
        rows = await self.store.list(source=source, include_unreadable=True)
        return [_public(c) for c in rows if actor.may_see(c.tenant_id)]

    async def get_connection(self, actor: Actor, tenant_id: str, connection_id: str) -> dict[str, Any]:
        return _public(await self._get(actor, tenant_id, connection_id))

    async def create_connection(
        self, actor: Actor, body: Mapping[str, Any], *, replace: bool = False
    ) -> dict[str, Any]:
        """Store a new connection in ``draft`` (``replace``: overwrite one of the same id, as ``add`` does)."""
        inp = ConnectionInput.parse(body, tenant_id=actor.tenant_id)
        if not actor.may_see(inp.tenant_id):
            raise Invalid("tenant_id must be your own tenant")
        check_connection_endpoint(inp.source, inp.endpoint)
        self._validate(Connection(inp.tenant_id, inp.connection_id, inp.source, inp.endpoint, inp.credentials,
                                  inp.settings))
        owner = await self.pool.fetchval(
            "SELECT tenant_id FROM connections WHERE connection_id = $1", inp.connection_id)
        if owner is not None and (owner != inp.tenant_id or not replace):
            raise Conflict(f"connection id {inp.connection_id!r} is taken; choose another "
                           "(or update the existing connection)")
        conn = await self.store.upsert(inp.tenant_id, inp.connection_id, inp.source, inp.endpoint,
                                       inp.credentials, inp.settings)
        await self._audit(actor, inp.tenant_id, "connection.create" if owner is None else "connection.replace",
                          inp.connection_id, {"source": inp.source, "endpoint": inp.endpoint,
                                              "credentials": sorted(inp.credentials)})
        return _public(conn)

    async def update_connection(self, actor: Actor, tenant_id: str, connection_id: str,
                                patch: Mapping[str, Any]) -> dict[str, Any]:
        """Change endpoint, settings and/or credentials (omitted ones are kept); the connection goes back to
        draft and must be verified again."""
        conn = await self._get(actor, tenant_id, connection_id)
        unknown = set(patch) - {"endpoint", "settings", "credentials"}
        if unknown:
            raise Invalid(f"cannot change {', '.join(sorted(unknown))}; only endpoint, settings and credentials")
        endpoint = patch.get("endpoint", conn.endpoint)
        settings = patch.get("settings", conn.settings)
        creds = patch.get("credentials")
        if not isinstance(endpoint, str) or not endpoint.strip():
            raise Invalid("endpoint must be a non-empty string")
        if not isinstance(settings, dict):
            raise Invalid("settings must be a JSON object")
        if creds is not None and (not isinstance(creds, dict) or not all(isinstance(v, str) for v in creds.values())):
            raise Invalid("credentials must be an object of strings")
        check_connection_endpoint(conn.source, endpoint)
        new_creds = {**conn.credentials, **creds} if creds else conn.credentials
        self._validate(Connection(tenant_id, connection_id, conn.source, endpoint.strip(), new_creds, settings))
        updated = await self.store.upsert(tenant_id, connection_id, conn.source, endpoint.strip(), new_creds, settings)
        await self._audit(actor, tenant_id, "connection.update", connection_id,
                          {"changed": sorted(patch), "credentials": sorted(creds or {})})
        return _public(updated)

    async def delete_connection(self, actor: Actor, tenant_id: str, connection_id: str) -> dict[str, Any]:
        await self._get(actor, tenant_id, connection_id)
        async with self.pool.acquire() as db, db.transaction():
            await db.execute("DELETE FROM cursors WHERE tenant_id = $1 AND connection_id = $2",
                             tenant_id, connection_id)
            await db.execute("DELETE FROM connections WHERE tenant_id = $1 AND connection_id = $2",
                             tenant_id, connection_id)
        await self._audit(actor, tenant_id, "connection.delete", connection_id)
        return {"deleted": connection_id, "tenant_id": tenant_id}

    @staticmethod
    def _connector(source: str) -> Any:
        """The registered connector of ``source`` (the kit's registry); Invalid when this build has none."""
        if source not in connector_sources():
            installed = ", ".join(connector_sources()) or "none"
            raise Invalid(f"no connector for source {source!r} is installed in this build (installed: {installed})")
        return load_connector(source)

    def _validate(self, conn: Connection) -> None:
        """What must hold before a connection is stored (``connectorkit.registry.validate_connection``: the
        endpoint policy, then the registered connector's parse of every setting), and that this build has a
        connector that can verify the source."""
        try:
            if kit_validate_connection(conn) is None:
                self._connector(conn.source)
        except ConfigError as exc:
            raise Invalid(str(_scrub(str(exc), conn.credentials))) from None

    async def verify(self, actor: Actor, tenant_id: str, connection_id: str) -> dict[str, Any]:
        """Host, authentication, privileges per entity (the connector's checks, one line each with its fix);
        records ``verified`` or ``failed`` with the reason."""
        conn = await self._get(actor, tenant_id, connection_id)
        check_connection_endpoint(conn.source, conn.endpoint)
        await check_connection_host(conn.source, conn.endpoint)
        connector = self._connector(conn.source)
        report: Any
        lines: list[str] = []
        try:
            result = await connector.verify(connector.parse(conn), self.settings)
            lines = list(result.lines())
            report = result.as_json()
            if not result.ok:
                raise ConfigError(result.summary())
        except FlashError as exc:
            message = str(_scrub(str(exc), conn.credentials))
            await self.store.set_state(tenant_id, connection_id, "failed", error=message)
            await self._audit(actor, tenant_id, "connection.verify", connection_id, {"ok": False, "error": message})
            return {"ok": False, "state": "failed", "error": message, "connection_id": connection_id,
                    "lines": _scrub(lines, conn.credentials)}
        await self.store.set_state(tenant_id, connection_id, "verified")
        usage = report.get("api_usage") if isinstance(report, dict) else None
        if not usage:  # the vendor's own figure from the verify's responses (Sforce-Limit-Info, x-ms-ratelimit)
            usage = metrics.quota_seen(conn.source)
        await self._audit(actor, tenant_id, "connection.verify", connection_id,
                          {"ok": True, **({"api_usage": usage} if usage else {})})
        return {"ok": True, "state": "verified", "connection_id": connection_id,
                "lines": _scrub(lines, conn.credentials), "report": _json_safe(_scrub(report, conn.credentials))}

    async def dry_run(self, actor: Actor, tenant_id: str, connection_id: str, *, limit: int = 5) -> dict[str, Any]:
        """Sample -> normalizer -> member resolution -> points rules, all read-only: what would land.
        Writes nothing (no topic, ledger, member link, cursor or state)."""
        conn = await self._get(actor, tenant_id, connection_id)
        check_connection_endpoint(conn.source, conn.endpoint)
        await check_connection_host(conn.source, conn.endpoint)
        connector = self._connector(conn.source)
        n = max(1, min(int(limit), 100))
        try:
            report = await kit_dry_run(connector, conn, self.settings, self.pool, limit=n)
        except FlashError as exc:
            raise Invalid(f"dry-run failed: {_scrub(str(exc), conn.credentials)}") from None
        report = _json_safe(_scrub(report, conn.credentials))
        return {"connection_id": connection_id, "tenant_id": tenant_id, "summary": summarize_preview(report),
                "report": report}

    async def set_state(self, actor: Actor, tenant_id: str, connection_id: str, action: str) -> dict[str, Any]:
        """``go-live`` (from verified/paused), ``pause`` (from live), ``resume`` (from paused)."""
        conn = await self._get(actor, tenant_id, connection_id)
        allowed = {"go-live": ("verified", "paused", "live"), "pause": ("live", "paused"), "resume": ("paused", "live")}
        target = {"go-live": "live", "pause": "paused", "resume": "live"}
        if action not in allowed:
            raise Invalid(f"unknown action {action!r}")
        if conn.state not in allowed[action]:
            hint = (f"verify it first (flash connections verify --tenant {tenant_id} --id {connection_id})"
                    if conn.state in ("draft", "failed") else
                    "only a live connection can be paused" if action == "pause" else "only a paused one resumes")
            last = f"; last verification: {_scrub(conn.last_error, conn.credentials)}" if conn.last_error else ""
            raise Conflict(f"connection {connection_id} is {conn.state}; {hint}{last}")
        if action != "pause":
            check_connection_endpoint(conn.source, conn.endpoint)
        await self.store.set_state(tenant_id, connection_id, target[action])  # type: ignore[arg-type]
        await self._audit(actor, tenant_id, f"connection.{action}", connection_id,
                          {"from": conn.state, "to": target[action]})
        return {**_public(await self.store.get(tenant_id, connection_id))}

    async def status(self, actor: Actor, tenant_id: str, connection_id: str) -> dict[str, Any]:
        """Last sync, lag, records per entity, errors, dead-letter depth and quota use of one connection."""
        conn = await self._get(actor, tenant_id, connection_id)
        cursors = await self.pool.fetch(
            """SELECT entity, updated_at FROM cursors WHERE tenant_id = $1 AND connection_id = $2 ORDER BY entity""",
            tenant_id, connection_id)
        last_sync = max((r["updated_at"] for r in cursors), default=None)
        records: dict[str, int] = {}
        order_matched: int | None = None
        points: int | None = None
        if await self.pool.fetchval("SELECT to_regclass('orders') IS NOT NULL"):
            row = await self.pool.fetchrow(
                """SELECT count(*) AS n, count(*) FILTER (WHERE member_id <> '') AS matched,
                          coalesce(sum(earned + clawed), 0)::bigint AS points
                   FROM orders WHERE tenant_id = $1 AND connection_id = $2 AND known""",
                tenant_id, connection_id)
            if row is not None:
                records["orders"], order_matched, points = int(row["n"]), int(row["matched"]), int(row["points"])
        matched: int | None = None
        if await self.pool.fetchval("SELECT to_regclass('customer_links') IS NOT NULL"):
            row = await self.pool.fetchrow(
                """SELECT count(*) AS n, count(member_id) AS matched FROM customer_links
                   WHERE tenant_id = $1 AND connection_id = $2""", tenant_id, connection_id)
            if row is not None:
                records["customers"] = int(row["n"])
                matched = int(row["matched"])
        if await self.pool.fetchval("SELECT to_regclass('parked') IS NOT NULL"):
            records["parked_orders"] = int(await self.pool.fetchval(
                """SELECT count(DISTINCT order_source_id) FROM parked WHERE tenant_id = $1 AND connection_id = $2""",
                tenant_id, connection_id))
        dead = await self.pool.fetch(
            """SELECT error_class, count(*) AS n FROM dead_letters WHERE tenant_id = $1 AND replayed_at IS NULL
               GROUP BY error_class ORDER BY error_class""", tenant_id)
        limits = conn.settings.get("limits") or conn.settings.get("quota")
        seen = await self.pool.fetchrow(
            """SELECT at, detail->>'api_usage' AS usage FROM audit_log WHERE tenant_id = $1 AND target = $2
               AND action = 'connection.verify' AND detail ? 'api_usage' ORDER BY id DESC LIMIT 1""",
            tenant_id, connection_id)
        customers = records.get("customers")
        return dict(_json_safe({
            "tenant_id": tenant_id, "connection_id": connection_id, "source": conn.source, "state": conn.state,
            "last_error": _scrub(conn.last_error, conn.credentials), "verified_at": conn.verified_at,
            "last_sync": last_sync,
            "lag_s": round((dt.datetime.now(dt.UTC) - last_sync).total_seconds(), 1) if last_sync else None,
            "cursors": {r["entity"]: r["updated_at"] for r in cursors},
            "records": records,
            "customer_match_rate": round(matched / customers, 3) if customers and matched is not None else None,
            "order_match_rate": round(order_matched / records["orders"], 3)
            if records.get("orders") and order_matched is not None else None,
            "points_in_ledger": points,
            "errors": {r["error_class"]: int(r["n"]) for r in dead},  # the tenant's pending dead letters
            "dead_letter_depth": sum(int(r["n"]) for r in dead),
            "quota": {"configured_limits": limits if isinstance(limits, dict) else None,
                      "api_usage_at_last_verify": {"usage": seen["usage"], "at": seen["at"]} if seen else None,
                      "live_use": "flash_vendor_quota_used / flash_source_requests_total on the pollers' /metrics"},
        }))

    # ------------------------------------------------------------------------------- dead letters

    def _dlq_filter(self, actor: Actor, query: Mapping[str, Any]) -> dlq_ops.DlqFilter:
        def when(name: str) -> dt.datetime | None:
            v = query.get(name)
            if not v:
                return None
            try:
                parsed = dt.datetime.fromisoformat(str(v))
            except ValueError:
                raise Invalid(f"{name} must be an ISO date or date-time, e.g. 2026-11-01") from None
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)

        tenant = query.get("tenant_id") or None
        if actor.tenant_id is not None:
            if tenant not in (None, actor.tenant_id):
                raise NotFound(f"no dead letters for tenant {tenant!r}")
            tenant = actor.tenant_id
        ids = query.get("ids")
        return dlq_ops.DlqFilter(
            consumer=query.get("consumer") or None, tenant_id=tenant, error_class=query.get("error_class") or None,
            entity=query.get("entity") or None, since=when("since"), until=when("until"),
            include_replayed=str(query.get("include_replayed", "")).lower() in ("1", "true", "yes"),
            ids=tuple(int(i) for i in ids) if ids else None,
        )

    async def list_dead_letters(
        self, actor: Actor, query: Mapping[str, Any], *, limit: int = 100
    ) -> list[dict[str, Any]]:
        rows = await dlq_ops.list_letters(self.pool, self._dlq_filter(actor, query), limit=max(1, min(limit, 1000)))
        return [_json_safe(r) for r in rows]

    async def show_dead_letter(self, actor: Actor, letter_id: int) -> dict[str, Any]:
        row = await dlq_ops.show_letter(self.pool, letter_id)
        if row is None or not actor.may_see(row["tenant_id"]):
            raise NotFound(f"no dead letter {letter_id}")
        return dict(_json_safe(row))

    async def depth(self, actor: Actor) -> list[dict[str, Any]]:
        return [_json_safe(r) for r in await dlq_ops.depth(self.pool) if actor.may_see(r["tenant_id"])]

    async def replay(self, actor: Actor, query: Mapping[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
        """Replay the matching dead letters (a tenant's own only) onto their topics; leaves an audit row."""
        flt = self._dlq_filter(actor, query)
        if flt.ids is not None:
            for letter_id in flt.ids:
                await self.show_dead_letter(actor, letter_id)  # NotFound for another tenant's
        if self.publisher is None:
            raise Conflict("this control plane has no broker to replay to: start `flash serve` with "
                           "FLASH_KAFKA_BOOTSTRAP set to the broker the services use")
        # Source dead letters are re-fetched from the vendor (connectorkit.replay), never re-sent as they are.
        audit = await dlq_ops.replay(self.pool, self.publisher, flt, dry_run=dry_run, requested_by=actor.name,
                                     rewrite=source_rewriter(self.store.get, self.settings))
        await self._audit(actor, flt.tenant_id, "dlq.replay" if not dry_run else "dlq.replay-preview",
                          str(audit.get("id")), {"filter": flt.as_json(), "replayed": audit.get("replayed", 0),
                                                 "failed": audit.get("failed", 0)})
        return dict(_json_safe(audit))

    async def audit(self, actor: Actor, *, limit: int = 100) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(
            """SELECT id, at, actor, tenant_id, action, target, detail FROM audit_log
               WHERE ($1::text IS NULL OR tenant_id = $1) ORDER BY id DESC LIMIT $2""",
            actor.tenant_id, max(1, min(limit, 1000)))
        out = []
        for r in rows:
            d = dict(r)
            d["detail"] = json.loads(d["detail"]) if isinstance(d["detail"], str) else d["detail"]
            out.append(_json_safe(d))
        return out


def summarize_preview(report: Any) -> dict[str, Any]:
    """The figures a person reads first, from a connector's dry-run report: records per entity, events
    per type, member match rate, points that would be earned and clawed back, would-be dead letters.

    Reads the connector kit's report (``records``, ``canonical``, ``members``, ``points``,
    ``would_dead_letter``) and, for a connector that only returns ``preview`` items, counts those.
    """
    out: dict[str, Any] = {}
    if not isinstance(report, dict):
        return out
    if isinstance(report.get("records"), dict):
        out["records"] = report["records"]
    if isinstance(report.get("canonical"), dict):
        out["events"] = report["canonical"]
    members = report.get("members")
    if isinstance(members, dict):
        out["match_rate"] = members.get("match_rate")
    points = report.get("points")
    if isinstance(points, dict):
        out["points_earned"] = points.get("would_earn")
        out["points_clawed_back"] = points.get("would_claw_back")
    dead = report.get("would_dead_letter")
    if dead is not None:
        out["would_dead_letter"] = len(dead) if isinstance(dead, list) else dead
    preview = report.get("preview")
    if isinstance(preview, dict) and "records" not in out:
        out["records"] = {entity: len(items) for entity, items in preview.items() if isinstance(items, list)}
        events: dict[str, int] = {}
        n_dead = 0
        for items in preview.values():
            for item in items if isinstance(items, list) else []:
                for e in item.get("events", []) if isinstance(item, dict) else []:
                    t = str(e.get("event_type") or e.get("topic"))
                    events[t] = events.get(t, 0) + 1
                n_dead += 1 if isinstance(item, dict) and item.get("dead") else 0
        out["events"] = events
        out["would_dead_letter"] = n_dead
    return out
