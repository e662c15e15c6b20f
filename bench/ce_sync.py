"""Bench: initial sync of N Dataverse sandbox orders through the CE poller, normalizer, resolver and points.

    .venv/bin/python bench/ce_sync.py [--orders 100000] [--customers 5000] [--page-size 5000]

The sandbox (seeded with N orders, their lines, customers, products and RMAs) runs in its own process over
HTTPS; the poller runs as its own process (``python -m ce_poller``) so its peak RSS is its own; normalizer,
resolver and points run in this process on the embedded broker and the local/embedded PostgreSQL. Prints
the poller's fetch rate (raw records/s until every table holds its delta link), the end-to-end rate (orders/s
until the last ledger entry of the initial load) and the poller's peak RSS: sampled every 0.1 s, reported as
the peak up to 20 %, 50 % and 100 % of the records fetched (flat when pages stream and nothing holds the whole
set), and the kernel's ru_maxrss of the poller once it exited.
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


def _sandbox(conn: Pipe, orders: int, customers: int) -> None:
    from sandbox.dataverse import DataverseState, build_app, seed_org
    from sandbox.server import serve

    async def run() -> None:
        state = DataverseState()
        org = state.add_org("bench")
        t = time.perf_counter()
        summary = seed_org(state, "bench", customers=customers, products=200, orders=orders, seed=7)
        seed_s = time.perf_counter() - t
        so = org.tables["salesorders"]
        awardable = sum(1 for r in so.rows.values() if r[so.pos["statecode"]] in (3, 4))
        acc, con = org.tables["accounts"], org.tables["contacts"]
        members = [("acc", r[acc.pos["accountnumber"]]) for r in acc.rows.values()]
        members += [("con", r[con.pos["emailaddress1"]]) for r in con.rows.values()]
        records = sum(len(org.tables[t]) for t in ("salesorders", "salesorderdetails", "accounts", "contacts",
                                                  "products", "msdyn_rmas"))
        async with serve(build_app(state)) as running:
            app = state.credentials("bench")[0]
            conn.send({"base": running.base_url, "ca": str(running.tls.ca_path), "tenant": org.tenant_id,
                       "client_id": app.client_id, "secret": app.client_secret, "awardable": awardable,
                       "members": members, "summary": summary.to_json(), "seed_s": seed_s, "records": records})
            while not conn.poll(0):
                await asyncio.sleep(0.5)
            conn.send({"requests": state.stats["requests"]})

    asyncio.run(run())


async def main(args: argparse.Namespace, parent: Pipe, proc: Any) -> None:
    from canonical.events import MemberData
    from ce_poller.app import MIGRATIONS as CE_MIGRATIONS
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
            raise SystemExit("the sandbox process died while seeding")
        await asyncio.sleep(0.5)
    info: dict[str, Any] = parent.recv()
    print(f"sandbox seeded in {info['seed_s']:.1f}s: {info['summary']}", flush=True)
    tenant = "bench"
    with tempfile.TemporaryDirectory() as state_dir:
        async with test_kafka() as bootstrap, test_database() as dsn:
            name = unique_name("cebench")
            settings = FlashSettings(kafka_bootstrap=bootstrap, database_url=dsn, db_schema=name,
                                     topic_prefix=f"{name}.", state_dir=Path(state_dir))
            async with open_infra(settings) as infra:
                await migrate(infra.pool, [RESOLVER_MIGRATIONS, POINTS_MIGRATIONS, CE_MIGRATIONS])
                store = PgConnectionStore(infra.pool, CredentialCipher.from_settings(settings))
                await store.upsert(tenant, "ce-bench", "dynamics-ce", f"{info['base']}/orgs/bench",
                                   {"tenant_id": info["tenant"], "client_id": info["client_id"],
                                    "client_secret": info["secret"]},
                                   {"authority": f"{info['base']}/{info['tenant']}", "ca_bundle": info["ca"],
                                    "page_size": args.page_size, "poll_interval_s": 5})
                await store.set_state(tenant, "ce-bench", "live")
                await set_program(infra.pool, Program.model_validate(
                    {"tenant_id": tenant, "base_currency": "USD", "basis": "total_ex_tax_shipping"}))
                await import_members(infra.pool, tenant, [
                    MemberData(member_id=f"m{i}", external_id=v) if kind == "acc"
                    else MemberData(member_id=f"m{i}", email=v) for i, (kind, v) in enumerate(info["members"])])
                stop = asyncio.Event()
                consumers = asyncio.create_task(run_services(
                    [NORMALIZER, RESOLVER, build_service(mature_interval_s=1.0)], settings, stop=stop))
                await asyncio.sleep(8)  # consumer groups join before the clock starts
                env = service_env(bootstrap, dsn, settings)
                t0 = time.perf_counter()
                db_t0 = await infra.pool.fetchval("SELECT clock_timestamp()")
                poller = subprocess.Popen([sys.executable, "-m", "ce_poller"], env=env)
                ps = psutil.Process(poller.pid)
                peak = 0
                # Peak RSS up to each share of the raw records fetched (known keys recorded after each page's ack).
                marks = {0.2: 0, 0.5: 0, 1.0: 0}
                fetched = 0
                next_count = 0.0
                fetched_s: float | None = None
                entities = 7
                last: tuple[int, ...] = ()
                quiet_since = time.perf_counter()
                try:
                    while True:
                        peak = max(peak, ps.memory_info().rss)
                        if fetched_s is None and time.perf_counter() >= next_count:
                            next_count = time.perf_counter() + 1.0
                            fetched = await infra.pool.fetchval(
                                "SELECT count(*) FROM ce_known_keys WHERE entity <> 'msdyn_rmaproduct'")
                        if fetched_s is None:
                            for share in marks:
                                if share == 1.0 or fetched < share * info["records"]:
                                    marks[share] = max(marks[share], peak)
                        if fetched_s is None:
                            done = await infra.pool.fetchval(
                                "SELECT count(*) FROM cursors WHERE cursor->>'phase' = 'delta'")
                            if done >= entities:
                                fetched_s = time.perf_counter() - t0
                        counts = tuple(r["n"] for r in await infra.pool.fetch(
                            "SELECT consumer, count(*) AS n FROM processed GROUP BY 1 ORDER BY 1"))
                        if counts != last:
                            last, quiet_since = counts, time.perf_counter()
                        elif (fetched_s is not None and counts and counts[0] >= info["records"]
                              and time.perf_counter() - quiet_since > 5):
                            print(f"poller initial sync {fetched_s:.1f}s; processed (normalizer, points, resolver) "
                                  f"{counts}", flush=True)
                            break  # every consumer idle for 5 s after the poller finished its initial sync
                        if time.perf_counter() - t0 > args.timeout:
                            raise SystemExit(f"timed out: fetched={fetched_s} processed={counts}")
                        await asyncio.sleep(0.1)
                    row = await infra.pool.fetchrow(
                        """SELECT count(DISTINCT order_source_id) AS orders, count(*) AS rows,
                                  extract(epoch FROM max(created_at) - $1)::float8 AS last_s FROM ledger""", db_t0)
                    assert row is not None  # an aggregate always returns a row
                    ledger_s = float(row["last_s"])
                    ledger_orders = int(row["orders"])
                finally:
                    poller.terminate()
                    poller.wait(30)
                    stop.set()
                    await asyncio.wait_for(consumers, 60)
                # Reaped children so far: the poller (and short-lived helpers); the broker and the sandbox still run.
                max_rss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
                parent.send("stop")
                stats = parent.recv() if parent.poll(10) else {"requests": None}
    proc.terminate()
    records = info["records"]
    mb = 2**20
    print(f"poller peak RSS {peak / mb:.0f} MB (ru_maxrss {max_rss_kb / 1024:.0f} MB); up to 20% / 50% / 100% of the "
          f"records fetched: {marks[0.2] / mb:.0f} / {marks[0.5] / mb:.0f} / {marks[1.0] / mb:.0f} MB", flush=True)
    print(json.dumps({
        "orders": args.orders,
        "raw_records": records,
        "poller_fetch_s": round(fetched_s, 2),
        "poller_records_per_s": round(records / fetched_s),
        "to_ledger_s": round(ledger_s, 2),
        "orders_to_ledger_per_s": round(args.orders / ledger_s),
        "orders_with_ledger_entries": ledger_orders,
        "records_to_ledger_per_s": round(records / ledger_s),
        "poller_peak_rss_mb": round(max_rss_kb / 1024, 1),
        "poller_peak_rss_mb_sampled": round(peak / mb, 1),
        "poller_rss_mb_by_share_fetched": {f"{int(k * 100)}%": round(v / mb, 1) for k, v in marks.items()},
        "sandbox_requests": stats["requests"],
    }, indent=1))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--orders", type=int, default=100_000)
    p.add_argument("--customers", type=int, default=5000)
    p.add_argument("--page-size", type=int, default=5000)
    p.add_argument("--timeout", type=float, default=1200)
    cli = p.parse_args()
    # The sandbox is forked before any event loop exists in this process (a child of a running loop can't run one).
    parent, child = mp.get_context("fork").Pipe()
    proc = mp.get_context("fork").Process(target=_sandbox, args=(child, cli.orders, cli.customers), daemon=True)
    proc.start()
    asyncio.run(main(cli, parent, proc))
