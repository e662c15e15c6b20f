"""What one poll of one object did (counts for logs and tests)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EntityResult"]


@dataclass
class EntityResult:
    entity: str
    upserts: int = 0
    deletes: int = 0
    pages: int = 0
    phase: str = "incremental"
    skipped: str = ""
