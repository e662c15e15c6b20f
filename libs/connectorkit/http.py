"""One vendor HTTP client for every connector: pinned hosts, retries, re-auth, quota, an error table as data.

:class:`VendorClient` wraps an ``httpx.AsyncClient`` (tests inject ``httpx.MockTransport``) and does, for
every request:

1. **Host pinning** (:class:`~connectorkit.endpoints.HostPin`): the URL (configured, or absolute from the
   vendor: a nextLink, an instance URL) is checked BEFORE a credential is attached, and the first request
   to a host checks its addresses (``check_resolved``: no private / loopback / link-local address). Redirects are never
   followed by httpx; a redirect to the same pinned host is followed (at most ``max_redirects``), one to any
   other host is refused. :meth:`VendorClient.token_post` (a token request carrying a secret) never
   follows a redirect at all.
2. **Quota**: the request runs inside the connection's :class:`QuotaGovernor` (one per credential,
   shared by every connection that uses it: :func:`shared_governor`); a 429 pauses the whole governor.
3. **Auth**: ``Authorization`` from a :class:`TokenSource`; a 401 renews the token once and retries; a
   second 401 is classified by the error table (normally a ConfigError).
4. **Retries**: a Transient (network error, 408, 429, 5xx, or what the table says) is retried up to
   ``max_attempts`` with exponential backoff and full jitter, waiting ``Retry-After`` (seconds or an HTTP
   date) on 429/503 instead. Poison and ConfigError are raised at once.
5. **Errors as data** (:class:`ErrorTable`): rows of (status, vendor code, message pattern) -> error class
   (Transient | Poison | ConfigError, or a subclass) + a what-to-fix message. The vendor's message is
   included trimmed and scrubbed of anything credential-like (:func:`scrub`), so it is safe for operators.

Bodies of successful responses are read chunk by chunk into one ``str`` owned by the :class:`Response`
alone (no cached copies on the httpx response), which keeps a poller's memory at a page or two.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import random
import re
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, TypeVar

import httpx

from connectorkit.endpoints import EndpointRefused, HostPin, check_resolved
from servicekit import metrics
from servicekit.errors import ConfigError, FlashError, Poison, Transient
from servicekit.logging import get_logger

__all__ = [
    "DEFAULT_RULES",
    "ErrorParser",
    "ErrorRule",
    "ErrorTable",
    "NoQuota",
    "QuotaGovernor",
    "RawResponse",
    "Response",
    "StaticTokenSource",
    "TokenSource",
    "VendorClient",
    "parse_error_body",
    "retry_after_seconds",
    "scrub",
    "shared_governor",
]

log = get_logger(__name__)

T = TypeVar("T")

# ------------------------------------------------------------------------------------------ scrubbing

_SCRUB = [
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9\-._~+/=]{8,}"), r"\1 ***"),
    (re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), "***"),
    (re.compile(r"\b00D[A-Za-z0-9]{12,15}![A-Za-z0-9._]+"), "***"),  # Salesforce session ids
    (re.compile(r"(?i)(\"?(?:access_token|refresh_token|id_token|client_secret|client_assertion|password|"
                r"secret|session_?id|sid|assertion|api_?key|signature|sig|code)\"?\s*[:=]\s*\"?)[^\"&\s,;}]+"),
     r"\1***"),
]


def scrub(text: str, *, secrets: Iterable[str] = (), limit: int = 300) -> str:
    """``text`` trimmed to ``limit`` characters, with tokens, secrets and session ids replaced by ``***``.

    Every remote error body shown to an operator (CLI output, connection ``last_error``, logs, dead-letter
    headers) goes through this; ``secrets`` are the connection's own credential values, removed verbatim.
    """
    out = text
    for s in secrets:
        if s and len(s) >= 4:
            out = out.replace(s, "***")
    for rx, repl in _SCRUB:
        out = rx.sub(repl, out)
    out = " ".join(out.split())
    return out if len(out) <= limit else out[: limit - 3] + "..."


# --------------------------------------------------------------------------------------- error table


@dataclass(frozen=True)
class ErrorRule:
    """One row of a vendor's error table.

    Matches when every given field matches: ``status`` (one or several HTTP statuses), ``code`` (the
    vendor's error code, case-insensitive), ``message`` (a regex searched in the vendor's message; its
    groups fill ``{1}``, ``{2}``... in ``fix``). ``error`` is the class raised; ``fix`` says what to do.
    ``retry=False`` makes the client raise a Transient of this row at once (the caller handles it, e.g. an
    expired change-tracking token that needs a resync, not a repeat).
    """

    error: type[FlashError]
    fix: str
    status: int | tuple[int, ...] | None = None
    code: str | None = None
    message: str | None = None
    retry: bool = True

    def match(self, status: int, code: str, message: str) -> tuple[str, ...] | None:
        if self.status is not None:
            wanted = self.status if isinstance(self.status, tuple) else (self.status,)
            if status not in wanted:
                return None
        if self.code is not None and code.lower() != self.code.lower():
            return None
        if self.message is not None:
            m = re.search(self.message, message)
            if m is None:
                return None
            return tuple(g or "" for g in m.groups())
        return ()


#: Rows every table ends with (after the vendor's own): the HTTP semantics when the vendor says no more.
DEFAULT_RULES: tuple[ErrorRule, ...] = (
    ErrorRule(Transient, "the vendor is throttling; waiting Retry-After", status=429),
    ErrorRule(ConfigError, "the credentials were refused: check them in the connection", status=401),
    ErrorRule(ConfigError, "access denied: grant the integration user the permission named", status=403),
    ErrorRule(Poison, "not found: the record or object does not exist (any more)", status=404),
    ErrorRule(Transient, "request timeout; retrying", status=408),
    ErrorRule(ConfigError, "the vendor rejected our request: check the connection's settings", status=(400, 405, 422)),
    ErrorRule(Transient, "the vendor is unavailable; retrying", status=(500, 502, 503, 504)),
)


class ErrorTable:
    """A vendor's error table: (status, code, message) -> error class + what to fix (first match wins)."""

    def __init__(self, vendor: str, rules: Sequence[ErrorRule], *, defaults: Sequence[ErrorRule] = DEFAULT_RULES):
        self.vendor = vendor
        self.rules = tuple(rules) + tuple(defaults)
        self._final = tuple({r.error for r in self.rules if not r.retry})

    def retryable(self, err: FlashError) -> bool:
        """Whether the client may repeat the request after ``err`` (a Transient not marked ``retry=False``)."""
        return isinstance(err, Transient) and not isinstance(err, self._final)

    def classify(
        self, status: int, code: str, message: str, *, what: str, retry_after: float | None = None,
        secrets: Iterable[str] = (),
    ) -> FlashError:
        shown = scrub(message, secrets=secrets)
        label = f"{status} {code}".strip()
        for rule in self.rules:
            groups = rule.match(status, code, message)
            if groups is not None:
                fix = rule.fix.format("", *groups)
                return rule.error(f"{what}: {self.vendor} answered {label}: {fix}" + (f" ({shown})" if shown else ""),
                                  retry_after=retry_after)
        cls: type[FlashError] = Transient if status >= 500 else ConfigError
        return cls(f"{what}: {self.vendor} answered {label}" + (f": {shown}" if shown else ""),
                   retry_after=retry_after)

    def as_rows(self) -> list[dict[str, Any]]:
        """The table as data (for docs and ``--help``)."""
        return [{"status": r.status, "code": r.code, "message": r.message, "class": r.error.__name__, "fix": r.fix}
                for r in self.rules]


