"""The connector supervisor on PostgreSQL: two copies of a poller share the live connections evenly, a
connection runs in one copy at a time, a copy that stops hands its connections over at once, and the
cursor writes of the kit's store are fenced by the lease."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from connectorkit.cursors import PgCursorStore
from connectorkit.runner import poll_forever, supervise_connections
from servicekit.connections import Connection, CredentialCipher, PgConnectionStore
from servicekit.leases import LeaseLost, PgLeaseStore, current_lease
from servicekit.runtime import Infra

pytestmark = pytest.mark.integration


async def test_copies_share_connections_and_hand_them_over(infra: Infra) -> None:
    store = PgConnectionStore(infra.pool, CredentialCipher.from_settings(infra.settings))
    for i in range(6):
        await store.upsert(f"tenant-{i % 3}", f"conn-{i}", "dynamics-ce", "https://x.crm.dynamics.com", {"k": "v"})
        await store.set_state(f"tenant-{i % 3}", f"conn-{i}", "live")
    cursors = PgCursorStore(infra.pool)
    running: Counter[tuple[str, str]] = Counter()
    overlaps: list[tuple[str, str]] = []
    by_copy: dict[str, set[tuple[str, str]]] = {"a": set(), "b": set()}

    def runner_for(copy: str):  # type: ignore[no-untyped-def]
        async def run(conn: Connection, infra: Infra, stop: asyncio.Event) -> None:
            key = (conn.tenant_id, conn.connection_id)
            lease = current_lease()
            assert lease is not None and (lease.tenant_id, lease.connection_id) == key
            running[key] += 1
            by_copy[copy].add(key)
            if running[key] > 1:
                overlaps.append(key)
            n = 0

            async def cycle() -> float:
                nonlocal n
                n += 1
                await cursors.save(conn.tenant_id, conn.connection_id, "salesorder", {"copy": copy, "n": n})
                return 0.05

            try:
                await poll_forever(conn, infra, stop, cycle)
            finally:
                running[key] -= 1
                by_copy[copy].discard(key)
        return run

    infra.settings = infra.settings.model_copy(update={"lease_ttl_s": 3.0})
    stops = {c: asyncio.Event() for c in "ab"}
    tasks = {c: asyncio.create_task(supervise_connections(infra, stops[c], source="dynamics-ce",
                                                          runner=runner_for(c), relist_s=0.2, scope="test-poller"))
             for c in "ab"}
    try:
        for _ in range(60):
            await asyncio.sleep(0.25)
            if len(by_copy["a"]) == len(by_copy["b"]) == 3:
                break
        assert (len(by_copy["a"]), len(by_copy["b"])) == (3, 3)
        moved = set(by_copy["a"])
        stops["a"].set()  # copy a stops: finishes its cycles, releases its leases
        await tasks["a"]
        for _ in range(40):
            await asyncio.sleep(0.25)
            if len(by_copy["b"]) == 6:
                break
        assert len(by_copy["b"]) == 6 and moved <= by_copy["b"]
        await asyncio.sleep(0.3)
        rows = await infra.pool.fetch("SELECT tenant_id, connection_id, cursor FROM cursors")
        assert len(rows) == 6 and all('"copy": "b"' in str(r["cursor"]) for r in rows)
        assert overlaps == []
    finally:
        for s in stops.values():
            s.set()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
    assert await infra.pool.fetchval("SELECT count(*) FROM connection_leases") == 0


async def test_the_kits_cursor_store_is_fenced(infra: Infra) -> None:
    from servicekit.leases import ConnectionLeases, PgLeaseStore, work_context

    leases = PgLeaseStore(infra.pool)
    old = ConnectionLeases(leases, "ce-poller", "old", ttl_s=30)
    await old.rebalance([("acme", "c1")])
    await infra.pool.execute("UPDATE connection_leases SET expires_at = now() - interval '1 second'")
    new = ConnectionLeases(leases, "ce-poller", "new", ttl_s=30)
    await new.rebalance([("acme", "c1")])
    store = PgCursorStore(infra.pool)
    loop = asyncio.get_running_loop()
    await loop.create_task(store.save("acme", "c1", "salesorder", {"p": 2}),
                           context=work_context(new.lease(("acme", "c1"))))
    with pytest.raises(LeaseLost):
        await loop.create_task(store.save("acme", "c1", "salesorder", {"p": 9}),
                               context=work_context(old.lease(("acme", "c1"))))
    assert await store.load("acme", "c1", "salesorder") == {"p": 2}


def test_flash_status_shows_which_copy_owns_each_connection(
    monkeypatch: pytest.MonkeyPatch, database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    import json

    import asyncpg

    from controlplane.cli import main
    from servicekit.leases import ConnectionLeases
    from servicekit.testing.infra import unique_name

    schema = unique_name("leases")
    for name, value in {"FLASH_DATABASE_URL": database_url, "FLASH_DB_SCHEMA": schema,
                        "FLASH_STATE_DIR": str(tmp_path)}.items():
        monkeypatch.setenv(name, value)

    async def take() -> None:
        pool = await asyncpg.create_pool(database_url, server_settings={"search_path": schema}, min_size=1,
                                         max_size=2)
        try:
            await ConnectionLeases(PgLeaseStore(pool), "ce-poller", "ce-poller-0:42:abc", ttl_s=60).rebalance(
                [("acme", "ce-main")])
        finally:
            await pool.close()

    async def drop() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()

    try:
        assert main(["migrate"]) == 0
        asyncio.run(take())
        capsys.readouterr()
        assert main(["status", "--json"]) == 0
        leases = json.loads(capsys.readouterr().out)["leases"]
        assert [(r["service"], r["tenant_id"], r["connection_id"], r["copy"]) for r in leases] == [
            ("ce-poller", "acme", "ce-main", "ce-poller-0:42:abc")]
        assert 0 < leases[0]["expires_in_s"] <= 60
        assert main(["status"]) == 0
        assert "LEASES" in capsys.readouterr().out
    finally:
        asyncio.run(drop())
