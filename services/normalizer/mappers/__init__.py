"""Mapper modules, one per source, and the result type they share.

A mapper module is pure: ``map_record(raw: RawRecord, settings: Mapping[str, Any]) -> MapResult`` turns one
vendor record, as delivered, into canonical events (with their logical topics), dead-letter reasons, and
actions for the connector (``refetch``, ``resync``). :func:`mapper_for` finds the module of a source by name:
``normalizer.mappers.<source with '-' replaced by '_'>``.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from canonical.envelope import Envelope
from canonical.events import RawRecord
from canonical.topics import RAW_ENTITIES

__all__ = ["MapResult", "Mapper", "mapper_for", "sources_with_mappers"]


@dataclass
class MapResult:
    events: list[tuple[str, Envelope]] = field(default_factory=list)
    """(logical topic, event) pairs to emit."""
    dead: list[str] = field(default_factory=list)
    """Why the record cannot be mapped, each saying what to fix."""
    actions: list[str] = field(default_factory=list)
    """What the connector should do next, e.g. ``refetch salesorders(<id>)``."""


class Mapper(Protocol):
    def map_record(self, raw: RawRecord, settings: Mapping[str, Any]) -> MapResult: ...


_CACHE: dict[str, Mapper | None] = {}


def _module_name(source: str) -> str:
    return f"normalizer.mappers.{source.replace('-', '_')}"


def mapper_for(source: str) -> Mapper | None:
    """The mapper module of ``source``, or None when there is none (yet)."""
    if source not in _CACHE:
        name = _module_name(source)
        _CACHE[source] = importlib.import_module(name) if importlib.util.find_spec(name) else None
    return _CACHE[source]


def sources_with_mappers() -> list[str]:
    return [s for s in RAW_ENTITIES if importlib.util.find_spec(_module_name(s)) is not None]
