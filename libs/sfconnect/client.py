"""Salesforce HTTP client on the connector kit's :class:`connectorkit.http.VendorClient`: client-credentials
token on My Domain, data calls on ``instance_url`` (both pinned: the connection's hosts and Salesforce's
host patterns), re-authentication once on 401, retries with jitter, the vendor's error table as data
(:data:`SF_ERRORS`, :data:`TOKEN_ERRORS`) and a quota governor fed by ``Sforce-Limit-Info``, shared by every
connection using the same credential.

The client receives its ``httpx.AsyncClient`` (unit tests pass one over ``httpx.MockTransport``). Errors
leave this module as :mod:`servicekit.errors` classes only; the table (first match wins, then the kit's
HTTP defaults) is in docs/vendor-facts.md (``## Salesforce``, error codes):

=====================================================  =====================================================
signal                                                 becomes
=====================================================  =====================================================
401 (``INVALID_SESSION_ID``)                           re-authenticate once and replay; again -> Transient
token 400 ``invalid_grant``                            ConfigError: use the My Domain URL
token 400 ``invalid_client`` / ``invalid_client_id``   ConfigError: check client id / secret
403 ``REQUEST_LIMIT_EXCEEDED``                         :class:`RequestLimited` (Transient), our own backoff
400 ``QUERY_TIMEOUT``                                  :class:`QueryTimeout`, not retried: narrow the window
400 ``INVALID_QUERY_LOCATOR``                          :class:`LocatorExpired`, not retried: restart at cursor
400 ``INVALID_FIELD`` / ``INVALID_TYPE``                 :class:`ShapeMismatch` (ConfigError): learn the shape
400 ``MALFORMED_QUERY`` and the other config codes      ConfigError: field-level security of the Run As user
404 ``NOT_FOUND`` / ``MALFORMED_ID``                   :class:`RecordNotFound` (Poison)
400 ``UNABLE_TO_LOCK_ROW``, 5xx, transport errors      Transient (retried with jittered backoff)
409                                                    ConfigError: Bulk results need the job's API version
414 / 431 / 420                                        ConfigError
=====================================================  =====================================================
"""

from __future__ import annotations

import asyncio
import random
import re
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import httpx

from connectorkit.endpoints import HostPin
from connectorkit.http import ErrorRule, ErrorTable, Response, VendorClient, shared_governor
from servicekit import metrics
from servicekit.errors import ConfigError, FlashError, Poison, Transient
from servicekit.logging import get_logger
from servicekit.runtime import Infra
from sfconnect.config import Quota, SfConnection

__all__ = [
    "SF_ERRORS",
    "TOKEN_ERRORS",
    "LocatorExpired",
    "QueryTimeout",
    "QuotaGovernor",
    "QuotaPaused",
    "RecordNotFound",
    "RequestLimited",
    "SalesforceClient",
    "ShapeMismatch",
    "Token",
    "build_client",
    "classify",
    "http_client",
]

log = get_logger(__name__)


class RequestLimited(Transient):
    """403 REQUEST_LIMIT_EXCEEDED (daily allocation or long-running concurrency)."""


class QuotaPaused(Transient):
    """Our governor stopped the run at its configured share of the daily allocation."""


class QueryTimeout(Transient):
    """400 QUERY_TIMEOUT: the caller narrows its window and retries."""


class LocatorExpired(Transient):
    """400 INVALID_QUERY_LOCATOR: restart the query from the checkpoint."""


class RecordNotFound(Poison):
    pass


class ShapeMismatch(ConfigError):
    """400 INVALID_FIELD / INVALID_TYPE: the query names a field or object this org does not have. The
    caller learns the org's shape again (:mod:`sfconnect.shape`) and retries once before failing."""


_FLS = "check the object and field-level security of the Run As user, and that the objects exist in this org"

