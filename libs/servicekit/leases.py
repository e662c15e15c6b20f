"""Work assignment for pollers and listeners: each connection is owned by one copy at a time.

Consumers scale by consumer group; pollers and listeners scale here. Every copy of a service (``scope``:
ce-poller, sf-poller, cdc-listener) runs :func:`supervise_leased`, which every round (a third of the lease
time):

1. heartbeats its membership (``lease_members``) and reads which copies are alive;
2. renews the leases it holds (``connection_leases``; expiry on the database clock, so copies on different
   machines agree); a lease it failed to renew was lost: its runner is stopped at once;
3. computes its even share of the live connections (``n // copies``, the first ``n % copies`` copies by
   name taking one more), gives up connections above its share (their runners are stopped first, then
   the leases released, so a connection is never polled by two copies) and acquires free or expired ones
   below it, spreading each tenant's connections over the copies.

A killed copy's leases expire after ``ttl_s``; the others take them within one round after that. A copy
that cannot reach the database stops its runners when its leases would have expired (local clock,
measured from before the renewal was sent, so it stops before another copy can start).

**Fencing.** Each acquisition draws a new token from a sequence. The runner's task carries its lease
(:func:`current_lease`); every cursor write (:func:`fenced_cursor_save`) checks, in the same statement,
that the lease row still holds that token (``FOR SHARE``, so a takeover waits for the write to commit or
the write sees the takeover): a copy that lost its lease cannot move a cursor, it gets :class:`LeaseLost`.

**Per-tenant fairness.** In one copy, at most ``tenant_concurrency`` connections of one tenant sync at
the same time (:func:`tenant_slot`, held around each poll cycle). There is no global bound, so one
tenant's long backfill occupies only its own slots and never delays another tenant's incremental reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import json
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import asyncpg

from servicekit.db import db_errors
from servicekit.errors import FlashError, Transient
from servicekit.logging import get_logger

__all__ = [
    "ConnectionLeases", "FakeLeaseStore", "Key", "Lease", "LeaseLost", "LeaseStore", "PgLeaseStore", "TenantGate",
    "WorkContext", "current_lease", "fenced_cursor_clear", "fenced_cursor_save", "holder_name", "supervise_leased",
    "tenant_slot", "work_context",
]

log = get_logger(__name__)

Key = tuple[str, str]
"""(tenant_id, connection_id)"""

T = TypeVar("T")


class LeaseLost(FlashError):
    """This copy no longer holds the connection's lease: another copy owns it; stop working on it."""


@dataclass(frozen=True, slots=True)
class Lease:
    scope: str
    tenant_id: str
    connection_id: str
    holder: str
    token: int


def holder_name(instance_id: str | None = None) -> str:
    """A name unique to this process: the instance id (or host name), the pid and a random suffix."""
    return f"{instance_id or socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


# ------------------------------------------------------------------------------------------- the port


class LeaseStore(Protocol):
    """Leases and memberships of one scope.

    Contract: ``acquire`` grants a key only when it has no lease or its lease expired, each grant with a
    token greater than every token granted before; ``renew`` extends only leases still held with the
    given token and returns those keys; ``release`` ends only leases held with the given token; ``owners``
    lists unexpired leases; ``join`` extends this holder's membership and lists the unexpired members
    (sorted); ``leave`` ends the membership and every lease of the holder.
    """

    async def join(self, scope: str, holder: str, ttl_s: float) -> list[str]: ...

    async def leave(self, scope: str, holder: str) -> None: ...

    async def acquire(self, scope: str, holder: str, keys: Collection[Key], ttl_s: float) -> dict[Key, int]: ...

    async def renew(self, scope: str, holder: str, held: Mapping[Key, int], ttl_s: float) -> set[Key]: ...

    async def release(self, scope: str, holder: str, held: Mapping[Key, int]) -> None: ...

    async def owners(self, scope: str) -> dict[Key, tuple[str, int]]: ...