ErrorParser = Callable[[int, str], tuple[str, str]]


def parse_error_body(status: int, text: str) -> tuple[str, str]:
    """(vendor code, message) from the common error shapes: OData ``{"error": {"code", "message"}}``,
    OAuth ``{"error", "error_description", "error_codes"}``, Salesforce ``[{"errorCode", "message"}]``."""
    try:
        body = json.loads(text) if text else None
    except ValueError:
        return "", text
    if isinstance(body, list) and body and isinstance(body[0], dict):
        body = body[0]
    if not isinstance(body, dict):
        return "", text
    err = body.get("error")
    if isinstance(err, dict):
        return str(err.get("code") or ""), str(err.get("message") or "")
    if isinstance(err, str):
        codes = body.get("error_codes")
        code = f"AADSTS{codes[0]}" if isinstance(codes, list) and codes else err
        return code, str(body.get("error_description") or err)
    if "errorCode" in body:
        return str(body.get("errorCode") or ""), str(body.get("message") or "")
    return "", text


def retry_after_seconds(value: str | None, *, now: Callable[[], float] = time.time) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date (RFC 9110 §10.2.3); None if absent/invalid."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now())


# ------------------------------------------------------------------------------------- auth and quota


class TokenSource(Protocol):
    """Hands out an access token; ``renew`` forces a new one (after a 401)."""

    async def token(self) -> str: ...

    async def renew(self) -> str: ...


