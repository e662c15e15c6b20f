"""Chaos: the Dataverse sandbox's data flows through every service as a separate process while services
are SIGKILLed at random moments, PostgreSQL and the broker are cut away (through TCP proxies), the
vendor answers 429 storms and 5xx bursts, tokens expire, the vendor redirects token and data requests
to a foreign host and hands out nextLinks pointing there, the sandbox's data changes, and hostile records
are injected onto the raw topics. Then the invariant checker compares the ledger with a reference
computed from the sandbox's final state: nothing missing, nothing awarded twice, every hostile record
dead-lettered with its reason, and no credential seen by the foreign host (issue 15). A connection the
poller marked failed after a foreign redirect is put back live, as an operator would after checking it.

The short variant runs by default; the long one is opt-in: ``pytest -m slow tests/e2e/test_chaos.py``.
Each prints a summary line (kills, outages, faults, hostile records, orders checked, discrepancies).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from aiohttp import web
from test_ce_pipeline import TENANTS, Sandbox, later_changes, ledger, reference, setup

from canonical.envelope import make_event_id
from canonical.events import RawRecord, encode
from canonical.topics import raw
from ce_poller.limiter import reset_budgets
from sandbox.dataverse import DataverseState, build_app, seed_org
from sandbox.server import serve
from servicekit.embedded import EmbeddedKafka, free_port
from servicekit.errors import InfrastructureUnavailable
from servicekit.kafka import OutMessage
from servicekit.runtime import Infra, open_infra
from servicekit.settings import FlashSettings
from servicekit.testing.chaos import ChaosProxy, ServiceProcess
from servicekit.testing.infra import service_env, unique_name

SERVICES = ("ce_poller", "normalizer", "resolver", "points")
MAX_MESSAGE_BYTES = 65_536


@dataclass
class Tally:
    kills: int = 0
    pg_outages: int = 0
    broker_outages: int = 0
    vendor_faults: int = 0
    token_expiries: int = 0
    changes: int = 0
    hostile: dict[str, str] = field(default_factory=dict)
    """marker -> words its dead letter's reason must contain"""
    restarts_after_exit: int = 0
    foreign_redirects: int = 0
    operator_go_lives: int = 0


class ForeignHost:
    """A plain-http server on loopback standing for another host: records whatever reaches it."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str], bytes]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        async def record(request: web.Request) -> web.Response:
            self.seen.append((request.path_qs, dict(request.headers), await request.read()))
            return web.json_response({"value": []})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", record)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def credentials_seen(self, secrets: list[str]) -> list[str]:
        leaks = []
        for path, headers, body in self.seen:
            if any(k.lower() == "authorization" for k in headers):
                leaks.append(f"Authorization header on {path}")
            for secret in secrets:
                if secret and (secret in path or secret.encode() in body):
                    leaks.append(f"a client secret on {path}")
        return leaks


def foreign_faults(foreign: ForeignHost, *, next_links: bool) -> tuple[Any, dict[str, bool]]:
    """Middleware for the sandbox: while ``mode`` is on, token and data requests are answered with a 307 to
    the foreign host, and (with ``next_links``) collection pages carry an @odata.nextLink to it.

    The nextLink fault runs in the long variant only: it finds a known defect of the connector kit's host
    pin (a nextLink to another port of the pinned host is followed with the token; see
    tests/unit/test_host_pin_origin.py), and the short variant runs in everyone's default suite."""
    mode = {"on": False}

    @web.middleware
    async def mw(request: web.Request, handler: Any) -> web.StreamResponse:
        if mode["on"] and ("oauth2" in request.path or "/api/data/" in request.path):
            if random.random() < 0.5:
                return web.Response(status=307, headers={"Location": f"{foreign.url}/steal{request.path_qs}"})
        resp = await handler(request)
        if (next_links and mode["on"] and isinstance(resp, web.Response) and resp.body
                and b"@odata.nextLink" in bytes(resp.body)):
            page = json.loads(bytes(resp.body))
            page["@odata.nextLink"] = f"{foreign.url}/steal/next"
            return web.json_response(page, status=resp.status)
        return resp

    return mw, mode


