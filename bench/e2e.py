"""End to end as deployed: vendor simulators -> every service as its own process (N copies) -> ledger.

    .venv/bin/python bench/e2e.py [--orders 5000] [--copies 1,2,3] [--scale-tenants 0] [--members 0]

The simulators of the demo (real HTTPS on loopback) are seeded once with ``--orders`` orders per tenant
(the demo's tenants: Dynamics 365 CE, Finance & Operations, Salesforce with CDC). For each copy count N, in a
fresh schema and topic prefix: N copies of EVERY service (pollers, CDC listener, normalizer, resolver,
points) start as processes and are waited for; then the connections go live and the clock starts. Prints:

- orders/s: member orders landed on the ledger / (last ledger row - go-live), both tenants together;
- p50/p99 latency: per order, first ledger row - the order's first raw record on the broker (the pipe
  from the poller's publish to the ledger, without the poll interval);
- RSS per service (peak over the run, MB per copy) and how long each copy took to stop on SIGTERM;
- beside it, the raw aiokafka produce+consume loop on the same broker (bench/pipe.py), measured in the
  same run, and the ratio.

``--scale-tenants T`` adds the scale case: T tenants with ``--scale-connections`` Dataverse connections
each on the ce-poller (one copy), all live and idle after their first cycle: prints the ce-poller's RSS
before and after, i.e. memory per idle connection, and how long the first cycle of all took.
``--members M`` imports M members into one tenant before its orders flow (resolver lookups against a
large members table) and prints the import rate and that tenant's orders/s.

The machine is shared: run it small (e.g. ``--orders 5000 --copies 1,2``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition

from canonical.topics import raw
from servicekit.connections import CredentialCipher, PgConnectionStore
from servicekit.logging import configure_logging
from servicekit.runtime import Infra, open_infra
from servicekit.settings import FlashSettings
from servicekit.testing.fleet import Fleet, RequestLog
from servicekit.testing.infra import service_env

POLLERS = ("ce-poller", "fo-poller", "sf-poller", "cdc-listener")
CONSUMERS = ("normalizer", "resolver", "points")


@dataclass
class RunResult:
    copies: dict[str, int]
    orders: int
    seconds: float
    latencies_s: list[float]
    rss_mb: dict[str, float]
    stop_s: dict[str, float]
    ledger: list[tuple[Any, ...]]
    runs: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    killed: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.orders / self.seconds if self.seconds > 0 else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies_s:
            return float("nan")
        xs = sorted(self.latencies_s)
        return xs[min(len(xs) - 1, int(q * len(xs)))]


@contextlib.asynccontextmanager
async def sandboxes(orders: int, log: RequestLog | None = None) -> AsyncIterator[list[tuple[Any, dict[str, Any]]]]:
    """The demo's tenants (Dataverse + Salesforce) on simulators seeded with ``orders`` orders each; with
    ``log``, the simulators record which process made each request."""
    import importlib

    import sandbox.server
    from controlplane import demo

    original = sandbox.server.serve
    patched: list[Any] = []
    if log is not None:
        @contextlib.asynccontextmanager
        async def serve_logged(app: Any, **kw: Any) -> AsyncIterator[Any]:
            app.middlewares.append(log.middleware)
            async with original(app, **kw) as sb:
                yield sb

        for name in ("sandbox.server", "sandbox.dataverse.demo", "sandbox.salesforce.demo"):
            with contextlib.suppress(ImportError):
                module = importlib.import_module(name)
                if getattr(module, "serve", None) is original:
                    module.serve = serve_logged  # type: ignore[attr-defined]
                    patched.append(module)
    try:
        async with contextlib.AsyncExitStack() as stack:
            yield await demo._setup_sandboxes(stack, orders)
    finally:
        for module in patched:
            module.serve = original


def _migrations() -> list[Any]:
    from controlplane.cli import SERVICES, load_service

    return [m for name in SERVICES for m in load_service(name).migrations]


async def _raw_first_seen(infra: Infra, entities: Sequence[tuple[str, str]]) -> dict[tuple[str, str], float]:
    """Earliest broker timestamp (s) of each order's raw records, by (tenant, order key)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=infra.bootstrap, enable_auto_commit=False, group_id=None,
                                **infra.security.client_kwargs())
    await consumer.start()
    first: dict[tuple[str, str], float] = {}
    try:
        tps = []
        for source, entity in entities:
            topic = infra.settings.topic(raw(source, entity))
            parts = consumer.partitions_for_topic(topic) or set()
            if not parts:
                await consumer._client.force_metadata_update()
                parts = consumer.partitions_for_topic(topic) or set()
            tps += [TopicPartition(topic, p) for p in parts]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        remaining = {tp for tp in tps if ends[tp] > 0}
        while remaining:
            batch = await consumer.getmany(timeout_ms=1000, max_records=5000)
            for tp, recs in batch.items():
                for r in recs:
                    key = (r.key or b"").decode()
                    tenant, _, order = key.partition(":")
                    t = r.timestamp / 1000
                    if first.get((tenant, order), 1e18) > t:
                        first[(tenant, order)] = t
                if recs and recs[-1].offset + 1 >= ends[tp]:
                    remaining.discard(tp)
            if not batch:
                break
    finally:
        await consumer.stop()
    return first


