"""Salesforce HTTP client: client-credentials token on My Domain, data calls on ``instance_url``, one error
table, re-authentication on ``INVALID_SESSION_ID``, and a quota governor fed by ``Sforce-Limit-Info``.

The client receives its ``httpx.AsyncClient`` (unit tests pass one over ``httpx.MockTransport``).
Errors leave this module as :mod:`servicekit.errors` classes only:

=====================================================  =====================================================
signal                                                 becomes
=====================================================  =====================================================
401 ``INVALID_SESSION_ID``                             re-authenticate once and replay; again -> Transient
token 400 ``invalid_grant``                            ConfigError: use the My Domain URL
token 400 ``invalid_client`` / ``invalid_client_id``   ConfigError: check client id / secret
403 ``REQUEST_LIMIT_EXCEEDED``                         :class:`RequestLimited` (Transient), our own backoff
400 ``QUERY_TIMEOUT``                                  :class:`QueryTimeout` (Transient): narrow the window
400 ``INVALID_QUERY_LOCATOR``                          :class:`LocatorExpired` (Transient): restart from cursor
400 ``MALFORMED_QUERY`` / ``INVALID_FIELD`` / ``..TYPE``  ConfigError: field-level security of the Run As user
404 ``NOT_FOUND`` / ``MALFORMED_ID``                   :class:`RecordNotFound` (Poison)
400 ``UNABLE_TO_LOCK_ROW``, 5xx, transport errors      Transient (retried here with jittered backoff)
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
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx

from servicekit.errors import ConfigError, Poison, Transient
from servicekit.logging import get_logger
from servicekit.runtime import Infra
from sfconnect.config import Quota, SfConnection

__all__ = [
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


_CONFIG_CODES = {"MALFORMED_QUERY", "INVALID_FIELD", "INVALID_TYPE", "INVALID_OPERATION", "API_DISABLED_FOR_ORG",
                 "INSUFFICIENT_ACCESS", "FUNCTIONALITY_NOT_ENABLED", "INVALID_QUERY_FILTER_OPERATOR"}


def classify(status: int, code: str, message: str, *, limit_backoff_s: float = 60.0) -> Exception:
    """The error-table row for one failed response (module docstring)."""
    text = f"Salesforce {status} {code}: {message}"[:500]
    if code == "REQUEST_LIMIT_EXCEEDED":
        return RequestLimited(text, retry_after=limit_backoff_s)
    if code == "QUERY_TIMEOUT":
        return QueryTimeout(text)
    if code == "INVALID_QUERY_LOCATOR":
        return LocatorExpired(text)
    if code in ("INVALID_FIELD", "INVALID_TYPE"):
        return ShapeMismatch(f"{text} (the org's fields or objects differ from the shape learned at verify: run "
                             "flash connections verify again; check the Run As user's field-level security)")
    if code in _CONFIG_CODES:
        return ConfigError(f"{text} (check the object and field-level security of the Run As user, and that "
                           "the objects exist in this org/edition)")
    if status == 404 or code in ("NOT_FOUND", "MALFORMED_ID", "ENTITY_IS_DELETED"):
        return RecordNotFound(text)
    if status == 409:
        return ConfigError(f"{text} (Bulk results must be read with the API version that created the job)")
    if status in (414, 431):
        return ConfigError(f"{text} (request too long: use POST collections)")
    if status == 420:
        return ConfigError(f"{text} (edge routing failed: check the My Domain host)")
    if status == 401:
        return Transient(text)
    if code == "UNABLE_TO_LOCK_ROW" or status >= 500 or status in (408, 429):
        return Transient(text)
    if status == 403:
        return ConfigError(f"{text} (the Run As user lacks access)")
    return Poison(text)


def _error_of(resp: httpx.Response) -> tuple[str, str]:
    try:
        body = resp.json()
    except ValueError:
        return "", resp.text[:300]
    if isinstance(body, list) and body and isinstance(body[0], dict):
        return str(body[0].get("errorCode", "")), str(body[0].get("message", ""))
    if isinstance(body, dict):
        return str(body.get("errorCode") or body.get("error") or ""), str(
            body.get("message") or body.get("error_description") or "")
    return "", resp.text[:300]


_LIMIT_RE = re.compile(r"api-usage=(\d+)/(\d+)")


@dataclass
class QuotaGovernor:
    """Reads ``Sforce-Limit-Info`` on every response; refuses further calls once this run used
    ``run_share`` of the daily allocation or the org reached ``org_share`` (QuotaPaused, retry_after =
    ``pause_s``). :meth:`begin_run` starts a new run's count."""

    quota: Quota
    used: int | None = None
    maximum: int | None = None
    run_start: int | None = None
    paused_runs: int = 0

    def begin_run(self) -> None:
        self.run_start = None

    def observe(self, header: str | None) -> None:
        if not header:
            return
        m = _LIMIT_RE.search(header)
        if not m:
            return
        self.used, self.maximum = int(m.group(1)), int(m.group(2))
        if self.run_start is None:
            self.run_start = self.used - 1  # this response's own call counts toward the run

    @property
    def run_used(self) -> int:
        if self.used is None or self.run_start is None:
            return 0
        return self.used - self.run_start

    def check(self) -> None:
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


