"""Prometheus metrics shared by every service (exposed with ``FLASH_METRICS_PORT``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

__all__ = [
    "BATCH_SECONDS",
    "DEAD_LETTERS",
    "DUPLICATES",
    "MESSAGES",
    "RECORDS_FETCHED",
    "RETRIES",
    "REWRITES",
    "SOURCE_REQUESTS",
    "serve_metrics",
]

MESSAGES = Counter("flash_messages_total", "Messages consumed", ["consumer"])
DUPLICATES = Counter("flash_duplicates_total", "Messages skipped as already processed", ["consumer"])
REWRITES = Counter(
    "flash_rewrites_total", "Messages whose event id was handled before with different content", ["consumer"]
)
DEAD_LETTERS = Counter("flash_dead_letters_total", "Messages dead-lettered", ["consumer", "error_class"])
RETRIES = Counter("flash_retries_total", "Retries after a failure", ["consumer", "error_class"])
BATCH_SECONDS = Histogram(
    "flash_batch_seconds", "Time to handle one batch end to end", ["consumer"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RECORDS_FETCHED = Counter("flash_records_fetched_total", "Vendor records fetched", ["source", "entity"])
SOURCE_REQUESTS = Counter("flash_source_requests_total", "Vendor HTTP requests", ["source", "status"])
PARKED = Gauge("flash_parked", "Orders/returns parked waiting for a member")
# Labels stay bounded: never a tenant, connection or record id (tests/unit/test_metric_labels.py). Per-tenant
# figures are in the database (`flash status`, `flash dlq depth`); logs carry the ids.


def serve_metrics(port: int) -> None:
    start_http_server(port, addr="127.0.0.1")
