"""Salesforce connector benchmark: CDC mutation -> ledger latency, and a Bulk API 2.0 backfill.

    .venv/bin/python bench/sf_cdc.py [--rate 200] [--seconds 15] [--orders 100000]

The sandbox runs in a child process (its own CPU and memory); the connectors (CDC listener, poller) and the
pipe (normalizer, resolver, points) run in this process (``--processes``: one process each) on the embedded
broker and PostgreSQL (``FLASH_DATABASE_URL`` or the local server).

1. Latency: ``--rate`` changes/s for ``--seconds``; each change is one Salesforce transaction that places and
   fulfils an order (Order + lines + status). Latency = the ledger's earn row ``created_at`` minus the moment
   the mutation was sent to the sandbox. Prints p50 / p99 / max (target p99 < 1 s).
2. Backfill: ``--orders`` Order rows read by the poller through Bulk API 2.0 (results streamed as CSV,
   ``maxRecords`` chunks, published to ``raw.salesforce.Order`` with broker acks and cursor saves). Prints
   records/s and this process's peak RSS growth during the backfill (bounded memory: it must not grow with
   ``--orders``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import httpx

from canonical.events import MemberData
from canonical.topics import CANONICAL_ORDER, RESOLVED_ORDER, raw
from servicekit.connections import Connection, CredentialCipher, PgConnectionStore, PgCursorStore
from servicekit.db import migrate
from servicekit.kafka import ensure_topics
from servicekit.logging import configure_logging
from servicekit.runtime import Infra, open_infra, run_loop, run_services
from servicekit.settings import FlashSettings
from servicekit.testing.infra import service_env

# bench/points.py would shadow the points package (the script's directory comes first on sys.path)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


# ------------------------------------------------------------------------------------------ sandbox child
def _sandbox_child(conn: Any, orders: int) -> None:
    asyncio.run(_sandbox_main(conn, orders))


async def _sandbox_main(conn: Any, orders: int) -> None:
    from sandbox.salesforce import SalesforceState, build_app, seed_org
    from sandbox.server import serve

    state = SalesforceState(cometd_timeout_s=5.0)
    bench = state.add_org("bench")
    seed_org(state, bench, orders=20, accounts=40, person_accounts=40, products=30, seed=3)
    bulk = state.add_org("bulk")
    seed_org(state, bulk, orders=0, accounts=20, person_accounts=20, products=10, seed=4)
    accounts = [a["Id"] for a in bulk.records("Account")]
    now = bulk.clock.now_ms() - 86_400_000
    for i in range(orders):
        ts = now + i // 3  # several rows share each millisecond
        bulk.insert_raw("Order", {
            "Id": bulk.ids.next("801"), "OrderNumber": f"{i + 1:08d}", "AccountId": accounts[i % len(accounts)],
            "Status": "Activated", "StatusCode": "Activated", "EffectiveDate": "2026-01-01", "ActivatedDate": ts,
            "TotalAmount": float(10 + i % 500), "CurrencyIsoCode": "EUR", "IsReductionOrder": False,
            "CreatedDate": ts, "LastModifiedDate": ts, "SystemModstamp": ts,
        })
    bulk.rebuild_indexes()
    async with serve(build_app(state)) as sb:
        conn.send({
            "base_url": sb.base_url, "ca": str(sb.tls.ca_path),
            "orgs": {o.name: (o.client_id, o.client_secret) for o in (bench, bulk)},
            "accounts": [(a["Id"], a["AccountNumber"]) for a in bench.records("Account")],
            "products": [p["Id"] for p in bench.records("Product2") if p["IsActive"]],
        })
        while True:
            await asyncio.sleep(3600)


# ------------------------------------------------------------------------------------------ load driver child
def _driver_child(conn: Any, info: dict[str, Any]) -> None:
    asyncio.run(_driver_main(conn, info))


async def paced(n: int, rate: float, one: Callable[[int], Coroutine[Any, Any, None]], start: float) -> float:
    """Start ``one(i)`` for i in 0..n-1 at ``rate`` per second from ``start`` (perf_counter), without
    waiting for each to finish; returns the seconds from ``start`` until all have finished."""
    tasks: list[asyncio.Task[None]] = []
    for i in range(n):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    return time.perf_counter() - start


async def _driver_main(conn: Any, info: dict[str, Any]) -> None:
    """Plays the Salesforce users: ``n`` order mutations at ``rate``/s, each timed from the moment its
    request leaves. Its own process, so generating the load never competes with the connectors' event loop
    (the services' CPU on a small host is what this benchmark measures)."""
    import ssl

    import aiohttp

    rate, n = await asyncio.get_running_loop().run_in_executor(None, conn.recv)
    accounts = [a for a, _ in info["accounts"]]
    products = info["products"]
    url = f"{info['base_url']}/_sandbox/orgs/bench/orders"
    ctx = ssl.create_default_context(cafile=info["ca"])
    sent: dict[str, float] = {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=64)) as http:

        async def one(i: int) -> None:
            t0 = time.time()
            async with http.post(url, json={
                    "accountId": accounts[i % len(accounts)], "status": "Fulfilled",
                    "lines": [{"productId": products[i % len(products)], "quantity": 1 + i % 3}]}) as resp:
                sent[(await resp.json())["id"]] = t0

        elapsed = await paced(n, rate, one, time.perf_counter())
    conn.send((sent, elapsed))