SF_ERRORS_RULES: tuple[ErrorRule, ...] = (
    ErrorRule(RequestLimited, "the org's API request limit is reached; backing off", code="REQUEST_LIMIT_EXCEEDED"),
    ErrorRule(QueryTimeout, "the query ran too long; narrowing the time window", code="QUERY_TIMEOUT", retry=False),
    ErrorRule(LocatorExpired, "the query cursor expired; restarting from the saved cursor",
              code="INVALID_QUERY_LOCATOR", retry=False),
    ErrorRule(ShapeMismatch, "the org's fields or objects differ from the shape learned at verify: run flash "
              "connections verify again; " + _FLS, code="INVALID_FIELD"),
    ErrorRule(ShapeMismatch, "an object this org does not have (Order Management objects need Order Management); "
              + _FLS, code="INVALID_TYPE"),
    *(ErrorRule(ConfigError, _FLS, code=c) for c in (
        "MALFORMED_QUERY", "INVALID_OPERATION", "API_DISABLED_FOR_ORG", "INSUFFICIENT_ACCESS",
        "FUNCTIONALITY_NOT_ENABLED", "INVALID_QUERY_FILTER_OPERATOR")),
    *(ErrorRule(RecordNotFound, "the record does not exist (any more)", code=c)
      for c in ("NOT_FOUND", "MALFORMED_ID", "ENTITY_IS_DELETED")),
    ErrorRule(Transient, "a record lock; retrying", code="UNABLE_TO_LOCK_ROW"),
    ErrorRule(Transient, "the session expired again right after re-authenticating; retrying", status=401),
    ErrorRule(ConfigError, "Bulk results must be read with the API version that created the job", status=409),
    ErrorRule(ConfigError, "request too long: use POST collections", status=(414, 431)),
    ErrorRule(ConfigError, "edge routing failed: check the My Domain host", status=420),
    ErrorRule(ConfigError, "the Run As user lacks access", status=403),
    ErrorRule(Poison, "Salesforce refused this request", status=400),
)

TOKEN_ERRORS = ErrorTable("Salesforce token endpoint", [
    ErrorRule(ConfigError, "token request rejected: use the org's My Domain URL "
              "(https://<mydomain>.my.salesforce.com) as the endpoint, not login/test", code="invalid_grant"),
    ErrorRule(ConfigError, "token request rejected: check the External Client App's consumer key and secret",
              code="invalid_client"),
    ErrorRule(ConfigError, "token request rejected: check the External Client App's consumer key and secret",
              code="invalid_client_id"),
    ErrorRule(ConfigError, "token request rejected: enable the client credentials flow on the External Client "
              "App and assign a Run As user", code="unsupported_grant_type"),
    ErrorRule(Transient, "the token endpoint is unavailable; retrying", status=(429, 500, 502, 503, 504)),
])


class _SfErrorTable(ErrorTable):
    """The data table plus our REQUEST_LIMIT_EXCEEDED policy: Salesforce sends no Retry-After, so the wait
    doubles from ``limit_backoff_s`` (x16 at most) with jitter, per consecutive refusal."""

    def __init__(self, limit_wait: Callable[[], float]) -> None:
        super().__init__("Salesforce", SF_ERRORS_RULES)
        self.limit_wait = limit_wait

    def classify(self, status: int, code: str, message: str, *, what: str, retry_after: float | None = None,
                 secrets: Iterable[str] = ()) -> FlashError:
        err = super().classify(status, code, message, what=what, retry_after=retry_after, secrets=secrets)
        if isinstance(err, RequestLimited) and err.retry_after is None:
            err.retry_after = self.limit_wait()
        return err


SF_ERRORS = ErrorTable("Salesforce", SF_ERRORS_RULES)
"""The Salesforce REST/Bulk error table as data (module docstring)."""


def classify(status: int, code: str, message: str, *, limit_backoff_s: float = 60.0) -> Exception:
    """The error-table row for one failed response (module docstring)."""
    return _SfErrorTable(lambda: limit_backoff_s).classify(status, code, message, what="Salesforce")


_LIMIT_RE = re.compile(r"api-usage=(\d+)/(\d+)")