class PgLeaseStore:
    """``connection_leases`` / ``lease_members`` (servicekit migration 0080); expiry on the database clock."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def join(self, scope: str, holder: str, ttl_s: float) -> list[str]:
        async with db_errors("lease heartbeat"):
            rows = await self.pool.fetch(
                """WITH beat AS (
                       INSERT INTO lease_members (scope, holder, expires_at)
                       VALUES ($1, $2, now() + make_interval(secs => $3))
                       ON CONFLICT (scope, holder) DO UPDATE SET expires_at = EXCLUDED.expires_at)
                   SELECT holder FROM lease_members WHERE scope = $1 AND expires_at > now()
                   UNION SELECT $2""",
                scope, holder, ttl_s,
            )
        return sorted(r["holder"] for r in rows)

    async def leave(self, scope: str, holder: str) -> None:
        async with db_errors("lease leave"), self.pool.acquire() as conn, conn.transaction():
            await conn.execute("DELETE FROM connection_leases WHERE scope = $1 AND holder = $2", scope, holder)
            await conn.execute("DELETE FROM lease_members WHERE scope = $1 AND holder = $2", scope, holder)

    async def acquire(self, scope: str, holder: str, keys: Collection[Key], ttl_s: float) -> dict[Key, int]:
        if not keys:
            return {}
        async with db_errors("lease acquire"):
            rows = await self.pool.fetch(
                """INSERT INTO connection_leases (scope, tenant_id, connection_id, holder, token, expires_at)
                   SELECT $1, t, c, $2, nextval('connection_lease_token'), now() + make_interval(secs => $5)
                   FROM unnest($3::text[], $4::text[]) AS u(t, c)
                   ON CONFLICT (scope, tenant_id, connection_id) DO UPDATE SET
                       holder = EXCLUDED.holder, token = EXCLUDED.token, expires_at = EXCLUDED.expires_at,
                       acquired_at = now()
                   WHERE connection_leases.expires_at <= now()
                   RETURNING tenant_id, connection_id, token""",
                scope, holder, [k[0] for k in keys], [k[1] for k in keys], ttl_s,
            )
        return {(r["tenant_id"], r["connection_id"]): int(r["token"]) for r in rows}

    async def renew(self, scope: str, holder: str, held: Mapping[Key, int], ttl_s: float) -> set[Key]:
        if not held:
            return set()
        async with db_errors("lease renew"):
            rows = await self.pool.fetch(
                """UPDATE connection_leases l SET expires_at = now() + make_interval(secs => $6)
                   FROM unnest($3::text[], $4::text[], $5::bigint[]) AS u(t, c, tok)
                   WHERE l.scope = $1 AND l.holder = $2 AND l.tenant_id = u.t AND l.connection_id = u.c
                     AND l.token = u.tok
                   RETURNING l.tenant_id, l.connection_id""",
                scope, holder, [k[0] for k in held], [k[1] for k in held], list(held.values()), ttl_s,
            )
        return {(r["tenant_id"], r["connection_id"]) for r in rows}

    async def release(self, scope: str, holder: str, held: Mapping[Key, int]) -> None:
        if not held:
            return
        async with db_errors("lease release"):
            await self.pool.execute(
                """DELETE FROM connection_leases l USING unnest($3::text[], $4::text[], $5::bigint[]) AS u(t, c, tok)
                   WHERE l.scope = $1 AND l.holder = $2 AND l.tenant_id = u.t AND l.connection_id = u.c
                     AND l.token = u.tok""",
                scope, holder, [k[0] for k in held], [k[1] for k in held], list(held.values()),
            )

    async def owners(self, scope: str) -> dict[Key, tuple[str, int]]:
        async with db_errors("lease owners"):
            rows = await self.pool.fetch(
                """SELECT tenant_id, connection_id, holder, token FROM connection_leases
                   WHERE scope = $1 AND expires_at > now()""",
                scope,
            )
        return {(r["tenant_id"], r["connection_id"]): (r["holder"], int(r["token"])) for r in rows}


@dataclass
class FakeLeaseStore:
    """In-memory :class:`LeaseStore` for unit tests: time is ``now`` (set it), or ``clock()`` when given."""

    now: float = 0.0
    clock: Callable[[], float] | None = None
    leases: dict[tuple[str, str, str], tuple[str, int, float]] = field(default_factory=dict)
    members: dict[tuple[str, str], float] = field(default_factory=dict)
    next_token: int = 1

    def _t(self) -> float:
        return self.clock() if self.clock else self.now

    async def join(self, scope: str, holder: str, ttl_s: float) -> list[str]:
        self.members[(scope, holder)] = self._t() + ttl_s
        return sorted(h for (s, h), exp in self.members.items() if s == scope and exp > self._t())

    async def leave(self, scope: str, holder: str) -> None:
        self.members.pop((scope, holder), None)
        for k, (h, _, _) in list(self.leases.items()):
            if k[0] == scope and h == holder:
                del self.leases[k]

    async def acquire(self, scope: str, holder: str, keys: Collection[Key], ttl_s: float) -> dict[Key, int]:
        got: dict[Key, int] = {}
        for t, c in keys:
            cur = self.leases.get((scope, t, c))
            if cur is None or cur[2] <= self._t():
                token, self.next_token = self.next_token, self.next_token + 1
                self.leases[(scope, t, c)] = (holder, token, self._t() + ttl_s)
                got[(t, c)] = token
        return got

    async def renew(self, scope: str, holder: str, held: Mapping[Key, int], ttl_s: float) -> set[Key]:
        out: set[Key] = set()
        for (t, c), token in held.items():
            cur = self.leases.get((scope, t, c))
            if cur is not None and cur[0] == holder and cur[1] == token:
                self.leases[(scope, t, c)] = (holder, token, self._t() + ttl_s)
                out.add((t, c))
        return out

    async def release(self, scope: str, holder: str, held: Mapping[Key, int]) -> None:
        for (t, c), token in held.items():
            cur = self.leases.get((scope, t, c))
            if cur is not None and cur[0] == holder and cur[1] == token:
                del self.leases[(scope, t, c)]

    async def owners(self, scope: str) -> dict[Key, tuple[str, int]]:
        return {(t, c): (h, tok) for (s, t, c), (h, tok, exp) in self.leases.items()
                if s == scope and exp > self._t()}


# ------------------------------------------------------------------------------------------- balancing


@dataclass
class Plan:
    """One round's outcome: what this copy owns now, and what its runners must stop on."""

    owned: dict[Key, Lease]
    acquired: list[Key]
    give_up: dict[Key, int]
    """Held but above this copy's share (or no longer live): stop the runner, then :meth:`release`."""
    lost: list[Key]
    """No longer held (expired and taken, or released elsewhere): stop the runner now."""


