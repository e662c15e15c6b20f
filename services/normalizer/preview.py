"""Dry-run stage ``normalize`` (entry point ``flash_connect.previews``): the normalizer's own mapping of one
raw record, exactly as the running normalizer maps it; pure, writes nothing."""

from __future__ import annotations

from typing import Any

from canonical.events import RawRecord
from normalizer.handlers import map_raw
from normalizer.mappers import MapResult

__all__ = ["normalize"]


def normalize(raw: RawRecord, settings: dict[str, Any]) -> MapResult:
    """(logical topic, canonical event) pairs and dead-letter reasons of ``raw`` (``MapResult``)."""
    return map_raw(raw, settings)
