"""API tokens: who is calling the control plane API, and which tenant they may see.

A token is ``flash_<token_id>_<secret>``: ``token_id`` (8 hex characters) names it in listings, audit rows
and revocation; the secret is 256 random bits. Only the SHA-256 of the whole token is stored, so the
database never holds a usable token; the token itself is shown once, when created.

Two roles: a ``tenant`` token sees and changes only its tenant's connections and dead letters; an
``operator`` token (for the people running Flash Connect, and the demo) sees every tenant.
"""

from __future__ import annotations

import getpass
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Any

import asyncpg

from servicekit.errors import ConfigError

__all__ = ["Actor", "authenticate", "cli_actor", "create_token", "list_tokens", "revoke_token"]

_TOKEN_RE = re.compile(r"\Aflash_([0-9a-f]{8})_([A-Za-z0-9_-]{20,100})\Z")


@dataclass(frozen=True)
class Actor:
    """Who makes a request: ``name`` goes into audit rows; ``tenant_id`` None means every tenant."""

    name: str
    tenant_id: str | None

    @property
    def is_operator(self) -> bool:
        return self.tenant_id is None

    def may_see(self, tenant_id: str) -> bool:
        return self.tenant_id is None or self.tenant_id == tenant_id


def cli_actor() -> Actor:
    """The person at the terminal: the CLI talks to the database directly, so it acts as operator."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return Actor(f"cli:{user}", None)


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def create_token(
    pool: asyncpg.Pool, *, tenant_id: str | None, name: str, created_by: str
) -> tuple[str, dict[str, Any]]:
    """Create a token; returns ``(token, row)``. The token is not stored: show it now or never."""
    if tenant_id is not None and not tenant_id.strip():
        raise ConfigError("a tenant token needs a tenant id (--tenant); use --operator for an all-tenant token")
    token_id = secrets.token_hex(4)
    token = f"flash_{token_id}_{secrets.token_urlsafe(32)}"
    row = await pool.fetchrow(
        """INSERT INTO api_tokens (token_id, tenant_id, role, name, token_hash, created_by)
           VALUES ($1, $2, $3, $4, $5, $6)
           RETURNING token_id, tenant_id, role, name, created_by, created_at""",
        token_id, tenant_id, "operator" if tenant_id is None else "tenant", name, _hash(token), created_by,
    )
    assert row is not None
    await pool.execute(
        "INSERT INTO audit_log (actor, tenant_id, action, target) VALUES ($1, $2, 'token.create', $3)",
        created_by, tenant_id, token_id,
    )
    return token, dict(row)


async def list_tokens(pool: asyncpg.Pool, *, tenant_id: str | None = None) -> list[dict[str, Any]]:
    """Tokens (never their hashes), newest first; ``tenant_id`` narrows to one tenant's."""
    rows = await pool.fetch(
        """SELECT token_id, tenant_id, role, name, created_by, created_at, last_used_at, revoked_at
           FROM api_tokens WHERE ($1::text IS NULL OR tenant_id = $1) ORDER BY created_at DESC""",
        tenant_id,
    )
    return [dict(r) for r in rows]


async def revoke_token(pool: asyncpg.Pool, token_id: str, *, revoked_by: str) -> bool:
    """Revoke a token at once (its next request is refused); False when there is no such live token."""
    tenant = await pool.fetchval(
        """UPDATE api_tokens SET revoked_at = now() WHERE token_id = $1 AND revoked_at IS NULL
           RETURNING coalesce(tenant_id, '')""",
        token_id,
    )
    if tenant is None:
        return False
    await pool.execute(
        "INSERT INTO audit_log (actor, tenant_id, action, target) VALUES ($1, $2, 'token.revoke', $3)",
        revoked_by, tenant or None, token_id,
    )
    return True


async def authenticate(pool: asyncpg.Pool, token: str | None) -> Actor | None:
    """The actor a presented token stands for, or None (missing, malformed, unknown or revoked)."""
    if not token:
        return None
    m = _TOKEN_RE.match(token.strip())
    if not m:
        return None
    row = await pool.fetchrow(
        """UPDATE api_tokens SET last_used_at = now() WHERE token_id = $1 AND revoked_at IS NULL
           RETURNING tenant_id, name, token_hash""",
        m.group(1),
    )
    if row is None or not hmac.compare_digest(row["token_hash"], _hash(token.strip())):
        return None
    return Actor(f"token:{m.group(1)} ({row['name']})", row["tenant_id"])
