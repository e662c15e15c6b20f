"""What a simulator contributes to ``flash demo`` (entry point group ``flash_connect.sandboxes``).

An entry point names an async setup function ``setup(stack, n_orders) -> DemoSandbox | None``: it starts the
simulator inside ``stack`` (an ``AsyncExitStack``), seeds it, and describes the tenant and the connection the
demo configures, verifies, dry-runs and takes live. The control plane never imports a simulator: a build
without the sandbox package simply has no entry points here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from canonical.events import MemberData

__all__ = ["DemoSandbox", "SandboxSetup"]


@dataclass
class DemoSandbox:
    """One simulated vendor org and the connection to it."""

    tenant_id: str
    connection_id: str
    source: str
    label: str
    expected_orders: int
    """Orders placed by members (what the demo waits for)."""
    endpoint: str
    credentials: dict[str, str]
    settings: dict[str, Any]
    members: list[MemberData] = field(default_factory=list)
    mutate: Callable[[], str] | None = None
    """Applies one live change in the simulator and says what it was."""
    notes: list[str] = field(default_factory=list)
    """Lines the demo prints about the simulator (URL, what was seeded)."""


SandboxSetup = Callable[[contextlib.AsyncExitStack, int], Awaitable[DemoSandbox | None]]