@dataclass
class QuotaGovernor:
    """Reads ``Sforce-Limit-Info`` on every response; refuses further calls once this run used
    ``run_share`` of the daily allocation or the org reached ``org_share`` (QuotaPaused, retry_after =
    ``pause_s``). :meth:`begin_run` starts a new run's count. Used as the kit's governor
    (``async with governor: request``), shared per credential (:func:`build_client`)."""

    quota: Quota
    used: int | None = None
    maximum: int | None = None
    run_start: int | None = None
    paused_runs: int = 0
    paused_until: float = 0.0

    def begin_run(self) -> None:
        self.run_start = None

    def observe(self, header: str | Mapping[str, str] | None) -> None:
        if header is not None and not isinstance(header, str):
            header = header.get("Sforce-Limit-Info")
        if not header:
            return
        m = _LIMIT_RE.search(header)
        if not m:
            return
        self.used, self.maximum = int(m.group(1)), int(m.group(2))
        metrics.observe_quota("salesforce", self.used, self.maximum)
        if self.run_start is None:
            self.run_start = self.used - 1  # this response's own call counts toward the run

    @property
    def run_used(self) -> int:
        if self.used is None or self.run_start is None:
            return 0
        return self.used - self.run_start

    def check(self) -> None:
        wait = self.paused_until - time.monotonic()
        if wait > 0:
            raise QuotaPaused(f"the org is throttling this credential; pausing {wait:.0f}s", retry_after=wait)
        if self.used is None or not self.maximum:
            return
        if self.used >= self.quota.org_share * self.maximum:
            self.paused_runs += 1
            raise QuotaPaused(
                f"org API usage {self.used}/{self.maximum} reached the configured org share "
                f"{self.quota.org_share:.0%}; pausing {self.quota.pause_s:.0f}s", retry_after=self.quota.pause_s)
        if self.run_used >= self.quota.run_share * self.maximum:
            self.paused_runs += 1
            raise QuotaPaused(
                f"this run used {self.run_used} of {self.maximum} daily API calls, the configured run share "
                f"{self.quota.run_share:.0%}; pausing {self.quota.pause_s:.0f}s", retry_after=self.quota.pause_s)

    # the kit's QuotaGovernor protocol
    async def __aenter__(self) -> QuotaGovernor:
        self.check()
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        return None

    def pause(self, seconds: float) -> None:
        self.paused_until = max(self.paused_until, time.monotonic() + seconds)


@dataclass
class Token:
    access_token: str
    instance_url: str
    org_id: str | None
    issued_at: float


class _Tokens:
    """The kit's TokenSource over the client's own token (renew = authenticate again)."""

    def __init__(self, client: SalesforceClient) -> None:
        self.client = client

    async def token(self) -> str:
        return (await self.client.ensure_token()).access_token

    async def renew(self) -> str:
        self.client.reauths += 1
        log.info("session expired; re-authenticating once")
        return (await self.client.authenticate()).access_token


