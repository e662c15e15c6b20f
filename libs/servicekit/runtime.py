"""Composition root shared by the services: infrastructure, FastStream wiring, run until stopped.

A service is described by a :class:`Service` (its name, migrations, consumers and background tasks);
``build_app`` wires it onto a FastStream ``KafkaBroker``. No I/O happens at import.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import asyncpg
from aiokafka import TopicPartition
from faststream import FastStream
from faststream.kafka import KafkaBroker, KafkaMessage
from faststream.middlewares import AckPolicy

from servicekit import metrics
from servicekit.consumer import PipeConsumer, prune_processed
from servicekit.db import CORE_MIGRATIONS, Migrations, create_pool, migrate
from servicekit.embedded import EmbeddedKafka, resolve_database_url
from servicekit.errors import ConfigError, FlashError, InfrastructureUnavailable, classify
from servicekit.kafka import KafkaPublisher, KafkaSecurity, ensure_topics, kafka_security, make_broker
from servicekit.logging import bind, get_logger
from servicekit.metrics import metrics_server
from servicekit.retention import prune_platform_tables
from servicekit.settings import FlashSettings

__all__ = [
    "Infra", "Service", "build_app", "every", "install_signal_handlers", "main", "open_infra", "run_services",
    "subscribe",
]

log = get_logger(__name__)

T = TypeVar("T")

STARTUP_WAIT_S = 120.0
"""How long a starting service waits for its database and broker (a restart during an outage) before it
stops with an error."""
TASK_GRACE_S = 8.0
"""On stop, how long background tasks get to finish their cycle before they are cancelled."""
DRAIN_S = 10.0
"""On stop, how long consumers get to finish the batches already taken (commit, publish, offsets)."""
SHUTDOWN_BOUND_S = 30.0
"""Documented bound (README, deploy/k8s terminationGracePeriodSeconds) from SIGTERM/SIGINT to exit:
TASK_GRACE_S + DRAIN_S + closing the broker and database connections."""


@dataclass
class Infra:
    """Connections one process shares between its services."""

    settings: FlashSettings
    bootstrap: str
    pool: asyncpg.Pool
    publisher: KafkaPublisher
    database_url: str = ""
    security: KafkaSecurity = field(default_factory=KafkaSecurity)
    """SASL/TLS of every Kafka client of this process (from the FLASH_KAFKA_* settings)."""
    embedded_kafka: bool = False
    """The broker is the embedded single-node one this process started (topics get replication 1)."""
    embedded: EmbeddedKafka | None = None
    """The broker child process this process started (no FLASH_KAFKA_BOOTSTRAP); watched while services run."""


@dataclass
class Service:
    name: str
    migrations: Sequence[Migrations] = ()
    consumers: Callable[[Infra], Sequence[PipeConsumer[Any]]] = lambda infra: ()
    tasks: Callable[[Infra, asyncio.Event], Sequence[Awaitable[None]]] = lambda infra, stop: ()
    extra_topics: Sequence[str] = field(default_factory=tuple)


@contextlib.asynccontextmanager
async def open_infra(
    settings: FlashSettings, *, migrations: Sequence[Migrations] = (), create_topics: bool = True,
    wait_s: float = 0.0,
) -> AsyncIterator[Infra]:
    """Broker (configured or embedded), database (configured, local or embedded), pool, publisher.

    With ``wait_s`` (services starting), an outage of the configured database or broker is waited out for
    up to that long, with a warning per attempt, instead of failing at once."""
    settings.apply_limits()
    embedded: EmbeddedKafka | None = None
    bootstrap = settings.kafka_bootstrap
    security = kafka_security(settings)
    if not bootstrap:
        embedded = EmbeddedKafka()
        bootstrap = await embedded.start()
    pool: asyncpg.Pool | None = None
    publisher: KafkaPublisher | None = None
    try:
        dsn = await resolve_database_url(settings.database_url, settings.state_dir)
        deadline = time.monotonic() + wait_s
        pool = await _until_up(lambda: create_pool(dsn, schema=settings.db_schema, max_size=10), deadline,
                               "PostgreSQL")
        await _until_up(lambda: migrate(pool, [CORE_MIGRATIONS, *migrations]), deadline, "PostgreSQL")
        if create_topics:
            await _until_up(lambda: ensure_topics(bootstrap, settings, embedded=embedded is not None), deadline,
                            "the Kafka broker")

        async def start_publisher() -> KafkaPublisher:
            p = KafkaPublisher(bootstrap, client_id=settings.instance_id or "flash", security=security)
            try:
                await p.start()
            except BaseException:
                with contextlib.suppress(Exception):
                    await p.stop()
                raise
            return p

        publisher = await _until_up(start_publisher, deadline, "the Kafka broker")
        # The settings handed on name what was resolved, so whoever runs services with them reuses this
        # broker and database instead of starting another embedded one.
        resolved = settings.model_copy(update={"kafka_bootstrap": bootstrap, "database_url": dsn})
        yield Infra(resolved, bootstrap, pool, publisher, dsn, security, embedded is not None, embedded)
    finally:
        if publisher:
            await publisher.stop()
        if pool:
            await pool.close()
        if embedded:
            await embedded.stop()


async def _until_up(attempt: Callable[[], Awaitable[T]], deadline: float, what: str) -> T:
    """``attempt()``, retried while it fails for an outage (the one classification table) until ``deadline``."""
    delay = 0.2
    while True:
        try:
            return await attempt()
        except Exception as exc:
            if not issubclass(classify(exc), InfrastructureUnavailable) or time.monotonic() + delay > deadline:
                raise
            log.warning(f"waiting for {what} to answer at start", error=str(exc)[:300], retry_in_s=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def subscribe(
    broker: KafkaBroker,
    consumer: PipeConsumer[Any],
    settings: FlashSettings,
    on_fatal: Callable[[BaseException], None],
) -> None:
    """Register ``consumer`` as a batch subscriber that acknowledges only after the effect.

    FastStream's Kafka default acknowledges first and can lose messages; here the ack policy is MANUAL:
    a batch's offsets are committed (explicitly, per partition) once its effects are committed and its
    outputs acknowledged, while the next batches are already being handled (see :class:`PipeConsumer`);
    they are left uncommitted on a configuration error, which also stops the service.
    """

    stopped = False

    def fatal(exc: BaseException) -> None:
        nonlocal stopped
        consumer.close()
        if not stopped:
            stopped = True
            what = "configuration error" if isinstance(exc, ConfigError) else "unexpected error"
            log.critical(f"consumer stopped: {what}", consumer=consumer.name, error=str(exc)[:500],
                         error_class=type(exc).__name__)
            on_fatal(exc)

    consumer.on_fatal = fatal  # a transaction runs on after on_batch returned: it reports through this

    async def on_batch(msg: KafkaMessage) -> None:
        records = msg.raw_message if isinstance(msg.raw_message, tuple) else (msg.raw_message,)
        kafka_consumer = msg.consumer
        # Records of one partition arrive in offset order: the last one of each partition decides.
        last: dict[tuple[str, int], int] = {}
        for rec in records:
            last[(rec.topic, rec.partition)] = rec.offset
        offsets = {TopicPartition(t, p): o + 1 for (t, p), o in last.items()}

        async def commit_offsets() -> None:
            # Exactly this batch's offsets: by now the consumer may have fetched (and be handling) the next one.
            await kafka_consumer.commit(offsets)  # type: ignore[call-arg]

        _observe_lag(consumer.name, kafka_consumer, last)
        try:
            await consumer.handle_batch(records, after_publish=commit_offsets)
        except Exception as exc:  # noqa: BLE001 - a ConfigError, or a defect: either way nothing may move on
            # Take no further batch: a later batch's offset commit would move past this one's records.
            consumer.close()
            with contextlib.suppress(Exception):
                await consumer.drain()
            await msg.nack()
            fatal(exc)

    on_batch.__name__ = f"consume_{consumer.name.replace('-', '_')}"
    broker.subscriber(
        *[settings.topic(t) for t in consumer.topics],
        batch=True,
        group_id=settings.group(consumer.name),
        ack_policy=AckPolicy.MANUAL,
        max_records=settings.batch_max_records,
        batch_timeout_ms=settings.batch_timeout_ms,
        auto_offset_reset="earliest",
        max_poll_interval_ms=600_000,
        # The embedded broker holds a fetch for the full wait even when data arrives; a short wait keeps
        # batch-to-batch latency low (measured: 500 ms default -> idle gaps between every batch).
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
        max_partition_fetch_bytes=4 * 1024 * 1024,
        title=f"{consumer.name}:{','.join(consumer.topics)}",
        parser=_parse_batch_lean,
        decoder=_keep_raw,
    )(on_batch)


async def _parse_batch_lean(records: Any, original: Callable[[Any], Awaitable[KafkaMessage]]) -> KafkaMessage:
    """FastStream's batch parser turns every record's headers into a dict, which nothing here reads (the
    consumer runtime works on the records): it parses the first record only, for the message's metadata,
    and the message carries all the records (``raw_message``, which nack and on_batch read)."""
    if not isinstance(records, tuple) or len(records) <= 1:
        return await original(records)
    msg = await original(records[:1])
    msg.raw_message = records
    return msg


async def _keep_raw(msg: Any) -> None:
    """FastStream would JSON-decode every body; the consumer runtime decodes (and diagnoses) itself."""
    return None


def build_app(
    services: Sequence[Service], infra: Infra, *, on_fatal: Callable[[BaseException], None] | None = None
) -> tuple[FastStream, KafkaBroker]:
    """Wire the consumers of ``services`` onto one broker; the FastStream app documents them (AsyncAPI)."""
    app, broker, _ = _wire(services, infra, on_fatal)
    return app, broker


def _wire(
    services: Sequence[Service], infra: Infra, on_fatal: Callable[[BaseException], None] | None
) -> tuple[FastStream, KafkaBroker, list[PipeConsumer[Any]]]:
    broker = make_broker(infra.bootstrap, infra.security)
    fatal = on_fatal or (lambda exc: None)
    consumers: list[PipeConsumer[Any]] = []
    # Copies of a consumer share its group and split its partitions; in one process they overlap each
    # other's database and broker waits (each copy handles one batch at a time, in order per partition).
    for _ in range(infra.settings.consumer_copies):
        for svc in services:
            for consumer in svc.consumers(infra):
                subscribe(broker, consumer, infra.settings, fatal)
                consumers.append(consumer)
    return FastStream(broker), broker, consumers


async def run_services(
    services: Sequence[Service],
    settings: FlashSettings,
    *,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[Infra], Awaitable[None]] | None = None,
    infra: Infra | None = None,
) -> int:
    """Run services in this process until SIGINT/SIGTERM or ``stop``; returns an exit code.

    With ``infra`` the services share connections the caller opened (and must have migrated).
    """
    stop = stop or asyncio.Event()
    fatal: list[BaseException] = []
    # Batches allocate many short-lived objects; the default GC thresholds make collections run every
    # few hundred messages. Fewer, larger young-generation collections cut batch latency noticeably.
    gc.set_threshold(50_000, 20, 20)

    def on_fatal(exc: BaseException) -> None:
        fatal.append(exc)
        stop.set()

    install_signal_handlers(stop)
    settings.apply_limits()
    bind(service="+".join(s.name for s in services))
    migrations = [m for s in services for m in s.migrations]
    async with contextlib.AsyncExitStack() as stack:
        if infra is None:
            infra = await stack.enter_async_context(open_infra(settings, migrations=migrations,
                                                               wait_s=STARTUP_WAIT_S))
        if settings.instance_id:
            bind(instance_id=settings.instance_id)  # FLASH_INSTANCE_ID: which copy of the service wrote the line
        started = asyncio.Event()  # /readyz answers 200 once the consumers are subscribed
        if settings.metrics_port is not None:  # /metrics, /healthz, /readyz (servicekit.metrics)
            await stack.enter_async_context(metrics_server(settings.metrics_port, _readiness(infra, started)))
        if any(s.extra_topics for s in services):
            await ensure_topics(infra.bootstrap, settings, (), extra=[t for s in services for t in s.extra_topics],
                                embedded=infra.embedded_kafka)
        _, broker, consumers = _wire(services, infra, on_fatal)
        await broker.start()
        tasks = [asyncio.ensure_future(t) for s in services for t in s.tasks(infra, stop)]
        if infra.embedded is not None:
            # The embedded broker is memory-only: restarting it would bring back an empty broker (topics,
            # offsets and undelivered messages gone), so its death stops the process with a clear error.
            tasks.append(asyncio.ensure_future(infra.embedded.watch(stop)))
        if consumers and settings.processed_retention_days:
            names = sorted({c.name for c in consumers})
            tasks.append(asyncio.ensure_future(every(
                3600, stop, lambda: prune_processed(infra.pool, names, settings.processed_retention_days),
                what="processed pruning",
            )))
        if consumers:  # dead letters and replay audits: pruned by every consumer process (chunked, idempotent)
            tasks.append(asyncio.ensure_future(every(
                3600, stop, lambda: prune_platform_tables(infra.pool, settings), what="dead-letter pruning",
            )))
        for t in tasks:
            t.add_done_callback(lambda task: _task_done(task, on_fatal))
        log.info("services started", services=[s.name for s in services], bootstrap=infra.bootstrap)
        started.set()
        try:
            if on_ready:
                await on_ready(infra)
            await stop.wait()
        finally:
            # Background tasks (pollers, listeners) watch ``stop``: they get TASK_GRACE_S to finish the cycle
            # in hand (publish, checkpoint, release their leases), then are cancelled (a cancelled cycle
            # re-reads from its last checkpoint at the next start, nothing is lost).
            if tasks and stop.is_set():
                await asyncio.wait(tasks, timeout=TASK_GRACE_S)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # Finish the batches already taken - commit, publish, commit their offsets - while the consumers
            # are still group members (after broker.stop() their offset commits would fail), taking no new
            # ones meanwhile; at most 10 s, then the rest is redelivered or relayed from the outbox at the
            # next start (as after a kill).
            for c in consumers:
                c.close()
            await asyncio.gather(*(c.drain(timeout=DRAIN_S) for c in consumers), return_exceptions=True)
            await broker.stop()
    if fatal:
        log.critical("stopped on error", error=str(fatal[0]))
        return 2
    return 0


def _observe_lag(name: str, kafka_consumer: Any, last: dict[tuple[str, int], int]) -> None:
    """Consumer lag per partition: the high watermark the last fetch saw, minus what this batch reaches."""
    for (topic, partition), offset in last.items():
        high = kafka_consumer.highwater(TopicPartition(topic, partition))
        if high is not None:
            metrics.CONSUMER_LAG.labels(name, topic, str(partition)).set(max(0, high - offset - 1))


def _readiness(infra: Infra, started: asyncio.Event) -> Callable[[], Awaitable[str | None]]:
    async def ready() -> str | None:
        if not started.is_set():
            return "starting: consumers not subscribed yet"
        try:
            await asyncio.wait_for(infra.pool.fetchval("SELECT 1"), 2)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            return f"PostgreSQL does not answer: {exc}"
        return None

    return ready


def install_signal_handlers(stop: asyncio.Event) -> None:
    """SIGINT and SIGTERM set ``stop`` (where the platform's event loop supports signal handlers)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # Windows loops, or not the main thread
            log.debug("signal handlers unavailable here; stop with the stop event")


def _task_done(task: asyncio.Future[None], on_fatal: Callable[[BaseException], None]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.critical("background task failed", error=str(exc), error_class=type(exc).__name__)
        on_fatal(exc)


async def every(interval: float, stop: asyncio.Event, job: Callable[[], Awaitable[int]], *, what: str) -> None:
    """Run ``job`` until it returns 0 (nothing left), then wait ``interval`` s; repeat until ``stop``.

    For background tasks (re-linking, maturing, pruning): our own outage is waited out; a configuration
    error stops the service; anything else (poison, a transient or unclassified error: the one table
    decides) is logged and retried next round, so one bad record never stops the task or the service.
    """
    while not stop.is_set():
        try:
            while await job():
                pass
        except Exception as exc:
            kind = classify(exc)
            if issubclass(kind, ConfigError):
                raise
            if issubclass(kind, InfrastructureUnavailable):
                log.warning(f"{what} deferred", error=str(exc)[:500])
            else:
                log.error(f"{what} failed; retried next round", error=str(exc)[:500],  # noqa: TRY400
                          error_class=type(exc).__name__)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


def run_loop(main: Coroutine[Any, Any, T], settings: FlashSettings) -> T:
    """Run ``main`` to completion on the event loop ``settings.event_loop`` asks for (see there)."""
    if settings.event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if settings.event_loop == "uvloop":
                main.close()
                raise ConfigError(
                    "FLASH_EVENT_LOOP=uvloop but uvloop is not installed (it is not available on Windows); "
                    "install it or set FLASH_EVENT_LOOP=asyncio"
                ) from None
        else:
            return uvloop.run(main)
    return asyncio.run(main)


def main(service: Service) -> int:
    """``python -m <service>``: run one service until SIGINT/SIGTERM, settings from FLASH_ variables."""
    from servicekit.logging import configure_logging

    settings = FlashSettings()
    configure_logging(settings.log_level, settings.log_format, service=service.name)
    try:
        return run_loop(run_services([service], settings), settings)
    except FlashError as exc:  # said once, clearly, instead of a traceback
        log.critical("service stopped", error=str(exc)[:1000], error_class=type(exc).__name__)
        return 2
