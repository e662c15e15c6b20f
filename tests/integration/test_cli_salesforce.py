"""Issue 10: ``flash connections add / verify / dry-run / go-live`` on a Salesforce sandbox connection, from a
fresh database, as an operator runs them; verify learns and saves the org's shape; its failures say what to
fix; dry-run writes nothing (every table unchanged)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_cli import sql

from controlplane.cli import main
from sandbox.salesforce import SalesforceState, build_app, seed_org
from sandbox.server import RunningSandbox, serve
from servicekit.testing.infra import unique_name

pytestmark = pytest.mark.integration


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, database_url: str, tmp_path: Path) -> Iterator[str]:
    schema = unique_name("clisf")
    monkeypatch.setenv("FLASH_DATABASE_URL", database_url)
    monkeypatch.setenv("FLASH_DB_SCHEMA", schema)
    monkeypatch.setenv("FLASH_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("FLASH_SECRET_KEY", raising=False)
    yield schema
    sql(database_url, "public", f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def sandbox() -> Iterator[tuple[SalesforceState, RunningSandbox]]:
    """The simulator on its own event loop thread (the CLI runs ``asyncio.run`` itself)."""
    state = SalesforceState(cometd_timeout_s=1.0)
    state.add_org("cliorg", multi_currency=False, person_accounts=False)
    seed_org(state, "cliorg", orders=12, person_accounts=0, seed=23)
    loop = asyncio.new_event_loop()
    ready: dict[str, Any] = {}
    stop = asyncio.Event()

    async def run() -> None:
        async with serve(build_app(state)) as sb:
            ready["sb"] = sb
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    for _ in range(500):
        if "sb" in ready:
            break
        threading.Event().wait(0.01)
    yield state, ready["sb"]
    loop.call_soon_threadsafe(stop.set)
    thread.join(10)


def _snapshot(dsn: str, schema: str) -> dict[str, str]:
    """A digest of every table of the schema (a dry-run must change none)."""
    tables = [r["tablename"] for r in sql(dsn, schema, "SELECT tablename FROM pg_tables WHERE schemaname = $1 "
                                                       "ORDER BY 1", schema)]
    return {t: str(sql(dsn, schema, f'SELECT md5(coalesce(string_agg(x::text, \'|\' ORDER BY x::text), \'\')) '
                                    f'FROM "{t}" x')[0][0]) for t in tables}


def test_salesforce_connection_add_verify_dry_run_go_live(
    cli_env: str, database_url: str, sandbox: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    state, sb = sandbox
    org = state.orgs["cliorg"]
    assert main(["migrate"]) == 0
    settings = {"ca_bundle": str(sb.tls.ca_path), "default_currency": "EUR", "cdc": False}
    bad = json.dumps({"client_id": org.client_id, "client_secret": "wrong"})
    assert main(["connections", "add", "--tenant", "acme", "--id", "sf-bad", "--source", "salesforce",
                 "--endpoint", sb.base_url, "--credentials", bad, "--settings", json.dumps(settings)]) == 0
    assert main(["connections", "verify", "--tenant", "acme", "--id", "sf-bad"]) == 1
    captured = capsys.readouterr()
    assert "consumer key and secret" in captured.err and "FAIL  auth" in captured.out
    assert "wrong" not in captured.err + captured.out, "says what to fix, shows no secret"

    creds = json.dumps({"client_id": org.client_id, "client_secret": org.client_secret})
    assert main(["connections", "add", "--tenant", "acme", "--id", "sf-main", "--source", "salesforce",
                 "--endpoint", sb.base_url, "--credentials", creds, "--settings", json.dumps(settings)]) == 0
    assert main(["connections", "go-live", "--tenant", "acme", "--id", "sf-main"]) == 2  # verify first
    capsys.readouterr()
    assert main(["connections", "verify", "--tenant", "acme", "--id", "sf-main"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "ok    org shape: multi_currency=False, person_accounts=False, order_management=False" in lines
    assert any(line.startswith("ok    read Order:") for line in lines) and "verified" in lines[-1]
    shape = sql(database_url, cli_env, "SELECT cursor FROM cursors WHERE connection_id = 'sf-main' AND "
                                       "entity = 'org:shape'")
    assert len(shape) == 1

    before = _snapshot(database_url, cli_env)
    assert main(["connections", "dry-run", "--tenant", "acme", "--id", "sf-main"]) == 0
    preview = json.loads(capsys.readouterr().out)
    assert preview["records"]["Order"] > 0 and not preview["would_dead_letter"], preview
    assert any("order" in topic for topic in preview["canonical"]), preview["canonical"]
    assert _snapshot(database_url, cli_env) == before, "a dry-run changed the database"

    assert main(["connections", "go-live", "--tenant", "acme", "--id", "sf-main"]) == 0
    state_row = sql(database_url, cli_env, "SELECT state FROM connections WHERE connection_id = 'sf-main'")
    assert state_row[0]["state"] == "live"