@dataclass
class SalesforceClient:
    """One connection's API client: the kit's VendorClient with the Salesforce token, table and governor."""

    http: httpx.AsyncClient
    my_domain: str
    client_id: str
    client_secret: str = field(repr=False)
    api_version: str = "66.0"
    governor: QuotaGovernor = field(default_factory=lambda: QuotaGovernor(Quota()))
    attempts: int = 4
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    sleep: Callable[[float], Any] = asyncio.sleep
    token: Token | None = None
    reauths: int = 0
    _limited: int = 0
    _vendor: VendorClient | None = field(default=None, repr=False)

    @property
    def data_path(self) -> str:
        return f"/services/data/v{self.api_version}"

    @property
    def calls(self) -> int:
        return self._vendor.requests if self._vendor is not None else 0

    def _limit_wait(self) -> float:
        self._limited += 1
        base = self.governor.quota.limit_backoff_s
        return float(min(base * 16, base * 2.0 ** self._limited)) * (0.8 + 0.4 * random.random())

    def _pin(self, *urls: str) -> HostPin:
        return HostPin.for_urls([self.my_domain, *urls], kinds=["salesforce"])

    def pin(self) -> HostPin:
        """The hosts this connection's credentials may go to (My Domain, the checked instance URL)."""
        return self._pin(self.token.instance_url if self.token else "")

    def vendor(self) -> VendorClient:
        if self._vendor is None:
            self._vendor = VendorClient(
                self.http, "Salesforce", self.token.instance_url if self.token else self.my_domain,
                self._pin(self.token.instance_url if self.token else ""), _SfErrorTable(self._limit_wait),
                tokens=_Tokens(self), governor=self.governor, secrets=(self.client_secret,),
                max_attempts=self.attempts, backoff_base_s=self.backoff_base_s, backoff_max_s=self.backoff_max_s,
                sleep=self.sleep)
        return self._vendor

    # ------------------------------------------------------------------------------------------ auth
    async def authenticate(self) -> Token:
        url = f"{self.my_domain.rstrip('/')}/services/oauth2/token"
        tokens = VendorClient(self.http, "Salesforce", self.my_domain, self._pin(), TOKEN_ERRORS,
                              secrets=(self.client_secret,))
        body = await tokens.token_post(url, {"grant_type": "client_credentials", "client_id": self.client_id,
                                             "client_secret": self.client_secret}, what="Salesforce token request")
        # the instance URL comes from the vendor: it must be My Domain's host or a Salesforce host before any
        # token is sent there (docs/vendor-facts.md, connector kit: Salesforce My Domain hosts)
        self._pin().check(str(body.get("instance_url") or ""), what="instance_url of the token response")
        ident = str(body.get("id") or "")
        m = re.search(r"/id/([^/]+)/", ident)
        self.token = Token(str(body["access_token"]), str(body["instance_url"]).rstrip("/"),
                           m.group(1) if m else None, time.monotonic())
        vendor = self.vendor()
        vendor.base_url = self.token.instance_url
        vendor.pin = self._pin(self.token.instance_url)
        return self.token

    async def ensure_token(self) -> Token:
        return self.token or await self.authenticate()

    def url(self, path: str) -> str:
        """``path`` (``/services/data/...`` or a ``nextRecordsUrl``) on the instance URL."""
        if path.startswith(("https://", "http://")):
            return path
        assert self.token is not None
        return f"{self.token.instance_url}{path}"

    # ------------------------------------------------------------------------------------------ calls
    async def request(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                      json: Any = None, headers: Mapping[str, str] | None = None) -> Response:
        """One API call with the kit's policy (pinning, re-auth, governor, retries, the error table)."""
        await self.ensure_token()
        resp = await self.vendor().request(method, self.url(path), what=f"{method} {path.split('?')[0]}",
                                           headers=headers, params=params, json_body=json)
        self._limited = 0
        return resp

    async def get_json(self, path: str, **kw: Any) -> Any:
        return (await self.request("GET", path, **kw)).json()

    @asynccontextmanager
    async def stream(self, path: str, *, params: Mapping[str, Any] | None = None) -> AsyncIterator[httpx.Response]:
        """A streamed GET (Bulk CSV results) with the same policy up to the status line."""
        await self.ensure_token()
        async with self.vendor().stream("GET", self.url(path), what=f"GET {path}", params=params,
                                        headers={"Accept-Encoding": "gzip"}) as resp:
            yield resp

    async def query_page(self, soql: str | None = None, *, next_url: str | None = None, all_rows: bool = False,
                         batch_size: int | None = None) -> tuple[dict[str, Any], str]:
        """One REST query page: (parsed body, request url). ``next_url`` continues a cursor."""
        headers = {"Sforce-Query-Options": f"batchSize={batch_size}"} if batch_size else None
        if next_url:
            resp = await self.request("GET", next_url, headers=headers)
        else:
            kind = "queryAll" if all_rows else "query"
            resp = await self.request("GET", f"{self.data_path}/{kind}", params={"q": soql}, headers=headers)
        body = resp.json()
        if not isinstance(body, dict) or "records" not in body or "done" not in body:
            raise Transient(f"query answered an unexpected body: {resp.text[:200]}")
        return body, resp.url


def http_client(cc: SfConnection) -> httpx.AsyncClient:
    """The connection's HTTP client (its CA bundle, no proxy settings from the environment)."""
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=cc.ca_bundle) if cc.ca_bundle else True
    return httpx.AsyncClient(verify=verify, timeout=httpx.Timeout(130.0, connect=15.0), trust_env=False,
                             limits=httpx.Limits(max_connections=10, max_keepalive_connections=10))


def build_client(cc: SfConnection, http: httpx.AsyncClient, infra: Infra | None = None, *,
                 governor: QuotaGovernor | None = None) -> SalesforceClient:
    """The connection's client; its quota governor is shared by every connection of the same credential
    (My Domain + consumer key) in this process."""
    base = infra.settings.backoff_base_s if infra else 0.5
    top = infra.settings.backoff_max_s if infra else 30.0
    gov = governor or shared_governor(("salesforce", cc.my_domain, cc.client_id), lambda: QuotaGovernor(cc.quota))
    return SalesforceClient(http, cc.my_domain, cc.client_id, cc.client_secret, cc.api_version, gov,
                            backoff_base_s=base, backoff_max_s=top)
