"""The simulator's whole state: orgs, OAuth sessions, injected faults, clock, streaming clients."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from typing import Any

from sandbox.salesforce.clock import SimClock
from sandbox.salesforce.errors import SalesforceError
from sandbox.salesforce.org import Org

__all__ = ["FAULT_KINDS", "Fault", "SalesforceState", "Session"]

#: kind -> (HTTP status, errorCode, message); "slow" delays the request and then serves it normally.
FAULT_KINDS: dict[str, tuple[int, str, str]] = {
    "request_limit": (403, "REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded."),
    "invalid_session": (401, "INVALID_SESSION_ID", "Session expired or invalid"),
    "query_timeout": (400, "QUERY_TIMEOUT", "Your query request was running for too long."),
    "server_error": (
        500,
        "UNKNOWN_EXCEPTION",
        "An unexpected error occurred. Please include this ErrorId if you contact support: 1824711843-42",
    ),
    "unavailable": (503, "SERVER_UNAVAILABLE", "Server is busy. Please try again later."),
    "unable_to_lock_row": (
        400,
        "UNABLE_TO_LOCK_ROW",
        "unable to obtain exclusive access to this record or 1 records",
    ),
    "slow": (200, "", ""),
}


@dataclass
class Fault:
    kind: str
    remaining: int
    path: str | None = None
    org: str | None = None
    delay_s: float = 0.0

    def error(self) -> SalesforceError:
        status, code, message = FAULT_KINDS[self.kind]
        return SalesforceError(status, code, message)


@dataclass
class Session:
    token: str
    org: str
    issued_ms: int
    last_used_ms: int


@dataclass
class SalesforceState:
    """Everything the HTTP app serves. Construct, ``add_org``/``seed_org``, then ``build_app(state)``.

    ``my_domain_hosts``: Host names that act as an org's My Domain; any other host (e.g. ``localhost``)
    plays ``login.salesforce.com`` and rejects the client-credentials grant.
    """

    clock: SimClock = field(default_factory=SimClock)
    session_timeout_s: float = 7200.0
    cometd_timeout_s: float = 110.0
    cometd_client_ttl_s: float = 40.0
    bulk_polls_to_complete: int = 2
    bulk_seconds_to_complete: float | None = None
    bulk_default_max_records: int = 50_000
    my_domain_hosts: set[str] = field(default_factory=lambda: {"127.0.0.1"})
    orgs: dict[str, Org] = field(default_factory=dict)
    sessions: dict[str, Session] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    stuck_bulk: dict[str, int] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    streams: Any = None  # sandbox.salesforce.cometd.CometdHub, attached by build_app

    # ---------------------------------------------------------------- orgs and OAuth
    def add_org(
        self,
        name: str,
        *,
        mode: str = "order",
        client_id: str | None = None,
        client_secret: str | None = None,
        seed: int = 0,
        multi_currency: bool = True,
        person_accounts: bool = True,
    ) -> Org:
        """Register an org. Credentials default to ``<name>-client-id`` / ``<name>-client-secret``."""
        if name in self.orgs:
            raise ValueError(f"org {name!r} exists")
        if not name.replace("-", "").replace("_", "").isalnum():
            raise ValueError("org names are [A-Za-z0-9_-]")
        org = Org(
            self.clock,
            name,
            client_id=client_id or f"{name}-client-id",
            client_secret=client_secret or f"{name}-client-secret",
            mode=mode,
            seed=seed,
            multi_currency=multi_currency,
            person_accounts=person_accounts,
        )
        self.orgs[name] = org
        return org

    def org_for_client(self, client_id: str) -> Org | None:
        return next((o for o in self.orgs.values() if o.client_id == client_id), None)

    def issue_token(self, org: Org, instance_url: str) -> dict[str, str]:
        now = self.clock.now_ms()
        token = f"{org.org_id[:15]}!AR" + secrets.token_urlsafe(72).replace("-", "x").replace("_", "y")
        self.sessions[token] = Session(token, org.name, now, now)
        ident = f"https://login.salesforce.com/id/{org.org_id}/{org.user_id}"
        issued_at = str(now)
        signature = base64.b64encode(
            hmac.new(org.client_secret.encode(), (ident + issued_at).encode(), hashlib.sha256).digest()
        ).decode()
        self.bump("tokens_issued")
        return {
            "access_token": token,
            "signature": signature,
            "scope": "api",
            "instance_url": instance_url,
            "id": ident,
            "token_type": "Bearer",
            "issued_at": issued_at,
            "token_format": "opaque",
        }

    def authenticate(self, token: str | None) -> Org:
        """The org of a live session; inactivity beyond ``session_timeout_s`` expires it."""
        session = self.sessions.get(token or "")
        now = self.clock.now_ms()
        if session is None or now - session.last_used_ms > self.session_timeout_s * 1000:
            if session is not None:
                del self.sessions[session.token]
            raise SalesforceError(401, "INVALID_SESSION_ID", "Session expired or invalid")
        session.last_used_ms = now
        return self.orgs[session.org]

    def expire_sessions(self, org: str | None = None) -> int:
        doomed = [t for t, s in self.sessions.items() if org is None or s.org == org]
        for t in doomed:
            del self.sessions[t]
        return len(doomed)

    # ---------------------------------------------------------------- faults and hooks
    def inject_fault(
        self,
        kind: str,
        count: int = 1,
        *,
        path: str | None = None,
        org: str | None = None,
        delay_s: float = 0.0,
    ) -> Fault:
        """Make the next ``count`` matching requests fail with ``kind`` (see :data:`FAULT_KINDS`)."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; one of {sorted(FAULT_KINDS)}")
        fault = Fault(kind, count, path, org, delay_s)
        self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        self.faults.clear()
        self.stuck_bulk.clear()

    def take_fault(self, path: str, org: str | None) -> Fault | None:
        for fault in self.faults:
            if fault.remaining <= 0:
                continue
            if fault.path is not None and fault.path not in path:
                continue
            if fault.org is not None and fault.org != org:
                continue
            fault.remaining -= 1
            self.bump(f"fault:{fault.kind}")
            self.faults = [f for f in self.faults if f.remaining > 0]
            return fault
        return None

    def set_api_limit(self, org: str, maximum: int | None = None, used: int | None = None) -> None:
        """Lower (or raise) the daily API allocation, and optionally pretend ``used`` calls were made."""
        o = self.orgs[org]
        if maximum is not None:
            o.api_max = maximum
        if used is not None:
            now = self.clock.now_ms()
            o.api_calls.clear()
            o.api_calls.extend([now] * used)

    def stick_bulk_jobs(self, org: str, count: int = 1) -> None:
        """The next ``count`` Bulk 2.0 query jobs of ``org`` never leave InProgress."""
        self.stuck_bulk[org] = self.stuck_bulk.get(org, 0) + count

    def advance_clock(self, seconds: float) -> int:
        return self.clock.advance(seconds)

    def drop_streams(self, org: str | None = None) -> int:
        """Forget streaming clients: their next message gets ``403::Unknown client``."""
        if self.streams is None:
            return 0
        return int(self.streams.drop(org))

    def bump(self, stat: str, n: int = 1) -> None:
        self.counters[stat] = self.counters.get(stat, 0) + n

    def stats(self) -> dict[str, Any]:
        return {
            "counters": dict(self.counters),
            "sessions": len(self.sessions),
            "faults_pending": [vars(f) for f in self.faults],
            "orgs": {
                name: {
                    "org_id": o.org_id,
                    "mode": o.mode,
                    "api_usage": list(o.api_usage()),
                    "api_versions": dict(o.api_versions),
                    "events": len(o.events),
                    "latest_replay_id": o.latest_replay_id(),
                    "bulk_jobs": len(o.bulk_jobs),
                    "cursors": len(o.cursors),
                    "stats": {k: v for k, v in o.stats.items() if not k.startswith("seq:")},
                    "records": {k: len(v) for k, v in o.tables.items()},
                    "stream_clients": self.streams.count(name) if self.streams is not None else 0,
                }
                for name, o in self.orgs.items()
            },
        }
