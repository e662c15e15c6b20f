"""Bench: initial load of N Finance & Operations simulator orders through the fo-poller, normalizer, resolver and
points.

    .venv/bin/python bench/fo_sync.py [--orders 100000] [--customers 5000] [--page-size 5000] [--companies 2]

The simulator (seeded with N orders across the companies, their lines, customers and released products) runs in
its own process over HTTPS; the poller runs as its own process (``python -m fo_poller``) so its peak RSS is its
own; normalizer, resolver and points run in this process on the embedded broker and the local/embedded
PostgreSQL. Prints the poller's initial-load rate (entity rows read per second -- headers, lines, customers,
products -- and raw records published per second, until every stream's cursor is incremental), the end-to-end
rate (orders/s until the last ledger entry of the initial load) and the poller's peak RSS: sampled every 0.1 s,
reported as the peak up to 20 %, 50 % and 100 % of the records published, and the kernel's ru_maxrss of the
poller once it exited.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import resource
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]

sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

STREAMS = ("orders", "customers", "products", "returns")


def _sandbox(conn: Pipe, orders: int, customers: int, companies: int) -> None:
    from sandbox.fo import FOState, build_app, seed_environment
    from sandbox.server import serve

    async def run() -> None:
        state = FOState(seed=7)
        names = tuple(["usmf", "demf", "gbsi", "jpmf"][:companies])
        env, app = state.add_environment("bench", companies=names, default_company=names[0])
        t = time.perf_counter()
        truth = seed_environment(env, customers=customers // len(names), products=200, orders=orders, seed=7)
        seed_s = time.perf_counter() - t
        rows = sum(len(env.rows[s]) for s in ("SalesOrderHeadersV2", "SalesOrderLines", "CustomersV3",
                                              "ReleasedProductsV2"))
        members = [r["CustomerAccount"] for r in env.rows["CustomersV3"].values()]
        async with serve(build_app(state)) as running:
            conn.send({"base": running.base_url, "ca": str(running.tls.ca_path), "tenant": app.tenant_id,
                       "client_id": app.client_id, "secret": app.client_secret, "orders": len(truth),
                       "awardable": sum(1 for o in truth if o.status in ("Invoiced", "Delivered")),
                       "rows": rows, "members": members, "seed_s": seed_s,
                       "lines": len(env.rows["SalesOrderLines"]), "products": len(env.rows["ReleasedProductsV2"])})
            while not conn.poll(0):
                await asyncio.sleep(0.5)
            conn.send({"requests": sum(v for k, v in state.stats.items() if k.startswith("get."))})

    asyncio.run(run())


async def main(args: argparse.Namespace, parent: Pipe, proc: Any) -> None:
    from canonical.events import MemberData
    from fo_poller.app import SERVICE as FO_SERVICE
    from normalizer.app import SERVICE as NORMALIZER
    from points.app import MIGRATIONS as POINTS_MIGRATIONS
    from points.app import build_service
    from points.cli import set_program
    from points.rules import Program
    from resolver.app import MIGRATIONS as RESOLVER_MIGRATIONS
    from resolver.app import SERVICE as RESOLVER
    from resolver.cli import import_members
    from servicekit.connections import CredentialCipher, PgConnectionStore
    from servicekit.db import migrate
    from servicekit.logging import configure_logging
    from servicekit.runtime import open_infra, run_services
    from servicekit.settings import FlashSettings
    from servicekit.testing.infra import service_env, test_database, test_kafka, unique_name

    configure_logging("WARNING", "console")
    while not parent.poll(0):
        if not proc.is_alive():
            raise SystemExit("the simulator process died while seeding")
        await asyncio.sleep(0.5)
    info: dict[str, Any] = parent.recv()
    print(f"simulator seeded in {info['seed_s']:.1f}s: {info['orders']} orders, {info['lines']} lines, "
          f"{info['rows']} entity rows", flush=True)
    tenant = "bench"
    with tempfile.TemporaryDirectory() as state_dir:
        async with test_kafka() as bootstrap, test_database() as dsn:
            name = unique_name("fobench")
            settings = FlashSettings(kafka_bootstrap=bootstrap, database_url=dsn, db_schema=name,
                                     topic_prefix=f"{name}.", state_dir=Path(state_dir))
            async with open_infra(settings) as infra:
                await migrate(infra.pool, [RESOLVER_MIGRATIONS, POINTS_MIGRATIONS, *FO_SERVICE.migrations])
                store = PgConnectionStore(infra.pool, CredentialCipher.from_settings(settings))
                await store.upsert(tenant, "fo-bench", "dynamics-fo", f"{info['base']}/envs/bench",
                                   {"tenant_id": info["tenant"], "client_id": info["client_id"],
                                    "client_secret": info["secret"]},
                                   {"authority": f"{info['base']}/{info['tenant']}", "ca_bundle": info["ca"],
                                    "page_size": args.page_size, "poll_interval_s": 5})
                await store.set_state(tenant, "fo-bench", "live")
                await set_program(infra.pool, Program.model_validate(
                    {"tenant_id": tenant, "base_currency": "USD", "basis": "total_ex_tax_shipping"}))
                await import_members(infra.pool, tenant, [
                    MemberData(member_id=f"m{i}", external_id=v) for i, v in enumerate(info["members"])])
                stop = asyncio.Event()
                consumers = asyncio.create_task(run_services(
                    [NORMALIZER, RESOLVER, build_service(mature_interval_s=1.0)], settings, stop=stop))
                await asyncio.sleep(8)  # consumer groups join before the clock starts
                env = service_env(bootstrap, dsn, settings)
                t0 = time.perf_counter()
                db_t0 = await infra.pool.fetchval("SELECT clock_timestamp()")
                poller = subprocess.Popen([sys.executable, "-m", "fo_poller"], env=env)
                ps = psutil.Process(poller.pid)
                peak = 0
                marks = {0.2: 0, 0.5: 0, 1.0: 0}
                expected = info["orders"] + len(info["members"]) + info["products"]
                published = 0
                next_count = 0.0
                loaded_s: float | None = None
                last: tuple[int, ...] = ()
                quiet_since = time.perf_counter()
                try:
                    while True:
                        peak = max(peak, ps.memory_info().rss)
                        if loaded_s is None and time.perf_counter() >= next_count:
                            next_count = time.perf_counter() + 0.25
                            published = await infra.pool.fetchval(
                                "SELECT count(*) FROM connector_published_versions WHERE stream <> 'invoices'")
                            for share in marks:
                                if share == 1.0 or published < share * expected:
                                    marks[share] = max(marks[share], peak)
                            done = await infra.pool.fetchval(
                                "SELECT count(*) FROM cursors WHERE cursor->>'phase' = 'incremental'")
                            if done >= len(STREAMS):
                                loaded_s = time.perf_counter() - t0
                                published = await infra.pool.fetchval(
                                    "SELECT count(*) FROM connector_published_versions WHERE stream <> 'invoices'")
                        counts = tuple(r["n"] for r in await infra.pool.fetch(
                            "SELECT consumer, count(*) AS n FROM processed GROUP BY 1 ORDER BY 1"))
                        if counts != last:
                            last, quiet_since = counts, time.perf_counter()
                        elif (loaded_s is not None and counts and counts[0] >= published
                              and time.perf_counter() - quiet_since > 5):
                            print(f"poller initial load {loaded_s:.1f}s; processed (normalizer, points, resolver) "
                                  f"{counts}", flush=True)
                            break
                        if time.perf_counter() - t0 > args.timeout:
                            raise SystemExit(f"timed out: loaded={loaded_s} processed={counts}")
                        await asyncio.sleep(0.1)
                    row = await infra.pool.fetchrow(
                        """SELECT count(DISTINCT order_source_id) AS orders, count(*) AS rows,
                                  extract(epoch FROM max(created_at) - $1)::float8 AS last_s FROM ledger""", db_t0)
                    assert row is not None  # an aggregate always returns a row
                    ledger_s = float(row["last_s"] or 0.0)
                    ledger_orders = int(row["orders"])
                    state = await store.get(tenant, "fo-bench")
                finally:
                    poller.terminate()
                    poller.wait(30)
                    stop.set()
                    await asyncio.wait_for(consumers, 60)
                max_rss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
                parent.send("stop")
                stats = parent.recv() if parent.poll(10) else {"requests": None}
    proc.terminate()
    assert loaded_s is not None
    mb = 2**20
    print(f"poller peak RSS {peak / mb:.0f} MB (ru_maxrss {max_rss_kb / 1024:.0f} MB); up to 20% / 50% / 100% of the "
          f"records published: {marks[0.2] / mb:.0f} / {marks[0.5] / mb:.0f} / {marks[1.0] / mb:.0f} MB", flush=True)
    print(json.dumps({
        "orders": info["orders"],
        "entity_rows_read": info["rows"],
        "raw_records_published": published,
        "poller_load_s": round(loaded_s, 2),
        "poller_entity_rows_per_s": round(info["rows"] / loaded_s),
        "poller_raw_records_per_s": round(published / loaded_s),
        "to_ledger_s": round(ledger_s, 2),
        "orders_to_ledger_per_s": round(info["orders"] / ledger_s) if ledger_s else None,
        "orders_with_ledger_entries": ledger_orders,
        "awardable_orders": info["awardable"],
        "poller_peak_rss_mb": round(max_rss_kb / 1024, 1),
        "poller_peak_rss_mb_sampled": round(peak / mb, 1),
        "poller_rss_mb_by_share_published": {f"{int(k * 100)}%": round(v / mb, 1) for k, v in marks.items()},
        "simulator_requests": stats["requests"],
        "connection_state": state.state,
    }, indent=1))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--orders", type=int, default=100_000)
    p.add_argument("--customers", type=int, default=5000)
    p.add_argument("--page-size", type=int, default=5000)
    p.add_argument("--companies", type=int, default=2, choices=(1, 2, 3, 4))
    p.add_argument("--timeout", type=float, default=1200)
    cli = p.parse_args()
    # The simulator is forked before any event loop exists in this process (a child of a running loop can't run one).
    parent, child = mp.get_context("fork").Pipe()
    proc = mp.get_context("fork").Process(target=_sandbox, args=(child, cli.orders, cli.customers, cli.companies),
                                          daemon=True)
    proc.start()
    asyncio.run(main(cli, parent, proc))
