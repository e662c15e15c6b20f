"""Dynamics CE onboarding on the connector kit, against the Dataverse sandbox over real HTTPS, with the real
broker and PostgreSQL: every verify failure says what to fix; `flash connections add / verify / dry-run /
go-live`; a dry-run changes no table and no topic offset; a PostgreSQL outage mid-poll is waited out with
nothing lost; a source dead letter, once fixed at the vendor, is re-fetched by `flash dlq replay` and lands
once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import urllib.parse
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from canonical.events import MemberData
from canonical.topics import raw
from ce_poller.app import MIGRATIONS, run_connection
from ce_poller.control import CeConnector
from ce_poller.limiter import reset_budgets
from connectorkit import MIGRATIONS as KIT_MIGRATIONS
from connectorkit.dryrun import dry_run
from controlplane.cli import main
from points.cli import set_program
from points.rules import Program
from resolver.cli import import_members
from sandbox.dataverse import DataverseState, build_app, ground_truth, seed_org
from sandbox.dataverse.mutations import update
from sandbox.server import serve
from servicekit.connections import Connection, CredentialCipher, PgConnectionStore
from servicekit.db import create_pool, migrate
from servicekit.kafka import ensure_topics
from servicekit.runtime import Infra
from servicekit.settings import FlashSettings

READABLE_BUT_ORDERS = {"account", "contact", "product", "salesorderdetail", "transactioncurrency", "organization",
                       "msdyn_rma", "msdyn_rmaproduct"}


@contextlib.asynccontextmanager
async def dataverse(orders: int = 30) -> AsyncIterator[tuple[DataverseState, Any]]:
    state = DataverseState()
    state.add_org("contoso")
    seed_org(state, "contoso", customers=12, products=8, orders=orders, seed=3)
    async with serve(build_app(state)) as running:
        yield state, running


def ce_connection(running: Any, state: DataverseState, org: str = "contoso", *, cid: str = "ce-1",
                  endpoint: str | None = None, **creds: str) -> Connection:
    o = state.orgs[org]
    app = state.credentials(org)[0]
    c = {"tenant_id": o.tenant_id, "client_id": app.client_id, "client_secret": app.client_secret, **creds}
    return Connection("acme", cid, "dynamics-ce", endpoint or f"{running.base_url}/orgs/{org}", c,
                      {"authority": f"{running.base_url}/{c['tenant_id']}", "ca_bundle": str(running.tls.ca_path),
                       "page_size": 10})


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _verify(conn: Connection) -> list[str]:
    connector = CeConnector()
    report = await connector.verify(connector.parse(conn), FlashSettings(backoff_base_s=0.01, backoff_max_s=0.05))
    return report.lines()


@pytest.mark.timeout(120)
async def test_verify_says_what_to_fix_for_each_failure() -> None:
    reset_budgets()
    async with dataverse() as (state, running):
        ok = await _verify(ce_connection(running, state))
        assert [line.split(":")[0] for line in ok] == [
            "ok    host", "ok    auth", "ok    application user", "ok    read transactioncurrency",
            "ok    read organization", "ok    read account", "ok    read contact",
            "ok    read product", "ok    read salesorder", "ok    read salesorderdetail", "ok    read msdyn_rma",
            "ok    read msdyn_rmaproduct", "ok    change tracking"]

        lines = await _verify(ce_connection(running, state, client_secret="not-the-secret"))
        assert lines[-1].startswith("FAIL  auth:") and "AADSTS7000215" in lines[-1]
        assert "put the secret's Value (not its Secret ID)" in lines[-1] and "not-the-secret" not in lines[-1]

        other_tenant = str(uuid.uuid4())
        lines = await _verify(ce_connection(running, state, tenant_id=other_tenant))
        assert lines[-1].startswith("FAIL  auth:") and "the tenant does not exist" in lines[-1]
        assert "credentials.tenant_id" in lines[-1]

        stranger = state.register_app(state.orgs["contoso"].tenant_id)  # registered, but no application user
        lines = await _verify(ce_connection(running, state, client_id=stranger.client_id,
                                            client_secret=stranger.client_secret))
        assert lines[-2].startswith("ok    auth")
        assert lines[-1].startswith("FAIL  application user:") and "0x80072560" in lines[-1]
        assert "Application users, add the app (credentials.client_id)" in lines[-1]

        state.add_org("fabrikam")  # another tenant's environment: contoso's app has no access to its API
        lines = await _verify(ce_connection(running, state, endpoint=f"{running.base_url}/orgs/fabrikam"))
        assert lines[-1].startswith("FAIL  auth:") and "AADSTS500011" in lines[-1]
        assert "no API access to the environment" in lines[-1]

        state.add_org("locked", readable=READABLE_BUT_ORDERS)
        lines = await _verify(ce_connection(running, state, "locked"))
        failed = [ln for ln in lines if ln.startswith("FAIL")]
        assert len(failed) == 1 and failed[0].startswith("FAIL  read salesorder:")
        assert "grant the application user's security role organisation-level prvReadSalesOrder" in failed[0]

        lines = await _verify(ce_connection(running, state, endpoint=f"https://127.0.0.1:{_closed_port()}/orgs/x"))
        assert len(lines) == 1 and lines[0].startswith("FAIL  host: cannot reach 127.0.0.1")
        assert "check the endpoint URL" in lines[0]


# --------------------------------------------------------------------------------------- CLI, dry-run


def _cli_env(monkeypatch: pytest.MonkeyPatch, settings: FlashSettings, bootstrap: str) -> None:
    monkeypatch.setenv("FLASH_DATABASE_URL", str(settings.database_url))
    monkeypatch.setenv("FLASH_DB_SCHEMA", str(settings.db_schema))
    monkeypatch.setenv("FLASH_TOPIC_PREFIX", settings.topic_prefix)
    monkeypatch.setenv("FLASH_KAFKA_BOOTSTRAP", bootstrap)
    monkeypatch.setenv("FLASH_STATE_DIR", str(settings.state_dir))
    monkeypatch.delenv("FLASH_SECRET_KEY", raising=False)


async def flash(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


async def db_snapshot(pool: asyncpg.Pool) -> dict[str, str]:
    tables = [r["tablename"] for r in await pool.fetch(
        "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY 1")]
    out = {}
    for t in tables:
        out[t] = str(await pool.fetchval(
            f'SELECT md5(coalesce(string_agg(x::text, \'|\' ORDER BY x::text), \'\')) FROM "{t}" x'))
    return out


async def end_offsets(infra: Infra) -> dict[str, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=infra.bootstrap)
    await consumer.start()
    try:
        topics = sorted(t for t in await consumer.topics() if t.startswith(infra.settings.topic_prefix))
        parts = [TopicPartition(t, p) for t in topics for p in (consumer.partitions_for_topic(t) or ())]
        ends = await consumer.end_offsets(parts)
        return {f"{tp.topic}/{tp.partition}": off for tp, off in ends.items()}
    finally:
        await consumer.stop()


async def raw_messages(infra: Infra, entity: str) -> list[dict[str, Any]]:
    consumer = AIOKafkaConsumer(infra.settings.topic(raw("dynamics-ce", entity)), bootstrap_servers=infra.bootstrap,
                                auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    got: list[dict[str, Any]] = []
    try:
        idle = 0
        while idle < 3:
            batch = await consumer.getmany(timeout_ms=300)
            idle = 0 if batch else idle + 1
            for recs in batch.values():
                got += [json.loads(r.value) for r in recs]
    finally:
        await consumer.stop()
    return got


@pytest.mark.timeout(180)
async def test_cli_add_verify_dry_run_go_live(infra: Infra, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    reset_budgets()
    _cli_env(monkeypatch, infra.settings, infra.bootstrap)
    assert await flash("migrate") == 0
    await ensure_topics(infra.bootstrap, infra.settings)
    async with dataverse() as (state, running):
        org = state.orgs["contoso"]
        truths = list(ground_truth(org))
        members = {t.customer_id: MemberData(member_id=f"M-{i}", external_id=t.accountnumber or None,
                                             email=t.customer_email)
                   for i, t in enumerate(truths) if t.customer_email or t.accountnumber}
        kept = list(members.values())[: max(1, len(members) // 2)]  # half the customers are members
        await import_members(infra.pool, "acme", kept)
        await set_program(infra.pool, Program(tenant_id="acme", base_currency="USD", points_per_unit=Decimal(1),
                                              exchange_rates={"EUR": Decimal("0.9"), "GBP": Decimal("0.8")}))
        conn = ce_connection(running, state)
        creds, settings = json.dumps(conn.credentials), json.dumps(conn.settings)
        capsys.readouterr()

        with monkeypatch.context() as m:  # production policy: a non-Dataverse endpoint is refused at add
            m.delenv("FLASH_ALLOW_SANDBOX_ENDPOINTS")
            assert await flash("connections", "add", "--tenant", "acme", "--id", "ce-1", "--source", "dynamics-ce",
                               "--endpoint", "http://contoso.crm.dynamics.com", "--credentials", creds) == 2
            assert "only https is allowed" in capsys.readouterr().err
            assert await flash("connections", "add", "--tenant", "acme", "--id", "ce-1", "--source", "dynamics-ce",
                               "--endpoint", conn.endpoint, "--credentials", creds, "--settings", settings) == 2
            assert "an IP address is not a vendor endpoint" in capsys.readouterr().err
            assert await flash("connections", "add", "--tenant", "acme", "--id", "ce-1", "--source", "dynamics-ce",
                               "--endpoint", "https://contoso.crm.dynamics.com.evil.example", "--credentials",
                               creds) == 2
            assert "is not a dynamics-ce endpoint" in capsys.readouterr().err
        with monkeypatch.context() as m:  # a source whose connector is not in this build is refused at add
            m.setattr("controlplane.ops.connector_sources", lambda: ["dynamics-ce"])  # the CLI and API share ops
            m.setattr("connectorkit.registry.connector_sources", lambda: ["dynamics-ce"])
            assert await flash("connections", "add", "--tenant", "acme", "--id", "fo-1", "--source", "dynamics-fo",
                               "--endpoint", "https://contoso.operations.dynamics.com", "--credentials", creds) == 2
            assert "no connector for source 'dynamics-fo' is installed" in capsys.readouterr().err
        assert await flash("connections", "add", "--tenant", "acme", "--id", "ce-1", "--source", "dynamics-ce",
                           "--endpoint", conn.endpoint, "--credentials", creds, "--settings", settings) == 0
        assert await flash("connections", "go-live", "--tenant", "acme", "--id", "ce-1") == 2
        assert "verify it first" in capsys.readouterr().err

        assert await flash("connections", "verify", "--tenant", "acme", "--id", "ce-1") == 0
        out = capsys.readouterr().out
        assert "ok    application user" in out and "ok    change tracking" in out and "verified" in out

        db_before, topics_before = await db_snapshot(infra.pool), await end_offsets(infra)
        assert await flash("connections", "dry-run", "--tenant", "acme", "--id", "ce-1", "--limit", "50") == 0
        report = json.loads(capsys.readouterr().out)
        assert await db_snapshot(infra.pool) == db_before, "a dry-run changed the database"
        assert await end_offsets(infra) == topics_before, "a dry-run published something"
        assert report["records"]["salesorder"] == 30 and report["records"]["account"] > 0
        assert report["canonical"]["canonical.order.v1"] >= 30
        assert set(report["stages"].values()) == {"done"}
        rate = report["members"]["match_rate"]
        assert 0 < rate < 1, report["members"]
        assert report["members"]["unresolved_samples"], "customers left out of the members import do not match"
        assert report["points"]["would_earn"] > 0
        assert report["would_dead_letter"] == []

        assert await flash("connections", "go-live", "--tenant", "acme", "--id", "ce-1") == 0
        live = await PgConnectionStore(infra.pool, CredentialCipher.from_settings(infra.settings)).get("acme", "ce-1")
        assert live.state == "live"
        await run_connection(live, infra, asyncio.Event(), once=True)
        assert len({m["source_id"] for m in await raw_messages(infra, "salesorder")}) == 30


# ----------------------------------------------------------------------------- source dead letters


@pytest.mark.timeout(180)
async def test_source_dead_letter_is_refetched_on_replay_and_lands_once(
        infra: Infra, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    reset_budgets()
    _cli_env(monkeypatch, infra.settings, infra.bootstrap)
    await migrate(infra.pool, [KIT_MIGRATIONS, MIGRATIONS])
    await ensure_topics(infra.bootstrap, infra.settings)
    async with dataverse() as (state, running):
        org = state.orgs["contoso"]
        base = ce_connection(running, state)
        settings = {**base.settings, "entities": ["account", "contact", "product", "salesorder"],
                    "return_source": {"kind": "none"}}
        connector = CeConnector()
        sample = await connector.sample(connector.parse(Connection(**{**base.__dict__, "settings": settings})),
                                        infra.settings, limit=5000)
        largest = max(len(r.payload.encode()) for rows in sample.values() for r in rows)
        settings["max_record_bytes"] = largest + 50
        big = sorted(org.tables["salesorders"].rows)[0]
        update(org, "salesorders", big, {"name": "Q" * 300})  # Dataverse allows 300 characters in name
        store = PgConnectionStore(infra.pool, CredentialCipher.from_settings(infra.settings))
        conn = await store.upsert("acme", "ce-1", "dynamics-ce", base.endpoint, base.credentials, settings)
        preview = await dry_run(connector, conn, infra.settings, None, limit=50)
        assert [(d["source_id"], d["stage"]) for d in preview["would_dead_letter"]] == [(big, "connector")]
        assert "over settings.max_record_bytes" in preview["would_dead_letter"][0]["reason"]
        await run_connection(conn, infra, asyncio.Event(), once=True)

        letters = await infra.pool.fetch("SELECT * FROM dead_letters WHERE consumer = 'ce-poller'")
        assert len(letters) == 1
        letter = letters[0]
        assert letter["entity"] == "salesorder" and letter["error_class"] == "Poison" and letter["stage"] == "fetch"
        assert "over settings.max_record_bytes" in letter["error_message"] and "name" in letter["error_message"]
        headers = dict(json.loads(letter["headers"]))
        assert headers["x-flash-original-topic"] == infra.settings.topic("raw.dynamics-ce.salesorder.v1")
        assert json.loads(headers["x-flash-refetch"])["locator"]["key"] == big
        orders = await raw_messages(infra, "salesorder")
        assert big not in {m["source_id"] for m in orders} and len({m["source_id"] for m in orders}) == 29

        capsys.readouterr()
        assert await flash("dlq", "replay", "--consumer", "ce-poller") == 1  # not fixed yet: stays pending
        assert "still undeliverable" in capsys.readouterr().err
        assert sorted(m["event_id"] for m in await raw_messages(infra, "salesorder")) == sorted(
            m["event_id"] for m in orders), "a pending source letter is never re-sent as it is"

        update(org, "salesorders", big, {"name": "Fixed order"})
        assert await flash("dlq", "replay", "--consumer", "ce-poller") == 0
        assert "replayed 1 dead letter(s)" in capsys.readouterr().out
        assert await flash("dlq", "replay", "--consumer", "ce-poller") == 0
        assert "replayed 0 dead letter(s)" in capsys.readouterr().out
        landed = [m for m in await raw_messages(infra, "salesorder") if m["source_id"] == big]
        assert len(landed) == 1, "the replay publishes the fresh record once (and never the letter's descriptor)"
        assert json.loads(landed[0]["payload"])["name"] == "Fixed order"
        assert landed[0]["event_type"] == "raw.record"

        # Change tracking then delivers the same version again: the same event id, so it lands once downstream.
        await run_connection(await store.get("acme", "ce-1"), infra, asyncio.Event(), once=True)
        ids = {m["event_id"] for m in await raw_messages(infra, "salesorder") if m["source_id"] == big}
        assert ids == {landed[0]["event_id"]}


# ---------------------------------------------------------------------------- PostgreSQL outage


class CuttableProxy:
    """A TCP proxy in front of PostgreSQL that can be cut (every connection dropped, new ones refused)."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.server: asyncio.Server | None = None
        self.port = 0
        self.links: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
        for w in list(self.links):
            w.transport.abort()
        self.links.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self.links |= {writer, up_w}

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            w.transport.abort()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))


