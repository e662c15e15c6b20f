"""Microsoft Entra ID client-credentials tokens for connectors (Dataverse, Finance & Operations): MSAL, with
the Entra error table as data.

:class:`MsalTokenSource` is a :class:`connectorkit.http.TokenSource` for ``scope`` (``<resource>/.default``,
e.g. ``https://contoso.crm.dynamics.com/.default`` or ``https://contoso.operations.dynamics.com/.default``).
MSAL runs in a worker thread on its own ``requests.Session`` that follows NO redirect (a token request
carries the secret; check the authority with ``connectorkit.endpoints.check_endpoint(kinds=["entra"])``
when parsing the connection). Refusals are classified by :data:`ENTRA_ERRORS` (``AADSTS<code>`` -> what to
fix); the secret never appears in a message.
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from typing import Any

from connectorkit.endpoints import EndpointRefused, check_resolved
from connectorkit.http import ErrorRule, ErrorTable, scrub
from servicekit.errors import ConfigError, Transient

__all__ = ["ENTRA_ERRORS", "MsalTokenSource"]


#: Microsoft Entra ID token errors (``AADSTS<code>``) -> class + what to fix.
ENTRA_ERRORS = ErrorTable("Microsoft Entra ID", [
    ErrorRule(ConfigError, "the client secret is wrong: put the secret's Value (not its Secret ID) of the app "
              "registration in credentials.client_secret", code="AADSTS7000215"),
    ErrorRule(ConfigError, "the client secret expired: create a new one and update credentials.client_secret",
              code="AADSTS7000222"),
    ErrorRule(ConfigError, "the app registration credentials.client_id is not in this tenant: check "
              "credentials.client_id and credentials.tenant_id", code="AADSTS700016"),
    ErrorRule(ConfigError, "the tenant does not exist: put the Directory (tenant) ID of the app registration in "
              "credentials.tenant_id (or fix settings.authority)", code="AADSTS90002"),
    ErrorRule(ConfigError, "this tenant has no API access to the environment (no resource principal for it): "
              "check the endpoint is the URL of an environment (Dataverse, Finance & Operations) of this tenant",
              code="AADSTS500011"),
    ErrorRule(ConfigError, "the token request was refused: check credentials.tenant_id, client_id and "
              "client_secret", code="invalid_client"),
], defaults=())


class MsalTokenSource:
    """One ``msal.ConfidentialClientApplication`` per connection, scope ``{org_url}/.default``.

    The token is renewed ``margin_s`` before it expires and on demand after a 401. MSAL is synchronous, so
    it runs in a worker thread, on its own ``requests.Session`` (``trust_env=False``; ``verify=`` the
    ``ca_bundle`` when given) that follows NO redirect: a token request carries the secret, and the
    authority was checked against the endpoint policy when the connection was parsed.
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

        session = requests.Session()
        session.trust_env = False
        session.max_redirects = 0
        if self.ca_bundle:
            session.verify = self.ca_bundle
        kwargs: dict[str, Any] = {"authority": self.authority, "client_credential": self._secret,
                                  "instance_discovery": False, "http_client": session}
        try:
            return msal.ConfidentialClientApplication(self.client_id, **kwargs)
        except ValueError as exc:  # authority discovery failed: an unknown tenant answers 400 there
            raise ENTRA_ERRORS.classify(400, "AADSTS90002", scrub(str(exc), secrets=[self._secret]),
                                        what="Entra authority") from exc
        except requests.TooManyRedirects as exc:
            raise EndpointRefused(f"Entra authority {self.authority} answered a redirect; token requests are "
                                  "never redirected: check settings.authority") from exc
        except requests.RequestException as exc:
            raise Transient(f"Entra authority {self.authority} unreachable: {scrub(str(exc))}") from exc

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
        except requests.TooManyRedirects as exc:
            raise EndpointRefused(f"the Entra token endpoint of {self.authority} answered a redirect; a request "
                                  "carrying the secret is never redirected: check settings.authority") from exc
        except requests.RequestException as exc:
            raise Transient(f"Entra token endpoint unreachable: {scrub(str(exc))}") from exc
        return result

    async def token(self) -> str:
        if self._token and time.time() < self._expires_at - self.margin_s:
            return self._token
        return await self._get(force=self._token is not None)

    async def renew(self) -> str:
        return await self._get(force=True)

    async def _get(self, *, force: bool) -> str:
        async with self._lock:
            if self._app is None:  # first use: the authority must not resolve into our own network
                host = urllib.parse.urlsplit(self.authority).hostname or self.authority
                await check_resolved(host, setting="settings.authority")
            result = await asyncio.to_thread(self._acquire, force)
            if "access_token" not in result:
                codes = result.get("error_codes") or []
                code = f"AADSTS{codes[0]}" if codes else str(result.get("error") or "")
                desc = str(result.get("error_description", "")).split(" Trace ID:")[0]
                err = ENTRA_ERRORS.classify(0, code, desc, what=f"token for {self.client_id}",
                                            secrets=[self._secret])
                if isinstance(err, ConfigError) or result.get("error") in (
                        "invalid_client", "unauthorized_client", "invalid_scope", "invalid_resource",
                        "invalid_tenant", "invalid_request"):
                    raise ConfigError(str(err))
                raise Transient(str(err))
            self.acquisitions += 1
            self._token = str(result["access_token"])
            self._expires_at = time.time() + float(result.get("expires_in", 3599))
            return self._token