def _proxied(dsn: str, port: int) -> str:
    parts = urlsplit(dsn)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


def _order_payload(**changes: Any) -> dict[str, Any]:
    """A salesorder as Dataverse sends it (the fields the mapper reads), with ``changes``."""
    base = {"salesorderid": "x", "ordernumber": "HOSTILE", "statecode": 3, "statuscode": 100001,
            "_customerid_value": "00000000-0000-0000-0000-00000000dead",
            "_customerid_value@Microsoft.Dynamics.CRM.lookuplogicalname": "contact",
            "_transactioncurrencyid_value@flash.isocurrencycode": "USD", "exchangerate": 1.0,
            "totalamount": 100.0, "totaltax": 0.0, "freightamount": 0.0, "versionnumber": 1}
    return {**base, **changes}


def _raw_msg(settings: FlashSettings, tenant: str, source_id: str, payload: str, *, connection: str | None = None,
             key: bytes | None = None, event_id: str | None = None) -> OutMessage:
    rec = RawRecord(tenant_id=tenant, connection_id=connection or f"ce-{tenant}", source="dynamics-ce",
                    entity="salesorder", source_id=source_id, source_version="1", payload=payload)
    body = json.loads(encode(rec))
    if event_id:
        body["event_id"] = event_id
    return OutMessage(settings.topic(raw("dynamics-ce", "salesorder")), json.dumps(body).encode(), key or rec.key)


def hostile_records(settings: FlashSettings, state: DataverseState, tally: Tally) -> list[OutMessage]:
    """Records no service may lose a batch over, each with a marker its dead letter must carry."""
    topic = settings.topic(raw("dynamics-ce", "salesorder"))
    so = state.orgs["contoso"].tables["salesorders"]
    victim = so.sorted_keys()[0]
    victim_eid = make_event_id("raw.record", "acme", "ce-acme", "dynamics-ce", "salesorder", victim,
                               str(so.rows[victim][so.pos["versionnumber"]]))
    msgs = [
        OutMessage(topic, b'{"event_type":"raw.record","tenant_id":"acme","source_id":"HOSTILE-DEEP","x":'
                   + b"[" * 3000 + b"]" * 3000 + b"}", b"acme:HOSTILE-DEEP"),
        OutMessage(topic, json.dumps({"event_type": "raw.record", "tenant_id": "acme", "source_id": "HOSTILE-BIG",
                                      "pad": "x" * (MAX_MESSAGE_BYTES + 10)}).encode(), b"acme:HOSTILE-BIG"),
        _raw_msg(settings, "acme", "HOSTILE-KEY", "{}", key=b"globex:HOSTILE-KEY"),
        _raw_msg(settings, "acme", "HOSTILE-FORGED", "{}", event_id=victim_eid),
        _raw_msg(settings, "acme", "HOSTILE-GHOST", "{}", connection="ghost"),
        _raw_msg(settings, "acme", "HOSTILE-HUGE", json.dumps(_order_payload(
            salesorderid="HOSTILE-HUGE", totalamount=999999999999999999))),
        _raw_msg(settings, "acme", "HOSTILE-RATE", json.dumps(_order_payload(
            salesorderid="HOSTILE-RATE", exchangerate=0))),
        _raw_msg(settings, "acme", "HOSTILE-BIDI", json.dumps(_order_payload(
            salesorderid="HOSTILE-BIDI", emailaddress="evil\u202e@example.com"))),
    ]
    tally.hostile.update({
        "HOSTILE-DEEP": "deeper", "HOSTILE-BIG": "larger", "HOSTILE-KEY": "tenant", "HOSTILE-FORGED": "",
        "HOSTILE-GHOST": "no connection", "HOSTILE-HUGE": "amount", "HOSTILE-RATE": "exchange",
        "HOSTILE-BIDI": "bidi",
    })
    return msgs