@pytest.mark.timeout(180)
async def test_postgres_outage_mid_poll_is_waited_out_and_nothing_is_lost(infra: Infra) -> None:
    reset_budgets()
    await migrate(infra.pool, [KIT_MIGRATIONS, MIGRATIONS])
    await ensure_topics(infra.bootstrap, infra.settings)
    dsn = infra.database_url
    parts = urllib.parse.urlsplit(dsn)
    proxy = CuttableProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    await proxy.start()
    netloc = parts.netloc.rsplit("@", 1)
    proxied = urllib.parse.urlunsplit(parts._replace(
        netloc=(netloc[0] + "@" if len(netloc) == 2 else "") + f"127.0.0.1:{proxy.port}"))
    pool = await create_pool(proxied, schema=infra.settings.db_schema, max_size=4)
    outage = Infra(infra.settings, infra.bootstrap, pool, infra.publisher, proxied)
    try:
        async with dataverse(orders=200) as (state, running):
            store = PgConnectionStore(infra.pool, CredentialCipher.from_settings(infra.settings))
            base = ce_connection(running, state)
            conn = await store.upsert("acme", "ce-1", "dynamics-ce", base.endpoint, base.credentials, base.settings)
            poll = asyncio.create_task(run_connection(conn, outage, asyncio.Event(), once=True))
            for _ in range(400):  # wait until the initial load is under way (pages checkpointed)
                if await infra.pool.fetchval("SELECT count(*) FROM ce_known_keys") >= 30:
                    break
                await asyncio.sleep(0.02)
            await proxy.cut()
            await asyncio.sleep(0.5)  # a statement the server received before the cut still completes there
            cut_at = await infra.pool.fetchval("SELECT count(*) FROM ce_known_keys")
            await asyncio.sleep(1.5)
            assert not poll.done(), "the poller must wait out our database outage, not give up"
            assert await infra.pool.fetchval("SELECT count(*) FROM ce_known_keys") == cut_at
            await proxy.start()  # the database is back on the same port
            await asyncio.wait_for(poll, 120)
            conn_row = await store.get("acme", "ce-1")
            assert conn_row.state == "draft", "an outage of our own database is not the connection's fault"
    finally:
        await pool.close()
    orders = await raw_messages(infra, "salesorder")
    assert len({m["source_id"] for m in orders}) == 200, "every order published despite the outage"
    phases = {json.loads(r["cursor"])["phase"] for r in await infra.pool.fetch("SELECT cursor FROM cursors")}
    assert phases == {"delta"}


