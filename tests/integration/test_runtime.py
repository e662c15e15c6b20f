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


async def test_processed_rows_expire_after_the_retention(database_url: str, tmp_path: Path) -> None:
    from servicekit.consumer import prune_processed

    schema = unique_name("rt")
    settings = FlashSettings(database_url=database_url, db_schema=schema, state_dir=tmp_path, topic_prefix=f"{schema}.",
                             kafka_bootstrap=None)
    async with open_infra(settings, create_topics=False) as infra:
        await infra.pool.execute(
            """INSERT INTO processed (consumer, tenant_id, event_id, processed_at)
               SELECT c, 'acme', c || '-' || i || '-' || age, now() - (age || ' days')::interval
               FROM unnest(ARRAY['mine', 'other']) AS c, generate_series(1, 50) AS i,
                    unnest(ARRAY[1, 29, 31, 90]) AS age"""
        )
        deleted = 0
        while n := await prune_processed(infra.pool, ["mine"], 30, chunk=20):  # several chunks
            deleted += n
        assert deleted == 100, "the 31- and 90-day-old rows of 'mine'"
        rows = await infra.pool.fetch(
            "SELECT consumer, count(*) AS n FROM processed GROUP BY consumer ORDER BY consumer"
        )
        assert [(r["consumer"], r["n"]) for r in rows] == [("mine", 100), ("other", 200)]
        assert await prune_processed(infra.pool, ["mine"], 0) == 0, "0 days keeps everything"
        await infra.pool.execute(f'DROP SCHEMA "{schema}" CASCADE')
