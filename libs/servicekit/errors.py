"""One error tree: every failure is classified as Transient, Poison or Config.

- ``Transient``: retry with backoff, don't commit (a vendor 503, a lock timeout).
- ``InfrastructureUnavailable`` (a Transient): our own broker or database is down. Retried without limit
  and never dead-lettered, because the message is not at fault.
- ``Poison``: the message itself is bad; dead-letter it and move on.
- ``ConfigError``: stop the service and say what to fix; nothing is committed.

Adapters translate third-party exceptions into these (``raise ... from exc``); handlers never catch
library exceptions. What still escapes an adapter (a library error on the decode or handling path) is
classified by ONE table, :data:`CLASSIFICATION` via :func:`classify`: the consumer runtime asks it for
every exception it meets, so a RecursionError, a NUL byte PostgreSQL refuses or an int64 overflow is
poison (dead-lettered at once), a lost connection is infrastructure (waited out), a missing table is
configuration (stop and say so). An exception nobody classified counts as transient, and is retried a
bounded number of times per message and then dead-lettered: it never moves an offset on its own.
"""

from __future__ import annotations

__all__ = [
    "CLASSIFICATION",
    "ConfigError",
    "ConflictingDuplicate",
    "DecodeError",
    "FlashError",
    "InfrastructureUnavailable",
    "MalformedMessage",
    "MessageTooLarge",
    "MissingTenant",
    "NestingTooDeep",
    "Poison",
    "SchemaViolation",
    "TenantMismatch",
    "Transient",
    "UnknownEventType",
    "UnsupportedEventVersion",
    "as_flash_error",
    "classify",
    "error_class_name",
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


class NestingTooDeep(DecodeError):
    """The body nests deeper than ``FLASH_MAX_JSON_DEPTH``; refused before any parser recurses into it."""


class MessageTooLarge(DecodeError):
    """The body is larger than ``FLASH_MAX_MESSAGE_BYTES``."""


class TenantMismatch(DecodeError):
    """The Kafka key names another tenant than the body's ``tenant_id``."""


class ConflictingDuplicate(Poison):
    """The same event id arrived with different content (kept for callers that want to refuse it)."""


#: The one classification table: (fully qualified exception class, its class in the tree). Matched along
#: the exception's MRO, so the most specific entry wins (asyncpg's client-side DataError is an
#: InterfaceError, but poison). Names, not imports, so this module depends on nothing.
CLASSIFICATION: dict[str, type[FlashError]] = {
    # The input can never succeed as it is.
    "builtins.RecursionError": Poison,  # nesting deeper than the interpreter's stack
    "builtins.UnicodeError": Poison,  # lone surrogates, undecodable bytes
    "builtins.ArithmeticError": Poison,  # overflow, decimal.InvalidOperation, division by zero
    "pydantic_core._pydantic_core.ValidationError": Poison,  # an event the data cannot form
    "pydantic_core._pydantic_core.PydanticSerializationError": Poison,  # e.g. a lone surrogate on the way out
    "asyncpg.exceptions._base.DataError": Poison,  # an argument asyncpg cannot encode (int64 overflow)
    "asyncpg.exceptions.DataError": Poison,  # SQLSTATE 22: NUL in text, numeric out of range, bad input
    "asyncpg.exceptions.CheckViolationError": Poison,
    "asyncpg.exceptions.NotNullViolationError": Poison,
    # Our own infrastructure: waited out, never the message's fault.
    "builtins.OSError": InfrastructureUnavailable,  # includes ConnectionError and TimeoutError
    "asyncpg.exceptions._base.InterfaceError": InfrastructureUnavailable,
    "asyncpg.exceptions.PostgresConnectionError": InfrastructureUnavailable,
    "asyncpg.exceptions.InsufficientResourcesError": InfrastructureUnavailable,  # 53: disk full, too many conns
    "asyncpg.exceptions.OperatorInterventionError": InfrastructureUnavailable,  # 57: admin shutdown
    "asyncpg.exceptions.SerializationError": InfrastructureUnavailable,
    "asyncpg.exceptions.DeadlockDetectedError": InfrastructureUnavailable,
    "asyncpg.exceptions.LockNotAvailableError": InfrastructureUnavailable,
    "aiokafka.errors.KafkaConnectionError": InfrastructureUnavailable,
    "aiokafka.errors.KafkaTimeoutError": InfrastructureUnavailable,
    # The deployment is wrong: stop and say what to fix.
    "asyncpg.exceptions.InsufficientPrivilegeError": ConfigError,
    "asyncpg.exceptions.UndefinedTableError": ConfigError,  # a migration did not run: flash migrate
    "asyncpg.exceptions.UndefinedColumnError": ConfigError,
    "asyncpg.exceptions.UndefinedFunctionError": ConfigError,
}


def classify(exc: BaseException) -> type[FlashError]:
    """The class of ``exc`` in the tree: its own for a FlashError, else the first :data:`CLASSIFICATION`
    entry along its MRO, else Transient (unclassified: retried a bounded number of times per message)."""
    if isinstance(exc, FlashError):
        return type(exc)
    for cls in type(exc).__mro__:
        kind = CLASSIFICATION.get(f"{cls.__module__}.{cls.__qualname__}")
        if kind is not None:
            return kind
    return Transient


def error_class_name(exc: BaseException) -> str:
    """What a dead letter's ``x-flash-error-class`` says: the FlashError's name, else ``Kind:Library``."""
    if isinstance(exc, FlashError):
        return type(exc).__name__
    return f"{classify(exc).__name__}:{type(exc).__name__}"


def as_flash_error(exc: BaseException) -> FlashError:
    """``exc`` as an instance of its class in the tree (the original is its ``__cause__``)."""
    if isinstance(exc, FlashError):
        return exc
    err = classify(exc)(f"{type(exc).__name__}: {exc}"[:2000])
    err.__cause__ = exc
    return err