# --------------------------------------------------------------------------- token never redirected


@pytest.mark.timeout(60)
async def test_the_token_request_is_never_redirected_with_the_secret() -> None:
    """An authority whose token endpoint answers 307 elsewhere: MSAL (on the connector's session) does not
    follow it, so the secret never reaches the other host, and verify says what to check."""
    from aiohttp import web

    stolen: list[str] = []
    thief = web.Application()

    async def steal(request: web.Request) -> web.Response:
        stolen.append(await request.text())
        return web.json_response({"access_token": "x", "expires_in": 3600, "token_type": "Bearer"})

    thief.router.add_post("/steal", steal)
    async with serve(thief) as other:
        idp = web.Application()

        async def oidc(request: web.Request) -> web.Response:
            base = f"{request.url.origin()}/{request.match_info['tenant']}"
            return web.json_response({"token_endpoint": f"{base}/oauth2/v2.0/token", "issuer": f"{base}/v2.0",
                                      "authorization_endpoint": f"{base}/oauth2/v2.0/authorize"})

        async def token(request: web.Request) -> web.Response:
            raise web.HTTPTemporaryRedirect(f"{other.base_url}/steal")

        async def org(request: web.Request) -> web.Response:
            return web.json_response({"error": {"code": "0x8004a101", "message": "Bearer token is missing."}},
                                     status=401)

        idp.router.add_get("/{tenant}/v2.0/.well-known/openid-configuration", oidc)
        idp.router.add_post("/{tenant}/oauth2/v2.0/token", token)
        idp.router.add_get("/orgs/x/{tail:.*}", org)
        async with serve(idp, tls=other.tls) as running:
            conn = Connection("acme", "ce-1", "dynamics-ce", f"{running.base_url}/orgs/x",
                              {"tenant_id": "t1", "client_id": "app", "client_secret": "top-secret-value"},
                              {"authority": f"{running.base_url}/t1", "ca_bundle": str(running.tls.ca_path)})
            lines = await _verify(conn)
    assert lines[0].startswith("ok    host")
    assert lines[-1].startswith("FAIL  auth:") and "never redirected" in lines[-1], lines
    assert stolen == [], "the client secret went to the redirect target"


