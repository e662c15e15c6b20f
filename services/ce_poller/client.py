"""Dataverse Web API client on the connector kit: MSAL client-credentials auth, paging, the error tables.

``DataverseClient`` is a :class:`connectorkit.http.VendorClient` (pinned to the org's host; retries, jitter,
Retry-After, one token renewal on 401) with Dataverse's error table (:data:`DATAVERSE_ERRORS`) and the
application user's :class:`~ce_poller.limiter.UserBudget` as its quota governor. Token errors of Microsoft
Entra ID are classified by :data:`ENTRA_ERRORS`. Both tables are data; ``docs/vendor-facts.md`` cites
each code. Every vendor message shown is scrubbed and trimmed (``connectorkit.http.scrub``).

==========================  ==================  ==================================================
HTTP status / error code    class               behaviour
==========================  ==================  ==================================================
``0x80044352`` (any status) DeltaTokenExpired   the sync drops the token and resyncs
429                         Transient           wait ``Retry-After`` (shared by the user), retry
401                         (renew)             renew the token, retry once; again -> ConfigError
403 ``0x80072560``          ConfigError         no application user for the app in this environment
403 ``0x80095ffc``          ConfigError         app access control blocks this application id
403 ``missing prv...``      ConfigError         names the missing privilege (``prvRead...``)
404                         RecordNotFound      a Poison: the record is gone
400 / 405 / 501             ConfigError         our query is wrong for this org (a column, a table)
408, 5xx, network errors    Transient           exponential backoff with jitter, then give up
==========================  ==================  ==================================================
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from ce_poller.limiter import UserBudget
from connectorkit.endpoints import HostPin
from connectorkit.entra import ENTRA_ERRORS, MsalTokenSource
from connectorkit.http import (
    ErrorRule,
    ErrorTable,
    StaticTokenSource,
    TokenSource,
    VendorClient,
    retry_after_seconds,
)
from servicekit.errors import ConfigError, FlashError, Poison, Transient
from servicekit.logging import get_logger

__all__ = [
    "DATAVERSE_ERRORS",
    "ENTRA_ERRORS",
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
NOT_A_MEMBER = "0x80072560"
APP_ACCESS_RESTRICTED = "0x80095ffc"
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


#: Dataverse Web API errors (status, code, message) -> class + what to fix. First match wins.
DATAVERSE_ERRORS = ErrorTable("Dataverse", [
    ErrorRule(DeltaTokenExpired, "change-tracking token expired; a full resync of the table runs",
              code=EXPIRED_VERSION_STAMP, retry=False),
    ErrorRule(ConfigError, "Dataverse refused the access token: check the app registration has an application "
              "user in this environment and that the endpoint is the environment URL (the token audience)",
              status=401),
    ErrorRule(ConfigError, "the app registration has no application user in this environment: in the Power "
              "Platform admin center open the environment > Settings > Users + permissions > Application users, "
              "add the app (credentials.client_id) and give it a security role", status=403, code=NOT_A_MEMBER),
    ErrorRule(ConfigError, "API access is blocked for this application id (client app access control): ask the "
              "environment administrator to allow credentials.client_id, or to activate its application user",
              status=403, code=APP_ACCESS_RESTRICTED),
    ErrorRule(ConfigError, "grant the application user's security role organisation-level {1} (Read on the table)",
              status=403, message=r"missing (prv\w+) privilege"),
    ErrorRule(ConfigError, "access denied: check the application user exists in this environment and has a "
              "security role", status=403),
    ErrorRule(RecordNotFound, "not found: the record or table does not exist (any more)", status=404),
    ErrorRule(ConfigError, "Dataverse rejected the request: a column or table of settings is not in this "
              "environment (check settings.entities, settings.select, settings.return_source)",
              status=(400, 405, 501)),
])

@dataclass(frozen=True)
class Page:
    """One Web API response: the body as received and the links it carries.

    ``text`` is the body as the UTF-8 bytes received (pages read by :meth:`DataverseClient.get`) or as a
    ``str`` (pages built from text). Pages are kept as bytes because CPython stores a ``str`` at the width of
    its widest character: one formatted value with a character beyond Latin-1 (``"€1,234.00"``) made a decoded
    page of 5,000 rows two bytes a character, twice its UTF-8 size. :func:`iter_values` reads either.
    """

    url: str
    text: str | bytes
    next_link: str | None
    delta_link: str | None
    headers: Mapping[str, str]

    def decoded(self) -> str:
        """The body as a ``str`` (for small responses, e.g. one record; pages are read with :func:`iter_values`)."""
        return self.text if isinstance(self.text, str) else self.text.decode()


_LINK_RE = {
    "next": re.compile(rb'"@odata\.nextLink"\s*:\s*"((?:[^"\\]|\\.)*)"'),
    "delta": re.compile(rb'"@odata\.deltaLink"\s*:\s*"((?:[^"\\]|\\.)*)"'),
}
_VALUE_RE = re.compile(r'"value"\s*:\s*\[')
_VALUE_RE_B = re.compile(rb'"value"\s*:\s*\[')
_DECODER = json.JSONDecoder()
_WS = " \t\n\r"
WINDOW = 1 << 20
"""Bytes of a page decoded at a time by :func:`iter_values` (doubled while one row does not fit)."""


def _link(kind: str, body: str | bytes) -> str | None:
    # Links follow the value array; search the tail first (pages are large, the links short).
    data = body.encode() if isinstance(body, str) else body
    tail = data[-4096:]
    m = _LINK_RE[kind].search(tail) or (_LINK_RE[kind].search(data) if len(data) > 4096 else None)
    return None if m is None else str(json.loads(b'"' + m.group(1) + b'"'))


def iter_values(body: str | bytes) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each record of a collection response as (its JSON text exactly as received, parsed), one at a time.

    A ``bytes`` body is decoded a window (:data:`WINDOW` bytes) at a time, so no ``str`` of the whole page
    is ever made (see :class:`Page`); each record's text is its own compact ``str``.
    """
    if isinstance(body, str):
        m = _VALUE_RE.search(body)
        if m is not None:
            yield from _records(body, m.end(), [0, True])
        return
    mb = _VALUE_RE_B.search(body)
    if mb is None:
        return
    pos, n, size = mb.end(), len(body), WINDOW
    while pos < n:
        end = min(n, pos + size)
        while end < n and body[end] & 0xC0 == 0x80:  # never cut a UTF-8 sequence in two
            end -= 1
        win = body[pos:end].decode()
        state = [0, end >= n]
        yield from _records(win, 0, state)
        used, closed = state
        if closed:
            return
        if used == 0:  # not one whole record in the window: widen it
            size *= 2
            continue
        pos += len(win[:used].encode())
        size = WINDOW