# ------------------------------------------------------------------------------------------ helpers
def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class RssSampler:
    def __init__(self) -> None:
        self.peak = rss_mb()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, rss_mb())
            await asyncio.sleep(0.05)

    def __enter__(self) -> RssSampler:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task:
            self._task.cancel()


def host_jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole host, to tell a run disturbed by other work on the machine."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


async def add_conn(infra: Infra, tenant: str, cid: str, info: dict[str, Any], org: str,
                   settings: dict[str, Any]) -> Connection:
    store = PgConnectionStore(infra.pool, CredentialCipher.from_settings(infra.settings))
    client_id, secret = info["orgs"][org]
    await store.upsert(tenant, cid, "salesforce", info["base_url"], {"client_id": client_id, "client_secret": secret},
                       {"ca_bundle": info["ca"], **settings})
    await store.set_state(tenant, cid, "live")
    return await store.get(tenant, cid)


async def topic_times(infra: Infra, topic: str, ids: set[str], *,
                      commit_time: bool = False) -> dict[str, list[float]]:
    """Broker CreateTimes of the messages keyed ``tenant:<order id>`` on ``topic``, per order id (with
    ``commit_time``: the ``SystemModstamp`` of the raw records instead, when the sandbox committed them)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    topic = infra.settings.topic(topic)
    consumer = AIOKafkaConsumer(bootstrap_servers=infra.bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    out: dict[str, list[float]] = {}
    try:
        await consumer.topics()
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or set()]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        while any([await consumer.position(tp) < ends[tp] for tp in tps]):
            for msgs in (await consumer.getmany(*tps, timeout_ms=500, max_records=5000)).values():
                for m in msgs:
                    key = (m.key or b"").decode().split(":", 1)[-1]
                    if key in ids and not commit_time:
                        out.setdefault(key, []).append(m.timestamp / 1000)
                    elif key in ids:
                        rec = json.loads(json.loads(m.value or b"{}")["payload"])
                        stamp = dt.datetime.fromisoformat(str(rec["SystemModstamp"]).replace("+0000", "+00:00"))
                        out.setdefault(key, []).append(stamp.timestamp())
    finally:
        await consumer.stop()
    return out


def cdc_stage_snapshot() -> dict[str, list[tuple[float, float]]]:
    """Cumulative bucket counts of the listener's ``flash_cdc_stage_seconds`` histogram, per stage."""
    from prometheus_client import REGISTRY

    out: dict[str, list[tuple[float, float]]] = {}
    for metric in REGISTRY.collect():
        if metric.name != "flash_cdc_stage_seconds":
            continue
        for sample in metric.samples:
            if sample.name.endswith("_bucket"):
                out.setdefault(sample.labels["stage"], []).append((float(sample.labels["le"]), sample.value))
            elif sample.name.endswith("_sum"):
                out.setdefault("sum:" + sample.labels["stage"], []).append((0.0, sample.value))
    return out


