"""Dataverse Web API client: MSAL client-credentials auth, paging, and one table classifying every failure.

``DataverseClient`` receives its ``httpx.AsyncClient`` (tests inject ``httpx.MockTransport``) and a
:class:`TokenSource`. Every request goes through the application user's :class:`~ce_poller.limiter.UserBudget`.
Failures become our error tree (STYLE.md habit 10):

==========================  ==================  ==================================================
HTTP status / error code    class               behaviour
==========================  ==================  ==================================================
``0x80044352`` (any status) DeltaTokenExpired   the sync drops the token and resyncs
429                         Transient           wait ``Retry-After`` (shared by the user), retry
401                         (renew)             renew the token, retry once; again -> ConfigError
403                         ConfigError         names the missing privilege (``prvRead...``)
404                         RecordNotFound      a Poison: the record is gone
400 / 405 / 501             ConfigError         our query is wrong for this org (a column, a table)
408, 5xx, network errors    Transient           exponential backoff with jitter, then give up
==========================  ==================  ==================================================
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from ce_poller.limiter import UserBudget
from servicekit import metrics
from servicekit.errors import ConfigError, FlashError, Poison, Transient
from servicekit.logging import get_logger

__all__ = [
    "DataverseClient",
    "DeltaTokenExpired",
    "MsalTokenSource",
    "Page",
    "RecordNotFound",
    "StaticTokenSource",
    "TokenSource",
    "classify_response",
    "iter_values",
]

log = get_logger(__name__)

EXPIRED_VERSION_STAMP = "0x80044352"
ODATA_HEADERS = {
    "Accept": "application/json",
    "OData-MaxVersion": "4.0",
    "OData-Version": "4.0",
    "If-None-Match": "null",
}


class DeltaTokenExpired(Transient):
    """Dataverse says the change-tracking token is too old (ExpiredVersionStamp 0x80044352): full resync."""


class RecordNotFound(Poison):
    """The record (or table) does not exist (any more)."""


class TokenSource(Protocol):
    async def token(self) -> str: ...

    async def renew(self) -> str: ...


class StaticTokenSource:
    """A fixed token (unit tests); ``renew`` hands out the next one of ``tokens`` if given."""

    def __init__(self, *tokens: str) -> None:
        self._tokens = list(tokens) or ["token"]
        self.renewals = 0

    async def token(self) -> str:
        return self._tokens[min(self.renewals, len(self._tokens) - 1)]

    async def renew(self) -> str:
        self.renewals += 1
        return await self.token()


_AADSTS_CONFIG = {
    7000215: "the client secret is wrong or expired: set a current secret in the connection credentials",
    7000222: "the client secret expired: create a new one and update the connection credentials",
    700016: "the client id is not registered in this tenant: check credentials.client_id and tenant_id",
    90002: "the tenant does not exist: check credentials.tenant_id / settings.authority",
    500011: "the org URL is not a resource of this tenant: check settings.org_url (scope {org}/.default)",
}


class MsalTokenSource:
    """One ``msal.ConfidentialClientApplication`` per connection, scope ``{org_url}/.default``.

    The token is renewed ``margin_s`` before it expires and on demand after a 401. MSAL is synchronous, so
    it runs in a worker thread. With a ``ca_bundle`` MSAL gets its own ``requests.Session`` (verify=bundle,
    trust_env=False), because REQUESTS_CA_BUNDLE in the environment would override ``verify=``.
    """

    def __init__(
        self, *, authority: str, client_id: str, client_secret: str, scope: str, ca_bundle: str | None = None,
        margin_s: float = 300.0,
    ) -> None:
        self.authority = authority
        self.client_id = client_id
        self._secret = client_secret
        self.scope = scope
        self.ca_bundle = ca_bundle
        self.margin_s = margin_s
        self._app: Any = None
        self._token: str | None = None
        self._expires_at = 0.0
        self._lock = asyncio.Lock()
        self.acquisitions = 0

    def _build(self) -> Any:
        import msal
        import requests

        kwargs: dict[str, Any] = {"authority": self.authority, "client_credential": self._secret,
                                  "instance_discovery": False}
        if self.ca_bundle:
            session = requests.Session()
            session.verify = self.ca_bundle
            session.trust_env = False
            kwargs["http_client"] = session
        try:
            return msal.ConfidentialClientApplication(self.client_id, **kwargs)
        except ValueError as exc:  # authority discovery failed (unknown tenant answers 400 there)
            raise ConfigError(f"Entra authority {self.authority} rejected the tenant: {exc}") from exc
        except requests.RequestException as exc:
            raise Transient(f"Entra authority {self.authority} unreachable: {exc}") from exc

    def _acquire(self, force: bool) -> dict[str, Any]:
        import requests

        if self._app is None:
            self._app = self._build()
        if force:
            cache = self._app.token_cache
            for at in list(cache.search(cache.CredentialType.ACCESS_TOKEN)):
                cache.remove_at(at)
        try:
            result: dict[str, Any] = self._app.acquire_token_for_client(scopes=[self.scope])
        except requests.RequestException as exc:
            raise Transient(f"Entra token endpoint unreachable: {exc}") from exc
        return result

    async def token(self) -> str:
        if self._token and time.time() < self._expires_at - self.margin_s:
            return self._token
        return await self._get(force=self._token is not None)

    async def renew(self) -> str:
        return await self._get(force=True)

    async def _get(self, *, force: bool) -> str:
        async with self._lock:
            result = await asyncio.to_thread(self._acquire, force)
            if "access_token" not in result:
                codes = result.get("error_codes") or []
                hint = next((_AADSTS_CONFIG[c] for c in codes if c in _AADSTS_CONFIG), None)
                desc = str(result.get("error_description", "")).split(" Trace ID:")[0]
                if hint or result.get("error") in ("invalid_client", "unauthorized_client", "invalid_scope",
                                                   "invalid_resource", "invalid_tenant", "invalid_request"):
                    raise ConfigError(f"Entra refused the token for {self.client_id}: {hint or desc}")
                raise Transient(f"Entra token request failed: {result.get('error')}: {desc}")
            self.acquisitions += 1
            self._token = str(result["access_token"])
            self._expires_at = time.time() + float(result.get("expires_in", 3599))
            return self._token


@dataclass(frozen=True)
class Page:
    """One Web API response: the body text as received and the links it carries."""

    url: str
    text: str
    next_link: str | None
    delta_link: str | None
    headers: Mapping[str, str]


_LINK_RE = {
    "next": re.compile(r'"@odata\.nextLink"\s*:\s*"((?:[^"\\]|\\.)*)"'),
    "delta": re.compile(r'"@odata\.deltaLink"\s*:\s*"((?:[^"\\]|\\.)*)"'),
}
_VALUE_RE = re.compile(r'"value"\s*:\s*\[')
_DECODER = json.JSONDecoder()
_WS = " \t\n\r"


def _link(kind: str, text: str) -> str | None:
    # Links follow the value array; search the tail first (pages are large, the links short).
    tail = text[-4096:]
    m = _LINK_RE[kind].search(tail) or (_LINK_RE[kind].search(text) if len(text) > 4096 else None)
    return None if m is None else str(json.loads(f'"{m.group(1)}"'))


def iter_values(text: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each record of a collection response as (its JSON text exactly as received, parsed)."""
    m = _VALUE_RE.search(text)
    if m is None:
        return
    i = m.end()
    n = len(text)
    while i < n:
        while i < n and text[i] in _WS:
            i += 1
        if i >= n or text[i] == "]":
            return
        obj, end = _DECODER.raw_decode(text, i)
        yield text[i:end], obj
        i = end
        while i < n and text[i] in _WS:
            i += 1
        if i < n and text[i] == ",":
            i += 1