async def run_copies(
    base: FlashSettings, pairs: list[tuple[Any, dict[str, Any]]], copies: dict[str, int], *, log_dir: Path,
    kill_at: float | None = None, lease_ttl_s: float = 6.0, timeout_s: float = 600.0, log: RequestLog | None = None,
    members: int = 0, settle_s: float = 8.0,
) -> RunResult:
    """One deployment: fresh schema/prefix, tenants configured, ``copies`` per service started and ready,
    then the connections go live; waits until every member order landed and the ledger is still.

    ``kill_at``: once that fraction of the orders landed, one copy of every service is SIGKILLed."""
    from controlplane import demo
    from controlplane.cli import SERVICES

    run = uuid.uuid4().hex[:6]
    settings = base.model_copy(update={"db_schema": f"e2e_{run}", "topic_prefix": f"e2e-{run}."})
    tenants = [t for t, _ in pairs]
    expected = sum(t.expected_orders for t in tenants)
    async with open_infra(settings, migrations=_migrations()) as infra:
        store = PgConnectionStore(infra.pool, CredentialCipher.from_settings(settings))
        for tenant, conn in pairs:
            await demo._configure(infra, settings, tenant, conn)
            await store.set_state(tenant.tenant_id, tenant.connection_id, "verified")  # live once all are up
        if members:
            rate = await _import_many_members(infra.pool, tenants[0].tenant_id, members)
            print(f"    {members:,} members imported into tenant {tenants[0].tenant_id} at {rate:,.0f} rows/s")
        # the children share FLASH_STATE_DIR (or FLASH_SECRET_KEY), so they decrypt the same credentials
        env = service_env(infra.bootstrap, infra.database_url, settings, FLASH_LOG_LEVEL="INFO",
                          FLASH_LEASE_TTL_S=str(lease_ttl_s), FLASH_ALLOW_SANDBOX_ENDPOINTS="1")
        fleet = Fleet(env, log_dir / run)
        for name in (*POLLERS, *CONSUMERS):
            fleet.start(name, SERVICES[name], copies.get(name, 1))
        peak: dict[str, float] = {}
        killed: list[str] = []
        try:
            await fleet.wait_started()
            db_t0 = await infra.pool.fetchval("SELECT now()")
            for tenant in tenants:
                await store.set_state(tenant.tenant_id, tenant.connection_id, "live")
            began = time.monotonic()
            stable_since: float | None = None
            last = -1
            while True:
                for service, rss in fleet.rss_mb().items():
                    peak[service] = max(peak.get(service, 0.0), max(rss))
                landed = await infra.pool.fetchval(
                    "SELECT count(*) FROM orders WHERE known AND tenant_id = ANY($1::text[])",
                    [t.tenant_id for t in tenants])
                if kill_at is not None and not killed and landed >= kill_at * expected:
                    for service in (*POLLERS, *CONSUMERS):
                        # a poller copy that owns a connection (its lease holder name starts with the instance id)
                        holder = await infra.pool.fetchval(
                            "SELECT holder FROM connection_leases WHERE scope = $1 ORDER BY holder LIMIT 1", service)
                        c = fleet.kill_one(service, holder.split(":")[0] if holder else None)
                        killed.append(f"{c.service}-{c.index}")
                entries = await infra.pool.fetchval("SELECT count(*) FROM ledger")
                if landed >= expected and entries == last:
                    stable_since = stable_since or time.monotonic()
                    # after a kill, the killed consumer's partitions wait for the group to notice (session
                    # timeout ~10 s) and rebalance: a still ledger proves nothing before that
                    if time.monotonic() - stable_since >= (max(25.0, 2 * lease_ttl_s) if killed else settle_s):
                        break
                else:
                    stable_since = None
                last = entries
                if time.monotonic() - began > timeout_s:
                    raise TimeoutError(f"{landed}/{expected} orders landed after {timeout_s}s")
                await asyncio.sleep(0.5)
            seconds = await infra.pool.fetchval(
                "SELECT extract(epoch FROM max(created_at) - $1)::float8 FROM ledger", db_t0)
            ledger = [tuple(r) for r in await infra.pool.fetch(
                """SELECT tenant_id, order_source_id, kind, points, source_version, member_id FROM ledger
                   ORDER BY tenant_id, order_source_id, kind, source_version""")]
            landed_at = {(r["tenant_id"], r["order_source_id"]): r["t"] for r in await infra.pool.fetch(
                """SELECT tenant_id, order_source_id, extract(epoch FROM min(created_at))::float8 AS t
                   FROM ledger GROUP BY 1, 2""")}
        finally:
            stop_s = await fleet.stop()
        first = await _raw_first_seen(infra, [("dynamics-ce", "salesorder"), ("dynamics-fo", "SalesOrderHeadersV2"),
                                              ("salesforce", "Order"), ("salesforce", "OrderSummary")])
        latencies = [landed_at[k] - first[k] for k in landed_at if k in first and landed_at[k] >= first[k]]
        runs = log.runs(fleet.service_of) if log else {}
        with contextlib.suppress(asyncpg.PostgresError):
            await infra.pool.execute(f'DROP SCHEMA IF EXISTS "{settings.db_schema}" CASCADE')
    return RunResult(copies, expected, float(seconds or 0), latencies, peak, stop_s, ledger, runs, killed)