def cdc_stage_report(before: dict[str, list[tuple[float, float]]], after: dict[str, list[tuple[float, float]]]) -> str:
    """Count, mean and bucket-resolution p50 / p99 of each listener stage between two snapshots."""
    lines = []
    for stage in ("delivery", "wait", "fetch", "publish", "save"):
        now = after.get(stage)
        if not now:
            continue
        then = dict(before.get(stage, []))
        buckets = [(le, n - then.get(le, 0.0)) for le, n in now]
        total = buckets[-1][1]
        if not total:
            continue
        spent = after["sum:" + stage][0][1] - (before.get("sum:" + stage) or [(0.0, 0.0)])[0][1]

        def q(p: float, buckets: list[tuple[float, float]] = buckets, total: float = total) -> str:
            le = next(le for le, n in buckets if n >= p * total)
            return f"<= {le * 1000:.0f} ms" if le != float("inf") else "> 10 s"

        lines.append(f"  {stage:<8} n {total:6.0f}  mean {spent / total * 1000:6.1f} ms  p50 {q(0.5):>10}  "
                     f"p99 {q(0.99):>10}")
    return "\n".join(lines)


def stage_report(sent: dict[str, float], stamps: dict[str, dict[str, float]], done: dict[str, float]) -> str:
    """p50 / p99 of each stage's own share: for every order, the last message of the stage that came no
    later than the ledger entry, minus the same for the stage before."""
    names = list(stamps)
    lines = []
    for i, name in enumerate([*names, "ledger"]):
        prev = names[i - 1] if i else "sent"
        d = []
        for o, t_ledger in done.items():
            t = t_ledger if name == "ledger" else stamps[name].get(o)
            t_prev = sent[o] if prev == "sent" else stamps[prev].get(o)
            if t is not None and t_prev is not None:
                d.append(t - t_prev)
        if d:
            lines.append(f"  {prev:>9} -> {name:<9} p50 {pct(d, 50) * 1000:6.0f} ms  p99 {pct(d, 99) * 1000:6.0f} ms"
                         f"  max {max(d) * 1000:6.0f} ms")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ 1. latency
SERVICE_MODULES = ("normalizer", "resolver", "points", "sf_poller", "cdc_listener")


async def drive_inline(info: dict[str, Any], rate: float, n: int) -> tuple[dict[str, float], float]:
    """The load generated on this process's own event loop (``--inline-driver``; how it was measured
    before): the POSTs compete with the services for the loop and the httpx pool queues the requests."""
    ctl = httpx.AsyncClient(base_url=f"{info['base_url']}/_sandbox/orgs/bench", verify=info["ca"], timeout=30,
                            limits=httpx.Limits(max_connections=16, max_keepalive_connections=16))
    accounts = [a for a, _ in info["accounts"]]
    products = info["products"]
    sent: dict[str, float] = {}
    async with ctl:
        start = time.perf_counter()
        wall0 = time.time() - start

        async def one(i: int) -> None:
            t0 = time.perf_counter()
            resp = await ctl.post("/orders", json={
                "accountId": accounts[i % len(accounts)], "status": "Fulfilled",
                "lines": [{"productId": products[i % len(products)], "quantity": 1 + i % 3}]})
            sent[resp.json()["id"]] = wall0 + t0

        return sent, await paced(n, rate, one, start)


