"""Registry of connectors, simulators and dry-run stages, through package entry points.

The control plane and the demo never import a service: they look up what is installed.

=============================  ===================================================================
entry point group              name -> object
=============================  ===================================================================
``flash_connect.connectors``   source (``dynamics-ce``) -> factory returning a :class:`Connector`
``flash_connect.sandboxes``    simulator name (``dataverse``) -> async setup function of the demo
                               (``sandbox.demo_setup(stack, n_orders) -> DemoSandbox``)
``flash_connect.previews``     ``normalize`` | ``resolve`` | ``points`` -> the read-only dry-run stages
                               (:mod:`connectorkit.dryrun` protocols)
=============================  ===================================================================

Declared in ``pyproject.toml`` (``[project.entry-points."flash_connect.connectors"]`` ...); re-run
``pip install -e .`` after adding one. A missing entry point is not an error for sandboxes and previews
(``flash`` runs without simulators); a missing connector is a ConfigError naming what is installed.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from servicekit.connections import Connection
from servicekit.errors import ConfigError

__all__ = [
    "CONNECTORS_GROUP",
    "PREVIEWS_GROUP",
    "SANDBOXES_GROUP",
    "connector_sources",
    "load_connector",
    "load_preview",
    "load_sandboxes",
    "validate_connection",
]

CONNECTORS_GROUP = "flash_connect.connectors"
SANDBOXES_GROUP = "flash_connect.sandboxes"
PREVIEWS_GROUP = "flash_connect.previews"


def _group(group: str) -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=group)}


def connector_sources() -> list[str]:
    """Sources with an installed connector."""
    return sorted(_group(CONNECTORS_GROUP))


@cache
def load_connector(source: str) -> Any:
    """The connector of ``source`` (an object following :class:`connectorkit.protocol.Connector`)."""
    eps = _group(CONNECTORS_GROUP)
    ep = eps.get(source)
    if ep is None:
        installed = ", ".join(sorted(eps)) or "none"
        raise ConfigError(f"no connector for source {source!r} is installed in this build (installed: {installed})")
    try:
        factory = ep.load()
    except ImportError as exc:
        raise ConfigError(f"the connector of {source!r} ({ep.value}) cannot be loaded: {exc}") from exc
    return factory()


def load_sandboxes() -> dict[str, Any]:
    """Installed simulators' demo setup functions by name (empty when the sandbox package is absent)."""
    out: dict[str, Any] = {}
    for name, ep in sorted(_group(SANDBOXES_GROUP).items()):
        try:
            out[name] = ep.load()
        except ImportError:
            continue
    return out


def load_preview(name: str) -> Any | None:
    """The dry-run stage ``name`` (``normalize``, ``resolve``, ``points``), or None when not installed."""
    ep = _group(PREVIEWS_GROUP).get(name)
    if ep is None:
        return None
    try:
        return ep.load()
    except ImportError:
        return None


def validate_connection(conn: Connection) -> Any | None:
    """What must hold before a connection is stored (``flash connections add``, the HTTP API): its endpoint
    passes the endpoint policy (``connectorkit.endpoints.check_endpoint``: https, the vendor's documented
    hosts, no IP or private address) and, when the source has a registered connector, that connector parses
    every setting. Raises a ConfigError saying which setting and what to put; returns the connector (None
    when the source has none registered)."""
    from connectorkit.endpoints import check_endpoint

    check_endpoint(conn.endpoint, kinds=[conn.source], setting="endpoint")
    if conn.source not in connector_sources():
        return None
    connector = load_connector(conn.source)
    connector.parse(conn)
    return connector