def _records(text: str, i: int, state: list[Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """The whole records of ``text`` from ``i``, one at a time. ``state`` is ``[consumed, final]`` on entry
    and ``[characters consumed, whether the array ended]`` on exit. Not ``final`` (a window of a page), a record
    cut by the end of ``text`` stops the scan: the caller decodes again from ``consumed``."""
    final = bool(state[1])
    n = len(text)
    state[1] = False
    while True:
        while i < n and text[i] in _WS:
            i += 1
        if i >= n:
            state[1] = final
            return
        if text[i] == "]":
            state[1] = True
            return
        try:
            obj, end = _DECODER.raw_decode(text, i)
        except ValueError:
            if final:
                raise
            return
        yield text[i:end], obj
        i = end
        while i < n and text[i] in _WS:
            i += 1
        if i < n and text[i] == ",":
            i += 1
        state[0] = i


def _error_body(resp: httpx.Response) -> tuple[str, str]:
    try:
        err = resp.json().get("error") or {}
    except (ValueError, AttributeError):
        return "", resp.text[:300]
    if not isinstance(err, dict):
        return "", str(err)[:300]
    return str(err.get("code") or ""), str(err.get("message") or "")


def classify_response(resp: httpx.Response, what: str) -> FlashError:
    """The error for a non-2xx Dataverse response (:data:`DATAVERSE_ERRORS`)."""
    code, message = _error_body(resp)
    return DATAVERSE_ERRORS.classify(resp.status_code, code, message, what=what,
                                     retry_after=retry_after_seconds(resp.headers.get("Retry-After")))


class DataverseClient:
    """GETs against one org's Web API: a pinned :class:`VendorClient` with Dataverse's table and budget."""

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
        pin: HostPin | None = None,
        secrets: tuple[str, ...] = (),
    ) -> None:
        self.api = api if api.endswith("/") else api + "/"
        self.budget = budget
        self.tokens = tokens
        self.vendor = VendorClient(
            http, "Dataverse", self.api, pin or HostPin.for_urls([self.api]), DATAVERSE_ERRORS, tokens=tokens,
            governor=budget, default_headers=ODATA_HEADERS, secrets=secrets, max_attempts=max_attempts,
            backoff_base_s=backoff_base_s, backoff_max_s=backoff_max_s, sleep=sleep, source="dynamics-ce",
        )

    @property
    def requests(self) -> int:
        return self.vendor.requests

    def url(self, path_or_url: str) -> str:
        return self.vendor.url(path_or_url)

    async def get(self, path_or_url: str, *, prefer: str | None = None, what: str = "GET") -> Page:
        resp = await self.vendor.get_raw(path_or_url, what=what, headers={"Prefer": prefer} if prefer else None)
        body = resp.content
        return Page(resp.url, body, _link("next", body), _link("delta", body), resp.headers)
