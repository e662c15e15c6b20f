"""The ``Connector`` protocol every source implements, and the report types of verify and sample.

A connector is found by its source name through the registry (:mod:`connectorkit.registry`) and used by
the control plane as::

    connector = load_connector(conn.source)          # entry point flash_connect.connectors
    config = connector.parse(conn)                    # typed; SettingError says which setting, what to put
    report = await connector.verify(config, settings) # VerifyReport: one Check line per check, with the fix
    records = await connector.sample(config, settings, limit=20)   # {stream: [RawRecord]}; moves no cursor
    messages = await connector.refetch(config, settings, refetch)  # a source dead letter's fresh raw record(s)

``verify`` never raises for a failed check (auth refused, host unreachable, a privilege missing): each is a
``Check`` with ``ok=False`` and a ``fix``; it raises only ConfigError from ``parse``. ``sample`` and
``refetch`` read the vendor and write nothing (no cursor, no topic, no table).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from canonical.events import RawRecord
from connectorkit.deadletters import Refetch, SourceLetter
from servicekit.connections import Connection
from servicekit.errors import ConfigError
from servicekit.kafka import OutMessage
from servicekit.settings import FlashSettings

__all__ = ["Check", "Connector", "Sample", "SettingError", "Stream", "VerifyReport"]

ConfigT = TypeVar("ConfigT")


class SettingError(ConfigError):
    """A connection setting is missing or wrong: names the setting and what to put there."""

    stage = "config"

    def __init__(self, connection_id: str, setting: str, problem: str, expected: str) -> None:
        super().__init__(f"connection {connection_id}: {setting} {problem}; put {expected}")
        self.setting = setting
        self.expected = expected


@dataclass(frozen=True)
class Stream:
    """One stream a connector reads: its name (the raw topic's entity unless ``topic_entity`` differs)."""

    name: str
    topic_entity: str | None = None
    publishes: bool = True
    description: str = ""

    @property
    def entity(self) -> str:
        return self.topic_entity or self.name


@dataclass(frozen=True)
class Check:
    """One verify check: ``name`` (``auth``, ``host``, ``read salesorder``...), outcome, detail and the fix."""

    name: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        if self.ok:
            return f"ok    {self.name}: {self.detail}"
        return f"FAIL  {self.name}: {self.detail}" + (f" -> fix: {self.fix}" if self.fix else "")


@dataclass
class VerifyReport:
    """The outcome of ``verify``: every check in order, plus facts learnt (org id, API version...)."""

    connection_id: str
    checks: list[Check] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def add(self, name: str, ok: bool, detail: str, fix: str = "") -> Check:
        check = Check(name, ok, detail, fix)
        self.checks.append(check)
        return check

    def lines(self) -> list[str]:
        return [c.line() for c in self.checks]

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def summary(self) -> str:
        """One line: ``ok`` or the failed checks with their fixes (stored as the connection's last_error)."""
        bad = self.failures()
        if not bad:
            return "ok"
        return "; ".join(f"{c.name}: {c.detail}" + (f" -> fix: {c.fix}" if c.fix else "") for c in bad)

    def as_json(self) -> dict[str, Any]:
        return {"connection_id": self.connection_id, "ok": self.ok, "checks": self.lines(), **self.info}


class Sample(dict[str, list[RawRecord]]):
    """What ``sample`` returns: raw records per stream (a plain mapping), plus ``letters``: the rows of the
    sample the connector would dead-letter (with why), so a dry-run can report them."""

    def __init__(self, records: Mapping[str, list[RawRecord]] | None = None,
                 letters: list[SourceLetter] | None = None) -> None:
        super().__init__(records or {})
        self.letters: list[SourceLetter] = list(letters or [])


class Connector(Protocol[ConfigT]):
    """A source connector (see the module docstring). ``source`` is the ``connections.source`` value and
    ``producer`` the name of its dead-letter topic (``dlq.<producer>.v1``) and service."""

    source: str
    producer: str

    def parse(self, conn: Connection) -> ConfigT: ...

    def streams(self, config: ConfigT) -> Sequence[Stream]: ...

    async def verify(self, config: ConfigT, settings: FlashSettings) -> VerifyReport: ...

    async def sample(self, config: ConfigT, settings: FlashSettings, *, limit: int) -> Mapping[str, list[RawRecord]]:
        ...

    async def refetch(self, config: ConfigT, settings: FlashSettings, ref: Refetch) -> Sequence[OutMessage]: ...
