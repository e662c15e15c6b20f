"""structlog JSON logs with tenant and correlation ids bound from context variables."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import MutableMapping
from typing import Any

import structlog

__all__ = ["RepeatLimiter", "bind", "configure_logging", "get_logger"]


def configure_logging(
    level: str = "INFO", fmt: str = "json", *, service: str | None = None, repeats: int = 10, window_s: float = 10.0
) -> None:
    """Configure stdlib logging and structlog once per process. Logs go to stderr.

    Library lines (aiokafka, faststream, asyncpg...) go through the same renderer as ours, so with
    ``json`` every line is JSON with its level, logger and timestamp. Any one message (same logger, level
    and template) is written at most ``repeats`` times per ``window_s`` seconds; the next one written after
    that carries ``suppressed`` = how many were dropped, so an outage reads as a few lines with counts
    instead of thousands (a reconnect loop logs every few milliseconds)."""
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    limiter = RepeatLimiter(repeats, window_s)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[limiter.processor, *shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=_Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(_Stderr())
    handler.addFilter(limiter.filter)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared, structlog.processors.format_exc_info],
    ))
    handler.set_name("flash")
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == "flash":  # ours from an earlier call; others (pytest's capture) stay
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("aiokafka", "faststream", "kafka", "asyncio", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level.upper())))
    if service:
        structlog.contextvars.bind_contextvars(service=service)
    if os.environ.get("FLASH_INSTANCE_ID"):  # names this process in every line (README: FLASH_INSTANCE_ID)
        structlog.contextvars.bind_contextvars(instance_id=os.environ["FLASH_INSTANCE_ID"])


class RepeatLimiter:
    """At most ``repeats`` lines of one message per ``window_s`` seconds (see :func:`configure_logging`)."""

    def __init__(self, repeats: int = 10, window_s: float = 10.0, *, max_keys: int = 10_000) -> None:
        self.repeats = repeats
        self.window_s = window_s
        self.max_keys = max_keys
        self._seen: dict[tuple[Any, ...], list[float]] = {}  # key -> [window start, written, suppressed]

    def allow(self, key: tuple[Any, ...]) -> tuple[bool, int]:
        """(write it?, lines suppressed before it that it should report)."""
        now = time.monotonic()
        entry = self._seen.get(key)
        if entry is None or now - entry[0] >= self.window_s:
            suppressed = int(entry[2]) if entry is not None else 0
            if len(self._seen) >= self.max_keys:
                self._seen.clear()  # a flood of distinct messages: start over rather than grow
            self._seen[key] = [now, 1, 0]
            return True, suppressed
        if entry[1] < self.repeats:
            entry[1] += 1
            return True, 0
        entry[2] += 1
        return False, 0

    def processor(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        # Per message and per tenant/connection/consumer: one tenant's flood never hides another's lines.
        ok, suppressed = self.allow((method, event.get("event"), event.get("tenant_id"), event.get("connection_id"),
                                     event.get("consumer")))
        if not ok:
            raise structlog.DropEvent
        if suppressed:
            event["suppressed"] = suppressed
        return event

    def filter(self, record: logging.LogRecord) -> bool:
        ok, suppressed = self.allow((record.name, record.levelno, str(record.msg)))
        if ok and suppressed:
            record.msg = f"{record.msg} [{suppressed} similar lines suppressed]"
        return ok


class _Stderr:
    """Resolves ``sys.stderr`` on every write, so redirecting it (tests, daemons) is honoured."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def bind(**values: Any) -> None:
    """Bind ids (tenant_id, correlation_id, connection_id...) for every log line of this task."""
    structlog.contextvars.bind_contextvars(**values)


def get_logger(name: str | None = None) -> Any:
    return structlog.get_logger(name)
