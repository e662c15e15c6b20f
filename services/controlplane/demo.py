"""`flash demo`: the whole pipe on embedded defaults against the vendor sandboxes, in one process.

What it does, in order (each step printed as it happens):
1. starts the installed simulators (entry point group ``flash_connect.sandboxes``: Dataverse, Salesforce)
   over HTTPS on loopback, for the sources whose connector is installed, and seeds them with customers,
   products, orders, cancellations and returns (``FLASH_ALLOW_SANDBOX_ENDPOINTS`` is set for this process:
   the simulators are on loopback);
2. opens the broker (embedded Tansu unless FLASH_KAFKA_BOOTSTRAP is set) and PostgreSQL (schema
   ``flash_demo``, recreated on every run unless FLASH_DB_SCHEMA is set);
3. imports the tenants' members as the loyalty core would (a few customers are left out on purpose, so
   their orders park), and sets each tenant's points program;
4. configures each connection with encrypted credentials, verifies it, dry-runs it (what would land,
   nothing written), and only then takes it live;
5. runs every service and shows progress until the initial load has landed, then prints what landed;
6. keeps applying live mutations in the sandboxes (status changes, cancellations, amendments, returns,
   new orders) and prints each with the ledger movement it caused, until Ctrl-C (or ``--duration``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import asyncpg

from canonical.events import MemberData
from connectorkit.dryrun import dry_run
from connectorkit.endpoints import SANDBOX_ENV
from connectorkit.registry import connector_sources, load_connector, load_sandboxes
from connectorkit.sandbox import DemoSandbox
from servicekit import dlq as dlq_ops
from servicekit.connections import CredentialCipher, PgConnectionStore
from servicekit.embedded import resolve_database_url
from servicekit.errors import ConfigError
from servicekit.runtime import Infra, Service, install_signal_handlers, open_infra, run_services
from servicekit.settings import FlashSettings

__all__ = ["run_demo"]

DEMO_SCHEMA = "flash_demo"


def say(text: str = "") -> None:
    print(text, flush=True)


@dataclass
class Tenant:
    tenant_id: str
    connection_id: str
    source: str
    label: str
    expected_orders: int
    members: list[MemberData] = field(default_factory=list)
    mutate: Any = None  # () -> str describing the change


def _load_services() -> list[Service]:
    from controlplane.cli import SERVICES, load_service

    out: list[Service] = []
    for name in SERVICES:
        try:
            out.append(load_service(name))
        except ConfigError as exc:
            say(f"  (service {name} not available in this build: {exc})")
    return out


async def _fresh_schema(settings: FlashSettings) -> None:
    dsn = await resolve_database_url(settings.database_url, settings.state_dir)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{DEMO_SCHEMA}" CASCADE')
    finally:
        await conn.close()


async def _stats(pool: asyncpg.Pool, tenant: str) -> dict[str, Any]:
    row = await pool.fetchrow(
        """SELECT (SELECT count(*) FROM orders WHERE tenant_id = $1 AND known) AS orders,
                  (SELECT count(*) FROM orders WHERE tenant_id = $1 AND member_id <> '') AS matched_orders,
                  (SELECT count(DISTINCT order_source_id) FROM parked WHERE tenant_id = $1) AS parked,
                  (SELECT count(*) FROM customer_links WHERE tenant_id = $1 AND member_id IS NOT NULL) AS linked,
                  (SELECT coalesce(sum(points) FILTER (WHERE kind IN ('earn', 'adjust')), 0) FROM ledger
                       WHERE tenant_id = $1) AS earned,
                  (SELECT coalesce(sum(points) FILTER (WHERE kind IN ('void', 'clawback')), 0) FROM ledger
                       WHERE tenant_id = $1) AS reversed,
                  (SELECT count(*) FROM ledger WHERE tenant_id = $1) AS entries,
                  (SELECT count(*) FROM dead_letters WHERE tenant_id = $1 AND replayed_at IS NULL) AS dead""",
        tenant,
    )
    return dict(row) if row else {}


def _line(t: Tenant, s: dict[str, Any]) -> str:
    return (f"{t.label:<22} orders {s.get('orders', 0):>6,}/{t.expected_orders:<6,}"
            f" matched {s.get('matched_orders', 0):>6,}  parked {s.get('parked', 0):>4,}"
            f"  points +{s.get('earned', 0):,} / {s.get('reversed', 0):,}  dead letters {s.get('dead', 0)}")


async def _setup_sandboxes(stack: contextlib.AsyncExitStack, n_orders: int) -> list[tuple[Tenant, dict[str, Any]]]:
    """Start every installed simulator whose source has a connector (registry), as tenants + connections."""
    usable = set(connector_sources())
    sandboxes = load_sandboxes()
    if not sandboxes:
        raise ConfigError("no simulators are installed in this build (entry point group flash_connect.sandboxes); "
                          "`flash demo` needs the sandbox package")
    out: list[tuple[Tenant, dict[str, Any]]] = []
    for name, setup in sandboxes.items():
        box: DemoSandbox | None = await setup(stack, n_orders)
        if box is None:
            continue
        if box.source not in usable:
            say(f"  ({name} simulator skipped: no {box.source} connector in this build)")
            continue
        for note in box.notes:
            say(f"  {note}")
        tenant = Tenant(box.tenant_id, box.connection_id, box.source, box.label, box.expected_orders, box.members,
                        box.mutate)
        out.append((tenant, {"endpoint": box.endpoint, "credentials": box.credentials, "settings": box.settings}))
    return out


async def _configure(infra: Infra, settings: FlashSettings, tenant: Tenant, conn: dict[str, Any]) -> None:
    resolver_cli = importlib.import_module("resolver.cli")
    points_cli = importlib.import_module("points.cli")
    rules = importlib.import_module("points.rules")
    await resolver_cli.import_members(infra.pool, tenant.tenant_id, tenant.members)
    program = rules.Program(
        tenant_id=tenant.tenant_id, base_currency="USD", points_per_unit=Decimal(1),
        basis="total_ex_tax_shipping", rounding="floor", category_multipliers={"Electronics": Decimal(2)},
        per_order_cap=50_000,
        # Salesforce orders carry a currency but no rate: the program's fallback rates convert them.
        exchange_rates={"EUR": Decimal("0.92"), "GBP": Decimal("0.79"), "USD": Decimal(1)},
    )
    await points_cli.set_program(infra.pool, program)
    store = PgConnectionStore(infra.pool, CredentialCipher.from_settings(settings))
    connection = await store.upsert(tenant.tenant_id, tenant.connection_id, tenant.source, conn["endpoint"],
                                    conn["credentials"], conn["settings"])
    if tenant.source not in connector_sources():
        raise ConfigError(f"no connector for {tenant.source} is installed in this build (the demo's tenant "
                          f"{tenant.tenant_id} needs it)")
    connector = load_connector(tenant.source)
    report = await connector.verify(connector.parse(connection), settings)
    if not report.ok:
        raise ConfigError(f"connection {tenant.connection_id} failed verification: {report.summary()}")
    say(f"    verified {tenant.connection_id}: {len(report.checks)} checks ok")
    preview = await dry_run(connector, connection, settings, infra.pool, limit=20)
    say(f"    dry-run {tenant.connection_id}: {_preview_line(preview)}")
    await store.set_state(tenant.tenant_id, tenant.connection_id, "verified")
    await store.set_state(tenant.tenant_id, tenant.connection_id, "live")
    say(f"    {tenant.connection_id} is live")


def _say_attach(bootstrap: str, prefix: str) -> None:
    """How a downstream consumer attaches to this run's topics (docs/events.md, "Attaching a consumer")."""
    say(f"  Attach a consumer (topics are prefixed {prefix!r}; an embedded broker lives only while the demo runs):")
    say(f"    .venv/bin/python examples/member_balances.py --bootstrap {bootstrap} --prefix {prefix}")
    say(f"    .venv/bin/python examples/order_view.py --bootstrap {bootstrap} --prefix {prefix} --once")
    say("    librdkafka on this broker: session.timeout.ms=6000 (the default 45 s makes each group join wait ~23 s),")
    say("    enable.partition.eof=true (its high watermarks trail batched writes); topics and schemas: docs/events.md")