class ConnectionLeases:
    """This copy's leases in one scope (see the module docstring); one :meth:`rebalance` per round."""

    def __init__(self, store: LeaseStore, scope: str, holder: str, *, ttl_s: float = 15.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.scope = scope
        self.holder = holder
        self.ttl_s = ttl_s
        self.clock = clock
        self.held: dict[Key, int] = {}
        self.valid_until: dict[Key, float] = {}
        self.members: list[str] = [holder]

    def lease(self, key: Key) -> Lease:
        return Lease(self.scope, key[0], key[1], self.holder, self.held[key])

    def share(self, n: int) -> int:
        """This copy's even share of ``n`` connections among the live members."""
        m = max(1, len(self.members))
        rank = self.members.index(self.holder) if self.holder in self.members else m - 1
        return n // m + (1 if rank < n % m else 0)

    def expired(self) -> list[Key]:
        """Held keys whose lease may have expired (no renewal confirmed in time): stop their runners."""
        now = self.clock()
        return [k for k in self.held if self.valid_until.get(k, 0.0) <= now]

    def forget(self, keys: Collection[Key]) -> None:
        for k in keys:
            self.held.pop(k, None)
            self.valid_until.pop(k, None)

    async def rebalance(self, live: Collection[Key]) -> Plan:
        started = self.clock()
        # Locally a lease counts as valid until a little before the database would expire it, measured
        # from before the request: the clocks' rates may differ slightly, the request took time.
        valid_until = started + self.ttl_s * 0.9
        self.members = await self.store.join(self.scope, self.holder, self.ttl_s)
        renewed = await self.store.renew(self.scope, self.holder, self.held, self.ttl_s)
        lost = [k for k in self.held if k not in renewed]
        self.forget(lost)
        for k in renewed:
            self.valid_until[k] = valid_until
        live_set = set(live)
        give_up = {k: tok for k, tok in self.held.items() if k not in live_set}
        keep = [k for k in self.held if k in live_set]
        target = self.share(len(live_set))
        acquired: list[Key] = []
        if len(keep) > target:
            # Give up where this copy holds most of one tenant's connections first (spreads tenants).
            per_tenant = Counter(k[0] for k in keep)
            keep.sort(key=lambda k: (per_tenant[k[0]], _rank(self.holder, k)))
            for k in keep[target:]:
                give_up[k] = self.held[k]
        elif len(keep) < target:
            owners = await self.store.owners(self.scope)
            free = [k for k in live_set if k not in owners and k not in self.held]
            per_tenant = Counter(k[0] for k in keep)
            free.sort(key=lambda k: (per_tenant[k[0]], _rank(self.holder, k)))
            got = await self.store.acquire(self.scope, self.holder, free[: target - len(keep)], self.ttl_s)
            for k, tok in got.items():
                self.held[k] = tok
                self.valid_until[k] = valid_until
                acquired.append(k)
        owned = {k: self.lease(k) for k in self.held if k not in give_up}
        return Plan(owned, acquired, give_up, lost)

    async def release(self, held: Mapping[Key, int]) -> None:
        await self.store.release(self.scope, self.holder, held)
        self.forget(list(held))

    async def close(self) -> None:
        """Release every lease and the membership: the other copies take over at their next round."""
        await self.store.leave(self.scope, self.holder)
        self.forget(list(self.held))


def _rank(holder: str, key: Key) -> bytes:
    """A per-copy order of connections (rendezvous-style): copies racing for free leases prefer different
    ones, so fewer acquisitions collide."""
    return hashlib.blake2b(f"{holder}|{key[0]}|{key[1]}".encode(), digest_size=8).digest()


# ------------------------------------------------------------------------------------------- fairness


class TenantGate:
    """At most ``limit`` concurrent slots per tenant (one semaphore per tenant, created on first use)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._sems: dict[str, asyncio.Semaphore] = {}
        self.active: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()

    @contextlib.asynccontextmanager
    async def slot(self, tenant_id: str) -> AsyncIterator[None]:
        sem = self._sems.get(tenant_id)
        if sem is None:
            sem = self._sems[tenant_id] = asyncio.Semaphore(self.limit)
        async with sem:
            self.active[tenant_id] += 1
            self.peak[tenant_id] = max(self.peak[tenant_id], self.active[tenant_id])
            try:
                yield
            finally:
                self.active[tenant_id] -= 1


@dataclass(frozen=True)
class WorkContext:
    """What a runner task carries (a context variable set when the supervisor starts it)."""

    lease: Lease | None = None
    gate: TenantGate | None = None


_WORK: contextvars.ContextVar[WorkContext | None] = contextvars.ContextVar("flash_work", default=None)


def work_context(lease: Lease | None, gate: TenantGate | None = None) -> contextvars.Context:
    """A copy of the current context in which :func:`current_lease` is ``lease`` (start a task in it)."""
    ctx = contextvars.copy_context()
    ctx.run(_WORK.set, WorkContext(lease, gate))
    return ctx


def current_lease() -> Lease | None:
    """The lease of the connection the calling task works on, if it runs under :func:`supervise_leased`."""
    work = _WORK.get()
    return work.lease if work else None


@contextlib.asynccontextmanager
async def tenant_slot(tenant_id: str) -> AsyncIterator[None]:
    """Hold one of the tenant's sync slots for a poll cycle (no bound outside :func:`supervise_leased`)."""
    work = _WORK.get()
    gate = work.gate if work else None
    if gate is None:
        yield
        return
    async with gate.slot(tenant_id):
        yield


# ------------------------------------------------------------------------------------------- fencing


async def fenced_cursor_save(pool: asyncpg.Pool, lease: Lease, entity: str, cursor: dict[str, Any]) -> None:
    """Write a cursor only while ``lease`` is still the connection's lease (same statement, row locked)."""
    async with db_errors("cursor save"):
        ok = await pool.fetchval(
            """WITH lease AS (
                   SELECT 1 FROM connection_leases
                   WHERE scope = $5 AND tenant_id = $1 AND connection_id = $2 AND token = $6 FOR SHARE)
               INSERT INTO cursors (tenant_id, connection_id, entity, cursor)
               SELECT $1, $2, $3, $4::jsonb FROM lease
               ON CONFLICT (tenant_id, connection_id, entity)
               DO UPDATE SET cursor = EXCLUDED.cursor, updated_at = now()
               RETURNING true""",
            lease.tenant_id, lease.connection_id, entity, json.dumps(cursor), lease.scope, lease.token,
        )
    if not ok:
        raise LeaseLost(f"{lease.scope} lost the lease of {lease.tenant_id}/{lease.connection_id} "
                        f"(token {lease.token}); the cursor of {entity} was not moved")


async def fenced_cursor_clear(pool: asyncpg.Pool, lease: Lease, entity: str) -> None:
    """Delete a cursor only while ``lease`` is still the connection's lease."""
    async with db_errors("cursor clear"):
        held = await pool.fetchval(
            """WITH lease AS (
                   SELECT 1 FROM connection_leases
                   WHERE scope = $4 AND tenant_id = $1 AND connection_id = $2 AND token = $5 FOR SHARE),
               gone AS (
                   DELETE FROM cursors WHERE tenant_id = $1 AND connection_id = $2 AND entity = $3
                     AND EXISTS (SELECT 1 FROM lease))
               SELECT EXISTS (SELECT 1 FROM lease)""",
            lease.tenant_id, lease.connection_id, entity, lease.scope, lease.token,
        )
    if not held:
        raise LeaseLost(f"{lease.scope} lost the lease of {lease.tenant_id}/{lease.connection_id}; "
                        f"the cursor of {entity} was not cleared")


# ------------------------------------------------------------------------------------------- supervisor


class _Runner(Generic[T]):
    __slots__ = ("fingerprint", "item", "task")

    def __init__(self, item: T, fingerprint: str, task: asyncio.Task[None]) -> None:
        self.item = item
        self.fingerprint = fingerprint
        self.task = task


async def supervise_leased(
    leases: ConnectionLeases,
    stop: asyncio.Event,
    *,
    list_live: Callable[[], Awaitable[Mapping[Key, T]]],
    run: Callable[[T], Awaitable[None]],
    fingerprint: Callable[[T], str],
    gate: TenantGate | None = None,
    relist_s: float = 5.0,
    stop_grace_s: float = 5.0,
) -> None:
    """Keep one ``run(item)`` task per live connection THIS copy holds the lease of, until ``stop``.

    Rounds every ``min(relist_s, ttl/3)`` s. A task restarts when its item's fingerprint changes or it
    crashed (a LeaseLost included, once the lease is confirmed held); a task that returned on purpose
    stays stopped. On ``stop``: tasks get ``stop_grace_s`` to finish their cycle (they watch the same
    ``stop``), are cancelled after that, and the leases are released so other copies take over at once.
    """
    running: dict[Key, _Runner[T]] = {}
    period = min(relist_s, leases.ttl_s / 3)

    async def halt(keys: Collection[Key], why: str) -> None:
        tasks = [running.pop(k).task for k in keys if k in running]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for k in keys:
            log.info("connection stopped", scope=leases.scope, tenant_id=k[0], connection_id=k[1], reason=why)

    try:
        while not stop.is_set():
            try:
                live = await list_live()
                plan = await leases.rebalance(live.keys())
            except Transient as exc:
                log.warning("lease round failed", scope=leases.scope, error=str(exc)[:300])
                expired = leases.expired()
                if expired:  # the database is out of reach longer than the lease: another copy may own them
                    await halt(expired, "lease not renewed in time")
                    leases.forget(expired)
            else:
                await halt(plan.lost, "lease lost")
                if plan.give_up:
                    await halt(plan.give_up, "rebalanced to another copy")
                    try:
                        await leases.release(plan.give_up)
                    except Transient as exc:  # they expire on their own
                        log.warning("lease release failed", scope=leases.scope, error=str(exc)[:300])
                        leases.forget(list(plan.give_up))
                for key, lease in plan.owned.items():
                    item = live[key]
                    fp = fingerprint(item)
                    r = running.get(key)
                    if r is not None:
                        if r.fingerprint == fp and (not r.task.done() or r.task.cancelled()
                                                    or r.task.exception() is None):
                            continue
                        if r.fingerprint == fp:
                            log.warning("connection task crashed; restarting", scope=leases.scope,
                                        tenant_id=key[0], connection_id=key[1],
                                        error=str(r.task.exception())[:300])
                        await halt([key], "changed or crashed")
                    task = asyncio.get_running_loop().create_task(_call(run, item), context=work_context(lease, gate))
                    running[key] = _Runner(item, fp, task)
                    log.info("connection started", scope=leases.scope, tenant_id=key[0], connection_id=key[1],
                             lease_token=lease.token)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), period)
    finally:
        tasks = [r.task for r in running.values()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=stop_grace_s if stop.is_set() else 0)
            for t in pending:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        running.clear()
        with contextlib.suppress(Transient):
            await leases.close()


async def _call(run: Callable[[T], Awaitable[None]], item: T) -> None:
    await run(item)
