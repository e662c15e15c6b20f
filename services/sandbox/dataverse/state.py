"""The whole simulator's state: tenants and app registrations, orgs, tokens, limits, faults, stats.

Everything here is plain Python so tests can drive it in-process; the aiohttp app in
:mod:`sandbox.dataverse.app` only translates HTTP to these calls.  Mutate the state from the event loop
thread that serves it (the handlers are not locked).
"""

from __future__ import annotations

import base64
import json
import math
import random
import secrets
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from sandbox.dataverse.store import Clock, DataverseError, Org

__all__ = [
    "AppRegistration",
    "DataverseState",
    "Fault",
    "FaultKind",
    "Faults",
    "Limits",
    "Token",
]


@dataclass
class AppRegistration:
    tenant_id: str
    client_id: str
    client_secret: str
    display_name: str = "Flash Connect"


@dataclass
class Token:
    value: str
    tenant_id: str
    client_id: str
    org_name: str
    audience: str
    expires_at: float  # real time.time(): tokens are not affected by the simulated data clock


@dataclass
class Limits:
    """Service protection limits per application user (reference A5)."""

    requests_per_window: int = 6000
    window_seconds: float = 300.0
    concurrent: int = 52
    execution_seconds: float = 1200.0


@dataclass
class _UserCounters:
    requests: deque[float] = field(default_factory=deque)
    executions: deque[tuple[float, float]] = field(default_factory=deque)
    inflight: int = 0


FaultKind = Literal["status", "delay"]


@dataclass
class Fault:
    """One injected fault rule.

    ``count`` requests (``None`` = until cleared) whose path contains ``match`` get ``status`` (429, 401,
    500, 502, 503...) or are delayed by ``delay`` seconds; ``probability`` < 1 makes it a random storm.
    """

    kind: FaultKind = "status"
    status: int = 503
    count: int | None = 1
    match: str | None = None
    retry_after: int | None = None
    delay: float = 0.0
    probability: float = 1.0
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "status": self.status,
            "count": self.count,
            "match": self.match,
            "retry_after": self.retry_after,
            "delay": self.delay,
            "probability": self.probability,
        }


