"""Bench: canonical orders through the member resolver and the points engine into PostgreSQL, on the
real broker.

    .venv/bin/python bench/points.py [--orders 20000] [--repeat 3] [--members 2000] [--rate 2000]
                                     [--points-replicas 2] [--in-process]

Starts the embedded broker (or FLASH_KAFKA_BOOTSTRAP) and the local PostgreSQL in a fresh schema,
pre-loads a program, members and linked customers, starts the two services - one process each, as
deployed (``python -m resolver``, ``python -m points``), or both in this process with --in-process -
and warms their consumer groups up. ``--points-replicas N`` runs N points engine processes in its
consumer group (they split the partitions, as replicas of a deployment do), waiting until the group is
stable before measuring: the points engine is the slowest stage, and one process leaves CPU idle while
it waits on PostgreSQL. Every order is one ``order.upserted`` event carrying its header and
two lines (one in an x2 category); the resolver turns it into one ``order.resolved``, the points engine
into one ledger entry, so each order is three events (one per hop); lines sent as events of their own
(``order.line_upserted``) would add two messages per order to each hop. The end of an order's journey
is its entry arriving on points.ledger (written and committed, then published), read here by a plain
consumer.

Two measurements:
  flood   all N orders published at once, --repeat times (each printed, then the median: a 2-core box
          shared with a broker and PostgreSQL swings run to run).
          orders/s = N / (first publish -> last ledger entry): the
          capacity. Its latency percentiles are mostly time spent queueing behind earlier orders (the
          last order waits for all the others), so they say little about the pipe itself.
  steady  (--rate R) N orders published at R orders/s in small chunks, below capacity: publish ->
          ledger entry latency p50/p99 is then the pipe's own handling latency (two consumer hops,
          batching waits, two transactions, two publishes).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

# This file is named like the points package: keep its folder off the import path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from aiokafka import AIOKafkaConsumer, TopicPartition  # noqa: E402
from aiokafka.admin import AIOKafkaAdminClient  # noqa: E402

from canonical.events import OrderData, OrderLineData, OrderUpserted, encode  # noqa: E402
from canonical.topics import CANONICAL_ORDER, POINTS_LEDGER  # noqa: E402
from points.app import CONSUMER as POINTS_CONSUMER  # noqa: E402
from points.app import MIGRATIONS as POINTS_MIGRATIONS  # noqa: E402
from points.app import build_service  # noqa: E402
from points.cli import set_program  # noqa: E402
from points.rules import Program  # noqa: E402
from resolver.adapters import PgResolverStore  # noqa: E402
from resolver.app import MIGRATIONS as RESOLVER_MIGRATIONS  # noqa: E402
from resolver.app import SERVICE as RESOLVER  # noqa: E402
from servicekit.kafka import OutMessage  # noqa: E402
from servicekit.logging import configure_logging  # noqa: E402
from servicekit.runtime import Infra, open_infra, run_loop, run_services  # noqa: E402
from servicekit.settings import FlashSettings  # noqa: E402
from servicekit.testing.cpu import CpuAccount  # noqa: E402
from servicekit.testing.infra import service_env  # noqa: E402

TENANT = "bench"
CHUNK_S = 0.02  # steady mode publishes every 20 ms


def make_order(i: int, members: int, tag: str) -> OrderUpserted:
    lines = (
        OrderLineData(line_id=f"{tag}-{i}-1", product_source_id="tv", amount=Decimal("60.00")),
        OrderLineData(line_id=f"{tag}-{i}-2", product_source_id="sock", amount=Decimal("40.00")),
    )
    return OrderUpserted(
        tenant_id=TENANT,
        connection_id="crm",
        source="dynamics-ce",
        entity="salesorder",
        source_id=f"{tag}-{i}",
        source_version="1",
        order=OrderData(
            order_number=f"SO-{tag}-{i}",
            customer_source_id=f"c{i % members}",
            status="100003",
            lifecycle="awardable",
            currency="EUR",
            total_amount=Decimal("121.00"),
            tax_amount=Decimal("21.00"),
            lines=lines,
        ),
    )


def encoded(n: int, members: int, tag: str, topic: str) -> list[OutMessage]:
    """The orders as the messages to publish, built before the clock starts (and no objects kept)."""
    out = []
    for i in range(n):
        o = make_order(i, members, tag)
        out.append(OutMessage(topic, encode(o), o.key))
    return out


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
                (TENANT, "crm", "dynamics-ce", f"c{i}", "account", None, f"C-{i}", None, f"m{i}", "external_id", "",
                 "1")
                for i in range(members)
            ]
        )


class LedgerWatch:
    """Reads points.ledger and notes when each order's entry arrived."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, max_poll_records=5000)
        self.topic = topic
        self.arrived: dict[str, float] = {}
        self.counts: collections.Counter[str] = collections.Counter()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.consumer.start()
        parts = self.consumer.partitions_for_topic(self.topic)
        while not parts:
            await asyncio.sleep(0.1)
            parts = self.consumer.partitions_for_topic(self.topic)
        self.consumer.assign([TopicPartition(self.topic, p) for p in parts])
        await self.consumer.seek_to_beginning()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            batches = await self.consumer.getmany(timeout_ms=50)
            now = time.perf_counter()
            for records in batches.values():
                for r in records:  # keyed tenant:order (no need to decode the entry)
                    order = (r.key or b"").decode().partition(":")[2]
                    if order not in self.arrived:
                        self.arrived[order] = now
                        self.counts[order.partition("-")[0]] += 1

    def count(self, tag: str) -> int:
        """Orders of ``tag`` seen (order ids are '<tag>-<n>'; counted as they arrive, not rescanned)."""
        return self.counts[tag]

    async def wait(self, tag: str, n: int, timeout: float) -> None:
        start = time.perf_counter()
        while self.count(tag) < n:
            if time.perf_counter() - start > timeout:
                raise SystemExit(f"only {self.count(tag)}/{n} '{tag}' orders reached points.ledger in {timeout:.0f}s")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.consumer.stop()