async def _read_text(resp: httpx.Response) -> str:
    """The body of a streamed response as text, with no copy of it left on the response.

    httpx's ``Response`` and the stream bound to it reference each other, so what the response caches
    (``.content``, ``.text``: two copies of a page of up to 5,000 rows) is freed by the cyclic garbage collector
    only, not when the page is dropped. Services raise the collector's thresholds, so an initial sync kept most
    page bodies it had read (RSS grew with the data set). Read this way, the text belongs to the Page alone and
    is freed by reference counting as soon as the page is published.
    """
    return "".join([part async for part in resp.aiter_text()])


def _error_body(resp: httpx.Response) -> tuple[str, str]:
    try:
        err = resp.json().get("error") or {}
    except (ValueError, AttributeError):
        return "", resp.text[:300]
    if not isinstance(err, dict):
        return "", str(err)[:300]
    return str(err.get("code") or ""), str(err.get("message") or "")


_PRIV_RE = re.compile(r"missing (prv\w+) privilege")


def classify_response(resp: httpx.Response, what: str) -> FlashError:
    """The error for a non-2xx response (the table in the module docstring)."""
    code, message = _error_body(resp)
    status = resp.status_code
    if code.lower() == EXPIRED_VERSION_STAMP:
        return DeltaTokenExpired(f"{what}: change-tracking token expired ({code}): {message}")
    if status == 429:
        return Transient(f"{what}: throttled (429 {code}): {message}", retry_after=_retry_after(resp))
    if status == 401:
        return ConfigError(f"{what}: Dataverse refused the access token (401 {code}): {message}")
    if status == 403:
        priv = _PRIV_RE.search(message)
        need = (
            f"grant the application user's security role organisation-level {priv.group(1)}"
            if priv else "check the application user exists in this environment and has a security role"
        )
        return ConfigError(f"{what}: Dataverse denied access (403 {code}): {need}. ({message[:200]})")
    if status == 404:
        return RecordNotFound(f"{what}: not found (404 {code}): {message}")
    if status in (400, 405, 501):
        return ConfigError(f"{what}: Dataverse rejected the request ({status} {code}): {message}")
    return Transient(f"{what}: Dataverse answered {status} {code}: {message[:300]}", retry_after=_retry_after(resp))


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


