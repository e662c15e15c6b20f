"""The Salesforce poller's cursor and the CDC listener's replay position, as typed models.

Stored in ``cursors`` (one row per tenant, connection, object / channel) and validated on every load and
save: a stored cursor that is not a valid model is a ConfigError saying how to reset it, never a silent
restart from scratch (connectorkit's ``Checkpoint`` contract). Saved only after the broker acknowledged
the records they cover.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from servicekit.errors import ConfigError

__all__ = ["BulkJob", "ReplayPosition", "SfCursor", "checked"]


class BulkJob(BaseModel):
    """A Bulk API 2.0 query job being read (``sf_poller.bulk``)."""

    model_config = ConfigDict(extra="forbid")
    job_id: str
    api_version: str
    created_at: float
    locator: str | None = None
    attempt: int = 1


class SfCursor(BaseModel):
    """One object's position: ``incremental`` at ``(ts, id)`` (``SystemModstamp``, ``Id``), or ``bulk``
    with the job and the locator of the next chunk; ``bulk_failed`` after a Bulk fallback to REST."""

    model_config = ConfigDict(extra="forbid")
    phase: Literal["incremental", "bulk"] = "incremental"
    ts: str | None = None
    id: str | None = None
    bulk: BulkJob | None = None
    bulk_failed: bool = False


class ReplayPosition(BaseModel):
    """A CDC channel's last saved replay id and the newest commit time seen (for reconciles)."""

    model_config = ConfigDict(extra="forbid")
    replay_id: int | None = None
    commit_ms: int | None = None


def checked(model: type[BaseModel], raw: dict[str, Any], *, where: str) -> dict[str, Any]:
    """``raw`` validated by ``model`` (normalised: defaults filled, None dropped)."""
    try:
        return model.model_validate(raw).model_dump(mode="json", exclude_none=True)
    except ValidationError as exc:
        raise ConfigError(f"cursor {where} is not a valid {model.__name__} ({exc.error_count()} errors: "
                          f"{exc.errors()[0]['loc']} {exc.errors()[0]['msg']}); reset it by deleting its row in "
                          "cursors (the object is then read again from the start, deduplicated by version)") from exc
