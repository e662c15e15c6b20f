"""Pick the broker and database a test run uses.

Order: an explicitly configured one (``FLASH_TEST_KAFKA_BOOTSTRAP`` / ``FLASH_TEST_DATABASE_URL``, or the
``FLASH_`` settings), else a testcontainers container when a Docker engine answers, else the embedded
defaults (Tansu child process; the local PostgreSQL or an embedded one).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from servicekit.embedded import EmbeddedKafka, resolve_database_url
from servicekit.logging import get_logger
from servicekit.settings import FlashSettings

__all__ = ["docker_available", "service_env", "test_database", "test_kafka", "unique_name"]

log = get_logger(__name__)


def unique_name(prefix: str = "t") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def service_env(bootstrap: str, database_url: str, settings: FlashSettings, **extra: str) -> dict[str, str]:
    """The environment of a service started as a child process (``python -m <service>``) on the broker,
    database, schema, topic prefix and state directory of ``settings``; ``extra`` adds or overrides
    ``FLASH_`` variables (logging defaults to WARNING). Connections may name the simulators on loopback
    (``FLASH_ALLOW_SANDBOX_ENDPOINTS=1``, unless the caller's environment says otherwise)."""
    return {
        "FLASH_ALLOW_SANDBOX_ENDPOINTS": "1",
        **os.environ,
        "FLASH_KAFKA_BOOTSTRAP": bootstrap,
        "FLASH_DATABASE_URL": database_url,
        "FLASH_DB_SCHEMA": settings.db_schema or "",
        "FLASH_TOPIC_PREFIX": settings.topic_prefix,
        "FLASH_STATE_DIR": str(settings.state_dir),
        "FLASH_LOG_LEVEL": "WARNING",
        **extra,
    }


def docker_available() -> bool:
    """True when a Docker engine answers (the client alone is not enough)."""
    try:
        import docker  # testcontainers' dependency

        client = docker.from_env(timeout=2)
        client.ping()
        return True
    except Exception:  # noqa: BLE001 - any failure means "no engine here"
        return False


@contextlib.asynccontextmanager
async def test_kafka() -> AsyncIterator[str]:
    configured = os.environ.get("FLASH_TEST_KAFKA_BOOTSTRAP") or os.environ.get("FLASH_KAFKA_BOOTSTRAP")
    if configured:
        yield configured
        return
    if os.environ.get("FLASH_TEST_USE_CONTAINERS") == "1" and docker_available():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer().with_kraft() as kafka:
            yield kafka.get_bootstrap_server()
        return
    async with EmbeddedKafka() as broker:
        yield broker.bootstrap


@contextlib.asynccontextmanager
async def test_database() -> AsyncIterator[str]:
    configured = os.environ.get("FLASH_TEST_DATABASE_URL") or os.environ.get("FLASH_DATABASE_URL")
    if configured:
        yield configured
        return
    if os.environ.get("FLASH_TEST_USE_CONTAINERS") == "1" and docker_available():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16", driver=None) as pg:
            yield pg.get_connection_url()
        return
    yield await resolve_database_url(None, Path(os.environ.get("FLASH_STATE_DIR", Path.home() / ".flash")))
