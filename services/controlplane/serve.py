"""``flash serve`` (HTTP API + Data Sources page), ``flash tokens`` and ``flash secrets rotate``."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import asyncpg

from controlplane.ops import CONTROLPLANE_MIGRATIONS
from controlplane.tokens import cli_actor, create_token, list_tokens, revoke_token
from servicekit.cliutil import open_db, print_json, print_table
from servicekit.connections import CredentialCipher
from servicekit.errors import ConfigError
from servicekit.kafka import KafkaPublisher
from servicekit.logging import bind, get_logger
from servicekit.runtime import install_signal_handlers, run_loop
from servicekit.settings import FlashSettings

__all__ = ["register", "rotate_secrets"]

log = get_logger(__name__)

SERVE_HELP = """\
Serves, in one process:
  /                      Settings -> Data Sources: connections, verify, dry-run preview, go-live, dead letters
  /api/v1/...            the HTTP API (OpenAPI document at /api/v1/openapi.json)
  /metrics /healthz /readyz

Every API call needs a token: `flash tokens create --tenant acme --name "acme ops"` (a tenant's own
connections and dead letters) or `flash tokens create --operator --name ops` (every tenant). The page asks
for the token once and keeps it in the browser tab only (sessionStorage).
"""


async def _serve(settings: FlashSettings, host: str, port: int, stop: asyncio.Event | None = None) -> int:
    """Serve until SIGINT/SIGTERM. Replays publish to FLASH_KAFKA_BOOTSTRAP; without it (an embedded broker
    would be this process's own, which no service reads) the API refuses replays and says so."""
    from controlplane.api import serve_api

    stop = stop or asyncio.Event()
    install_signal_handlers(stop)
    if settings.instance_id:
        bind(instance_id=settings.instance_id)
    async with open_db(settings, [CONTROLPLANE_MIGRATIONS]) as pool:
        publisher: KafkaPublisher | None = None
        if settings.kafka_bootstrap:
            publisher = KafkaPublisher(settings.kafka_bootstrap, client_id=settings.instance_id or "flash-serve")
            await publisher.start()
        else:
            log.warning("FLASH_KAFKA_BOOTSTRAP is not set: dead-letter replays are refused until it names the "
                        "broker the services use")
        try:
            async with serve_api(pool, settings, publisher, host=host, port=port) as url:
                print(f"Flash Connect control plane on {url}/  (API {url}/api/v1, Ctrl-C stops)", flush=True)
                await stop.wait()
        finally:
            if publisher is not None:
                await publisher.stop()
    return 0


def cmd_serve(args: argparse.Namespace, settings: FlashSettings) -> int:
    return int(run_loop(_serve(settings, args.host, args.port), settings))


def cmd_tokens(args: argparse.Namespace, settings: FlashSettings) -> int:
    async def go() -> int:
        async with open_db(settings, [CONTROLPLANE_MIGRATIONS]) as pool:
            who = cli_actor().name
            if args.action == "create":
                if bool(args.tenant) == bool(args.operator):
                    raise ConfigError("give either --tenant TENANT (a tenant's token) or --operator (every tenant)")
                token, row = await create_token(pool, tenant_id=args.tenant, name=args.name, created_by=who)
                scope = f"tenant {row['tenant_id']}" if row["tenant_id"] else "every tenant (operator)"
                print(f"token {row['token_id']} for {scope}; shown once, keep it now:\n{token}")
                return 0
            if args.action == "list":
                rows = await list_tokens(pool, tenant_id=args.tenant)
                print_json(rows) if args.json else print_table(rows, empty="no tokens")
                return 0
            if args.action == "revoke":
                if not await revoke_token(pool, args.token_id, revoked_by=who):
                    print(f"no live token {args.token_id}", file=sys.stderr)
                    return 1
                print(f"token {args.token_id} revoked")
                return 0
        raise ConfigError(f"unknown action {args.action}")

    return asyncio.run(go())


async def rotate_secrets(pool: asyncpg.Pool, cipher: CredentialCipher, *, actor: str) -> dict[str, int]:
    """Re-encrypt every connection's credentials under the newest key (the first of FLASH_SECRET_KEY).

    Each row is decrypted with whichever configured key encrypted it and written back, in one transaction
    (all or nothing); a row no configured key opens stops it with a ConfigError naming the connection.
    """
    async with pool.acquire() as db, db.transaction():
        rows = await db.fetch("SELECT tenant_id, connection_id, credentials FROM connections FOR UPDATE")
        for r in rows:
            try:
                plain = cipher.decrypt(r["credentials"])
            except ConfigError as exc:
                raise ConfigError(f"connection {r['connection_id']} (tenant {r['tenant_id']}): {exc}; nothing "
                                  "was changed") from None
            await db.execute(
                "UPDATE connections SET credentials = $3 WHERE tenant_id = $1 AND connection_id = $2",
                r["tenant_id"], r["connection_id"], cipher.encrypt(plain),
            )
        await db.execute(
            "INSERT INTO audit_log (actor, action, detail) VALUES ($1, 'secrets.rotate', $2::jsonb)",
            actor, json.dumps({"connections": len(rows)}),
        )
    return {"connections": len(rows)}


def cmd_secrets(args: argparse.Namespace, settings: FlashSettings) -> int:
    async def go() -> int:
        async with open_db(settings, [CONTROLPLANE_MIGRATIONS]) as pool:
            result = await rotate_secrets(pool, CredentialCipher.from_settings(settings), actor=cli_actor().name)
        print(f"re-encrypted the credentials of {result['connections']} connection(s) under the newest key; "
              "the older keys can now be dropped from FLASH_SECRET_KEY")
        return 0

    return asyncio.run(go())


def register(sub: Any) -> None:
    """Add ``serve``, ``tokens`` and ``secrets`` to the ``flash`` parser."""
    p = sub.add_parser("serve", help="serve the HTTP API and the Data Sources page",
                       description=SERVE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("tokens", help="API tokens: create (shown once), list, revoke",
                       description="Tokens authenticate API calls and the page. Only a hash is stored.")
    tsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    t = tsub.add_parser("create", help="create a token and print it once")
    t.add_argument("--tenant", help="the tenant whose connections and dead letters the token may see and change")
    t.add_argument("--operator", action="store_true", help="a token for every tenant (operators, the demo)")
    t.add_argument("--name", required=True, help="who or what holds it (shown in listings and audit rows)")
    t = tsub.add_parser("list", help="list tokens (never the tokens themselves)")
    t.add_argument("--tenant")
    t.add_argument("--json", action="store_true")
    t = tsub.add_parser("revoke", help="revoke a token at once")
    t.add_argument("token_id", help="the 8-character id `flash tokens list` shows")
    p.set_defaults(func=cmd_tokens)

    p = sub.add_parser("secrets", help="credential encryption keys")
    ssub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    ssub.add_parser(
        "rotate", help="re-encrypt every connection's credentials under the newest key",
        description="Put a new key first in FLASH_SECRET_KEY (new,old), run this, then drop the old key. "
        "Generate a key with: python -c 'from cryptography.fernet import Fernet; "
        "print(Fernet.generate_key().decode())'",
    )
    p.set_defaults(func=cmd_secrets)

