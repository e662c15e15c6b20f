"""One error tree: every failure is classified as Transient, Poison or Config.

- ``Transient``: retry with backoff, don't commit (a vendor 503, a lock timeout).
- ``InfrastructureUnavailable`` (a Transient): our own broker or database is down. Retried without limit
  and never dead-lettered, because the message is not at fault.
- ``Poison``: the message itself is bad; dead-letter it and move on.
- ``ConfigError``: stop the service and say what to fix; nothing is committed.

Adapters translate third-party exceptions into these (``raise ... from exc``); handlers never catch
library exceptions.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DecodeError",
    "FlashError",
    "InfrastructureUnavailable",
    "MalformedMessage",
    "MissingTenant",
    "Poison",
    "SchemaViolation",
    "Transient",
    "UnknownEventType",
    "UnsupportedEventVersion",
    "classify",
]


class FlashError(Exception):
    """Base of every error this project raises on purpose."""

    stage: str = "handle"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class Transient(FlashError):
    """Worth retrying later; the same input may well succeed."""


class InfrastructureUnavailable(Transient):
    """Our own broker or database did not answer; retried until it does, never dead-lettered."""


class Poison(FlashError):
    """The input can never succeed as it is; it goes to the dead-letter topic with this reason."""


class ConfigError(FlashError):
    """The deployment or connection is misconfigured; the service stops and says what to fix."""


class DecodeError(Poison):
    stage = "decode"


class MalformedMessage(DecodeError):
    """The body is not valid JSON."""


class MissingTenant(DecodeError):
    """The message carries no usable tenant_id, so it cannot be routed to any tenant."""


class UnknownEventType(DecodeError):
    """The event_type is not one this consumer knows."""


class UnsupportedEventVersion(DecodeError):
    """The event's version is newer or older than the versions this consumer reads."""


class SchemaViolation(DecodeError):
    """The JSON is an event of a known type and version, but fields are missing or invalid."""


def classify(exc: BaseException) -> type[FlashError]:
    """Map any exception to its class in the tree; unknown exceptions count as transient (bounded)."""
    if isinstance(exc, FlashError):
        return type(exc)
    return Transient
