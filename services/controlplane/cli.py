"""`flash`: the one command for everything a person does with Flash Connect.

Settings come from FLASH_* environment variables (see the README). With none set, every command uses
the embedded defaults: a Tansu broker started for the command, and the local PostgreSQL (or an embedded
one). Services are found by module name, so the control plane never imports them statically.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from connectorkit.replay import source_rewriter
from servicekit import dlq as dlq_ops
from servicekit.cliutil import open_db, print_json, print_table
from servicekit.connections import CredentialCipher, PgConnectionStore
from servicekit.db import Migrations
from servicekit.errors import ConfigError, FlashError
from servicekit.kafka import KafkaPublisher, kafka_security
from servicekit.logging import configure_logging
from servicekit.runtime import Service, run_loop, run_services
from servicekit.settings import FlashSettings

__all__ = ["SERVICES", "main"]

#: name → module holding ``SERVICE``; started with ``flash run <name>`` or ``python -m <module>``.
SERVICES: dict[str, str] = {
    "ce-poller": "ce_poller",
    "fo-poller": "fo_poller",
    "sf-poller": "sf_poller",
    "cdc-listener": "cdc_listener",
    "normalizer": "normalizer",
    "resolver": "resolver",
    "points": "points",
}
#: Connectors are found through the registry (entry point group ``flash_connect.connectors``, see
#: ``connectorkit.registry``).
#: modules contributing subcommands through ``cli.register(subparsers)``.
PLUGINS = ("resolver", "points", "normalizer")

EPILOG = """\
Typical flow for an operator:
  flash connections add --tenant acme --id ce-main --source dynamics-ce --endpoint https://org.crm.dynamics.com \\
        --credentials creds.json --settings settings.json
  flash connections verify --tenant acme --id ce-main     # auth + read privileges, says what to fix
  flash connections dry-run --tenant acme --id ce-main    # preview what would land, nothing is written
  flash connections go-live --tenant acme --id ce-main    # pollers pick it up
  flash status                                            # connections, cursors, dead letters, ledger
  flash dlq list --tenant acme; flash dlq replay --tenant acme --error-class SchemaViolation

