"""Endpoint policy: which hosts a connection may name, and where its credentials may be sent.

One table (:data:`ENDPOINT_PATTERNS`) lists, per vendor, the host patterns its documented endpoints use.
:func:`check_endpoint` is the public gate: the control plane calls it before it stores a connection
(``flash connections add`` refuses a bad endpoint) and every :class:`~connectorkit.http.VendorClient`
calls :meth:`HostPin.check` before it attaches a credential to a request, for the configured URLs and for
every absolute URL the vendor hands back (``@odata.nextLink``, a Salesforce ``instance_url``).

Rules (production):

- ``https`` only;
- the host must match one of the vendor's patterns (``*`` at the start stands for one or more DNS labels,
  ``*`` inside a label for any run of letters, digits and ``-``);
- IP literals and names resolving to private, loopback, link-local, multicast or reserved addresses are
  refused (:func:`check_resolved`), so a connection can never point a credential at our own network.

Simulators: with ``FLASH_ALLOW_SANDBOX_ENDPOINTS=1`` (read from the environment, or passed as
``allow_sandbox=True``) any host is accepted, ``http`` included, loopback included. The demo and the test
suite set it; a production deployment must not.

Adding a vendor: add one row to :data:`ENDPOINT_PATTERNS` (source name -> patterns, plus the identity
provider's hosts under their own key) and cite the documentation in ``docs/vendor-facts.md``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import socket
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache

from servicekit.errors import ConfigError

__all__ = [
    "ENDPOINT_PATTERNS",
    "SANDBOX_ENV",
    "EndpointRefused",
    "HostPin",
    "check_endpoint",
    "check_resolved",
    "host_matches",
    "sandbox_endpoints_allowed",
]

SANDBOX_ENV = "FLASH_ALLOW_SANDBOX_ENDPOINTS"

#: Host patterns per vendor endpoint kind (see ``docs/vendor-facts.md`` for the sources).
ENDPOINT_PATTERNS: Mapping[str, tuple[str, ...]] = {
    # Dataverse environment URLs: https://<org>.crm[N].dynamics.com (regional), US Government clouds, China.
    "dynamics-ce": (
        "*.crm*.dynamics.com", "*.crm.microsoftdynamics.us", "*.crm.appsplatform.us", "*.crm.dynamics.cn",
    ),
    # Finance & Operations environments: https://<env>[.sandbox].operations[.<region>].dynamics.com
    "dynamics-fo": ("*.operations.dynamics.com", "*.operations.*.dynamics.com", "*.cloudax.dynamics.com"),
    # Salesforce My Domain (production, sandboxes, Developer Edition, scratch orgs) and the login hosts.
    "salesforce": (
        "*.my.salesforce.com", "login.salesforce.com", "test.salesforce.com", "*.my.salesforce.mil",
    ),
    # Microsoft Entra ID token endpoints (public, US Government, China).
    "entra": ("login.microsoftonline.com", "login.microsoftonline.us", "login.chinacloudapi.cn",
              "login.partner.microsoftonline.cn"),
}


class EndpointRefused(ConfigError):
    """A URL the endpoint policy does not allow (wrong scheme, foreign host, private address)."""

    stage = "endpoint"


def sandbox_endpoints_allowed(env: Mapping[str, str] | None = None) -> bool:
    """True when ``FLASH_ALLOW_SANDBOX_ENDPOINTS`` is ``1``/``true``/``yes`` (simulators on loopback)."""
    value = (env if env is not None else os.environ).get(SANDBOX_ENV, "")
    return value.strip().lower() in ("1", "true", "yes", "on")


@cache
def _pattern_re(pattern: str) -> re.Pattern[str]:
    parts = []
    for i, label in enumerate(pattern.lower().split(".")):
        if i == 0 and label == "*":
            parts.append(r"[a-z0-9-]+(?:\.[a-z0-9-]+)*")
        else:
            parts.append(re.escape(label).replace(r"\*", "[a-z0-9-]*"))
    return re.compile(r"\.".join(parts) + r"\Z")


def host_matches(host: str, patterns: Iterable[str]) -> bool:
    """Whether ``host`` matches one of ``patterns`` (case-insensitive, no trailing dot)."""
    h = host.lower().rstrip(".")
    return any(_pattern_re(p).match(h) for p in patterns)


def _blocked_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
            or ip.is_unspecified)


def _ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def check_endpoint(
    url: str, *, kinds: Iterable[str], setting: str = "endpoint", allow_sandbox: bool | None = None
) -> str:
    """Validate ``url`` against the policy of ``kinds`` (keys of :data:`ENDPOINT_PATTERNS`); returns its host.

    Raises :class:`EndpointRefused` (a ConfigError) naming ``setting`` and what to put there.
    ``allow_sandbox`` None reads ``FLASH_ALLOW_SANDBOX_ENDPOINTS``.
    """
    kinds = tuple(kinds)
    sandbox = sandbox_endpoints_allowed() if allow_sandbox is None else allow_sandbox
    parts = urllib.parse.urlsplit(url.strip())
    host = (parts.hostname or "").lower()
    patterns = [p for k in kinds for p in ENDPOINT_PATTERNS.get(k, ())]
    expect = " or ".join(f"https://{p}" for p in patterns) or "an https URL"
    if not host:
        raise EndpointRefused(f"{setting} {url!r} is not a URL; put {expect}")
    if parts.username or parts.password:
        raise EndpointRefused(f"{setting} must not carry a user or password in the URL; put credentials in "
                              "the connection's credentials")
    if sandbox:
        if parts.scheme not in ("https", "http"):
            raise EndpointRefused(f"{setting} {url!r}: scheme must be https (or http for a simulator)")
        return host
    if parts.scheme != "https":
        raise EndpointRefused(f"{setting} {url!r}: only https is allowed; put {expect} "
                              f"(http is accepted only for simulators, with {SANDBOX_ENV}=1)")
    ip = _ip_literal(host)
    if ip is not None:
        raise EndpointRefused(f"{setting} {url!r}: an IP address is not a vendor endpoint; put {expect}")
    if not host_matches(host, patterns):
        raise EndpointRefused(f"{setting} {url!r}: host {host} is not a {'/'.join(kinds)} endpoint; put {expect} "
                              f"(simulators on other hosts need {SANDBOX_ENV}=1)")
    return host


async def check_resolved(host: str, *, setting: str = "endpoint", allow_sandbox: bool | None = None) -> None:
    """Refuse a host whose DNS answers include a private, loopback or link-local address.

    A name matching a vendor pattern can still be pointed (by whoever controls its DNS) at an address inside
    our network; this check runs before the first request to a host. Unresolvable names pass here (the
    request itself then reports the host unreachable).
    """
    sandbox = sandbox_endpoints_allowed() if allow_sandbox is None else allow_sandbox
    if sandbox:
        return
    ip = _ip_literal(host)
    addrs: list[str] = [str(ip)] if ip is not None else []
    if ip is None:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, 443, type=socket.SOCK_STREAM)
        except OSError:
            return
        addrs = [str(i[4][0]) for i in infos]
    for a in addrs:
        parsed = _ip_literal(a.split("%")[0])
        if parsed is not None and _blocked_ip(parsed):
            raise EndpointRefused(f"{setting}: {host} resolves to {a}, a private/loopback/link-local address; "
                                  "credentials are only sent to the vendor's public endpoints")


_DEFAULT_PORTS = {"https": 443, "http": 80}


def _origin(parts: urllib.parse.SplitResult) -> tuple[str, int | None]:
    """(host, port) of a URL, the port defaulted by its scheme; ValueError for a port that is not a number."""
    return (parts.hostname or "").lower(), parts.port or _DEFAULT_PORTS.get(parts.scheme)


@dataclass(frozen=True)
class HostPin:
    """The hosts one connection may send requests (and credentials) to.

    ``hosts``: exact hosts from the connection's configuration (its endpoint, its authority).
    ``patterns``: vendor patterns an absolute URL handed back by the vendor may also match (a Salesforce
    instance URL differing from My Domain); empty means exact hosts only.
    ``origins``: the (host, port) pairs of the configured URLs. A credential goes to an origin, not a host name:
    another port of a configured host is refused (a nextLink to ``:8443`` must not receive the token), and a
    host matched only by a vendor pattern must use its scheme's default port. A pin built with hosts only
    (no origins) allows the default port of the request's scheme.
    """

    hosts: frozenset[str]
    patterns: tuple[str, ...] = ()
    allow_sandbox: bool = False
    origins: frozenset[tuple[str, int | None]] = frozenset()

    @classmethod
    def for_urls(cls, urls: Iterable[str], *, kinds: Iterable[str] = (), allow_sandbox: bool | None = None) -> HostPin:
        sandbox = sandbox_endpoints_allowed() if allow_sandbox is None else allow_sandbox
        origins = frozenset(o for o in (_origin(urllib.parse.urlsplit(u)) for u in urls if u) if o[0])
        patterns = tuple(p for k in kinds for p in ENDPOINT_PATTERNS.get(k, ()))
        return cls(frozenset(h for h, _ in origins), patterns, sandbox, origins)

    def check(self, url: str, *, what: str = "request") -> str:
        """Return the URL's host, or raise EndpointRefused before anything is sent to it."""
        parts = urllib.parse.urlsplit(url)
        host = (parts.hostname or "").lower()
        if parts.scheme != "https" and not (self.allow_sandbox and parts.scheme == "http"):
            raise EndpointRefused(f"{what}: refusing {parts.scheme or 'a relative'} URL for {host or url!r}: "
                                  f"only https is allowed ({SANDBOX_ENV}=1 permits http for simulators)")
        try:
            _, port = _origin(parts)
        except ValueError:
            raise EndpointRefused(f"{what}: refusing {url!r}: its port is not a number") from None
        default = _DEFAULT_PORTS.get(parts.scheme)
        if host in self.hosts:
            ports = {p for h, p in self.origins if h == host} or {default}
            if port in ports:
                return host
            raise EndpointRefused(f"{what}: refusing to send a request to {host}:{port}: this connection names "
                                  f"{host} on port {', '.join(str(p) for p in sorted(x for x in ports if x))} only")
        if self.patterns and host_matches(host, self.patterns) and _ip_literal(host) is None and port == default:
            return host
        raise EndpointRefused(f"{what}: refusing to send a request to {host or url!r}: not a host of this "
                              f"connection ({', '.join(sorted(self.hosts)) or 'none configured'})")