async def _send(infra: Infra, msgs: list[OutMessage]) -> None:
    for _ in range(60):
        try:
            await infra.publisher.send_all(msgs)
            return
        except InfrastructureUnavailable:
            await asyncio.sleep(0.5)
    raise AssertionError("could not inject the hostile records")


async def chaos(database_url: str, tmp_path: Path, *, orders: int, seconds: float, seed: int,
                next_links: bool = False) -> Tally:
    rng = random.Random(seed)
    reset_budgets()
    tally = Tally()
    schema = unique_name("chaos")
    kafka_port = free_port()
    kproxy = ChaosProxy(kafka_port)
    await kproxy.start()
    broker = EmbeddedKafka(kafka_port, advertised_port=kproxy.port)
    await broker.start()
    pg_port = urlsplit(database_url).port or 5432
    pproxy = ChaosProxy(pg_port)
    await pproxy.start()
    settings = FlashSettings(kafka_bootstrap=f"127.0.0.1:{kproxy.port}", database_url=database_url, db_schema=schema,
                             topic_prefix=f"{schema}.", state_dir=tmp_path, max_message_bytes=MAX_MESSAGE_BYTES)
    state = DataverseState()
    for org_name, org_seed in TENANTS.values():
        state.add_org(org_name)
        seed_org(state, org_name, customers=60, products=20, orders=orders, seed=org_seed)
    procs: list[ServiceProcess] = []
    foreign = ForeignHost()
    await foreign.start()
    app = build_app(state)
    middleware, redirecting = foreign_faults(foreign, next_links=next_links)
    app.middlewares.append(middleware)
    try:
        async with serve(app) as running, open_infra(settings) as infra:
            sb = Sandbox(state, running)
            await setup(infra, sb, page_size=100)
            env = service_env(settings.kafka_bootstrap or "", _proxied(database_url, pproxy.port), settings,
                              FLASH_BATCH_MAX_RECORDS="100", FLASH_BACKOFF_BASE_S="0.05", FLASH_BACKOFF_MAX_S="1",
                              FLASH_MAX_ATTEMPTS="3", FLASH_MAX_MESSAGE_BYTES=str(MAX_MESSAGE_BYTES))
            procs = [ServiceProcess(m, env, log_path=str(tmp_path / f"{m}.log")) for m in SERVICES]
            await _send(infra, hostile_records(settings, state, tally))
            for p in procs:
                p.start()
            deadline = time.monotonic() + seconds
            changed = False
            first = ["kill", "pg", "broker", "vendor", "token", "change", "foreign"]  # every fault at least once
            rng.shuffle(first)
            while time.monotonic() < deadline or first:
                await asyncio.sleep(rng.uniform(0.5, 2.0))
                for p in procs:  # a service that stopped on its own (e.g. no database at start) is restarted
                    if not p.alive():
                        tally.restarts_after_exit += 1
                        p.start()
                action = first.pop() if first else rng.choice(["kill", "kill", "kill", "pg", "broker", "vendor",
                                                                   "token", "foreign"])
                if action == "kill":
                    victim = rng.choice(procs)
                    victim.kill()
                    tally.kills += 1
                    await asyncio.sleep(rng.uniform(0.2, 1.5))
                    victim.start()
                elif action == "pg":
                    tally.pg_outages += 1
                    await pproxy.outage(rng.uniform(1.0, 4.0))
                elif action == "broker":
                    tally.broker_outages += 1
                    await kproxy.outage(rng.uniform(1.0, 4.0))
                elif action == "vendor":
                    tally.vendor_faults += 1
                    state.faults.storm(0.2, rng.choice([429, 500, 503]), match="/api/data/", retry_after=1)
                    await asyncio.sleep(rng.uniform(1.0, 3.0))
                    state.faults.clear()
                elif action == "token":
                    tally.token_expiries += 1
                    state.expire_tokens()
                elif action == "foreign":
                    tally.foreign_redirects += 1
                    redirecting["on"] = True
                    await asyncio.sleep(rng.uniform(1.0, 3.0))
                    redirecting["on"] = False
                    tally.operator_go_lives += await _go_live_again(infra)
                elif action == "change":
                    later_changes(state)
                    tally.changes += 1
                    changed = True
            state.faults.clear()
            redirecting["on"] = False
            pproxy.restore()
            kproxy.restore()
            tally.operator_go_lives += await _go_live_again(infra)
            if not changed:
                later_changes(state)
                tally.changes += 1
            for p in procs:
                if not p.alive():
                    tally.restarts_after_exit += 1
                    p.start()
            secrets = [state.credentials(org)[0].client_secret for org, _ in TENANTS.values()]
            try:
                await check(infra, sb, tally, settle_s=180, operator=lambda: _go_live_again(infra))
            finally:
                leaks = foreign.credentials_seen(secrets)
                print(f"CHAOS: foreign host received {len(foreign.seen)} requests, credentials among them: "
                      f"{len(leaks)}")
            assert leaks == [], leaks[:5]
    finally:
        for p in procs:
            p.stop()
        await pproxy.stop()
        await kproxy.stop()
        await broker.stop()
        await foreign.stop()
        await _drop_schema(database_url, schema)
    return tally


