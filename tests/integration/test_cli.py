"""The `flash` CLI against a real PostgreSQL: connections keep secrets secret, go-live needs a
verified connection, and the DLQ commands show and count what the runtime dead-lettered."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from controlplane.cli import main
from servicekit.testing.infra import unique_name


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, database_url: str, tmp_path: Path) -> Iterator[str]:
    schema = unique_name("cli")
    monkeypatch.setenv("FLASH_DATABASE_URL", database_url)
    monkeypatch.setenv("FLASH_DB_SCHEMA", schema)
    monkeypatch.setenv("FLASH_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("FLASH_SECRET_KEY", raising=False)
    yield schema
    sql(database_url, "public", f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')  # leave the database as found


def sql(dsn: str, schema: str, query: str, *args: object) -> list[asyncpg.Record]:
    async def go() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
        try:
            return await conn.fetch(query, *args)
        finally:
            await conn.close()

    return asyncio.run(go())


def test_connections_secrets_and_lifecycle(cli_env: str, database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    creds = json.dumps({"tenant_id": "t-guid", "client_id": "app", "client_secret": "s3cr3t-value"})
    assert main(["connections", "add", "--tenant", "acme", "--id", "ce-main", "--source", "dynamics-ce",
                 "--endpoint", "https://acme.crm.dynamics.com", "--credentials", creds,
                 "--settings", '{"page_size": 500}']) == 0
    assert main(["connections", "list", "--json"]) == 0
    assert main(["connections", "show", "--tenant", "acme", "--id", "ce-main"]) == 0
    out = capsys.readouterr().out
    assert "s3cr3t-value" not in out
    assert '"client_secret": "***"' in out
    stored = sql(database_url, cli_env, "SELECT credentials, state FROM connections")
    assert b"s3cr3t-value" not in stored[0]["credentials"], "credentials must be encrypted at rest"
    assert stored[0]["state"] == "draft"

    assert main(["connections", "go-live", "--tenant", "acme", "--id", "ce-main"]) == 2
    assert "verify it first" in capsys.readouterr().err
    assert main(["connections", "show", "--tenant", "acme", "--id", "nope"]) == 2
    assert "no connection 'nope'" in capsys.readouterr().err


def test_dlq_commands(cli_env: str, database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["migrate"]) == 0
    for i, tenant in enumerate(["acme", "acme", "globex"]):
        sql(database_url, cli_env,
            """INSERT INTO dead_letters (consumer, tenant_id, event_id, entity, error_class, error_message, stage,
                   source_topic, source_partition, source_offset, attempts, first_failed_at, last_failed_at,
                   dlq_topic, key, value, headers)
               VALUES ('normalizer', $1, $2, 'salesorder', 'SchemaViolation', 'order.upserted v1 failed', 'handle',
                   'raw.dynamics-ce.salesorder.v1', 0, $3, 1, now(), now(), 'dlq.normalizer.v1', 'k', '{}', '[]')""",
            tenant, f"e{i}", i)
    capsys.readouterr()
    assert main(["dlq", "list", "--tenant", "acme", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["event_id"] for r in rows] == ["e0", "e1"]
    assert main(["dlq", "depth", "--json"]) == 0
    depth = {(r["tenant_id"], r["depth"]) for r in json.loads(capsys.readouterr().out)}
    assert depth == {("acme", 2), ("globex", 1)}
    assert main(["dlq", "show", str(rows[0]["id"])]) == 0
    assert '"error_class": "SchemaViolation"' in capsys.readouterr().out
    assert main(["dlq", "replay", "--tenant", "globex", "--dry-run"]) == 0
    assert "would replay 1 dead letter(s)" in capsys.readouterr().out
    assert main(["status"]) == 0
    assert "DEAD LETTERS" in capsys.readouterr().out
