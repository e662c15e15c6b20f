"""Bench: canonical orders through member resolver + points engine into PostgreSQL on the real broker.

    .venv/bin/python bench/points.py [--orders 20000] [--members 2000]

Starts the embedded broker (or FLASH_KAFKA_BOOTSTRAP) and the local PostgreSQL in a fresh schema,
pre-loads a program, members and linked customers, warms the consumer groups up, then publishes the
orders (two lines each, one in an x2 category) and waits until every order has its ledger entry.
Prints orders/s (first publish -> last ledger row) and the handling latency per order (publish ->
ledger row written), p50/p99.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
import time
import uuid
from decimal import Decimal
from pathlib import Path

# This file is named like the points package: keep its folder off the import path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from canonical.events import OrderData, OrderLineData, OrderUpserted, encode  # noqa: E402
from canonical.topics import CANONICAL_ORDER  # noqa: E402
from points.app import MIGRATIONS as POINTS_MIGRATIONS  # noqa: E402
from points.app import build_service  # noqa: E402
from points.cli import set_program  # noqa: E402
from points.rules import Program  # noqa: E402
from resolver.adapters import PgResolverStore  # noqa: E402
from resolver.app import MIGRATIONS as RESOLVER_MIGRATIONS  # noqa: E402
from resolver.app import SERVICE as RESOLVER  # noqa: E402
from servicekit import metrics  # noqa: E402
from servicekit.kafka import OutMessage  # noqa: E402
from servicekit.logging import configure_logging  # noqa: E402
from servicekit.runtime import Infra, open_infra, run_services  # noqa: E402
from servicekit.settings import FlashSettings  # noqa: E402

TENANT = "bench"


def make_order(i: int, members: int, tag: str) -> OrderUpserted:
    lines = (
        OrderLineData(line_id=f"{tag}{i}-1", product_source_id="tv", amount=Decimal("60.00")),
        OrderLineData(line_id=f"{tag}{i}-2", product_source_id="sock", amount=Decimal("40.00")),
    )
    return OrderUpserted(
        tenant_id=TENANT,
        connection_id="crm",
        source="dynamics-ce",
        entity="salesorder",
        source_id=f"{tag}{i}",
        source_version="1",
        observed_at=dt.datetime.now(dt.UTC),
        order=OrderData(
            order_number=f"SO-{tag}{i}",
            customer_source_id=f"c{i % members}",
            status="100003",
            lifecycle="awardable",
            currency="EUR",
            total_amount=Decimal("121.00"),
            tax_amount=Decimal("21.00"),
            lines=lines,
        ),
    )


async def preload(infra: Infra, members: int) -> None:
    await set_program(
        infra.pool,
        Program.model_validate(
            {
                "tenant_id": TENANT,
                "base_currency": "EUR",
                "points_per_unit": "1",
                "category_multipliers": {"tv": "2"},
                "awardable_statuses": {"dynamics-ce": ["100003"]},
            }
        ),
    )
    await infra.pool.execute("INSERT INTO products VALUES ($1, 'tv', 'tv', '1')", TENANT)
    async with infra.pool.acquire() as conn, conn.transaction():
        store = PgResolverStore(conn)
        await store.upsert_members(
            [(TENANT, f"m{i}", f"C-{i}", f"m{i}@example.com", False, False, "active", "1") for i in range(members)],
            relinked=True,
        )
        await store.upsert_links(
            [
                (
                    TENANT,
                    "crm",
                    "dynamics-ce",
                    f"c{i}",
                    "account",
                    None,
                    f"C-{i}",
                    None,
                    f"m{i}",
                    "external_id",
                    "",
                    "1",
                )
                for i in range(members)
            ]
        )


async def publish(infra: Infra, orders: list[OrderUpserted]) -> None:
    topic = infra.settings.topic(CANONICAL_ORDER)
    for start in range(0, len(orders), 5000):
        chunk = orders[start : start + 5000]
        await infra.publisher.send_all([OutMessage(topic, encode(o), o.key) for o in chunk])


async def ledger_count(infra: Infra, tag: str) -> int:
    return int(
        await infra.pool.fetchval(
            "SELECT count(*) FROM ledger WHERE tenant_id = $1 AND order_source_id LIKE $2", TENANT, f"{tag}%"
        )
    )


async def main(n: int, members: int, batch: int, timeout_ms: int) -> None:
    run = uuid.uuid4().hex[:8]
    settings = FlashSettings(
        db_schema=f"bench_points_{run}",
        topic_prefix=f"bench{run}.",
        log_level="WARNING",
        batch_max_records=batch,
        batch_timeout_ms=timeout_ms,
    )
    configure_logging("WARNING", "console")
    async with open_infra(settings, migrations=[RESOLVER_MIGRATIONS, POINTS_MIGRATIONS]) as infra:
        settings = settings.model_copy(update={"kafka_bootstrap": infra.bootstrap, "database_url": infra.database_url})
        await preload(infra, members)
        stop = asyncio.Event()
        runner = asyncio.create_task(run_services([RESOLVER, build_service()], settings, stop=stop))
        try:
            warm = [make_order(i, members, "w") for i in range(200)]
            await publish(infra, warm)
            t0 = time.monotonic()
            while await ledger_count(infra, "w") < len(warm):
                if time.monotonic() - t0 > 120:
                    raise SystemExit("warm-up did not finish")
                await asyncio.sleep(0.1)
            print(f"warm-up: consumer groups ready after {time.monotonic() - t0:.1f}s")

            orders = [make_order(i, members, "o") for i in range(n)]
            start = time.monotonic()
            started_at = dt.datetime.now(dt.UTC)
            orders = [o.model_copy(update={"observed_at": started_at}) for o in orders]
            publish_task = asyncio.create_task(publish(infra, orders))
            while (done := await ledger_count(infra, "o")) < n:
                if time.monotonic() - start > 600:
                    raise SystemExit(f"only {done}/{n} orders reached the ledger")
                await asyncio.sleep(0.05)
            elapsed = time.monotonic() - start
            await publish_task
        finally:
            stop.set()
            await runner
        rows = await infra.pool.fetch(
            """SELECT extract(epoch FROM l.created_at - $2::timestamptz) AS lat FROM ledger l
               WHERE tenant_id = $1 AND order_source_id LIKE 'o%' ORDER BY 1""",
            TENANT,
            started_at,
        )
        lat = sorted(float(r["lat"]) for r in rows)
        p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]  # noqa: E731
        print(f"orders: {n}, members: {members}, batch_max_records: {batch}")
        print(f"throughput: {n / elapsed:,.0f} orders/s through resolver + points into PostgreSQL ({elapsed:.2f}s)")
        print(
            f"latency publish -> ledger (all published at t0): p50 {p(0.5) * 1000:.0f} ms, p99 {p(0.99) * 1000:.0f} ms"
        )
        for name in ("resolver", "points"):
            hist = metrics.BATCH_SECONDS.labels(name)
            batches = sum(b.get() for b in hist._buckets)
            msgs = metrics.MESSAGES.labels(name)._value.get()
            print(
                f"{name}: {batches:.0f} batches, {msgs / max(batches, 1):.0f} messages/batch, "
                f"{hist._sum.get() / max(batches, 1) * 1000:.1f} ms/batch"
            )
        await infra.pool.execute(f'DROP SCHEMA "{settings.db_schema}" CASCADE')


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--orders", type=int, default=20000)
    ap.add_argument("--members", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--timeout-ms", type=int, default=20, help="consumer batch_timeout_ms")
    args = ap.parse_args()
    asyncio.run(main(args.orders, args.members, args.batch, args.timeout_ms))
