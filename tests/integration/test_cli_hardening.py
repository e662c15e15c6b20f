"""The CLI under one tenant's problems and without the services' broker (issue 15)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from cryptography.fernet import Fernet

from controlplane.cli import main
from servicekit.testing.infra import unique_name


def sql(dsn: str, schema: str, query: str, *args: object) -> list[asyncpg.Record]:
    async def go() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
        try:
            return await conn.fetch(query, *args)
        finally:
            await conn.close()

    return asyncio.run(go())


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, database_url: str, tmp_path: Path) -> Iterator[str]:
    schema = unique_name("clih")
    monkeypatch.setenv("FLASH_DATABASE_URL", database_url)
    monkeypatch.setenv("FLASH_DB_SCHEMA", schema)
    monkeypatch.setenv("FLASH_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("FLASH_SECRET_KEY", raising=False)
    monkeypatch.delenv("FLASH_KAFKA_BOOTSTRAP", raising=False)
    yield schema
    sql(database_url, "public", f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def test_dlq_replay_refuses_without_the_services_broker(
    cli_env: str, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["migrate"]) == 0
    sql(database_url, cli_env,
        """INSERT INTO dead_letters (consumer, tenant_id, event_id, entity, error_class, error_message, stage,
               source_topic, source_partition, source_offset, attempts, first_failed_at, last_failed_at,
               dlq_topic, key, value, headers)
           VALUES ('normalizer', 'acme', 'e1', 'salesorder', 'SchemaViolation', 'bad', 'handle',
               'raw.dynamics-ce.salesorder.v1', 0, 1, 1, now(), now(), 'dlq.normalizer.v1', 'k', '{}', '[]')""")
    capsys.readouterr()
    assert main(["dlq", "replay", "--tenant", "acme"]) == 2
    err = capsys.readouterr().err
    assert "FLASH_KAFKA_BOOTSTRAP" in err, err
    pending = sql(database_url, cli_env, "SELECT count(*) AS n FROM dead_letters WHERE replayed_at IS NULL")
    assert pending[0]["n"] == 1, "nothing is marked replayed"
    assert main(["dlq", "replay", "--tenant", "acme", "--dry-run"]) == 0, "a dry run needs no broker"
    assert "would replay 1" in capsys.readouterr().out


def test_one_undecryptable_connection_is_named_and_stops_nothing_else(
    cli_env: str, database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FLASH_ALLOW_SANDBOX_ENDPOINTS", "1")  # no DNS look-up of the example hosts
    creds = json.dumps({"tenant_id": "t-guid", "client_id": "app", "client_secret": "s3cr3t"})
    for tenant in ("acme", "globex"):
        assert main(["connections", "add", "--tenant", tenant, "--id", f"{tenant}-ce", "--source", "dynamics-ce",
                     "--endpoint", f"https://{tenant}.crm.dynamics.com", "--credentials", creds]) == 0
    # globex's row was written with a key this deployment no longer has.
    sql(database_url, cli_env, "UPDATE connections SET credentials = $1 WHERE tenant_id = 'globex'",
        Fernet(Fernet.generate_key()).encrypt(b'{"client_secret": "x"}'))
    capsys.readouterr()
    assert main(["connections", "list", "--json"]) == 0
    rows = {r["connection_id"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"acme-ce", "globex-ce"}
    assert "cannot be decrypted" in (rows["globex-ce"]["last_error"] or "")
    assert main(["status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert {c["connection_id"] for c in status["connections"]} == {"acme-ce", "globex-ce"}
    assert main(["connections", "show", "--tenant", "globex", "--id", "globex-ce"]) == 2
    assert "globex-ce" in capsys.readouterr().err, "the error names the row"


async def test_pollers_list_skips_the_unreadable_row(database_url: str, tmp_path: Path) -> None:
    from servicekit.connections import CredentialCipher, PgConnectionStore
    from servicekit.db import CORE_MIGRATIONS, create_pool, migrate

    schema = unique_name("conn")
    pool = await create_pool(database_url, schema=schema)
    try:
        await migrate(pool, [CORE_MIGRATIONS])
        store = PgConnectionStore(pool, CredentialCipher([Fernet.generate_key()]))
        await store.upsert("acme", "a", "dynamics-ce", "https://a.crm.dynamics.com", {"k": "v"})
        await store.upsert("globex", "g", "dynamics-ce", "https://g.crm.dynamics.com", {"k": "v"})
        await pool.execute("UPDATE connections SET credentials = 'garbage'::bytea WHERE tenant_id = 'globex'")
        usable = await store.list()
        assert [c.connection_id for c in usable] == ["a"], "one tenant's broken row does not stop the others"
        everything = await store.list(include_unreadable=True)
        assert [(c.connection_id, c.credentials) for c in everything] == [("a", {"k": "v"}), ("g", {})]
    finally:
        await pool.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await pool.close()