Run `flash demo` to see the whole pipe on embedded defaults against the vendor sandboxes.
"""


def load_module(name: str, attr: str | None = None) -> ModuleType:
    try:
        return importlib.import_module(f"{name}.{attr}" if attr else name)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"{name}{'.' + attr if attr else ''} is not installed in this build") from exc


def load_service(name: str) -> Service:
    if name not in SERVICES:
        raise ConfigError(f"unknown service {name!r}; choose one of: {', '.join(SERVICES)}")
    service = getattr(load_module(SERVICES[name], "app"), "SERVICE", None)
    if not isinstance(service, Service):
        raise ConfigError(f"{SERVICES[name]}.app defines no SERVICE")
    return service


# ------------------------------------------------------------------------------------------- commands


def cmd_run(args: argparse.Namespace, settings: FlashSettings) -> int:
    services = [load_service(n) for n in args.services]
    return run_loop(run_services(services, settings), settings)


def cmd_services(args: argparse.Namespace, settings: FlashSettings) -> int:
    rows = []
    for name, module in SERVICES.items():
        try:
            svc = load_service(name)
            rows.append({"service": name, "module": f"python -m {module}", "available": "yes",
                         "owns tables from": ", ".join(m.component for m in svc.migrations) or "-"})
        except ConfigError as exc:
            rows.append({"service": name, "module": f"python -m {module}", "available": f"no ({exc})",
                         "owns tables from": "-"})
    print_table(rows)
    return 0


def cmd_migrate(args: argparse.Namespace, settings: FlashSettings) -> int:
    migrations: list[Migrations] = []
    for name in SERVICES:
        try:
            migrations.extend(load_service(name).migrations)
        except ConfigError:
            continue
    migrations.append(load_module("controlplane", "ops").CONTROLPLANE_MIGRATIONS)

    async def go() -> None:
        async with open_db(settings, migrations):
            print("database is up to date")
        if getattr(args, "topics", False):
            if not settings.kafka_bootstrap:
                raise ConfigError("--topics needs FLASH_KAFKA_BOOTSTRAP (the embedded broker creates its own topics)")
            from servicekit.kafka import ensure_topics

            await ensure_topics(settings.kafka_bootstrap, settings)
            print("topics exist (partitions, replication factor and min.insync.replicas of schemas/topics.yaml)")

    asyncio.run(go())
    return 0


def _read_json_arg(value: str | None) -> dict[str, Any]:
    if not value:
        return {}
    path = Path(value)
    text = path.read_text() if path.exists() else value
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{value!r} is neither a JSON file nor JSON text: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{value!r} must hold a JSON object")
    return data


def cmd_connections(args: argparse.Namespace, settings: FlashSettings) -> int:
    """Every action goes through controlplane.ops, as the HTTP API does (same checks, audit rows, answers)."""
    from controlplane.ops import CONTROLPLANE_MIGRATIONS, Operations
    from controlplane.tokens import cli_actor

    async def go() -> int:
        async with open_db(settings, [CONTROLPLANE_MIGRATIONS]) as pool:
            ops, actor = Operations(pool, settings), cli_actor()
            if args.action == "list":
                conns = await ops.list_connections(actor, source=args.source)
                rows = [{k: v for k, v in c.items() if k not in ("credentials", "settings")} for c in conns]
                print_json(rows) if args.json else print_table(rows)
                return 0
            if args.action == "add":
                conn = await ops.create_connection(actor, {
                    "tenant_id": args.tenant, "connection_id": args.id, "source": args.source,
                    "endpoint": args.endpoint, "credentials": _read_json_arg(args.credentials),
                    "settings": _read_json_arg(args.settings)}, replace=True)
                print(f"connection {conn['connection_id']} saved for tenant {conn['tenant_id']} (state: draft); "
                      f"next: flash connections verify --tenant {conn['tenant_id']} --id {conn['connection_id']}")
                return 0
            if args.action == "show":
                print_json(await ops.get_connection(actor, args.tenant, args.id))
                return 0
            if args.action == "status":
                print_json(await ops.status(actor, args.tenant, args.id))
                return 0
            if args.action == "delete":
                await ops.delete_connection(actor, args.tenant, args.id)
                print(f"connection {args.id} deleted (its cursors too)")
                return 0
            if args.action in ("pause", "go-live", "resume"):
                conn = await ops.set_state(actor, args.tenant, args.id, args.action)
                print(f"connection {conn['connection_id']} is now {conn['state']}")
                return 0
            if args.action == "verify":
                result = await ops.verify(actor, args.tenant, args.id)
                for line in result.get("lines") or []:
                    print(line)
                if not result["ok"]:
                    print(f"verification failed: {result['error']}", file=sys.stderr)
                    return 1
                if not result.get("lines"):
                    print_json(result["report"])  # a connector not on the kit yet: its own report
                print(f"connection {args.id} verified; next: flash connections dry-run --tenant {args.tenant} "
                      f"--id {args.id}")
                return 0
            if args.action == "dry-run":
                print_json((await ops.dry_run(actor, args.tenant, args.id, limit=args.limit))["report"])
                return 0
        raise ConfigError(f"unknown action {args.action}")

    return asyncio.run(go())


def _dlq_filter(args: argparse.Namespace) -> dlq_ops.DlqFilter:
    def when(value: str | None) -> dt.datetime | None:
        if not value:
            return None
        parsed = dt.datetime.fromisoformat(value)
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)

    return dlq_ops.DlqFilter(
        consumer=args.consumer, tenant_id=args.tenant, error_class=args.error_class, entity=args.entity,
        since=when(args.since), until=when(args.until), include_replayed=getattr(args, "all", False),
    )


def cmd_dlq(args: argparse.Namespace, settings: FlashSettings) -> int:
    async def go() -> int:
        async with open_db(settings) as pool:
            if args.action == "list":
                rows = await dlq_ops.list_letters(pool, _dlq_filter(args), limit=args.limit)
                cols = ["id", "consumer", "tenant_id", "entity", "error_class", "error_message", "attempts",
                        "first_failed_at", "replayed_at"]
                print_json(rows) if args.json else print_table(rows, cols, empty="no dead letters match")
            elif args.action == "show":
                row = await dlq_ops.show_letter(pool, args.letter_id)
                if row is None:
                    print(f"no dead letter {args.letter_id}", file=sys.stderr)
                    return 1
                print_json(row)
            elif args.action == "depth":
                rows = await dlq_ops.depth(pool)
                print_json(rows) if args.json else print_table(rows, empty="all dead-letter topics are empty")
            elif args.action == "replay":
                store = PgConnectionStore(pool, CredentialCipher.from_settings(settings))
                # Source dead letters are re-fetched from the vendor (connectorkit.replay), never re-sent.
                rewrite = source_rewriter(store.get, settings)
                if args.dry_run:
                    audit = await dlq_ops.replay(pool, None, _dlq_filter(args), dry_run=True)
                else:
                    # Never an embedded broker of our own: what it took would reach no service, and the letters
                    # would be marked replayed for good.
                    if not settings.kafka_bootstrap:
                        raise ConfigError(
                            "dlq replay needs the broker the services use: set FLASH_KAFKA_BOOTSTRAP to its "
                            "host:port (as for `flash run`); nothing was replayed"
                        )
                    publisher = KafkaPublisher(settings.kafka_bootstrap, security=kafka_security(settings))
                    await publisher.start()
                    try:
                        audit = await dlq_ops.replay(pool, publisher, _dlq_filter(args), dry_run=False,
                                                     rewrite=rewrite)
                    finally:
                        await publisher.stop()
                verb = "would replay" if args.dry_run else "replayed"
                print(f"{verb} {audit.get('replayed', 0)} dead letter(s) (audit id {audit.get('id')})")
                for err in audit.get("errors") or []:
                    print(f"  not replayed: {err}", file=sys.stderr)
                if audit.get("failed"):
                    return 1
        return 0

    return asyncio.run(go())


def cmd_status(args: argparse.Namespace, settings: FlashSettings) -> int:
    async def go() -> int:
        async with open_db(settings) as pool:
            store = PgConnectionStore(pool, CredentialCipher.from_settings(settings))
            conns = [{k: v for k, v in c.redacted().items() if k in ("tenant_id", "connection_id", "source",
                                                                      "state", "last_error")}
                     for c in await store.list(include_unreadable=True)]
            cursors = [dict(r) for r in await pool.fetch(
                """SELECT tenant_id, connection_id, entity, updated_at,
                          extract(epoch FROM now() - updated_at)::float8 AS age_s
                   FROM cursors ORDER BY tenant_id, connection_id, entity""")]
            depth = await dlq_ops.depth(pool)
            # which copy of each poller/listener owns each connection now (servicekit.leases)
            leases = [dict(r) for r in await pool.fetch(
                """SELECT scope AS service, tenant_id, connection_id, holder AS copy, token,
                          extract(epoch FROM expires_at - now())::float8 AS expires_in_s
                   FROM connection_leases WHERE expires_at > now() ORDER BY scope, tenant_id, connection_id""")]
            ledger: list[dict[str, Any]] = []
            if await pool.fetchval("SELECT to_regclass('ledger') IS NOT NULL"):
                ledger = [dict(r) for r in await pool.fetch(
                    """SELECT tenant_id, kind, count(*) AS entries, sum(points) AS points
                       FROM ledger GROUP BY tenant_id, kind ORDER BY tenant_id, kind""")]
            if args.json:
                print_json({"connections": conns, "cursors": cursors, "leases": leases, "dead_letters": depth,
                            "ledger": ledger})
                return 0
            print("CONNECTIONS")
            print_table(conns)
            print("\nCURSORS")
            print_table(cursors)
            print("\nLEASES (the copy polling each connection)")
            print_table(leases, empty="none held (no poller or listener running)")
            print("\nDEAD LETTERS (pending, per consumer and tenant)")
            print_table(depth, empty="none")
            print("\nLEDGER")
            print_table(ledger, empty="no ledger entries yet")
        return 0

    return asyncio.run(go())


def cmd_demo(args: argparse.Namespace, settings: FlashSettings) -> int:
    demo = load_module("controlplane", "demo")
    return int(run_loop(demo.run_demo(settings, args), settings))


# ------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flash",
        description="Flash Connect: land Dynamics 365 and Salesforce commerce data on verified loyalty members.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default: FLASH_LOG_LEVEL or INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="run the whole pipe on embedded defaults against the vendor sandboxes",
                       description="Seeds the Dynamics (and Salesforce) sandboxes, starts every service in this "
                       "process on an embedded broker, shows ingest progress, prints what landed, then keeps "
                       "applying live mutations until Ctrl-C.")
    p.add_argument("--orders", type=int, default=500, help="orders to seed per tenant (default 500)")
    p.add_argument("--mutate-every", type=float, default=2.0, help="seconds between live mutations (0: none)")
    p.add_argument("--duration", type=float, default=0, help="stop after this many seconds (0: until Ctrl-C)")
    p.add_argument("--until-landed", action="store_true",
                   help="exit after the initial load has landed (exit code 1 if it did not within --duration)")
    p.add_argument("--api-port", type=int, default=8080,
                   help="serve the HTTP API and the Data Sources page on 127.0.0.1:PORT (default 8080; a free port "
                   "if taken; -1: off); an operator token is printed")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("run", help="run one or more services in this process",
                       description="Run services until SIGINT/SIGTERM. Without FLASH_KAFKA_BOOTSTRAP an embedded "
                       "broker is started for this process only; point several processes at one cluster to run "
                       "services apart (or more copies of one service: they share its consumer group).")
    p.add_argument("services", nargs="+", metavar="SERVICE", help=", ".join(SERVICES))
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("services", help="list the services and how to start each")
    p.set_defaults(func=cmd_services)

    p = sub.add_parser("migrate", help="apply every pending database migration")
    p.add_argument("--topics", action="store_true",
                   help="also create the missing topics on FLASH_KAFKA_BOOTSTRAP (partitions, replication factor, "
                        "min.insync.replicas and retention of schemas/topics.yaml; FLASH_KAFKA_REPLICATION_FACTOR "
                        "and FLASH_KAFKA_MIN_INSYNC_REPLICAS override)")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("connections", help="configure, verify, dry-run and go live with vendor connections")
    csub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = csub.add_parser("list", help="list connections (credentials never shown)")
    c.add_argument("--source", choices=["dynamics-ce", "dynamics-fo", "salesforce"])
    c.add_argument("--json", action="store_true")
    c = csub.add_parser("add", help="create or replace a connection (goes back to draft)")
    c.add_argument("--tenant", required=True)
    c.add_argument("--id", required=True)
    c.add_argument("--source", required=True, choices=["dynamics-ce", "dynamics-fo", "salesforce"])
    c.add_argument("--endpoint", required=True,
                   help="org URL (Dynamics: https://<org>.crm[N].dynamics.com) or My Domain URL (Salesforce: "
                   "https://<domain>.my.salesforce.com); https on the vendor's hosts only, checked before saving "
                   "(simulators need FLASH_ALLOW_SANDBOX_ENDPOINTS=1)")
    c.add_argument("--credentials", required=True, help="JSON file or text; stored encrypted")
    c.add_argument("--settings", help="JSON file or text with connector settings")
    for action, text in (("show", "show one connection (credentials masked)"),
                         ("verify", "host, authentication, application user, read privilege per table, change "
                          "tracking: one line per check, with what to fix"),
                         ("dry-run", "sample -> normalizer mapping -> member resolution -> points rules: a report of "
                          "records per entity, member match rate, points earned/clawed back, dead letters; "
                          "writes nothing"),
                         ("go-live", "let the pollers sync it"), ("pause", "stop syncing it"),
                         ("resume", "sync a paused connection again"),
                         ("status", "last sync, lag, records per entity, errors, dead-letter depth"),
                         ("delete", "remove the connection and its cursors")):
        c = csub.add_parser(action, help=text)
        c.add_argument("--tenant", required=True)
        c.add_argument("--id", required=True)
        if action == "dry-run":
            c.add_argument("--limit", type=int, default=20, help="records per entity to preview")
    p.set_defaults(func=cmd_connections)

    p = sub.add_parser("dlq", help="inspect and replay dead letters")
    dsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (("list", "list pending dead letters"),
                         ("replay", "send matching dead letters back to their original topics (idempotent)")):
        d = dsub.add_parser(action, help=text)
        d.add_argument("--consumer", help="e.g. normalizer, resolver, points, ce-poller (a poller's letters are "
                       "re-fetched from the vendor on replay)")
        d.add_argument("--tenant")
        d.add_argument("--error-class", help="e.g. SchemaViolation, Poison, MissingTenant")
        d.add_argument("--entity", help="source object, e.g. salesorder, Order")
        d.add_argument("--since", help="ISO time; first failure at or after")
        d.add_argument("--until", help="ISO time; first failure before")
        if action == "list":
            d.add_argument("--all", action="store_true", help="include replayed ones")
            d.add_argument("--limit", type=int, default=100)
            d.add_argument("--json", action="store_true")
        else:
            d.add_argument("--dry-run", action="store_true", help="count what would be replayed")
    d = dsub.add_parser("show", help="one dead letter with its body and headers")
    d.add_argument("letter_id", type=int)
    d = dsub.add_parser("depth", help="pending dead letters and oldest age per consumer and tenant")
    d.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_dlq)

    p = sub.add_parser("status", help="connections, cursors, dead-letter depth and ledger totals")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    load_module("controlplane", "serve").register(sub)  # flash serve, flash tokens, flash secrets

    for plugin in PLUGINS:
        try:
            register: Callable[[Any], None] = importlib.import_module(f"{plugin}.cli").register
        except (ModuleNotFoundError, AttributeError):
            continue
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = FlashSettings()
    long_running = args.command in ("run", "serve")  # structured logs; one-off commands print for people
    configure_logging(args.log_level or settings.log_level, settings.log_format if long_running else "console")
    func: Callable[[argparse.Namespace, FlashSettings], int] = args.func
    try:
        result = func(args, settings) if _takes_settings(func) else func(args)  # type: ignore[call-arg]
        return int(result or 0)
    except ConfigError as exc:
        print(f"flash: {exc}", file=sys.stderr)
        return 2
    except FlashError as exc:
        print(f"flash: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _takes_settings(func: Callable[..., Any]) -> bool:
    code = getattr(func, "__code__", None)
    return bool(code and code.co_argcount >= 2)
