"""Prometheus metrics shared by every service, and the small HTTP server that exposes them.

With ``FLASH_METRICS_PORT`` set, every service process (``flash run``, ``python -m <service>``,
``flash serve``) answers on ``127.0.0.1:PORT``:

* ``GET /metrics``: the Prometheus text format (this module's metrics plus each service's own);
* ``GET /healthz``: 200 while the process runs (liveness);
* ``GET /readyz``: 200 once the service's database and broker answer, 503 with the reason otherwise.

Labels never carry tenant ids (or anything else per customer): each tenant would add a time series to
every metric, without bound. Per-tenant figures are in ``flash status`` and the control plane API.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest

from servicekit.logging import get_logger

__all__ = [
    "BATCH_SECONDS",
    "CONSUMER_LAG",
    "DEAD_LETTERS",
    "DUPLICATES",
    "FAILED",
    "MESSAGES",
    "POINTS",
    "PUBLISHED",
    "RECORDS_FETCHED",
    "RETRIES",
    "REWRITES",
    "SOURCE_REQUESTS",
    "VENDOR_QUOTA_LIMIT",
    "VENDOR_QUOTA_USED",
    "metrics_server",
    "observe_quota",
    "quota_seen",
    "serve_metrics",
]

log = get_logger(__name__)

MESSAGES = Counter("flash_messages_total", "Messages consumed (handled or dead-lettered)", ["consumer"])
PUBLISHED = Counter("flash_messages_published_total", "Messages published after commit (outbox)", ["consumer"])
FAILED = Counter("flash_messages_failed_total", "Failed attempts at handling one message", ["consumer", "error_class"])
DUPLICATES = Counter("flash_duplicates_total", "Messages skipped as already processed", ["consumer"])
REWRITES = Counter(
    "flash_rewrites_total", "Messages whose event id was handled before with different content", ["consumer"]
)
DEAD_LETTERS = Counter("flash_dead_letters_total", "Messages dead-lettered", ["consumer", "error_class"])
RETRIES = Counter("flash_retries_total", "Retries after a failure", ["consumer", "error_class"])
BATCH_SECONDS = Histogram(
    "flash_batch_seconds", "Handling latency: one batch from fetch to committed effect", ["consumer"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
CONSUMER_LAG = Gauge(
    "flash_consumer_lag", "Records behind the partition's high watermark after the last batch",
    ["consumer", "topic", "partition"],
)
POINTS = Counter("flash_points_total", "Points written to the ledger (absolute value), by entry kind", ["kind"])
RECORDS_FETCHED = Counter("flash_records_fetched_total", "Vendor records fetched", ["source", "entity"])
SOURCE_REQUESTS = Counter("flash_source_requests_total", "Vendor HTTP requests", ["source", "status"])
PARKED = Gauge("flash_parked", "Orders/returns parked waiting for a member")
# Labels stay bounded: never a tenant, connection or record id (tests/unit/test_metric_labels.py). Per-tenant
# figures are in the database (`flash status`, `flash dlq depth`); logs carry the ids.
VENDOR_QUOTA_USED = Gauge("flash_vendor_quota_used", "Vendor API calls used in the current allocation (last seen)",
                          ["source"])
VENDOR_QUOTA_LIMIT = Gauge("flash_vendor_quota_limit", "Vendor API allocation (last seen)", ["source"])


def observe_quota(source: str, used: int, maximum: int | None) -> None:
    """Record the vendor's quota figures as last reported (e.g. Salesforce ``Sforce-Limit-Info``)."""
    VENDOR_QUOTA_USED.labels(source).set(used)
    if maximum:
        VENDOR_QUOTA_LIMIT.labels(source).set(maximum)


def quota_seen(source: str) -> str | None:
    """``used/limit`` of ``source`` as this process last saw it, or None."""
    used = REGISTRY.get_sample_value("flash_vendor_quota_used", {"source": source})
    limit = REGISTRY.get_sample_value("flash_vendor_quota_limit", {"source": source})
    if used is None:
        return None
    return f"{int(used)}/{int(limit)}" if limit else str(int(used))


ReadyCheck = Callable[[], Awaitable[str | None]]
"""Returns ``None`` when ready, else what is not (shown in the 503 body)."""


def metrics_routes(app: web.Application, ready: ReadyCheck | None = None) -> None:
    """Add ``/metrics``, ``/healthz`` and ``/readyz`` to ``app`` (the control plane serves them too)."""

    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        problem = "starting" if ready is None else await _safe(ready)
        if problem:
            return web.json_response({"status": "not ready", "reason": problem}, status=503)
        return web.json_response({"status": "ready"})

    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)


async def _safe(check: ReadyCheck) -> str | None:
    try:
        return await check()
    except Exception as exc:  # noqa: BLE001 - any failure of a readiness probe means "not ready"
        return f"{type(exc).__name__}: {exc}"


@contextlib.asynccontextmanager
async def metrics_server(port: int, ready: ReadyCheck | None = None, *, host: str = "127.0.0.1") -> AsyncIterator[int]:
    """Serve the metrics endpoints on ``host:port`` while the block runs; yields the bound port."""
    app = web.Application()
    metrics_routes(app, ready)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = port
    server = getattr(site, "_server", None)
    if port == 0 and server is not None and server.sockets:
        bound = int(server.sockets[0].getsockname()[1])
    log.info("metrics served", url=f"http://{host}:{bound}/metrics")
    try:
        yield bound
    finally:
        await runner.cleanup()


def serve_metrics(port: int) -> None:
    """Blocking-free exposition from a thread (for scripts without an event loop): ``/metrics`` only."""
    from prometheus_client import start_http_server

    start_http_server(port, addr="127.0.0.1")
