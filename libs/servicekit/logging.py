"""structlog JSON logs with tenant and correlation ids bound from context variables."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

__all__ = ["bind", "configure_logging", "get_logger"]


def configure_logging(level: str = "INFO", fmt: str = "json", *, service: str | None = None) -> None:
    """Configure stdlib logging and structlog once per process. Logs go to stderr."""
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=_Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=level.upper(), stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
    for noisy in ("aiokafka", "faststream", "kafka", "asyncio", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level.upper())))
    if service:
        structlog.contextvars.bind_contextvars(service=service)
    if os.environ.get("FLASH_INSTANCE_ID"):  # names this process in every line (README: FLASH_INSTANCE_ID)
        structlog.contextvars.bind_contextvars(instance_id=os.environ["FLASH_INSTANCE_ID"])


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
