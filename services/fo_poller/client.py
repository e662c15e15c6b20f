"""The F&O OData client on the connector kit: client-credentials token, paging, $metadata, the error tables.

:class:`FoClient` wraps a :class:`connectorkit.http.VendorClient` pinned to the environment's and the
authority's hosts (retries with jitter, ``Retry-After`` on 429, one token renewal on 401). Both error tables
are data; ``docs/vendor-facts.md`` (Finance & Operations) holds the facts they rest on.

=============================  ===========  =========================================================
F&O OData                      class        what to fix
=============================  ===========  =========================================================
429 (service protection)       Transient    wait ``Retry-After``; every connection of the app waits
401 after one renewal          ConfigError  register the app in the environment (Microsoft Entra applications)
403                            ConfigError  the app's user lacks a role that reads the entity
404                            Poison       the record does not exist (any more) in that company
400 / 405 / 501                ConfigError  our query does not fit this environment: verify the connection
5xx, network                   Transient    backoff with jitter
=============================  ===========  =========================================================

Entra ID (token endpoint): AADSTS7000215 wrong secret, 7000222 expired secret, 700016 unknown app,
90002 unknown tenant, 500011 the environment URL is not a resource of the tenant (wrong endpoint or app not
consented) -- each a ConfigError saying what to fix.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from decimal import Decimal
from typing import Any

import httpx

from connectorkit.endpoints import HostPin
from connectorkit.http import ErrorRule, ErrorTable, NoQuota, QuotaGovernor, VendorClient, shared_governor
from fo_poller.config import FoConnection
from fo_poller.metadata import CsdlReader, EntityInfo
from servicekit.errors import ConfigError, Poison, Transient

__all__ = ["ENTRA_ERRORS", "FO_ERRORS", "FoClient", "FoTokenSource", "odata_literal", "parse_fo_error"]

FO_ERRORS = ErrorTable("Finance & Operations", [
    ErrorRule(Transient, "the environment is throttling (service protection); waiting Retry-After", status=429),
    ErrorRule(ConfigError, "the token was refused: register the app's client id in the environment (System "
                           "administration > Setup > Microsoft Entra applications) with a user", status=401),
    ErrorRule(ConfigError, "access denied: give the app's user a security role that reads this entity", status=403),
    ErrorRule(Poison, "not found: the record does not exist (any more) in that company", status=404),
    ErrorRule(ConfigError, "the environment rejected our query: an entity set or field of the connection does not "
                           "exist here; run `flash connections verify` to see what the environment offers",
              status=(400, 405, 501)),
])

ENTRA_ERRORS = ErrorTable("Microsoft Entra ID", [
    ErrorRule(ConfigError, "the client secret is wrong: paste the secret's value (not its id) into "
                           "credentials.client_secret", code="AADSTS7000215"),
    ErrorRule(ConfigError, "the client secret has expired: create a new one in the app registration",
              code="AADSTS7000222"),
    ErrorRule(ConfigError, "no app with this client id in the tenant: check credentials.client_id and "
                           "credentials.tenant_id", code="AADSTS700016"),
    ErrorRule(ConfigError, "the tenant does not exist: check credentials.tenant_id", code="AADSTS90002"),
    ErrorRule(ConfigError, "the environment URL is not a resource of this tenant: check the connection's endpoint "
                           "(https://<env>.operations.dynamics.com) and that the app is consented",
              code="AADSTS500011"),
])


def parse_fo_error(status: int, text: str) -> tuple[str, str]:
    """(code, message) of an F&O OData error: the inner message is the useful one."""
    try:
        body = json.loads(text) if text else None
    except ValueError:
        return "", text[:300]
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            inner = err.get("innererror")
            msg = inner.get("message") if isinstance(inner, dict) and inner.get("message") else err.get("message")
            return str(err.get("code") or ""), str(msg or "")
        if isinstance(err, str):
            codes = body.get("error_codes")
            code = f"AADSTS{codes[0]}" if isinstance(codes, list) and codes else err
            return code, str(body.get("error_description") or err)
    return "", text[:300]


def odata_literal(value: str) -> str:
    """A string literal for ``$filter`` and keys (quotes doubled)."""
    return "'" + str(value).replace("'", "''") + "'"


class FoTokenSource:
    """Client-credentials tokens for ``<env>/.default``, cached until a minute before they expire."""

    def __init__(self, client: VendorClient, cc: FoConnection) -> None:
        self.client = client
        self.cc = cc
        self._token: str | None = None
        self._expires = 0.0
        self._lock = asyncio.Lock()

    async def token(self) -> str:
        if self._token and time.monotonic() < self._expires:
            return self._token
        return await self.renew()

    async def renew(self) -> str:
        async with self._lock:
            body = await self.client.token_post(self.cc.token_url, {
                "grant_type": "client_credentials", "client_id": self.cc.client_id,
                "client_secret": self.cc.client_secret, "scope": self.cc.scope,
            }, what=f"token for {self.cc.scope}")
            tok = body.get("access_token")
            if not isinstance(tok, str):
                raise Transient("token response without access_token")
            self._token = tok
            self._expires = time.monotonic() + max(60.0, float(body.get("expires_in", 3600)) - 60.0)
            return tok


def _governor(cc: FoConnection) -> QuotaGovernor:
    # One governor per app registration: a 429 pauses every connection that uses the same client id.
    return shared_governor(("dynamics-fo", cc.authority, cc.client_id), NoQuota)


class FoClient:
    """Reads of one environment (see the module docstring)."""

    def __init__(self, cc: FoConnection, http: httpx.AsyncClient, *, max_attempts: int = 8,
                 backoff_base_s: float = 0.5, backoff_max_s: float = 60.0) -> None:
        self.cc = cc
        pin = HostPin.for_urls([cc.env_url, cc.authority])
        secrets = tuple(s for s in (cc.client_secret, cc.events_secret) if s)
        auth = VendorClient(http, "Microsoft Entra ID", cc.authority, pin, ENTRA_ERRORS, secrets=secrets,
                            error_parser=parse_fo_error)
        self.tokens = FoTokenSource(auth, cc)
        self.vendor = VendorClient(
            http, "Finance & Operations", cc.data_url, pin, FO_ERRORS, tokens=self.tokens, governor=_governor(cc),
            default_headers={"Accept": "application/json", "OData-MaxVersion": "4.0", "OData-Version": "4.0"},
            secrets=secrets, max_attempts=max_attempts, backoff_base_s=backoff_base_s, backoff_max_s=backoff_max_s,
            error_parser=parse_fo_error,
        )

    @property
    def requests(self) -> int:
        return self.vendor.requests

    async def metadata(self, entity_sets: list[str]) -> dict[str, EntityInfo]:
        """The entity types of ``entity_sets`` from ``$metadata``, parsed as the body streams in."""
        reader = CsdlReader(entity_sets)
        async with self.vendor.stream("GET", "$metadata", what="$metadata",
                                      headers={"Accept": "application/xml"}) as resp:
            async for chunk in resp.aiter_bytes():
                reader.feed(chunk)
        return reader.close()

    def _query(self, entity_set: str, flt: str | None, extra: Mapping[str, str] | None = None) -> str:
        params: dict[str, str] = {"cross-company": "true"}
        if flt:
            params["$filter"] = flt
        params.update(extra or {})
        return entity_set + "?" + urllib.parse.urlencode(params, quote_via=urllib.parse.quote, safe="$,'=:()/-")

    async def pages(self, entity_set: str, flt: str | None = None, *, page_size: int | None = None,
                    start: str | None = None, extra: Mapping[str, str] | None = None,
                    ) -> AsyncIterator[tuple[list[dict[str, Any]], str | None]]:
        """Every page of a cross-company read: (rows, nextLink or None). ``start`` resumes at a nextLink."""
        url: str | None = start or self._query(entity_set, flt, extra)
        prefer = {"Prefer": f"odata.maxpagesize={page_size or self.cc.page_size}"}
        while url:
            resp = await self.vendor.get(url, what=f"read {entity_set}", headers=prefer)
            body = json.loads(resp.text, parse_float=Decimal)
            if not isinstance(body, dict) or not isinstance(body.get("value"), list):
                raise Poison(f"read {entity_set}: the answer has no value array")
            url = body.get("@odata.nextLink")
            yield body["value"], url

    async def rows(self, entity_set: str, flt: str | None = None, **kw: Any) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        async for page, _ in self.pages(entity_set, flt, **kw):
            out += page
        return out
