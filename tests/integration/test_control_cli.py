"""`flash tokens`, `flash secrets rotate` and `flash serve` as a user runs them: a token is shown once and
works until revoked; rotation re-encrypts every connection under the newest key; the served API gives the
CLI's answers; the process serves the page, /metrics, /healthz and /readyz."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.fernet import Fernet
from test_cli import sql

from controlplane.cli import main
from servicekit.testing.infra import unique_name

CREDS = {"tenant_id": "t-guid", "client_id": "app", "client_secret": "cli-s3cret-never-shown"}


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, database_url: str, tmp_path: Path) -> Iterator[str]:
    schema = unique_name("ccli")
    monkeypatch.setenv("FLASH_DATABASE_URL", database_url)
    monkeypatch.setenv("FLASH_DB_SCHEMA", schema)
    monkeypatch.setenv("FLASH_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("FLASH_SECRET_KEY", raising=False)
    yield schema
    sql(database_url, "public", f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def _add(tenant: str, cid: str) -> None:
    assert main(["connections", "add", "--tenant", tenant, "--id", cid, "--source", "dynamics-ce",
                 "--endpoint", f"https://{tenant}.crm.dynamics.com", "--credentials", json.dumps(CREDS)]) == 0


def test_tokens_are_shown_once_listed_without_secret_and_revocable(
    cli_env: str, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["tokens", "create", "--name", "nobody"]) == 2
    assert "either --tenant" in capsys.readouterr().err
    assert main(["tokens", "create", "--tenant", "acme", "--name", "acme ops"]) == 0
    out = capsys.readouterr().out
    token = out.strip().splitlines()[-1]
    assert token.startswith("flash_") and "shown once" in out
    assert main(["tokens", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed[0]["tenant_id"] == "acme" and listed[0]["role"] == "tenant"
    assert token not in json.dumps(listed) and "token_hash" not in listed[0]
    assert main(["tokens", "revoke", listed[0]["token_id"]]) == 0
    assert main(["tokens", "revoke", listed[0]["token_id"]]) == 1, "already revoked"
    rows = sql(database_url, cli_env, "SELECT action, actor FROM audit_log ORDER BY id")
    assert [r["action"] for r in rows] == ["token.create", "token.revoke"]
    assert all(r["actor"].startswith("cli:") for r in rows)


def test_secrets_rotate_re_encrypts_every_connection_under_the_newest_key(
    cli_env: str, database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    monkeypatch.setenv("FLASH_SECRET_KEY", old)
    _add("acme", "ce-a")
    _add("globex", "ce-g")
    before = {r["connection_id"]: bytes(r["credentials"]) for r in sql(database_url, cli_env,
                                                                       "SELECT * FROM connections")}
    monkeypatch.setenv("FLASH_SECRET_KEY", f"{new},{old}")
    assert main(["secrets", "rotate"]) == 0
    assert "2 connection(s)" in capsys.readouterr().out
    after = {r["connection_id"]: bytes(r["credentials"]) for r in sql(database_url, cli_env,
                                                                      "SELECT * FROM connections")}
    for cid in before:
        assert before[cid] != after[cid]
        assert json.loads(Fernet(new.encode()).decrypt(after[cid])) == CREDS, "the new key alone opens it"
    monkeypatch.setenv("FLASH_SECRET_KEY", new)  # the old key dropped: every connection still works
    assert main(["connections", "show", "--tenant", "acme", "--id", "ce-a"]) == 0
    monkeypatch.setenv("FLASH_SECRET_KEY", old)
    assert main(["connections", "show", "--tenant", "acme", "--id", "ce-a"]) == 2
    assert "cannot be decrypted" in capsys.readouterr().err
    assert "secrets.rotate" in [r["action"] for r in sql(database_url, cli_env, "SELECT action FROM audit_log")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_flash_serve_answers_as_the_cli_does(
    cli_env: str, database_url: str, kafka_bootstrap: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _add("acme", "ce-a")
    _add("globex", "ce-g")
    assert main(["tokens", "create", "--tenant", "acme", "--name", "acme"]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(["connections", "list", "--json"]) == 0
    cli_rows = [r for r in json.loads(capsys.readouterr().out) if r["tenant_id"] == "acme"]
    assert main(["connections", "status", "--tenant", "acme", "--id", "ce-a"]) == 0
    cli_status = json.loads(capsys.readouterr().out)

    port = _free_port()
    env = {**os.environ, "FLASH_KAFKA_BOOTSTRAP": kafka_bootstrap, "FLASH_LOG_FORMAT": "json",
           "FLASH_INSTANCE_ID": "serve-1"}
    proc = subprocess.Popen([sys.executable, "-m", "controlplane", "serve", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            try:
                if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        auth = {"Authorization": f"Bearer {token}"}
        api_rows = httpx.get(base + "/api/v1/connections", headers=auth).json()
        assert [{k: v for k, v in r.items() if k not in ("credentials", "settings")} for r in api_rows] == cli_rows
        api_status = httpx.get(base + "/api/v1/connections/acme/ce-a/status", headers=auth).json()
        assert {k: v for k, v in api_status.items() if k != "lag_s"} == \
            {k: v for k, v in cli_status.items() if k != "lag_s"}
        page = httpx.get(base + "/")
        assert page.status_code == 200 and "Data Sources" in page.text
        assert httpx.get(base + "/static/app.js").headers["content-type"].startswith("text/javascript")
        assert "# TYPE flash_messages_total counter" in httpx.get(base + "/metrics").text
        assert httpx.get(base + "/api/v1/connections").status_code == 401
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert f"control plane on http://127.0.0.1:{port}/".encode() in out
    lines = [json.loads(line) for line in err.decode().splitlines() if line.startswith("{")]
    requests = [line for line in lines if line.get("event") == "request"]
    assert requests and all(line.get("instance_id") == "serve-1" for line in requests)
    assert any(line.get("tenant_id") == "acme" and line.get("correlation_id") for line in requests)
    assert CREDS["client_secret"] not in err.decode() + out.decode()