async def _import_many_members(pool: asyncpg.Pool, tenant: str, n: int) -> float:
    """``n`` extra members in one tenant (COPY, the way a bulk member import lands); returns rows/s."""
    began = time.perf_counter()
    chunk = 100_000
    for start in range(0, n, chunk):
        rows = [(tenant, f"BULK-{i:08d}", f"X-{i:08d}", f"bulk{i}@example.com")
                for i in range(start, min(n, start + chunk))]
        async with pool.acquire() as conn:
            await conn.copy_records_to_table("members", records=rows,
                                             columns=["tenant_id", "member_id", "external_id", "email_normalized"])
    return n / (time.perf_counter() - began)


async def scale_case(base: FlashSettings, tenants: int, per_tenant: int, log_dir: Path) -> None:
    """T tenants x C idle Dataverse connections on one ce-poller: memory per idle connection."""
    from controlplane import demo
    from controlplane.cli import SERVICES

    run = uuid.uuid4().hex[:6]
    settings = base.model_copy(update={"db_schema": f"e2e_scale_{run}", "topic_prefix": f"e2e-scale-{run}."})
    async with sandboxes(20) as pairs, open_infra(settings, migrations=_migrations()) as infra:
        ce_tenant, ce_conn = next((t, c) for t, c in pairs if t.source == "dynamics-ce")
        await demo._configure(infra, settings, ce_tenant, ce_conn)
        store = PgConnectionStore(infra.pool, CredentialCipher.from_settings(settings))
        await store.set_state(ce_tenant.tenant_id, ce_tenant.connection_id, "paused")
        cc = {**ce_conn, "settings": {**ce_conn["settings"], "poll_interval_s": 3600}}
        n = tenants * per_tenant
        for t in range(tenants):
            for c in range(per_tenant):
                # connection ids are unique across tenants (connections_id)
                await store.upsert(f"scale-{t:04d}", f"ce-{t:04d}-{c}", "dynamics-ce", cc["endpoint"],
                                   cc["credentials"], cc["settings"])
        env = service_env(infra.bootstrap, infra.database_url, settings, FLASH_LOG_LEVEL="INFO",
                          FLASH_ALLOW_SANDBOX_ENDPOINTS="1")  # INFO: wait_started reads "services started"
        fleet = Fleet(env, log_dir / f"scale-{run}")
        fleet.start("ce-poller", SERVICES["ce-poller"], 1)
        try:
            await fleet.wait_started()
            await asyncio.sleep(3)
            before = fleet.rss_mb()["ce-poller"][0]
            began = time.monotonic()
            await infra.pool.execute("UPDATE connections SET state = 'live' WHERE tenant_id LIKE 'scale-%'")
            # every connection owned (a lease and a runner each), then give their first cycles a while: the
            # simulator serves all of them from one org and one app user, so its service-protection limits
            # throttle the first cycles (429 + Retry-After); a throttled runner waits like an idle one
            leases = 0
            while leases < n and time.monotonic() - began < 180:
                await asyncio.sleep(2)
                leases = await infra.pool.fetchval("SELECT count(*) FROM connection_leases WHERE scope = 'ce-poller'")
            owned_s = time.monotonic() - began
            await asyncio.sleep(30)
            after = fleet.rss_mb()["ce-poller"][0]
            done = await infra.pool.fetchval(
                "SELECT count(DISTINCT (tenant_id, connection_id)) FROM cursors WHERE tenant_id LIKE 'scale-%'")
        finally:
            await fleet.stop()
            with contextlib.suppress(asyncpg.PostgresError):
                await infra.pool.execute(f'DROP SCHEMA IF EXISTS "{settings.db_schema}" CASCADE')
    print(f"scale: {tenants:,} tenants x {per_tenant} connections = {n:,} live connections on one ce-poller copy: "
          f"{leases:,} leases held after {owned_s:.0f}s, {done:,} finished a first cycle within {owned_s + 30:.0f}s; "
          f"RSS {before:.0f} MB -> {after:.0f} MB = {(after - before) * 1000 / max(n, 1):.1f} KB per connection")