class StaticTokenSource:
    """A fixed token (tests); ``renew`` hands out the next of ``tokens`` when given."""

    def __init__(self, *tokens: str) -> None:
        self._tokens = list(tokens) or ["token"]
        self.renewals = 0

    async def token(self) -> str:
        return self._tokens[min(self.renewals, len(self._tokens) - 1)]

    async def renew(self) -> str:
        self.renewals += 1
        return await self.token()


class QuotaGovernor(Protocol):
    """A vendor quota (request window, concurrency) shared per credential: ``async with governor: request``.

    ``pause`` holds every request of the credential (a 429's Retry-After); ``observe`` reads the vendor's
    remaining-budget headers of each response.
    """

    async def __aenter__(self) -> Any: ...

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None: ...

    def pause(self, seconds: float) -> None: ...

    def observe(self, headers: Mapping[str, str]) -> None: ...


class NoQuota:
    """A governor that never waits (vendors or tests without a client-side quota)."""

    async def __aenter__(self) -> NoQuota:
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        return None

    def pause(self, seconds: float) -> None:
        return None

    def observe(self, headers: Mapping[str, str]) -> None:
        return None


_GOVERNORS: dict[tuple[int, Hashable], Any] = {}


def shared_governor(key: Hashable, factory: Callable[[], T]) -> T:
    """The process-wide governor of one credential ``key`` (e.g. ``("dynamics-ce", authority, client_id)``),
    created by ``factory`` on first use. One per event loop, since governors hold asyncio primitives; every
    connection of every tenant using the same credential shares it."""
    loop_key = (id(asyncio.get_running_loop()), key)
    gov = _GOVERNORS.get(loop_key)
    if gov is None:
        gov = _GOVERNORS[loop_key] = factory()
    return gov


def reset_governors() -> None:
    """Forget every shared governor (tests)."""
    _GOVERNORS.clear()


# ------------------------------------------------------------------------------------------- client


@dataclass(slots=True)
class Response:
    """A successful response: its final URL, status, headers and the whole body as text."""

    url: str
    status: int
    headers: httpx.Headers
    text: str

    def json(self) -> Any:
        try:
            return json.loads(self.text)
        except ValueError as exc:
            raise Poison(f"{self.url}: the vendor answered with a body that is not JSON: {scrub(self.text)}") from exc


@dataclass(slots=True)
class RawResponse:
    """A successful response with its body as the bytes received (see :meth:`VendorClient.get_raw`)."""

    url: str
    status: int
    headers: httpx.Headers
    content: bytes


async def _read_bytes(resp: httpx.Response) -> bytes:
    # As _read_text: the bytes belong to our RawResponse alone, nothing cached on the httpx response.
    return b"".join([part async for part in resp.aiter_bytes()])


async def _read_text(resp: httpx.Response) -> str:
    # httpx's Response and its stream reference each other, so cached .content/.text copies are freed only by
    # the cyclic GC; joining the decoded chunks leaves the text owned by our Response alone.
    return "".join([part async for part in resp.aiter_text()])


_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})