@pytest.mark.timeout(60)
async def test_a_source_letter_from_before_the_kit_is_never_resent_as_is(
        infra: Infra, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The CE poller used to write its letters by hand (descriptor body, ``x-flash-source-url``); replaying one
    put the descriptor on the raw topic. Now it stays pending and the command says what to do."""
    _cli_env(monkeypatch, infra.settings, infra.bootstrap)
    await ensure_topics(infra.bootstrap, infra.settings)
    topic = infra.settings.topic("raw.dynamics-ce.salesorder.v1")
    body = json.dumps({"tenant_id": "acme", "connection_id": "ce-1", "entity": "salesorder", "source_id": "?",
                       "url": "https://x/api/data/v9.2/salesorders", "body": "{}"})
    headers = json.dumps([["x-flash-consumer", "ce-poller"], ["x-flash-stage", "fetch"],
                          ["x-flash-original-topic", topic], ["x-flash-source-url", "https://x/api"]])
    await infra.pool.execute(
        """INSERT INTO dead_letters (consumer, tenant_id, event_id, entity, error_class, error_message, stage,
               source_topic, source_partition, source_offset, attempts, first_failed_at, last_failed_at,
               dlq_topic, key, value, headers)
           VALUES ('ce-poller', 'acme', NULL, 'salesorder', 'Poison', 'row without its key', 'fetch', $1, NULL,
                   NULL, 1, now(), now(), 'dlq.ce-poller.v1', 'acme:?', $2, $3::jsonb)""",
        topic, body.encode(), headers)
    before = await end_offsets(infra)
    capsys.readouterr()
    assert await flash("dlq", "replay", "--consumer", "ce-poller") == 1
    assert "written before the connector kit" in capsys.readouterr().err
    assert await end_offsets(infra) == before
    assert await infra.pool.fetchval("SELECT count(*) FROM dead_letters WHERE replayed_at IS NULL") == 1
