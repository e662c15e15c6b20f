"""Throughput of the two-hop pipe versus a raw aiokafka produce+consume loop on the same broker.

    .venv/bin/python bench/pipe.py [--messages 30000] [--repeat 3] [--in-process]

Both runs use the same broker (embedded Tansu unless FLASH_KAFKA_BOOTSTRAP is set) and PostgreSQL.
The raw loop: produce N messages (sends issued, then awaited), consume them in a consumer group and
commit offsets. The pipe: the same N messages through hop 1 (dedupe + effect + outbox in PostgreSQL,
publish) and hop 2 (dedupe + effect). Consumers are started and assigned before the clock starts in
both runs, so group-join time is excluded from both. The two are measured alternately ``--repeat`` times
(the raw loop swings run to run on a shared 2-core box); prints every run, the medians and the ratio of
the medians (target: pipe >= 25% of raw).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
import uuid
from decimal import Decimal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from canonical.events import ProductData, ProductUpserted, encode
from servicekit.db import migrate
from servicekit.kafka import OutMessage, ensure_topics
from servicekit.logging import configure_logging
from servicekit.runtime import open_infra, run_loop, run_services
from servicekit.settings import FlashSettings
from servicekit.testing.cpu import CpuAccount
from servicekit.testing.infra import service_env
from servicekit.testing.relay import IN_TOPIC, MID_TOPIC, MIGRATIONS, RELAY


def event(i: int, run: str) -> ProductUpserted:
    return ProductUpserted(
        tenant_id="bench", connection_id="bench", source="flash", entity="relay-in", source_id=f"{run}-{i}",
        source_version="1", product=ProductData(sku=f"SKU-{i}", name=f"Product {i}", price=Decimal("9.99")),
    )


async def raw_loop(bootstrap: str, n: int, payloads: list[bytes]) -> float:
    topic = f"bench-raw-{uuid.uuid4().hex[:8]}"
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=512 * 1024)
    await producer.start()
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"g-{topic}",
                                auto_offset_reset="earliest", enable_auto_commit=False, max_poll_records=1000)
    await producer.send_and_wait(topic, b"warmup")
    await consumer.start()
    got = 0
    while got < 1:  # wait for the assignment and the warm-up record
        for recs in (await consumer.getmany(timeout_ms=500)).values():
            got += len(recs)
    await consumer.commit()
    started = time.perf_counter()

    async def produce() -> None:
        futures = [await producer.send(topic, p, key=str(i % 64).encode()) for i, p in enumerate(payloads)]
        await asyncio.gather(*futures)

    prod_task = asyncio.create_task(produce())
    got = 0
    while got < n:
        batch = await consumer.getmany(timeout_ms=500, max_records=1000)
        got += sum(len(r) for r in batch.values())
        if batch:
            await consumer.commit()
    await prod_task
    elapsed = time.perf_counter() - started
    await consumer.stop()
    await producer.stop()
    return n / elapsed


async def pipe(settings: FlashSettings, n: int, run: str, *, in_process: bool) -> float:
    async with open_infra(settings, create_topics=False) as infra:
        await migrate(infra.pool, [MIGRATIONS])
        await ensure_topics(infra.bootstrap, settings, (), extra=[IN_TOPIC, MID_TOPIC])
        stop = asyncio.Event()
        procs: list[subprocess.Popen[bytes]] = []
        runner = None
        if in_process:
            runner = asyncio.create_task(run_services([RELAY], settings, stop=stop))
        else:  # one process per service, as deployed
            env = service_env(infra.bootstrap, infra.database_url, settings)
            procs = [subprocess.Popen([sys.executable, "-m", "servicekit.testing.relay"],
                                      env={**env, "FLASH_RELAY_HOPS": hop}) for hop in ("hop1", "hop2")]
        topic = settings.topic(IN_TOPIC)
        warm = event(-1, run)
        await infra.publisher.send_all([OutMessage(topic, encode(warm), warm.key)])
        while not await infra.pool.fetchval("SELECT count(*) FROM relay_effects WHERE hop = 'hop2'"):
            await asyncio.sleep(0.1)
        events = [event(i, run) for i in range(n)]
        msgs = [OutMessage(topic, encode(e), e.key) for e in events]
        pids = {"bench": os.getpid()}
        if procs:
            pids |= {"hop1": procs[0].pid, "hop2": procs[1].pid}
        cpu = CpuAccount(pids)
        started = time.time()
        for s in range(0, n, 5000):
            await infra.publisher.send_all(msgs[s:s + 5000])
        # Polled gently (a count is a scan that competes with the pipe for PostgreSQL); the end time is the
        # write time of the last effect row, so the poll interval does not add to the measurement.
        while await infra.pool.fetchval("SELECT count(*) FROM relay_effects WHERE hop = 'hop2'") < n + 1:
            await asyncio.sleep(0.25)
        last = await infra.pool.fetchval("SELECT extract(epoch FROM max(applied_at)) FROM relay_effects")
        elapsed = float(last) - started
        print(f"pipe phase: {elapsed:.2f}s wall; {cpu.report(n, 'message')[0]}")
        stop.set()
        if runner:
            await runner
        for p in procs:
            p.terminate()
            p.wait(20)
        await infra.pool.execute(f'DROP SCHEMA "{settings.db_schema}" CASCADE')
        return n / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=30_000)
    parser.add_argument("--repeat", type=int, default=3, help="alternate raw and pipe runs this many times")
    parser.add_argument("--in-process", action="store_true", help="run both hops in this process")
    args = parser.parse_args()
    configure_logging("WARNING", "console")
    run = uuid.uuid4().hex[:8]
    base = FlashSettings()
    from servicekit.embedded import EmbeddedKafka

    embedded = None
    bootstrap = base.kafka_bootstrap
    if not bootstrap:
        embedded = EmbeddedKafka()
        bootstrap = await embedded.start()
    raws: list[float] = []
    pipes: list[float] = []
    mode = "both hops in one process" if args.in_process else "one process per hop"
    mode += f", {type(asyncio.get_running_loop()).__module__.split('.')[0]} event loop"
    try:
        payloads = [encode(event(i, run)) for i in range(args.messages)]
        for r in range(args.repeat):
            raws.append(await raw_loop(bootstrap, args.messages, payloads))
            run_id = f"{run}{r}"
            settings = base.model_copy(update={"kafka_bootstrap": bootstrap, "db_schema": f"bench_{run_id}",
                                               "topic_prefix": f"bench-{run_id}."})
            pipes.append(await pipe(settings, args.messages, run_id, in_process=args.in_process))
            print(f"run {r + 1}: raw {raws[-1]:,.0f} msg/s, pipe {pipes[-1]:,.0f} msg/s ({pipes[-1] / raws[-1]:.1%})")
    finally:
        if embedded:
            await embedded.stop()
    raw, piped = statistics.median(raws), statistics.median(pipes)
    print(f"messages per run:    {args.messages} ({args.repeat} runs)")
    print(f"raw aiokafka loop:   {raw:,.0f} msg/s median (produce + consume + commit)")
    print(f"two-hop pipe:        {piped:,.0f} msg/s median (2 x consume + PostgreSQL effect + outbox + publish;"
          f" {mode})")
    print(f"ratio pipe/raw:      {piped / raw:.1%} of medians (target >= 25%)")

if __name__ == "__main__":
    run_loop(main(), FlashSettings())