def _preview_line(preview: dict[str, Any]) -> str:
    members = preview.get("members") or {}
    pts = preview.get("points") or {}
    return (f"{sum(preview.get('records', {}).values())} records sampled, member match rate "
            f"{members.get('match_rate')}, would earn {pts.get('would_earn', 0)} / claw back "
            f"{pts.get('would_claw_back', 0)} points, {len(preview.get('would_dead_letter') or [])} would be "
            "dead-lettered (nothing written)")


async def run_demo(settings: FlashSettings, args: argparse.Namespace) -> int:
    run = uuid.uuid4().hex[:6]
    # The simulators listen on loopback: let this process's connections name them (connectorkit.endpoints).
    os.environ.setdefault(SANDBOX_ENV, "1")
    if not settings.db_schema:
        settings = settings.model_copy(update={"db_schema": DEMO_SCHEMA})
        await _fresh_schema(settings)
    settings = settings.model_copy(update={"topic_prefix": settings.topic_prefix or f"demo-{run}."})
    say("Flash Connect demo: Dynamics 365 / Salesforce -> loyalty ledger, on embedded defaults")
    say(f"  database schema {settings.db_schema}, topic prefix {settings.topic_prefix!r}")
    stop = asyncio.Event()
    install_signal_handlers(stop)
    services = _load_services()
    async with contextlib.AsyncExitStack() as stack:
        say("\n1. Vendor sandboxes")
        pairs = await _setup_sandboxes(stack, args.orders)
        say("\n2. Broker and database")
        infra = await stack.enter_async_context(
            open_infra(settings, migrations=[m for s in services for m in s.migrations])
        )
        say(f"  Kafka {infra.bootstrap}   PostgreSQL {infra.database_url.rsplit('@', 1)[-1]}")
        _say_attach(infra.bootstrap, settings.topic_prefix)
        say("\n3. Members, programs and connections")
        for tenant, conn in pairs:
            await _configure(infra, settings, tenant, conn)
        await _serve_control_plane(stack, infra, settings, getattr(args, "api_port", 8080))
        say("\n4. Ingesting (services: " + ", ".join(s.name for s in services) + ")")
        runner = asyncio.create_task(run_services(services, settings, stop=stop, infra=infra))
        code = await _watch(infra, [t for t, _ in pairs], stop, args)
        stop.set()
        code = max(code, await runner)
    return code