@dataclass
class VendorClient:
    """Requests to one vendor connection. See the module docstring for the contract.

    ``base_url`` resolves relative paths; ``pin`` decides where requests may go; ``tokens`` None sends no
    ``Authorization`` (token endpoints, public metadata).
    """

    http: httpx.AsyncClient
    vendor: str
    base_url: str
    pin: HostPin
    errors: ErrorTable
    tokens: TokenSource | None = None
    governor: QuotaGovernor = field(default_factory=NoQuota)
    default_headers: Mapping[str, str] = field(default_factory=dict)
    secrets: tuple[str, ...] = ()
    max_attempts: int = 8
    backoff_base_s: float = 0.5
    backoff_max_s: float = 60.0
    max_redirects: int = 3
    error_parser: ErrorParser = parse_error_body
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    requests: int = 0
    source: str = ""
    """The ``source`` label of ``flash_source_requests_total`` (the connection's source, e.g. ``dynamics-ce``);
    empty: the vendor name."""
    check_addresses: bool = True
    """Resolve each new host and refuse private addresses (off only in unit tests without sockets)."""
    _resolved: set[str] = field(default_factory=set, init=False, repr=False)

    async def _check_host(self, url: str, *, what: str) -> None:
        """Pinned host (every request) and, on the first request to a host, its addresses (no private,
        loopback or link-local address unless the simulators are allowed)."""
        host = self.pin.check(url, what=what)
        if self.check_addresses and host not in self._resolved:
            await check_resolved(host, setting=what, allow_sandbox=self.pin.allow_sandbox)
            self._resolved.add(host)

    def url(self, path_or_url: str) -> str:
        if path_or_url.startswith(("https://", "http://")):
            return path_or_url
        base = self.base_url if self.base_url.endswith("/") else self.base_url + "/"
        return base + path_or_url.lstrip("/")

    async def get(self, path_or_url: str, *, what: str = "GET", headers: Mapping[str, str] | None = None,
                  params: Mapping[str, str] | None = None) -> Response:
        return await self.request("GET", path_or_url, what=what, headers=headers, params=params)

    async def get_raw(self, path_or_url: str, *, what: str = "GET", headers: Mapping[str, str] | None = None,
                      params: Mapping[str, str] | None = None) -> RawResponse:
        """:meth:`get` keeping the body as the bytes received, for large bodies parsed piece by piece.

        CPython stores a ``str`` at the width of its widest character: one character beyond Latin-1 (a "€" in a
        formatted value) makes the whole decoded page two bytes a character, twice its UTF-8 size.
        """
        result: RawResponse | None = None

        async def read(resp: httpx.Response) -> None:
            nonlocal result
            result = RawResponse(str(resp.url), resp.status_code, resp.headers, await _read_bytes(resp))

        await self._send("GET", path_or_url, what=what, headers=headers, params=params, json_body=None,
                         content=None, idempotent=None, on_success=read)
        assert result is not None
        return result

    async def request(
        self, method: str, path_or_url: str, *, what: str = "request", headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None, json_body: Any = None, content: bytes | str | None = None,
        idempotent: bool | None = None,
    ) -> Response:
        """One request with the whole policy; returns the 2xx response or raises our error tree."""
        result: Response | None = None

        async def read(resp: httpx.Response) -> None:
            nonlocal result
            result = Response(str(resp.url), resp.status_code, resp.headers, await _read_text(resp))

        await self._send(method, path_or_url, what=what, headers=headers, params=params, json_body=json_body,
                         content=content, idempotent=idempotent, on_success=read)
        assert result is not None
        return result

    @contextlib.asynccontextmanager
    async def stream(
        self, method: str, path_or_url: str, *, what: str = "request", headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> AsyncIterator[httpx.Response]:
        """A 2xx response whose body the caller streams (large exports); failures before it are retried."""
        queue: asyncio.Queue[httpx.Response] = asyncio.Queue(1)
        done = asyncio.Event()

        async def hold(resp: httpx.Response) -> None:
            await queue.put(resp)
            await done.wait()

        task = asyncio.ensure_future(self._send(method, path_or_url, what=what, headers=headers, params=params,
                                                json_body=None, content=None, idempotent=None, on_success=hold))
        getter = asyncio.ensure_future(queue.get())
        try:
            finished, _ = await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in finished:
                getter.cancel()
                await task  # raises the classified error
                raise Transient(f"{what}: the response ended before it started")  # pragma: no cover
            yield getter.result()
        finally:
            done.set()
            getter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def token_post(self, url: str, form: Mapping[str, str], *, what: str = "token request") -> dict[str, Any]:
        """POST a token request (it carries a secret): pinned host, no redirect ever followed, no retry on a
        refusal; transport errors and 5xx are Transient. Returns the JSON body."""
        await self._check_host(url, what=what)
        try:
            resp = await self.http.post(url, data=dict(form), headers={"Accept": "application/json"},
                                        follow_redirects=False)
        except httpx.TransportError as exc:
            raise Transient(f"{what}: cannot reach {urllib.parse.urlsplit(url).hostname}: "
                            f"{type(exc).__name__}: {scrub(str(exc))}") from exc
        metrics.SOURCE_REQUESTS.labels(self.source or self.vendor, str(resp.status_code)).inc()
        if 300 <= resp.status_code < 400:
            raise EndpointRefused(f"{what}: the token endpoint answered a redirect ({resp.status_code} to "
                                  f"{scrub(resp.headers.get('location', '?'), limit=120)}); a request carrying a "
                                  "secret is never redirected: check the token endpoint / authority setting")
        if resp.status_code >= 300:
            code, message = self.error_parser(resp.status_code, resp.text)
            raise self.errors.classify(resp.status_code, code, message, what=what, secrets=self._secrets(form),
                                       retry_after=retry_after_seconds(resp.headers.get("Retry-After")))
        try:
            body = resp.json()
        except ValueError as exc:
            raise Transient(f"{what}: token response is not JSON: {scrub(resp.text)}") from exc
        if not isinstance(body, dict):
            raise Transient(f"{what}: token response is not a JSON object")
        return body

    def _secrets(self, extra: Mapping[str, str] | None = None) -> tuple[str, ...]:
        return self.secrets + tuple(v for k, v in (extra or {}).items() if "secret" in k or "password" in k
                                    or "assertion" in k)

    async def _send(
        self, method: str, path_or_url: str, *, what: str, headers: Mapping[str, str] | None,
        params: Mapping[str, str] | None, json_body: Any, content: bytes | str | None, idempotent: bool | None,
        on_success: Callable[[httpx.Response], Awaitable[None]],
    ) -> None:
        url = self.url(path_or_url)
        method = method.upper()
        safe = (method in _IDEMPOTENT) if idempotent is None else idempotent
        attempt = 0
        renewed = False
        redirects = 0
        while True:
            attempt += 1
            await self._check_host(url, what=what)  # before any credential is attached
            hdrs = {**self.default_headers, **(headers or {})}
            if self.tokens is not None:
                hdrs["Authorization"] = f"Bearer {await self.tokens.token()}"
            err: FlashError
            status = 0
            try:
                async with self.governor:
                    self.requests += 1
                    req = self.http.build_request(method, url, headers=hdrs, params=params, json=json_body,
                                                  content=content)
                    resp = await self.http.send(req, stream=True, follow_redirects=False)
                    try:
                        status = resp.status_code
                        if status < 300:
                            self.governor.observe(resp.headers)
                            metrics.SOURCE_REQUESTS.labels(self.source or self.vendor, str(status)).inc()
                            await on_success(resp)
                            return
                        await resp.aread()  # error and redirect bodies are small
                    finally:
                        await resp.aclose()
            except httpx.TransportError as exc:
                metrics.SOURCE_REQUESTS.labels(self.source or self.vendor, "network").inc()
                host = urllib.parse.urlsplit(url).hostname
                err = Transient(f"{what}: cannot reach {host}: {type(exc).__name__}: {scrub(str(exc))}")
                if not safe and not isinstance(exc, httpx.ConnectError):
                    raise err from exc  # the request may have been applied: never repeat it blindly
            else:
                metrics.SOURCE_REQUESTS.labels(self.source or self.vendor, str(status)).inc()
                self.governor.observe(resp.headers)
                if 300 <= status < 400 and "location" in resp.headers:
                    url = self._follow(url, resp.headers["location"], what=what)
                    redirects += 1
                    if redirects > self.max_redirects:
                        raise ConfigError(f"{what}: more than {self.max_redirects} redirects; check the endpoint")
                    if status in (301, 302, 303):
                        method, json_body, content = "GET", None, None
                    attempt -= 1
                    continue
                if status == 401 and not renewed and self.tokens is not None:
                    renewed = True
                    log.info("access token rejected, renewing", vendor=self.vendor, what=what)
                    await self.tokens.renew()
                    attempt -= 1
                    continue
                code, message = self.error_parser(status, resp.text)
                retry_after = retry_after_seconds(resp.headers.get("Retry-After")) if status in (429, 503) else None
                err = self.errors.classify(status, code, message, what=what, retry_after=retry_after,
                                           secrets=self.secrets)
                if status == 429:
                    self.governor.pause(retry_after if retry_after is not None else 2.0 ** min(attempt, 6))
                if not safe and status not in (429, 503):
                    raise err
            if not self.errors.retryable(err) or attempt >= self.max_attempts:
                raise err
            if err.retry_after is not None:
                delay = err.retry_after
            else:
                delay = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1)) * (0.5 + random.random())
            log.warning("vendor request failed, retrying", vendor=self.vendor, what=what, attempt=attempt,
                        error=str(err)[:300], retry_in_s=round(delay, 2))
            await self.sleep(delay)

    def _follow(self, url: str, location: str, *, what: str) -> str:
        target = urllib.parse.urljoin(url, location)
        here = urllib.parse.urlsplit(url)
        there = urllib.parse.urlsplit(target)
        if (there.hostname or "").lower() != (here.hostname or "").lower() or there.scheme != here.scheme:
            raise EndpointRefused(f"{what}: the vendor redirected to {there.scheme}://{there.hostname}, another host "
                                  "than the one requested; redirects are only followed on the same host")
        return target
