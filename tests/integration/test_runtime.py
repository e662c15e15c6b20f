"""Composition root: embedded defaults are resolved once and handed on, never started twice."""

from __future__ import annotations

from pathlib import Path

from servicekit.runtime import open_infra
from servicekit.settings import FlashSettings
from servicekit.testing.infra import unique_name


async def test_open_infra_hands_on_the_broker_and_database_it_resolved(database_url: str, tmp_path: Path) -> None:
    schema = unique_name("rt")
    settings = FlashSettings(kafka_bootstrap=None, database_url=database_url, db_schema=schema, state_dir=tmp_path,
                             topic_prefix=f"{schema}.")
    async with open_infra(settings, create_topics=False) as infra:
        assert infra.bootstrap.startswith("127.0.0.1:"), "no broker configured: an embedded one is started"
        assert infra.settings.kafka_bootstrap == infra.bootstrap
        assert infra.settings.database_url == infra.database_url == database_url
        assert await infra.pool.fetchval("SELECT current_schema()") == schema
        await infra.pool.execute(f'DROP SCHEMA "{schema}" CASCADE')
