"""One contract for the LeaseStore port, run against the in-memory fake and PostgreSQL alike.

Expiry is forced the same way on both (``expire_all``): the fake's clock moves on; in PostgreSQL the
rows' expiry is moved into the past (the database clock decides expiry)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from servicekit.leases import FakeLeaseStore, LeaseStore, PgLeaseStore
from servicekit.runtime import Infra

S = "ce-poller"
A, B, C = ("acme", "c1"), ("acme", "c2"), ("globex", "c1")


@pytest.fixture(params=["fake", "postgres"])
async def pair(request: pytest.FixtureRequest, infra: Infra) -> tuple[LeaseStore, Callable[[], Awaitable[None]]]:
    if request.param == "fake":
        fake = FakeLeaseStore()

        async def expire_fake() -> None:
            fake.now += 1000

        return fake, expire_fake
    async def expire_pg() -> None:
        await infra.pool.execute("UPDATE connection_leases SET expires_at = now() - interval '1 second'")
        await infra.pool.execute("UPDATE lease_members SET expires_at = now() - interval '1 second'")

    return PgLeaseStore(infra.pool), expire_pg


async def test_a_free_key_is_granted_once(pair: tuple[LeaseStore, Callable[[], Awaitable[None]]]) -> None:
    store, _ = pair
    got = await store.acquire(S, "x", [A, B], 30)
    assert set(got) == {A, B}
    assert set(await store.acquire(S, "y", [A, B, C], 30)) == {C}
    owners = await store.owners(S)
    assert owners[A] == ("x", got[A]) and owners[C][0] == "y"
    assert await store.owners("sf-poller") == {}  # scopes are separate: each service owns its own work


async def test_expired_leases_go_to_another_holder_with_a_greater_token(
    pair: tuple[LeaseStore, Callable[[], Awaitable[None]]],
) -> None:
    store, expire_all = pair
    first = await store.acquire(S, "x", [A], 30)
    await expire_all()
    assert await store.owners(S) == {}
    second = await store.acquire(S, "y", [A], 30)
    assert second[A] > first[A]
    # the old holder can neither renew nor release the lease it lost
    assert await store.renew(S, "x", first, 30) == set()
    await store.release(S, "x", first)
    assert (await store.owners(S))[A] == ("y", second[A])


async def test_renew_extends_only_what_is_still_held(pair: tuple[LeaseStore, Callable[[], Awaitable[None]]]) -> None:
    store, _ = pair
    got = await store.acquire(S, "x", [A, B], 30)
    assert await store.renew(S, "x", got, 30) == {A, B}
    assert await store.renew(S, "x", {A: got[A] + 999}, 30) == set()  # wrong token
    assert await store.renew(S, "y", got, 30) == set()  # wrong holder


async def test_release_and_leave_free_the_keys(pair: tuple[LeaseStore, Callable[[], Awaitable[None]]]) -> None:
    store, _ = pair
    got = await store.acquire(S, "x", [A, B, C], 30)
    await store.release(S, "x", {A: got[A]})
    assert set(await store.owners(S)) == {B, C}
    assert set(await store.acquire(S, "y", [A], 30)) == {A}
    await store.join(S, "x", 30)
    await store.leave(S, "x")
    assert set(await store.owners(S)) == {A}
    assert await store.join(S, "y", 30) == ["y"]


async def test_members_are_the_unexpired_heartbeats(pair: tuple[LeaseStore, Callable[[], Awaitable[None]]]) -> None:
    store, expire_all = pair
    assert await store.join(S, "b", 30) == ["b"]
    assert await store.join(S, "a", 30) == ["a", "b"]
    assert await store.join("sf-poller", "z", 30) == ["z"]
    await expire_all()
    assert await store.join(S, "b", 30) == ["b"]  # a's heartbeat expired