class Faults:
    def __init__(self, rng: random.Random) -> None:
        self.rules: list[Fault] = []
        self._rng = rng

    def add(self, fault: Fault) -> Fault:
        self.rules.append(fault)
        return fault

    def fail_next(
        self, n: int = 1, status: int = 503, *, match: str | None = None, retry_after: int | None = None
    ) -> Fault:
        return self.add(Fault("status", status, n, match, retry_after))

    def delay_next(self, n: int = 1, seconds: float = 1.0, *, match: str | None = None) -> Fault:
        return self.add(Fault("delay", 200, n, match, None, seconds))

    def storm(
        self, probability: float, status: int = 503, *, match: str | None = None, retry_after: int | None = 1
    ) -> Fault:
        return self.add(Fault("status", status, None, match, retry_after, 0.0, probability))

    def clear(self) -> None:
        self.rules.clear()

    def take(self, path: str) -> list[Fault]:
        """Rules firing for this request (delays first, at most one status), consuming their counts."""
        fired: list[Fault] = []
        have_status = False
        for rule in list(self.rules):
            if rule.match and rule.match not in path:
                continue
            if rule.kind == "status" and have_status:
                continue
            if rule.probability < 1.0 and self._rng.random() >= rule.probability:
                continue
            if rule.count is not None:
                rule.count -= 1
                if rule.count <= 0:
                    self.rules.remove(rule)
            fired.append(rule)
            have_status = have_status or rule.kind == "status"
        fired.sort(key=lambda f: f.kind != "delay")
        return fired


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class DataverseState:
    """Tenants (Entra), organisations (Dataverse), tokens, service protection, faults and stats."""

    def __init__(
        self, *, token_lifetime: float = 3599.0, limits: Limits | None = None, rng_seed: int = 0
    ) -> None:
        self.clock = Clock()
        self.tenants: dict[str, dict[str, AppRegistration]] = {}
        self.orgs: dict[str, Org] = {}
        self.tokens: dict[str, Token] = {}
        self.token_lifetime = token_lifetime
        self.limits = limits or Limits()
        self.rng = random.Random(rng_seed)
        self.faults = Faults(self.rng)
        self.stats: Counter[str] = Counter()
        self._counters: dict[tuple[str, str], _UserCounters] = {}

    # -- set-up --------------------------------------------------------------------------------------

    def add_tenant(self, tenant_id: str | None = None) -> str:
        tenant_id = (tenant_id or str(uuid.uuid4())).lower()
        self.tenants.setdefault(tenant_id, {})
        return tenant_id

    def register_app(
        self, tenant_id: str, client_id: str | None = None, client_secret: str | None = None
    ) -> AppRegistration:
        tenant_id = self.add_tenant(tenant_id)
        app = AppRegistration(
            tenant_id, (client_id or str(uuid.uuid4())).lower(), client_secret or secrets.token_urlsafe(30)
        )
        self.tenants[tenant_id][app.client_id] = app
        return app

    def add_org(
        self,
        name: str,
        *,
        tenant_id: str | None = None,
        client_id: str | None = None,
        client_secret: str | None = None,
        readable: Iterable[str] | None = None,
        expirechangetrackingindays: int = 7,
    ) -> Org:
        """Create an org in a (new or given) tenant with one app registration bound to an application user."""
        if name in self.orgs:
            raise ValueError(f"org {name!r} exists")
        tenant_id = self.add_tenant(tenant_id)
        org = Org(name, tenant_id, self.clock, expirechangetrackingindays=expirechangetrackingindays)
        self.orgs[name] = org
        app = self.register_app(tenant_id, client_id, client_secret)
        org.add_application_user(app.client_id, readable=readable)
        return org

    def credentials(self, org_name: str) -> list[AppRegistration]:
        org = self.orgs[org_name]
        apps = self.tenants[org.tenant_id]
        return [apps[c] for c in org.app_users if c in apps]

    @property
    def default_org(self) -> Org:
        if not self.orgs:
            raise DataverseError(404, "0x80040217", "No organisation is configured in this sandbox.")
        return next(iter(self.orgs.values()))

    # -- tokens ----------------------------------------------------------------------------------------

    def issue_token(self, tenant_id: str, client_id: str, org: Org, audience: str) -> Token:
        now = time.time()
        header = {"typ": "JWT", "alg": "RS256", "kid": "flash-sandbox"}
        user = org.app_users.get(client_id)
        claims = {
            "aud": audience,
            "iss": f"https://sts.windows.net/{tenant_id}/",
            "iat": int(now),
            "nbf": int(now),
            "exp": int(now + self.token_lifetime),
            "appid": client_id,
            "appidacr": "1",
            "tid": tenant_id,
            "oid": user.user_id if user else str(uuid.uuid4()),
            "sub": client_id,
            "ver": "1.0",
            "uti": secrets.token_urlsafe(16),
            "idtyp": "app",
        }
        value = ".".join(
            (
                _b64(json.dumps(header).encode()),
                _b64(json.dumps(claims).encode()),
                _b64(secrets.token_bytes(32)),
            )
        )
        token = Token(value, tenant_id, client_id, org.name, audience, now + self.token_lifetime)
        self.tokens[value] = token
        return token

    def expire_tokens(self) -> int:
        """Make every issued access token expired now (clients must acquire a new one)."""
        now = time.time()
        for t in self.tokens.values():
            t.expires_at = min(t.expires_at, now - 1)
        return len(self.tokens)

    def advance_clock(self, seconds: float) -> None:
        """Move the simulated data clock (modifiedon stamps, delta-token age) forward."""
        self.clock.advance(seconds)

    # -- service protection ----------------------------------------------------------------------------

    def acquire_slot(self, org: str, client_id: str) -> None:
        """Count a request against the user's limits or raise the Dataverse 429."""
        c = self._counters.setdefault((org, client_id), _UserCounters())
        now = time.monotonic()
        lim = self.limits
        self._purge(c, now)
        if c.inflight >= lim.concurrent:
            self.stats["throttled"] += 1
            raise DataverseError(
                429,
                "0x80072326",
                f"Number of concurrent requests exceeded the limit of {lim.concurrent}.",
                {"Retry-After": "1"},
            )
        if len(c.requests) >= lim.requests_per_window:
            wait = max(1, math.ceil(c.requests[0] + lim.window_seconds - now))
            self.stats["throttled"] += 1
            raise DataverseError(
                429,
                "0x80072322",
                f"Number of requests exceeded the limit of {lim.requests_per_window} over time window of "
                f"{int(lim.window_seconds)} seconds.",
                {"Retry-After": str(wait)},
            )
        spent = sum(d for _, d in c.executions)
        if spent >= lim.execution_seconds:
            wait = max(1, math.ceil(c.executions[0][0] + lim.window_seconds - now))
            self.stats["throttled"] += 1
            raise DataverseError(
                429,
                "0x80072321",
                f"Combined execution time of incoming requests exceeded limit of "
                f"{int(lim.execution_seconds * 1000):,} milliseconds over time window of "
                f"{int(lim.window_seconds)} seconds. Decrease number of concurrent requests or reduce the "
                "duration of requests and try again later.",
                {"Retry-After": str(wait)},
            )
        c.requests.append(now)
        c.inflight += 1

    def release_slot(self, org: str, client_id: str, duration: float) -> None:
        c = self._counters.setdefault((org, client_id), _UserCounters())
        c.inflight = max(0, c.inflight - 1)
        c.executions.append((time.monotonic(), duration))

    def ratelimit_headers(self, org: str, client_id: str) -> dict[str, str]:
        c = self._counters.setdefault((org, client_id), _UserCounters())
        self._purge(c, time.monotonic())
        spent = sum(d for _, d in c.executions)
        lim = self.limits
        return {
            "x-ms-ratelimit-burst-remaining-xrm-requests": str(
                max(0, self.limits.requests_per_window - len(c.requests))
            ),
            "x-ms-ratelimit-time-remaining-xrm-requests": f"{max(0.0, lim.execution_seconds - spent):,.2f}",
        }

    def _purge(self, c: _UserCounters, now: float) -> None:
        horizon = now - self.limits.window_seconds
        while c.requests and c.requests[0] <= horizon:
            c.requests.popleft()
        while c.executions and c.executions[0][0] <= horizon:
            c.executions.popleft()

    def reset_limits(self) -> None:
        self._counters.clear()
