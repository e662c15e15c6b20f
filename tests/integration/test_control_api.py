"""The control plane HTTP API on a real PostgreSQL, broker and the Salesforce sandbox: tokens and tenant
isolation, write-only credentials (absent from the database, every response and every log line), endpoint
checks before any request, audit rows, a dry-run that changes nothing, key rotation, CLI parity."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet

from controlplane.api import openapi_text, routes, serve_api
from controlplane.ops import CONTROLPLANE_MIGRATIONS
from controlplane.serve import rotate_secrets
from controlplane.tokens import create_token
from sandbox.salesforce import SalesforceState, build_app, seed_org
from sandbox.server import serve
from servicekit.connections import CredentialCipher, PgConnectionStore
from servicekit.db import migrate
from servicekit.kafka import ensure_topics
from servicekit.runtime import Infra
from servicekit.settings import FlashSettings

SECRET = "Sup3r-S3cret-Value-never-shown-0042"


@dataclass
class Api:
    url: str
    http: httpx.AsyncClient
    tokens: dict[str, str]
    infra: Infra

    async def call(self, who: str | None, method: str, path: str, body: Any = None, **params: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"} if who else {}
        return await self.http.request(method, self.url + path, json=body, headers=headers, params=params or None)


@pytest.fixture
async def api(infra: Infra, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Api]:
    monkeypatch.delenv("FLASH_ALLOW_SANDBOX_ENDPOINTS", raising=False)
    await migrate(infra.pool, [CONTROLPLANE_MIGRATIONS])
    tokens = {}
    for who, tenant in (("a", "tenant-a"), ("b", "tenant-b"), ("op", None)):
        tokens[who], _ = await create_token(infra.pool, tenant_id=tenant, name=f"{who} test", created_by="test")
    async with serve_api(infra.pool, infra.settings, infra.publisher, port=0) as url, \
            httpx.AsyncClient(timeout=30) as http:
        yield Api(url, http, tokens, infra)


def _conn(cid: str, endpoint: str = "https://acme.crm.dynamics.com", **extra: Any) -> dict[str, Any]:
    return {"connection_id": cid, "source": "dynamics-ce", "endpoint": endpoint,
            "credentials": {"tenant_id": "t-guid", "client_id": "app-id", "client_secret": SECRET},
            "settings": {"page_size": 500}, **extra}


async def test_requests_without_a_valid_token_are_refused(api: Api) -> None:
    r = await api.call(None, "GET", "/api/v1/connections")
    assert r.status_code == 401 and "Authorization: Bearer" in r.json()["error"]["message"]
    for bad in ("nope", "flash_00000000_" + "x" * 43, api.tokens["a"][:-1] + "A"):
        r = await api.http.get(api.url + "/api/v1/connections", headers={"Authorization": f"Bearer {bad}"})
        assert r.status_code == 401, bad
    assert (await api.call("a", "GET", "/api/v1/me")).json()["tenant_id"] == "tenant-a"
    token_id = api.tokens["a"].split("_")[1]
    from controlplane.tokens import revoke_token

    assert await revoke_token(api.infra.pool, token_id, revoked_by="test")
    assert (await api.call("a", "GET", "/api/v1/me")).status_code == 401, "a revoked token is refused at once"
    stored = await api.infra.pool.fetch("SELECT token_hash FROM api_tokens")
    assert all(api.tokens[w] not in r["token_hash"] for r in stored for w in api.tokens), "hashed at rest"
    # The token is not needed for the document, the page and the probes.
    assert (await api.http.get(api.url + "/api/v1/openapi.json")).json()["openapi"].startswith("3.")
    assert (await api.http.get(api.url + "/healthz")).status_code == 200
    assert (await api.http.get(api.url + "/readyz")).status_code == 200


async def test_a_tenant_sees_and_changes_only_its_own(api: Api) -> None:
    assert (await api.call("a", "POST", "/api/v1/connections", _conn("a-ce"))).status_code == 201
    assert (await api.call("b", "POST", "/api/v1/connections", _conn("b-ce"))).status_code == 201
    r = await api.call("a", "POST", "/api/v1/connections", _conn("a-2", tenant_id="tenant-b"))
    assert r.status_code == 400, "cannot create for another tenant"
    listed = (await api.call("a", "GET", "/api/v1/connections")).json()
    assert [c["connection_id"] for c in listed] == ["a-ce"]
    assert {c["connection_id"] for c in (await api.call("op", "GET", "/api/v1/connections")).json()} >= {"a-ce", "b-ce"}
    b = "/api/v1/connections/tenant-b/b-ce"
    for method, path, body in (("GET", b, None), ("PATCH", b, {"endpoint": "https://x.crm.dynamics.com"}),
                               ("POST", b + "/verify", None), ("POST", b + "/dry-run", None),
                               ("POST", b + "/go-live", None), ("POST", b + "/pause", None),
                               ("GET", b + "/status", None), ("DELETE", b, None)):
        r = await api.call("a", method, path, body)
        assert r.status_code == 404, (method, path, r.text)
    assert (await api.call("b", "GET", b)).json()["endpoint"] == "https://acme.crm.dynamics.com", "unchanged"
    r = await api.call("b", "POST", "/api/v1/connections", _conn("a-ce"))
    assert r.status_code == 409, "ids are unique across tenants: B cannot take over A's"

    # Dead letters: A sees none of B's and cannot replay them.
    ids = {}
    for tenant in ("tenant-a", "tenant-b"):
        ids[tenant] = await api.infra.pool.fetchval(
            """INSERT INTO dead_letters (consumer, tenant_id, error_class, error_message, stage, source_topic,
                   attempts, first_failed_at, last_failed_at, dlq_topic, value)
               VALUES ('normalizer', $1, 'SchemaViolation', 'bad', 'decode', $2, 1, now(), now(), 'dlq', $3)
               RETURNING id""",
            tenant, api.infra.settings.topic("raw.dynamics-ce.salesorder.v1"), b'{"tenant_id": "x"}')
    seen = (await api.call("a", "GET", "/api/v1/dead-letters")).json()
    assert [d["id"] for d in seen] == [ids["tenant-a"]]
    assert (await api.call("a", "GET", f"/api/v1/dead-letters/{ids['tenant-b']}")).status_code == 404
    assert (await api.call("a", "POST", f"/api/v1/dead-letters/{ids['tenant-b']}/replay")).status_code == 404
    r = await api.call("a", "POST", "/api/v1/dead-letters/replay", {"tenant_id": "tenant-b"})
    assert r.status_code == 404
    r = await api.call("a", "POST", "/api/v1/dead-letters/replay", {})  # everything A may replay: its own only
    assert r.json()["replayed"] == 1
    rows = {r["tenant_id"]: r["replayed_at"] for r in await api.infra.pool.fetch("SELECT * FROM dead_letters")}
    assert rows["tenant-a"] is not None and rows["tenant-b"] is None

    audit = await api.infra.pool.fetch("SELECT actor, tenant_id, action, target FROM audit_log ORDER BY id")
    actions = [(r["tenant_id"], r["action"], r["target"]) for r in audit]
    assert ("tenant-a", "connection.create", "a-ce") in actions
    assert ("tenant-a", "dlq.replay", actions[-1][2]) in actions
    assert all(r["actor"].startswith(("token:", "test")) for r in audit)
    assert (await api.call("a", "DELETE", "/api/v1/connections/tenant-a/a-ce")).status_code == 200
    assert (await api.call("a", "GET", "/api/v1/connections/tenant-a/a-ce")).status_code == 404
    mine = (await api.call("a", "GET", "/api/v1/audit")).json()
    assert mine[0]["action"] == "connection.delete" and mine[0]["target"] == "a-ce"
    assert mine and all(r["tenant_id"] == "tenant-a" for r in mine)


async def test_endpoints_are_checked_before_any_request(api: Api) -> None:
    hits: list[int] = []
    listener = await asyncio.start_server(lambda r, w: (hits.append(1), w.close()), "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        ip = "an IP address is not a vendor endpoint"  # private, loopback, link-local: never a vendor
        for endpoint, why in ((f"https://127.0.0.1:{port}", ip), ("https://10.1.2.3", ip),
                              ("https://169.254.169.254/latest", ip), ("https://[::1]", ip),
                              ("http://acme.crm.dynamics.com", "only https"), ("https://evil.example.com", "not a"),
                              ("https://acme.crm.dynamics.com.evil.io", "not a dynamics-ce endpoint")):
            r = await api.call("a", "POST", "/api/v1/connections", _conn("bad", endpoint))
            assert r.status_code == 400, endpoint
            assert "endpoint" in r.json()["error"]["message"] and why in r.json()["error"]["message"], r.text
        assert (await api.call("a", "POST", "/api/v1/connections", _conn("ok"))).status_code == 201
        r = await api.call("a", "PATCH", "/api/v1/connections/tenant-a/ok", {"endpoint": f"https://127.0.0.1:{port}"})
        assert r.status_code == 400
        # A row that bypassed the API (an older version, a hand edit) is still refused before verify calls out.
        await api.infra.pool.execute("UPDATE connections SET endpoint = $1 WHERE connection_id = 'ok'",
                                     f"https://127.0.0.1:{port}")
        for action in ("verify", "dry-run"):
            r = await api.call("a", "POST", f"/api/v1/connections/tenant-a/ok/{action}")
            assert r.status_code == 400 and "IP address" in r.json()["error"]["message"], r.text
        await asyncio.sleep(0.2)
        assert hits == [], "nothing may connect to a refused endpoint"
    finally:
        listener.close()


async def _snapshot(infra: Infra) -> dict[str, Any]:
    from aiokafka import AIOKafkaConsumer

    tables = {}  # every table of the schema: ledger, cursors, member links, connections, dead letters...
    names = [r["table_name"] for r in await infra.pool.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()")]
    for t in names:
        if t == "api_tokens":  # last_used_at moves with every request: that is the API call, not the dry-run
            continue
        tables[t] = sorted(r[0] for r in await infra.pool.fetch(f'SELECT t::text FROM "{t}" t'))
    consumer = AIOKafkaConsumer(bootstrap_servers=infra.bootstrap)
    await consumer.start()
    try:
        topics = sorted(t for t in await consumer.topics() if t.startswith(infra.settings.topic_prefix))
        from aiokafka import TopicPartition

        tps = [TopicPartition(t, p) for t in topics for p in (consumer.partitions_for_topic(t) or ())]
        ends = await consumer.end_offsets(tps) if tps else {}
    finally:
        await consumer.stop()
    return {"tables": tables, "offsets": {f"{tp.topic}:{tp.partition}": o for tp, o in ends.items()}}


async def test_sandbox_flow_secrets_dry_run_rotation(
    api: Api, infra: Infra, settings: FlashSettings, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    from servicekit.logging import configure_logging

    configure_logging("DEBUG", "json")  # every log line, to search them for the secret
    monkeypatch.setenv("FLASH_ALLOW_SANDBOX_ENDPOINTS", "1")
    await ensure_topics(infra.bootstrap, settings)
    state = SalesforceState()
    org = state.add_org("acme", client_secret=SECRET)
    seed_org(state, org, orders=30, seed=5)
    responses: list[str] = []

    async def call(*args: Any, **kw: Any) -> httpx.Response:
        r = await api.call(*args, **kw)
        responses.append(r.text + json.dumps(dict(r.headers)))
        return r

    try:
        async with serve(build_app(state)) as sb:
            body = {"connection_id": "sf-a", "source": "salesforce", "endpoint": sb.base_url,
                    "credentials": {"client_id": org.client_id, "client_secret": SECRET},
                    "settings": {"ca_bundle": str(sb.tls.ca_path), "cdc": False}}
            r = await call("a", "POST", "/api/v1/connections", body)
            assert r.status_code == 201, r.text
            assert r.json()["credentials"] == {"client_id": "***", "client_secret": "***"}
            base = "/api/v1/connections/tenant-a/sf-a"
            assert (await call("a", "POST", base + "/go-live")).status_code == 409, "verify first"
            r = await call("a", "POST", base + "/verify")
            assert r.json()["ok"] is True, r.text
            before = await _snapshot(infra)
            r = await call("a", "POST", base + "/dry-run", limit=3)
            assert r.status_code == 200, r.text
            summary = r.json()["summary"]
            assert summary["records"].get("Order", 0) >= 1, summary
            assert await _snapshot(infra) == before, "a dry-run writes nothing: topics, tables, cursors unchanged"
            assert (await call("a", "POST", base + "/go-live")).json()["state"] == "live"
            assert (await call("a", "POST", base + "/pause")).json()["state"] == "paused"
            assert (await call("a", "POST", base + "/resume")).json()["state"] == "live"
            status = (await call("a", "GET", base + "/status")).json()
            assert status["state"] == "live" and "dead_letter_depth" in status
            assert re.fullmatch(r"\d+/\d+", status["quota"]["api_usage_at_last_verify"]["usage"]), status["quota"]
            # A wrong secret: the error says what is wrong, without the secret sent.
            r = await call("a", "PATCH", base, {"credentials": {"client_secret": SECRET + "-wrong"}})
            assert r.json()["state"] == "draft", "changed credentials need a new verify"
            r = await call("a", "POST", base + "/verify")
            assert r.json()["ok"] is False and r.json()["error"], r.text
            r = await call("a", "PATCH", base, {"credentials": {"client_secret": SECRET}})
            assert (await call("a", "POST", base + "/verify")).json()["ok"] is True

            # Rotation: a new key first, the old one kept; after the rotation the new key alone opens every row.
            old_key = CredentialCipher.from_settings(settings)
            new = Fernet.generate_key()
            old = (settings.state_dir / "secret.key").read_bytes().strip()
            result = await rotate_secrets(infra.pool, CredentialCipher([new, old]), actor="test")
            assert result["connections"] >= 1
            from pydantic import SecretStr

            rotated = settings.model_copy(update={"secret_key": SecretStr(new.decode())})
            only_new = PgConnectionStore(infra.pool, CredentialCipher.from_settings(rotated))
            conn = await only_new.get("tenant-a", "sf-a")
            assert conn.credentials["client_secret"] == SECRET
            with pytest.raises(Exception, match="cannot be decrypted"):
                await PgConnectionStore(infra.pool, old_key).get("tenant-a", "sf-a")
            from sf_poller import control

            assert (await control.verify(conn, rotated))["ok"] is True, "the rotated connection still works"
    finally:
        configure_logging("WARNING", "console")

    tables = [r["table_name"] for r in await infra.pool.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()")]
    assert {"connections", "audit_log", "api_tokens", "dead_letters"} <= set(tables)
    dump = [f"{t}: {r[0]}" for t in tables  # every row of every table, as PostgreSQL renders it (a dump)
            for r in await infra.pool.fetch(f'SELECT t::text FROM "{t}" t')]
    audit = await infra.pool.fetch("SELECT actor, action, at FROM audit_log WHERE target = 'sf-a'")
    assert {"connection.create", "connection.verify", "connection.go-live", "connection.pause", "connection.resume",
            "connection.update"} <= {r["action"] for r in audit}, "every change leaves an audit row"
    assert all(r["actor"].startswith("token:") and r["at"] for r in audit), "who and when"
    raw = await infra.pool.fetch("SELECT credentials FROM connections")
    assert all(SECRET.encode() not in bytes(r["credentials"]) for r in raw)
    assert not [d for d in dump if SECRET in d], "the secret is absent in plaintext from the database"
    assert not [r for r in responses if SECRET in r], "and from every response"
    out = capfd.readouterr()
    assert "request" in out.err, "the request log lines were captured"
    assert SECRET not in out.err and SECRET not in out.out, "and from every log line"


def test_the_openapi_document_names_every_route() -> None:
    doc = json.loads(openapi_text())
    documented = {(m.upper(), p) for p, item in doc["paths"].items() for m in item if m != "parameters"}
    served = set()
    for r in routes:
        path = re.sub(r"\{(\w+)(:[^}]*)?\}", r"{\1}", r.path)  # type: ignore[attr-defined]
        if "{action}" in path:
            served |= {(r.method, path.replace("{action}", a)) for a in ("go-live", "pause", "resume")}
        else:
            served.add((r.method, path))
    assert served <= documented, served - documented



async def test_a_kit_connector_through_the_api_verify_lines_and_a_dry_run_with_match_rate_and_points(
    api: Api, infra: Infra, settings: FlashSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dynamics CE (a connector on the kit): verify answers one line per check; the dry-run summary reads the
    member match rate and the points that would be earned from the kit's report; nothing is written."""
    from decimal import Decimal

    from canonical.events import MemberData
    from ce_poller.app import MIGRATIONS as CE_MIGRATIONS
    from connectorkit import MIGRATIONS as KIT_MIGRATIONS
    from points.app import MIGRATIONS as POINTS_MIGRATIONS
    from points.cli import set_program
    from points.rules import Program
    from resolver.app import MIGRATIONS as RESOLVER_MIGRATIONS
    from resolver.cli import import_members
    from sandbox.dataverse import DataverseState, ground_truth, seed_org
    from sandbox.dataverse import build_app as dataverse_app

    monkeypatch.setenv("FLASH_ALLOW_SANDBOX_ENDPOINTS", "1")
    await migrate(infra.pool, [KIT_MIGRATIONS, CE_MIGRATIONS, RESOLVER_MIGRATIONS, POINTS_MIGRATIONS])
    await ensure_topics(infra.bootstrap, settings)
    state = DataverseState()
    state.add_org("contoso")
    seed_org(state, "contoso", customers=12, products=8, orders=20, seed=3)
    truths = list(ground_truth(state.orgs["contoso"]))
    members = [MemberData(member_id=f"M-{i}", external_id=t.accountnumber or None, email=t.customer_email)
               for i, t in enumerate(truths) if t.customer_email or t.accountnumber]
    await import_members(infra.pool, "tenant-a", members[: max(1, len(members) // 2)])
    await set_program(infra.pool, Program(tenant_id="tenant-a", base_currency="USD", points_per_unit=Decimal(1),
                                          exchange_rates={"EUR": Decimal("0.9"), "GBP": Decimal("0.8")}))
    async with serve(dataverse_app(state)) as running:
        o, app = state.orgs["contoso"], state.credentials("contoso")[0]
        body = {"connection_id": "ce-a", "source": "dynamics-ce", "endpoint": f"{running.base_url}/orgs/contoso",
                "credentials": {"tenant_id": o.tenant_id, "client_id": app.client_id,
                                "client_secret": app.client_secret},
                "settings": {"authority": f"{running.base_url}/{o.tenant_id}", "ca_bundle": str(running.tls.ca_path),
                             "page_size": 10}}
        r = await api.call("a", "POST", "/api/v1/connections", {**body, "settings": {"page_size": "many"}})
        assert r.status_code == 400 and "page_size" in r.json()["error"]["message"], "the connector's own parse"
        assert (await api.call("a", "POST", "/api/v1/connections", body)).status_code == 201
        base = "/api/v1/connections/tenant-a/ce-a"
        r = (await api.call("a", "POST", base + "/verify")).json()
        assert r["ok"] is True and any(line.startswith("ok    auth") for line in r["lines"]), r
        before = await _snapshot(infra)
        r = await api.call("a", "POST", base + "/dry-run", limit=20)
        assert r.status_code == 200, r.text
        summary = r.json()["summary"]
        assert summary["records"]["salesorder"] == 20
        assert 0 < summary["match_rate"] < 1, summary
        assert summary["points_earned"] > 0, summary
        assert await _snapshot(infra) == before, "the dry-run wrote nothing"
        assert {"ledger", "cursors", "customer_links", "orders"} <= set(before["tables"])


async def test_without_a_broker_replays_are_refused_and_say_why(infra: Infra) -> None:
    await migrate(infra.pool, [CONTROLPLANE_MIGRATIONS])
    token, _ = await create_token(infra.pool, tenant_id=None, name="op", created_by="test")
    async with serve_api(infra.pool, infra.settings, None, port=0) as url, httpx.AsyncClient() as http:
        r = await http.post(url + "/api/v1/dead-letters/replay", json={},
                            headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 409 and "FLASH_KAFKA_BOOTSTRAP" in r.json()["error"]["message"]


async def test_a_connection_whose_credentials_cannot_be_decrypted_says_so(api: Api) -> None:
    assert (await api.call("a", "POST", "/api/v1/connections", _conn("a-ce"))).status_code == 201
    other_key = Fernet(Fernet.generate_key()).encrypt(b'{"client_secret": "x"}')
    await api.infra.pool.execute("UPDATE connections SET credentials = $1 WHERE connection_id = 'a-ce'", other_key)
    r = await api.call("a", "GET", "/api/v1/connections/tenant-a/a-ce")
    assert r.status_code == 409 and "cannot be decrypted" in r.json()["error"]["message"], r.text
    assert (await api.call("a", "GET", "/api/v1/connections/tenant-a/nope")).status_code == 404