async def latency(infra: Infra, info: dict[str, Any], rate: float, seconds: float, *,
                  processes: bool = True, driver: Any = None) -> dict[str, Any]:
    from cdc_listener.app import run_listener
    from normalizer.app import SERVICE as NORMALIZER
    from points.app import MIGRATIONS as POINTS_MIGRATIONS
    from points.app import build_service
    from points.cli import set_program
    from points.rules import Program
    from resolver.app import MIGRATIONS as RESOLVER_MIGRATIONS
    from resolver.app import SERVICE as RESOLVER
    from resolver.cli import import_members
    from sf_poller.app import supervise

    await migrate(infra.pool, [RESOLVER_MIGRATIONS, POINTS_MIGRATIONS])
    tenant = "bench"
    await set_program(infra.pool, Program.model_validate({
        "tenant_id": tenant, "base_currency": "EUR", "points_per_unit": "1", "basis": "total",
        "exchange_rates": {"USD": "1.08", "GBP": "0.86", "CHF": "0.95"}}))
    await import_members(infra.pool, tenant,
                         [MemberData(member_id=f"m-{n}", external_id=n) for _, n in info["accounts"]])
    await add_conn(infra, tenant, "sf-bench", info, "bench", {
        "objects": ["Account", "Order", "OrderItem"], "status_map": {"Fulfilled": "awardable"},
        "reconcile_interval_s": 3600})
    stop = asyncio.Event()
    procs: list[subprocess.Popen[bytes]] = []
    pipe: asyncio.Task[int] | None = None
    connectors: list[asyncio.Task[None]] = []
    if processes:  # one process per service, as deployed
        env = service_env(infra.bootstrap, infra.database_url, infra.settings)
        procs = [subprocess.Popen([sys.executable, "-m", m], env=env) for m in SERVICE_MODULES]
    else:
        pipe = asyncio.create_task(run_services([NORMALIZER, RESOLVER, build_service()], infra.settings, stop=stop))
        connectors = [asyncio.create_task(supervise(infra, stop, relist_s=1.0)),
                      asyncio.create_task(supervise(infra, stop, run_listener, relist_s=1.0))]
    try:
        seeded = 0
        for _ in range(600):  # backfill of the seed (and consumer groups joining) before the clock starts
            seeded = int(await infra.pool.fetchval("SELECT count(DISTINCT order_source_id) FROM ledger") or 0)
            if seeded:
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(2.0)
        n = int(rate * seconds)
        listener_before = cdc_stage_snapshot()
        cpu0, wall_start, host0 = time.process_time(), time.perf_counter(), host_jiffies()
        if driver is not None:
            driver.send((rate, n))
            sent, send_elapsed = await asyncio.get_running_loop().run_in_executor(None, driver.recv)
        else:
            sent, send_elapsed = await drive_inline(info, rate, n)
        cpu = (time.process_time() - cpu0) / (time.perf_counter() - wall_start)
        host1 = host_jiffies()
        host = (host1[0] - host0[0]) / max(1, host1[1] - host0[1])
        deadline = time.monotonic() + 60
        done: dict[str, float] = {}
        while time.monotonic() < deadline and len(done) < len(sent):
            rows = await infra.pool.fetch(
                "SELECT order_source_id, min(created_at) AS t FROM ledger WHERE kind = 'earn' "
                "AND order_source_id = ANY($1::text[]) GROUP BY 1", list(sent))
            done = {r["order_source_id"]: r["t"].timestamp() for r in rows}
            await asyncio.sleep(0.5)
        lat = [done[o] - sent[o] for o in done]
        listener = cdc_stage_report(listener_before, cdc_stage_snapshot())
        stamps: dict[str, dict[str, float]] = {}
        for name, topic in (("committed", None), ("raw", raw("salesforce", "Order")), ("canonical", CANONICAL_ORDER),
                            ("resolved", RESOLVED_ORDER)):
            if topic is None:  # the sandbox's commit time: SystemModstamp of the order's raw records
                got = await topic_times(infra, raw("salesforce", "Order"), set(sent), commit_time=True)
            else:
                got = await topic_times(infra, topic, set(sent))
            # the last message of the stage that came no later than the ledger entry
            stamps[name] = {o: max((t for t in ts if t <= done[o] + 0.005), default=min(ts))
                            for o, ts in got.items() if o in done}
        raw_lat = [stamps["raw"][o] - sent[o] for o in stamps["raw"]]
        return {"changes": n, "rate": n / send_elapsed, "landed": len(done), "p50": pct(lat, 50),
                "p99": pct(lat, 99), "max": max(lat), "mean": statistics.fmean(lat),
                "raw_p50": pct(raw_lat, 50), "raw_p99": pct(raw_lat, 99),
                "stages": stage_report(sent, stamps, done), "listener": listener, "cpu": cpu, "host": host,
                "cores": os.cpu_count() or 1}
    finally:
        for t in connectors:
            t.cancel()
        await asyncio.gather(*connectors, return_exceptions=True)
        stop.set()
        if pipe is not None:
            await pipe
        for proc in procs:
            proc.terminate()
        for proc in procs:
            await asyncio.to_thread(proc.wait, 30)


# ------------------------------------------------------------------------------------------ 2. backfill
async def backfill(infra: Infra, info: dict[str, Any], orders: int) -> dict[str, float]:
    from sf_poller.sync import ConnectionSync
    from sfconnect.client import build_client, http_client
    from sfconnect.config import parse_connection
    from sfconnect.published import MIGRATIONS as SF_MIGRATIONS
    from sfconnect.published import PgPublishedStore

    await migrate(infra.pool, [SF_MIGRATIONS])  # the published-version store, as the service uses it

    conn = await add_conn(infra, "bulk", "sf-bulk", info, "bulk", {
        "objects": ["Order"], "bulk_threshold": 2000, "bulk_poll_s": 0.2, "cdc": False})
    conn_cc = parse_connection(conn)
    async with http_client(conn_cc) as http:
        sync = ConnectionSync(conn_cc, build_client(conn_cc, http, infra), infra.publisher,
                              PgCursorStore(infra.pool), infra.settings, store=PgPublishedStore(infra.pool))
        base = rss_mb()
        with RssSampler() as sampler:
            t0 = time.perf_counter()
            res = await sync.sync_entity("Order")
            elapsed = time.perf_counter() - t0
        cur = await PgCursorStore(infra.pool).load("bulk", "sf-bulk", "Order")
    assert cur, "no cursor saved"
    assert cur["phase"] == "incremental", cur
    return {"records": sync.published, "phase": res.phase == "bulk", "seconds": elapsed,
            "rps": sync.published / elapsed, "rss_base_mb": base, "rss_peak_mb": sampler.peak,
            "rss_growth_mb": sampler.peak - base, "expected": orders}


