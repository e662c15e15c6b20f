"""Shared fixtures: one broker and one database server per test session, a schema and a topic prefix
per test (unique names instead of cleanup)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from servicekit.logging import configure_logging
from servicekit.runtime import Infra, open_infra
from servicekit.settings import FlashSettings
from servicekit.testing.infra import test_database, test_kafka, unique_name

configure_logging(os.environ.get("FLASH_LOG_LEVEL", "WARNING"), "console")
# The vendor simulators listen on loopback over http(s): the endpoint policy admits them only with this
# setting (connectorkit.endpoints). Tests of the policy itself pass allow_sandbox=False explicitly.
os.environ.setdefault("FLASH_ALLOW_SANDBOX_ENDPOINTS", "1")

_TIERS = ("unit", "integration", "e2e", "contract")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in _TIERS:
            if tier in parts and not item.get_closest_marker(tier):
                item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
async def kafka_bootstrap() -> AsyncIterator[str]:
    async with test_kafka() as bootstrap:
        yield bootstrap


@pytest.fixture(scope="session")
async def database_url() -> AsyncIterator[str]:
    async with test_database() as dsn:
        yield dsn


@pytest.fixture
def test_id() -> str:
    return unique_name("t")


@pytest.fixture
def settings(kafka_bootstrap: str, database_url: str, test_id: str, tmp_path: Path) -> FlashSettings:
    return FlashSettings(
        kafka_bootstrap=kafka_bootstrap,
        database_url=database_url,
        db_schema=test_id,
        topic_prefix=f"{test_id}.",
        state_dir=tmp_path,
        backoff_base_s=0.01,
        backoff_max_s=0.2,
        max_attempts=3,
        batch_timeout_ms=50,
    )


@pytest.fixture
async def infra(settings: FlashSettings) -> AsyncIterator[Infra]:
    async with open_infra(settings, create_topics=False) as value:
        yield value
        await value.pool.execute(f'DROP SCHEMA IF EXISTS "{settings.db_schema}" CASCADE')