@contextlib.asynccontextmanager
async def services(
    infra: Infra, settings: FlashSettings, *, in_process: bool, points_replicas: int = 1
) -> AsyncIterator[dict[str, int | list[int]]]:
    """Run the two services; yields their process ids by name (for the CPU account)."""
    if in_process:
        stop = asyncio.Event()
        runner = asyncio.create_task(run_services([RESOLVER, build_service()], settings, stop=stop))
        try:
            yield {"bench + resolver + points": os.getpid()}
        finally:
            stop.set()
            await runner
        return
    env = service_env(
        infra.bootstrap, infra.database_url, settings,
        FLASH_BATCH_MAX_RECORDS=str(settings.batch_max_records), FLASH_BATCH_TIMEOUT_MS=str(settings.batch_timeout_ms),
    )
    modules = ["resolver"] + ["points"] * points_replicas
    procs = [subprocess.Popen([sys.executable, "-m", m], env=env) for m in modules]
    try:
        await wait_for_group(infra.bootstrap, settings.group(POINTS_CONSUMER), points_replicas)
        yield {"resolver": procs[0].pid, "points": [p.pid for p in procs[1:]], "bench": os.getpid()}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)


async def wait_for_group(bootstrap: str, group: str, members: int, timeout: float = 60) -> None:
    """Until ``group`` is Stable with ``members`` members: replicas joining later would rebalance the
    group in the middle of a measurement."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        deadline = time.monotonic() + timeout
        while True:
            state, count = "", 0
            with contextlib.suppress(Exception):  # the group does not exist until its first member joins
                for response in await admin.describe_consumer_groups([group]):
                    for g in response.groups:
                        state, count = g[2], len(g[5])
            if state == "Stable" and count == members:
                return
            if time.monotonic() > deadline:
                raise SystemExit(f"group {group} not stable with {members} members after {timeout:.0f}s "
                                 f"(state {state or 'unknown'}, {count} members)")
            await asyncio.sleep(0.5)
    finally:
        await admin.close()


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def batch_stats(infra: Infra, since: dt.datetime) -> str:
    rows = await infra.pool.fetch(
        """SELECT consumer, count(DISTINCT processed_at) AS batches, count(*) AS messages FROM processed
           WHERE tenant_id = $1 AND processed_at >= $2 GROUP BY consumer ORDER BY consumer""",
        TENANT,
        since,
    )
    return ", ".join(f"{r['consumer']} {r['batches']} batches of {r['messages'] / r['batches']:.0f}" for r in rows)


async def flood(
    infra: Infra, watch: LedgerWatch, msgs: list[OutMessage], tag: str, pids: dict[str, int | list[int]]
) -> tuple[float, float]:
    """One flood; returns (orders/s, CPU us/order)."""
    n = len(msgs)
    cpu = CpuAccount(pids)
    since = dt.datetime.now(dt.UTC)
    start = time.perf_counter()
    await infra.publisher.send_all(msgs)
    published = time.perf_counter() - start
    await watch.wait(tag, n, 600)
    elapsed = max(watch.arrived[k] for k in watch.arrived if k.startswith(tag + "-")) - start
    lat = [watch.arrived[k] - start for k in watch.arrived if k.startswith(tag + "-")]
    rate = n / elapsed
    print(
        f"flood:  {n} orders published at once (in {published:.2f}s), last ledger entry after {elapsed:.2f}s: "
        f"{rate:,.0f} orders/s"
    )
    print(
        f"        events/s: {rate:,.0f} order.upserted into the resolver, {rate:,.0f} order.resolved into points, "
        f"{rate:,.0f} ledger entries out ({3 * rate:,.0f}/s in all)"
    )
    print(
        f"        publish -> ledger entry p50 {pct(lat, 0.5) * 1000:,.0f} ms, p99 {pct(lat, 0.99) * 1000:,.0f} ms "
        f"(queueing: the last orders wait for all before them)"
    )
    line, cpu_per_order = cpu.report(n)
    print(f"        {line}")
    print(f"        {await batch_stats(infra, since)}")
    return rate, cpu_per_order


async def steady(infra: Infra, watch: LedgerWatch, msgs: list[OutMessage], tag: str, rate: float) -> None:
    n = len(msgs)
    per_chunk = max(1, round(rate * CHUNK_S))
    sent: dict[str, float] = {}
    since = dt.datetime.now(dt.UTC)
    start = time.perf_counter()
    for c, i in enumerate(range(0, n, per_chunk)):
        delay = start + c * per_chunk / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        chunk = msgs[i : i + per_chunk]
        t = time.perf_counter()
        await infra.publisher.send_all(chunk)
        for j in range(i, i + len(chunk)):
            sent[f"{tag}-{j}"] = t
    offered = n / (time.perf_counter() - start)
    await watch.wait(tag, n, 600)
    elapsed = max(watch.arrived[k] for k in sent) - start
    lat = [watch.arrived[k] - sent[k] for k in sent]
    print(
        f"steady: {n} orders offered at {offered:,.0f}/s (asked {rate:,.0f}/s), {n / elapsed:,.0f} orders/s landed; "
        f"publish -> ledger entry p50 {pct(lat, 0.5) * 1000:,.0f} ms, p99 {pct(lat, 0.99) * 1000:,.0f} ms, "
        f"max {max(lat) * 1000:,.0f} ms"
    )
    print(f"        {await batch_stats(infra, since)}")


async def main(args: argparse.Namespace) -> None:
    run = uuid.uuid4().hex[:8]
    settings = FlashSettings(
        db_schema=f"bench_points_{run}",
        topic_prefix=f"bench{run}.",
        log_level="WARNING",
        batch_max_records=args.batch,
        batch_timeout_ms=args.timeout_ms,
    )
    configure_logging("WARNING", "console")
    async with open_infra(settings, migrations=[RESOLVER_MIGRATIONS, POINTS_MIGRATIONS]) as infra:
        settings = infra.settings
        topic = settings.topic(CANONICAL_ORDER)
        await preload(infra, args.members)
        watch = LedgerWatch(infra.bootstrap, settings.topic(POINTS_LEDGER))
        await watch.start()
        mode = "both services in this process" if args.in_process else (
            "one process per service" if args.points_replicas == 1
            else f"resolver x1, points x{args.points_replicas} (one group)"
        )
        mode += f", {type(asyncio.get_running_loop()).__module__.split('.')[0]} event loop"
        print(
            f"{mode}; {args.orders} orders x (header + 2 lines in one order.upserted event), {args.members} members, "
            f"batch_max_records {args.batch}, batch_timeout_ms {args.timeout_ms}"
        )
        warm = encoded(200, args.members, "w", topic)
        floods = [encoded(args.orders, args.members, f"f{k}", topic) for k in range(args.repeat)]
        paced = encoded(args.orders, args.members, "s", topic) if args.rate else []
        try:
            async with services(
                infra, settings, in_process=args.in_process, points_replicas=args.points_replicas
            ) as pids:
                t0 = time.perf_counter()
                await infra.publisher.send_all(warm)
                await watch.wait("w", len(warm), 120)
                print(f"warm-up: consumer groups ready after {time.perf_counter() - t0:.1f}s")
                results = []
                for k, msgs in enumerate(floods):
                    results.append(await flood(infra, watch, msgs, f"f{k}", pids))
                if len(results) > 1:
                    rates = sorted(r for r, _ in results)
                    cpus = sorted(c for _, c in results)
                    print(
                        f"flood median of {len(results)}: {statistics.median(rates):,.0f} orders/s "
                        f"(runs {', '.join(f'{r:,.0f}' for r, _ in results)}), "
                        f"CPU {statistics.median(cpus):,.0f} us/order (target: >= 5,000 orders/s)"
                    )
                if args.rate:
                    await steady(infra, watch, paced, "s", args.rate)
        finally:
            await watch.stop()
            await infra.pool.execute(f'DROP SCHEMA "{settings.db_schema}" CASCADE')


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--orders", type=int, default=20000)
    ap.add_argument("--members", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3, help="flood this many times; prints each and the median")
    ap.add_argument("--rate", type=float, default=0, help="also run the steady measurement at this many orders/s")
    ap.add_argument("--in-process", action="store_true", help="run both services in this process")
    ap.add_argument("--points-replicas", type=int, default=1,
                    help="points engine processes in one consumer group (they split the partitions)")
    ap.add_argument("--batch", type=int, default=1000, help="consumer batch_max_records")
    ap.add_argument("--timeout-ms", type=int, default=20, help="consumer batch_timeout_ms")
    run_loop(main(ap.parse_args()), FlashSettings())