class DataverseClient:
    """GETs against one org's Web API with auth, budget, retries and error classification."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        api: str,
        tokens: TokenSource,
        budget: UserBudget,
        *,
        max_attempts: int = 8,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 60.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.http = http
        self.api = api if api.endswith("/") else api + "/"
        self.tokens = tokens
        self.budget = budget
        self.max_attempts = max_attempts
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self._sleep = sleep
        self.requests = 0

    def url(self, path_or_url: str) -> str:
        return path_or_url if path_or_url.startswith("https://") or path_or_url.startswith("http://") \
            else self.api + path_or_url

    async def get(self, path_or_url: str, *, prefer: str | None = None, what: str = "GET") -> Page:
        url = self.url(path_or_url)
        attempt = 0
        renewed = False
        while True:
            attempt += 1
            token = await self.tokens.token()
            headers = {**ODATA_HEADERS, "Authorization": f"Bearer {token}"}
            if prefer:
                headers["Prefer"] = prefer
            text: str | None = None
            try:
                async with self.budget:
                    self.requests += 1
                    async with self.http.stream("GET", url, headers=headers) as resp:
                        if resp.status_code < 300:
                            text = await _read_text(resp)
                        else:
                            await resp.aread()  # error bodies are small; classify_response reads them
            except httpx.TransportError as exc:
                err: FlashError = Transient(f"{what}: {type(exc).__name__}: {exc}")
                metrics.SOURCE_REQUESTS.labels("dynamics-ce", "network").inc()
            else:
                metrics.SOURCE_REQUESTS.labels("dynamics-ce", str(resp.status_code)).inc()
                self.budget.observe(resp.headers)
                if text is not None:
                    return Page(url, text, _link("next", text), _link("delta", text), resp.headers)
                if resp.status_code == 401 and not renewed:
                    renewed = True
                    log.info("access token rejected, renewing", what=what)
                    await self.tokens.renew()
                    attempt -= 1
                    continue
                err = classify_response(resp, what)
                if resp.status_code == 429:
                    self.budget.pause(err.retry_after if err.retry_after is not None else 2.0 ** min(attempt, 6))
            if not isinstance(err, Transient) or isinstance(err, DeltaTokenExpired):
                raise err
            if attempt >= self.max_attempts:
                raise err
            if err.retry_after is not None:
                delay = err.retry_after
            else:
                delay = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1))
                delay *= 0.5 + random.random()
            log.warning("dataverse request failed, retrying", what=what, attempt=attempt, error=str(err)[:300],
                        retry_in_s=round(delay, 2))
            await self._sleep(delay)