async def _go_live_again(infra: Infra) -> int:
    """What an operator does after checking a connection the poller stopped (flash connections go-live)."""
    status = await infra.pool.execute("UPDATE connections SET state = 'live', last_error = NULL WHERE state = 'failed'")
    return int(status.split()[-1])


async def check(infra: Infra, sb: Sandbox, tally: Tally, *, settle_s: float, operator: Any = None) -> None:
    """The invariants, once the pipe settled: the ledger equals the reference, no entry twice, every hostile
    record dead-lettered with its reason."""
    deadline = time.monotonic() + settle_s
    want = reference(sb.state)
    got: dict[tuple[str, str], int] = {}
    while time.monotonic() < deadline:
        got = await ledger(infra)
        want = reference(sb.state)
        if got == want:
            break
        if operator is not None:
            tally.operator_go_lives += await operator()
        await asyncio.sleep(1.0)
    diff = {k: (got.get(k), want.get(k)) for k in set(got) | set(want) if got.get(k) != want.get(k)}
    doubles = await infra.pool.fetchval(
        "SELECT count(*) FROM (SELECT event_id FROM ledger GROUP BY tenant_id, event_id HAVING count(*) > 1) d")
    letters = await infra.pool.fetch("SELECT value, error_class, error_message FROM dead_letters")
    unreasoned = []
    for marker, words in tally.hostile.items():
        found = [r for r in letters if marker.encode() in bytes(r["value"])]
        if not found or not all(r["error_message"] and words in r["error_message"] for r in found[:1]):
            unreasoned.append((marker, [(r["error_class"], r["error_message"][:120]) for r in found]))
    print(f"\nCHAOS: kills={tally.kills} pg_outages={tally.pg_outages} broker_outages={tally.broker_outages} "
          f"vendor_fault_bursts={tally.vendor_faults} token_expiries={tally.token_expiries} "
          f"sandbox_changes={tally.changes} hostile_records={len(tally.hostile)} "
          f"restarts_after_exit={tally.restarts_after_exit} foreign_redirect_bursts={tally.foreign_redirects} "
          f"operator_go_lives={tally.operator_go_lives} orders_checked={len(want)} "
          f"discrepancies={len(diff)} doubled_entries={doubles} hostile_without_reason={len(unreasoned)}")
    assert diff == {}, f"{len(diff)} orders differ from the reference, e.g. {list(diff.items())[:5]}"
    assert doubles == 0
    assert unreasoned == [], unreasoned
    assert len(want) > 10


async def _drop_schema(database_url: str, schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.mark.timeout(420)
async def test_chaos_short(database_url: str, tmp_path: Path) -> None:
    await chaos(database_url, tmp_path, orders=120, seconds=25, seed=15)


@pytest.mark.slow
@pytest.mark.timeout(1800)
async def test_chaos_long(database_url: str, tmp_path: Path) -> None:
    await chaos(database_url, tmp_path, orders=1500, seconds=600, seed=1515, next_links=True)