async def main(args: argparse.Namespace) -> int:
    configure_logging("WARNING", "console")
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_sandbox_child, args=(child, args.orders), daemon=True)
    t0 = time.perf_counter()
    proc.start()
    info = await asyncio.get_running_loop().run_in_executor(None, parent.recv)
    print(f"sandbox ready in {time.perf_counter() - t0:.1f}s ({args.orders} orders for the backfill)", flush=True)
    driver_proc = None
    driver = None
    if not args.skip_latency and not args.inline_driver:
        driver, driver_end = ctx.Pipe()
        driver_proc = ctx.Process(target=_driver_child, args=(driver_end, info), daemon=True)
        driver_proc.start()
    run = uuid.uuid4().hex[:8]
    settings = FlashSettings(db_schema=f"bench_sf_{run}", topic_prefix=f"bench-sf-{run}.",
                             state_dir=Path(tempfile.mkdtemp(prefix="flash-bench-")))
    try:
        async with open_infra(settings, create_topics=False) as infra:
            # the services below must use this broker and database, not start embedded ones of their own
            infra.settings = settings = settings.model_copy(
                update={"kafka_bootstrap": infra.bootstrap, "database_url": infra.database_url})
            await ensure_topics(infra.bootstrap, settings)
            try:
                if not args.skip_latency:
                    lat = await latency(infra, info, args.rate, args.seconds, processes=args.processes,
                                        driver=driver)
                    print(f"CDC mutation -> ledger: {lat['changes']} changes at {lat['rate']:.0f}/s, "
                          f"{lat['landed']} landed; p50 {lat['p50'] * 1000:.0f} ms, p99 {lat['p99'] * 1000:.0f} ms, "
                          f"max {lat['max'] * 1000:.0f} ms (target p99 < 1000 ms); of which sandbox -> raw topic: "
                          f"p50 {lat['raw_p50'] * 1000:.0f} ms, p99 {lat['raw_p99'] * 1000:.0f} ms; "
                          f"this process used {lat['cpu']:.0%} of a core while the changes were sent, the host "
                          f"{lat['host']:.0%} of its {lat['cores']} cores\n"
                          f"per stage (each order's own share):\n{lat['stages']}", flush=True)
                    if lat["listener"]:
                        print(f"CDC listener stages (flash_cdc_stage_seconds):\n{lat['listener']}", flush=True)
                bf = await backfill(infra, info, args.orders)
                print(f"Bulk 2.0 backfill: {bf['records']:.0f} orders in {bf['seconds']:.1f}s = "
                      f"{bf['rps']:.0f} records/s; RSS {bf['rss_base_mb']:.0f} MB -> peak {bf['rss_peak_mb']:.0f} MB "
                      f"(+{bf['rss_growth_mb']:.0f} MB during the backfill)", flush=True)
            except Exception:
                print(f"sandbox process alive: {proc.is_alive()} exit code {proc.exitcode}", flush=True)
                raise
            finally:
                await infra.pool.execute(f'DROP SCHEMA IF EXISTS "{settings.db_schema}" CASCADE')
    finally:
        proc.terminate()
        if driver_proc is not None:
            driver_proc.terminate()
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=200.0, help="changes per second")
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--orders", type=int, default=100_000, help="orders in the Bulk backfill")
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--processes", action="store_true",
                   help="one process per service, as deployed (default: all services in this process, which is "
                        "faster on small hosts where the processes would only compete for the same cores)")
    p.add_argument("--inline-driver", action="store_true",
                   help="generate the load on this process's event loop, next to the services (as measured before "
                        "the driver had its own process; the load generator then competes with the services)")
    sys.exit(run_loop(main(p.parse_args()), FlashSettings()))