async def raw_broker(settings: FlashSettings, n: int) -> float:
    import importlib.util

    # bench/pipe.py's loop, loaded by path: bench/ is not on sys.path (its points.py would shadow the service)
    spec = importlib.util.spec_from_file_location("bench_pipe", Path(__file__).parent / "pipe.py")
    assert spec is not None
    assert spec.loader is not None
    pipe = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = pipe
    spec.loader.exec_module(pipe)
    raw_loop = pipe.raw_loop

    async with open_infra(settings, create_topics=False) as infra:
        return await raw_loop(infra.bootstrap, n, [os.urandom(400) for _ in range(n)])


async def main(args: argparse.Namespace) -> None:
    # the connections point at the simulators on loopback (connectorkit.endpoints), as in `flash demo`
    os.environ.setdefault("FLASH_ALLOW_SANDBOX_ENDPOINTS", "1")
    base = FlashSettings()
    base = base.model_copy(update={"db_schema": base.db_schema or "e2e_base"})  # never the public schema
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="flash-e2e-"))
    counts = [int(c) for c in args.copies.split(",") if c]
    async with open_infra(base, create_topics=False) as shared:
        # one broker and database for every run (embedded unless configured): children reuse them
        base = shared.settings
        print(f"e2e: {args.orders:,} orders per tenant; copies {counts}; logs {log_dir}")
        async with sandboxes(args.orders) as pairs:
            expected = sum(t.expected_orders for t, _ in pairs)
            print(f"  {expected:,} member orders to land (others park for non-members)")
            results = []
            for n in counts:
                copies = dict.fromkeys((*POLLERS, *CONSUMERS), n)
                res = await run_copies(base, pairs, copies, log_dir=log_dir, members=args.members)
                results.append(res)
                rss = ", ".join(f"{s} {v:.0f}" for s, v in sorted(res.rss_mb.items()))
                stop = max(res.stop_s.values()) if res.stop_s else 0.0
                print(f"  copies {n}: {res.rate:,.0f} orders/s ({res.orders:,} in {res.seconds:.1f}s), latency p50 "
                      f"{res.pct(0.5):.2f}s p99 {res.pct(0.99):.2f}s; peak RSS MB per copy: {rss}; "
                      f"slowest stop {stop:.1f}s")
        raw_rate = await raw_broker(base, args.raw_messages)
        print(f"  raw aiokafka produce+consume loop, same broker: {raw_rate:,.0f} msgs/s")
        for res in results:
            print(f"  copies {res.copies['normalizer']}: pipe/raw = {res.rate / raw_rate:.1%}")
        if len(results) > 1:
            def nets(ledger: list[tuple[Any, ...]]) -> dict[tuple[Any, ...], int]:
                out: dict[tuple[Any, ...], int] = {}
                for t, o, _kind, pts, _v, member in ledger:
                    out[(t, o, member)] = out.get((t, o, member), 0) + int(pts)
                return out

            same = all(nets(r.ledger) == nets(results[0].ledger) for r in results[1:])
            print(f"  same points per (tenant, order, member) across copy counts: {same}")
        if args.members:
            print(f"  (tenant {pairs[0][0].tenant_id} had {args.members:,} extra members during every run)")
        if args.scale_tenants:
            await scale_case(base, args.scale_tenants, args.scale_connections, log_dir)
        if base.db_schema == "e2e_base":
            await shared.pool.execute('DROP SCHEMA IF EXISTS "e2e_base" CASCADE')


if __name__ == "__main__":
    # run as a script, bench/ is sys.path[0]: bench/points.py would shadow the points service package
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orders", type=int, default=5000, help="orders seeded per tenant (2 tenants)")
    parser.add_argument("--copies", default="1,2,3",
                        help="copy counts to run, comma-separated (each service); empty: only the other cases")
    parser.add_argument("--members", type=int, default=0, help="extra members imported into the first tenant")
    parser.add_argument("--scale-tenants", type=int, default=0, help="scale case: tenants (0: skip)")
    parser.add_argument("--scale-connections", type=int, default=3, help="scale case: connections per tenant")
    parser.add_argument("--raw-messages", type=int, default=20000, help="messages through the raw broker loop")
    parser.add_argument("--log-dir", default=None, help="where each service copy's log goes")
    a = parser.parse_args()
    configure_logging(os.environ.get("FLASH_LOG_LEVEL", "WARNING"), "console")
    asyncio.run(main(a))
