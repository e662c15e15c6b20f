"""Metric labels stay bounded: no metric of any service is labelled per tenant or connection (their number
grows with customers; per-tenant figures live in the database and `flash status`)."""

from __future__ import annotations

import importlib

from prometheus_client import REGISTRY

from controlplane.cli import SERVICES

UNBOUNDED = {"tenant", "tenant_id", "connection", "connection_id", "member_id", "event_id", "order_id"}


def test_no_metric_is_labelled_per_tenant_or_connection() -> None:
    for module in SERVICES.values():
        importlib.import_module(f"{module}.app")
    offenders = []
    for collector in list(REGISTRY._collector_to_names):  # the registry has no public iterator
        labels = set(getattr(collector, "_labelnames", ()))
        if labels & UNBOUNDED:
            offenders.append((getattr(collector, "_name", collector), sorted(labels & UNBOUNDED)))
    assert offenders == []