@dataclass
class Token:
    access_token: str
    instance_url: str
    org_id: str | None
    issued_at: float


@dataclass
class SalesforceClient:
    """One connection's API client. ``request`` handles auth, the governor and the error table."""

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
    calls: int = 0
    reauths: int = 0

    @property
    def data_path(self) -> str:
        return f"/services/data/v{self.api_version}"

    # ------------------------------------------------------------------------------------------ auth
    async def authenticate(self) -> Token:
        url = f"{self.my_domain.rstrip('/')}/services/oauth2/token"
        try:
            resp = await self.http.post(url, data={"grant_type": "client_credentials", "client_id": self.client_id,
                                                   "client_secret": self.client_secret})
        except httpx.HTTPError as exc:
            raise Transient(f"token endpoint {url} unreachable: {type(exc).__name__}: {exc}") from exc
        if resp.status_code != 200:
            code, desc = _error_of(resp)
            if code == "invalid_grant":
                raise ConfigError(f"token request rejected ({code}: {desc}): use the org's My Domain URL "
                                  "(https://<mydomain>.my.salesforce.com) as the endpoint, not login/test")
            if code in ("invalid_client", "invalid_client_id"):
                raise ConfigError(f"token request rejected ({code}: {desc}): check the External Client App's "
                                  "consumer key and secret")
            if code == "unsupported_grant_type":
                raise ConfigError(f"token request rejected ({code}): enable the client credentials flow on the "
                                  "External Client App and assign a Run As user")
            if resp.status_code >= 500 or resp.status_code == 429:
                raise Transient(f"token endpoint answered {resp.status_code}")
            raise ConfigError(f"token request rejected: {resp.status_code} {code} {desc}")
        body = resp.json()
        ident = str(body.get("id") or "")
        m = re.search(r"/id/([^/]+)/", ident)
        self.token = Token(str(body["access_token"]), str(body["instance_url"]).rstrip("/"),
                           m.group(1) if m else None, time.monotonic())
        return self.token

    async def ensure_token(self) -> Token:
        return self.token or await self.authenticate()

    def url(self, path: str) -> str:
        """``path`` (``/services/data/...`` or a ``nextRecordsUrl``) on the instance URL."""
        if path.startswith("https://") or path.startswith("http://"):
            return path
        assert self.token is not None
        return f"{self.token.instance_url}{path}"

    # ------------------------------------------------------------------------------------------ calls
    async def request(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                      json: Any = None, headers: Mapping[str, str] | None = None) -> httpx.Response:
        """One API call with re-auth, governor and bounded retries of transient failures."""
        failures = 0
        reauthed = False
        while True:
            self.governor.check()
            token = await self.ensure_token()
            hdrs = {"Authorization": f"Bearer {token.access_token}", **(headers or {})}
            try:
                self.calls += 1
                resp = await self.http.request(method, self.url(path), params=params, json=json, headers=hdrs)
            except httpx.HTTPError as exc:
                err: Exception = Transient(f"{method} {path}: {type(exc).__name__}: {exc}")
                cause: BaseException | None = exc
            else:
                self.governor.observe(resp.headers.get("Sforce-Limit-Info"))
                if resp.status_code < 300:
                    return resp
                code, message = _error_of(resp)
                if resp.status_code == 401 and code in ("INVALID_SESSION_ID", "") and not reauthed:
                    reauthed = True
                    self.reauths += 1
                    log.info("session expired; re-authenticating once")
                    await self.authenticate()
                    continue
                err, cause = classify(resp.status_code, code, message,
                                      limit_backoff_s=self._limit_wait(failures)), None
            if not isinstance(err, Transient) or isinstance(err, QueryTimeout | LocatorExpired | QuotaPaused):
                raise err from cause
            failures += 1
            if failures >= self.attempts:
                raise err from cause
            wait = err.retry_after if isinstance(err, RequestLimited) and err.retry_after else self._backoff(failures)
            log.warning("salesforce call failed; retrying", error=str(err)[:200], retry_in_s=round(wait, 3))
            await self.sleep(wait)

    def _limit_wait(self, failures: int) -> float:
        base = self.governor.quota.limit_backoff_s
        return float(min(base * 16, base * 2.0 ** failures)) * (0.8 + 0.4 * random.random())

    def _backoff(self, failures: int) -> float:
        return float(min(self.backoff_max_s, self.backoff_base_s * 2.0 ** (failures - 1))) * (0.5 + random.random())

    async def get_json(self, path: str, **kw: Any) -> Any:
        return (await self.request("GET", path, **kw)).json()

    @asynccontextmanager
    async def stream(self, path: str, *, params: Mapping[str, Any] | None = None) -> AsyncIterator[httpx.Response]:
        """A streamed GET (Bulk CSV results) with the same auth / error handling on the status line."""
        reauthed = False
        while True:
            self.governor.check()
            token = await self.ensure_token()
            req = self.http.build_request("GET", self.url(path), params=params,
                                          headers={"Authorization": f"Bearer {token.access_token}",
                                                   "Accept-Encoding": "gzip"})
            try:
                self.calls += 1
                resp = await self.http.send(req, stream=True)
            except httpx.HTTPError as exc:
                raise Transient(f"GET {path}: {type(exc).__name__}: {exc}") from exc
            try:
                self.governor.observe(resp.headers.get("Sforce-Limit-Info"))
                if resp.status_code >= 300:
                    await resp.aread()
                    code, message = _error_of(resp)
                    if resp.status_code == 401 and not reauthed:
                        reauthed = True
                        self.reauths += 1
                        await self.authenticate()
                        continue
                    raise classify(resp.status_code, code, message,
                                   limit_backoff_s=self.governor.quota.limit_backoff_s)
                yield resp
                return
            finally:
                await resp.aclose()

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
        return body, str(resp.request.url)


def http_client(cc: SfConnection) -> httpx.AsyncClient:
    """The connection's HTTP client (its CA bundle, no proxy settings from the environment)."""
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=cc.ca_bundle) if cc.ca_bundle else True
    return httpx.AsyncClient(verify=verify, timeout=httpx.Timeout(130.0, connect=15.0), trust_env=False,
                             limits=httpx.Limits(max_connections=10, max_keepalive_connections=10))


def build_client(cc: SfConnection, http: httpx.AsyncClient, infra: Infra | None = None) -> SalesforceClient:
    base = infra.settings.backoff_base_s if infra else 0.5
    top = infra.settings.backoff_max_s if infra else 30.0
    return SalesforceClient(http, cc.my_domain, cc.client_id, cc.client_secret, cc.api_version,
                            QuotaGovernor(cc.quota), backoff_base_s=base, backoff_max_s=top)
