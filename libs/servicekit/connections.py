"""Connections (endpoint + encrypted credentials + settings) and poller cursors, in PostgreSQL.

Credentials are encrypted with Fernet (``cryptography``): AES-128-CBC + HMAC-SHA256 with a timestamp,
through ``MultiFernet`` so keys rotate (``FLASH_SECRET_KEY`` lists keys newest first). They are decrypted
only inside the process that calls the vendor, and never logged or shown: ``Connection.redacted()``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import asyncpg
from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from servicekit.errors import ConfigError
from servicekit.leases import current_lease, fenced_cursor_clear, fenced_cursor_save
from servicekit.logging import get_logger
from servicekit.settings import FlashSettings

__all__ = [
    "Connection",
    "ConnectionState",
    "CredentialCipher",
    "CursorStore",
    "FakeCursorStore",
    "PgConnectionStore",
    "PgCursorStore",
]

log = get_logger(__name__)

ConnectionState = Literal["draft", "verified", "live", "paused", "failed"]


class CredentialCipher:
    def __init__(self, keys: list[bytes]) -> None:
        if not keys:
            raise ConfigError("no credential key configured; set FLASH_SECRET_KEY")
        try:
            self._fernet = MultiFernet([Fernet(k) for k in keys])
        except ValueError as exc:
            raise ConfigError(
                "FLASH_SECRET_KEY is not a valid Fernet key (32 url-safe base64 bytes); generate one with "
                "`python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'`"
            ) from exc

    @classmethod
    def from_settings(cls, settings: FlashSettings) -> CredentialCipher:
        if settings.secret_key:
            return cls([k.strip().encode() for k in settings.secret_key.get_secret_value().split(",") if k.strip()])
        path = Path(settings.state_dir) / "secret.key"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(Fernet.generate_key())
        return cls([path.read_bytes().strip()])

    def encrypt(self, credentials: dict[str, str]) -> bytes:
        return self._fernet.encrypt(json.dumps(credentials).encode())

    def decrypt(self, token: bytes) -> dict[str, str]:
        try:
            return dict(json.loads(self._fernet.decrypt(token)))
        except (InvalidToken, ValueError, TypeError) as exc:  # not ours, corrupt, or not a JSON object
            raise ConfigError(
                "connection credentials cannot be decrypted with the configured FLASH_SECRET_KEY "
                "(was the key rotated without keeping the old one?)"
            ) from exc


@dataclass(frozen=True)
class Connection:
    tenant_id: str
    connection_id: str
    source: str
    endpoint: str
    credentials: dict[str, str] = field(repr=False)
    settings: dict[str, Any]
    state: ConnectionState = "draft"
    last_error: str | None = None
    verified_at: dt.datetime | None = None
    readable: bool = True
    """False when the stored credentials could not be decrypted (then ``credentials`` is empty)."""

    def redacted(self) -> dict[str, Any]:
        """Safe to print or log: credential values are masked."""
        return {
            "tenant_id": self.tenant_id, "connection_id": self.connection_id, "source": self.source,
            "endpoint": self.endpoint, "state": self.state, "last_error": self.last_error,
            "verified_at": self.verified_at.isoformat() if self.verified_at else None,
            "credentials": dict.fromkeys(self.credentials, "***"), "settings": self.settings,
        }


class PgConnectionStore:
    def __init__(self, pool: asyncpg.Pool, cipher: CredentialCipher) -> None:
        self.pool = pool
        self.cipher = cipher

    def _row(self, r: asyncpg.Record, *, unreadable_ok: bool = False) -> Connection:
        """The connection of row ``r``. Credentials that cannot be decrypted raise a ConfigError naming the
        row, or with ``unreadable_ok`` give the connection with no credentials and the reason as last_error."""
        settings = r["settings"]
        try:
            credentials = self.cipher.decrypt(r["credentials"])
        except ConfigError as exc:
            message = f"connection {r['connection_id']!r} of tenant {r['tenant_id']!r}: {exc}"
            if not unreadable_ok:
                raise ConfigError(message) from exc
            return Connection(
                tenant_id=r["tenant_id"], connection_id=r["connection_id"], source=r["source"],
                endpoint=r["endpoint"], credentials={}, settings=_settings(settings), state=r["state"],
                last_error=message, verified_at=r["verified_at"], readable=False,
            )
        return Connection(
            tenant_id=r["tenant_id"], connection_id=r["connection_id"], source=r["source"], endpoint=r["endpoint"],
            credentials=credentials, settings=_settings(settings),
            state=r["state"], last_error=r["last_error"], verified_at=r["verified_at"],
        )

    async def upsert(
        self, tenant_id: str, connection_id: str, source: str, endpoint: str,
        credentials: dict[str, str], settings: dict[str, Any] | None = None,
    ) -> Connection:
        """Create or replace a connection; a changed endpoint or credential sends it back to draft."""
        row = await self.pool.fetchrow(
            """INSERT INTO connections (tenant_id, connection_id, source, endpoint, credentials, settings)
               VALUES ($1, $2, $3, $4, $5, $6::jsonb)
               ON CONFLICT (tenant_id, connection_id) DO UPDATE SET
                   source = EXCLUDED.source, endpoint = EXCLUDED.endpoint, credentials = EXCLUDED.credentials,
                   settings = EXCLUDED.settings, state = 'draft', verified_at = NULL, updated_at = now()
               RETURNING *""",
            tenant_id, connection_id, source, endpoint, self.cipher.encrypt(credentials),
            json.dumps(settings or {}),
        )
        assert row is not None
        return self._row(row)

    async def get(self, tenant_id: str, connection_id: str) -> Connection:
        row = await self.pool.fetchrow(
            "SELECT * FROM connections WHERE tenant_id = $1 AND connection_id = $2", tenant_id, connection_id
        )
        if row is None:
            raise ConfigError(f"no connection {connection_id!r} for tenant {tenant_id!r}; see `flash connections list`")
        return self._row(row)

    async def list(
        self, *, source: str | None = None, states: tuple[str, ...] | None = None, include_unreadable: bool = False
    ) -> list[Connection]:
        """Connections in id order. A row whose credentials cannot be decrypted (a rotated key, a corrupt
        value) is one tenant's problem: it is left out with an error log naming it, so the others still
        sync; ``include_unreadable`` (listings, status) returns it too, without credentials, its last_error
        saying what is wrong."""
        rows = await self.pool.fetch(
            """SELECT * FROM connections WHERE ($1::text IS NULL OR source = $1)
               AND ($2::text[] IS NULL OR state = ANY($2::text[])) ORDER BY tenant_id, connection_id""",
            source, list(states) if states else None,
        )
        out: list[Connection] = []
        for r in rows:
            conn = self._row(r, unreadable_ok=True)
            if not conn.readable:
                log.error("connection skipped: its credentials cannot be decrypted", tenant_id=conn.tenant_id,
                          connection_id=conn.connection_id, error=conn.last_error)
                if not include_unreadable:
                    continue
            out.append(conn)
        return out

    async def set_state(
        self, tenant_id: str, connection_id: str, state: ConnectionState, *, error: str | None = None
    ) -> None:
        await self.pool.execute(
            """UPDATE connections SET state = $3, last_error = $4, updated_at = now(),
                   verified_at = CASE WHEN $3 = 'verified' THEN now() ELSE verified_at END
               WHERE tenant_id = $1 AND connection_id = $2""",
            tenant_id, connection_id, state, error,
        )


def _settings(value: Any) -> dict[str, Any]:
    return json.loads(value) if isinstance(value, str) else dict(value)


class CursorStore(Protocol):
    """Where a poller keeps its checkpoint per (tenant, connection, entity).

    Contract: ``save`` is called only after the broker acknowledged every record the cursor covers.
    """

    async def load(self, tenant_id: str, connection_id: str, entity: str) -> dict[str, Any] | None: ...

    async def save(self, tenant_id: str, connection_id: str, entity: str, cursor: dict[str, Any]) -> None: ...

    async def clear(self, tenant_id: str, connection_id: str, entity: str) -> None: ...


class PgCursorStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def load(self, tenant_id: str, connection_id: str, entity: str) -> dict[str, Any] | None:
        raw = await self.pool.fetchval(
            "SELECT cursor FROM cursors WHERE tenant_id = $1 AND connection_id = $2 AND entity = $3",
            tenant_id, connection_id, entity,
        )
        if raw is None:
            return None
        return dict(json.loads(raw) if isinstance(raw, str) else raw)

    async def save(self, tenant_id: str, connection_id: str, entity: str, cursor: dict[str, Any]) -> None:
        # Under a lease (servicekit.leases: a poller copy owns this connection) the write is fenced: a copy
        # that lost the lease gets LeaseLost instead of moving the cursor.
        lease = current_lease()
        if lease is not None and (lease.tenant_id, lease.connection_id) == (tenant_id, connection_id):
            await fenced_cursor_save(self.pool, lease, entity, cursor)
            return
        await self.pool.execute(
            """INSERT INTO cursors (tenant_id, connection_id, entity, cursor) VALUES ($1, $2, $3, $4::jsonb)
               ON CONFLICT (tenant_id, connection_id, entity)
               DO UPDATE SET cursor = EXCLUDED.cursor, updated_at = now()""",
            tenant_id, connection_id, entity, json.dumps(cursor),
        )

    async def clear(self, tenant_id: str, connection_id: str, entity: str) -> None:
        lease = current_lease()
        if lease is not None and (lease.tenant_id, lease.connection_id) == (tenant_id, connection_id):
            await fenced_cursor_clear(self.pool, lease, entity)
            return
        await self.pool.execute(
            "DELETE FROM cursors WHERE tenant_id = $1 AND connection_id = $2 AND entity = $3",
            tenant_id, connection_id, entity,
        )


class FakeCursorStore:
    """In-memory cursor store that records every save, for tests to assert ordering against publishes."""

    def __init__(self) -> None:
        self.cursors: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.saves: list[tuple[str, str, str, dict[str, Any]]] = []

    async def load(self, tenant_id: str, connection_id: str, entity: str) -> dict[str, Any] | None:
        return self.cursors.get((tenant_id, connection_id, entity))

    async def save(self, tenant_id: str, connection_id: str, entity: str, cursor: dict[str, Any]) -> None:
        self.cursors[(tenant_id, connection_id, entity)] = dict(cursor)
        self.saves.append((tenant_id, connection_id, entity, dict(cursor)))

    async def clear(self, tenant_id: str, connection_id: str, entity: str) -> None:
        self.cursors.pop((tenant_id, connection_id, entity), None)