async def _watch(infra: Infra, tenants: list[Tenant], stop: asyncio.Event, args: argparse.Namespace) -> int:
    started = time.monotonic()
    deadline = started + args.duration if args.duration else None
    landed = False
    stable_since: float | None = None
    last: list[dict[str, Any]] = []
    next_mutation = 0.0
    while not stop.is_set():
        now = time.monotonic()
        if deadline and now >= deadline:
            break
        stats = [await _stats(infra.pool, t.tenant_id) for t in tenants]
        if not landed:
            lines = [_line(t, s) for t, s in zip(tenants, stats, strict=True)]
            say(f"  [{now - started:5.0f}s] " + "\n          ".join(lines))
            done = all(s.get("orders", 0) >= t.expected_orders for t, s in zip(tenants, stats, strict=True))
            stable_since = (stable_since or now) if stats == last else None
            if done or (stable_since and now - stable_since > 20 and any(s.get("orders") for s in stats)):
                landed = True
                await _summary(infra, tenants, stats, now - started)
                if getattr(args, "until_landed", False):
                    return 0 if all(s.get("orders", 0) >= t.expected_orders
                                    for t, s in zip(tenants, stats, strict=True)) else 1
                if args.mutate_every > 0:
                    say("\n6. Live changes in the sandboxes (Ctrl-C to stop)")
                next_mutation = now
        elif args.mutate_every > 0 and now >= next_mutation:
            for tenant in tenants:
                if tenant.mutate:
                    what = tenant.mutate()
                    say(f"  {what}")
            next_mutation = now + args.mutate_every
        if landed and last and stats != last:
            for tenant, before, after in zip(tenants, last, stats, strict=True):
                if before != after:
                    say(f"    ledger {tenant.tenant_id}: +{after['earned'] - before['earned']:,} earned, "
                        f"{after['reversed'] - before['reversed']:,} reversed, parked {after['parked']}")
        last = stats
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 2.0)
    if not landed:
        await _summary(infra, tenants, last, time.monotonic() - started)
        return 1 if getattr(args, "until_landed", False) else 0
    return 0


async def _summary(infra: Infra, tenants: list[Tenant], stats: list[dict[str, Any]], elapsed: float) -> None:
    say(f"\n5. What landed after {elapsed:.0f}s")
    for tenant, s in zip(tenants, stats, strict=True):
        say(f"  {tenant.label}")
        say(f"    orders landed       {s.get('orders', 0):,} of {tenant.expected_orders:,} placed by members")
        say(f"    customers linked    {s.get('linked', 0):,} to members; orders matched {s.get('matched_orders', 0):,}")
        say(f"    parked (no member)  {s.get('parked', 0):,} orders (they flow on when the customer joins)")
        say(f"    points earned       {s.get('earned', 0):,}  (ledger entries {s.get('entries', 0):,})")
        say(f"    voided/clawed back  {s.get('reversed', 0):,}")
        say(f"    dead letters        {s.get('dead', 0)}")
    depth = await dlq_ops.depth(infra.pool)
    if depth:
        say("  dead letters per consumer: " + ", ".join(f"{d['consumer']}/{d['tenant_id']}={d['depth']}" for d in depth)
            + "   (inspect: flash dlq list)")


async def _serve_control_plane(
    stack: contextlib.AsyncExitStack, infra: Infra, settings: FlashSettings, port: int
) -> None:
    """The HTTP API and the Data Sources page, with an operator token for this demo (printed once)."""
    if port < 0:
        return
    from controlplane.api import serve_api
    from controlplane.ops import CONTROLPLANE_MIGRATIONS
    from controlplane.tokens import create_token
    from servicekit.db import migrate

    await migrate(infra.pool, [CONTROLPLANE_MIGRATIONS])
    token, _ = await create_token(infra.pool, tenant_id=None, name="flash demo operator", created_by="flash demo")
    try:
        url = await stack.enter_async_context(serve_api(infra.pool, settings, infra.publisher, port=port))
    except OSError:  # the port is taken: any free one
        url = await stack.enter_async_context(serve_api(infra.pool, settings, infra.publisher, port=0))
    say(f"  Control plane  {url}/  (Settings -> Data Sources; API {url}/api/v1)")
    say(f"    operator token for this demo (every tenant): {token}")


if __name__ == "__main__":  # pragma: no cover - `flash demo` is the entry point
    sys.exit("run `flash demo`")

