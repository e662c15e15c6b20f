"""`flash connections add / verify / dry-run / go-live` on a Finance & Operations simulator connection: an
environment whose field names differ from the defaults fails verify, naming the field and what the environment
offers, and cannot go live; once mapped it verifies, dry-runs without writing anything, and goes live."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from canonical.events import MemberData
from controlplane.cli import main
from points.cli import set_program
from points.rules import Program
from resolver.cli import import_members
from sandbox.fo import FOState, Variant, build_app, seed_environment
from sandbox.server import serve
from servicekit.connections import CredentialCipher, PgConnectionStore
from servicekit.kafka import ensure_topics
from servicekit.runtime import Infra
from servicekit.settings import FlashSettings


def _cli_env(monkeypatch: pytest.MonkeyPatch, settings: FlashSettings, bootstrap: str) -> None:
    monkeypatch.setenv("FLASH_DATABASE_URL", str(settings.database_url))
    monkeypatch.setenv("FLASH_DB_SCHEMA", str(settings.db_schema))
    monkeypatch.setenv("FLASH_TOPIC_PREFIX", settings.topic_prefix)
    monkeypatch.setenv("FLASH_KAFKA_BOOTSTRAP", bootstrap)
    monkeypatch.setenv("FLASH_STATE_DIR", str(settings.state_dir))
    monkeypatch.setenv("FLASH_ALLOW_SANDBOX_ENDPOINTS", "1")
    monkeypatch.delenv("FLASH_SECRET_KEY", raising=False)


async def flash(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


async def db_snapshot(pool: asyncpg.Pool) -> dict[str, str]:
    tables = [r["tablename"] for r in await pool.fetch(
        "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY 1")]
    return {t: str(await pool.fetchval(
        f'SELECT md5(coalesce(string_agg(x::text, \'|\' ORDER BY x::text), \'\')) FROM "{t}" x')) for t in tables}


async def end_offsets(infra: Infra) -> dict[str, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=infra.bootstrap)
    await consumer.start()
    try:
        topics = sorted(t for t in await consumer.topics() if t.startswith(infra.settings.topic_prefix))
        parts = [TopicPartition(t, p) for t in topics for p in (consumer.partitions_for_topic(t) or ())]
        ends = await consumer.end_offsets(parts)
        return {f"{tp.topic}/{tp.partition}": off for tp, off in ends.items()}
    finally:
        await consumer.stop()

VARIANT = Variant(renames={"SalesOrderHeadersV2": {"SalesOrderStatus": "ZZOrderState"}},
                  extensions={"SalesOrderHeadersV2": {"ZZModifiedDateTime": "Edm.DateTimeOffset"}})


@pytest.mark.timeout(180)
async def test_cli_unconfirmed_mapping_is_refused_then_verify_dry_run_go_live(
        infra: Infra, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _cli_env(monkeypatch, infra.settings, infra.bootstrap)
    assert await flash("migrate") == 0
    await ensure_topics(infra.bootstrap, infra.settings)
    state = FOState()
    env, app = state.add_environment("fabrikam", companies=("usmf", "demf"), variant=VARIANT,
                                     stamp_field="ZZModifiedDateTime")
    seed_environment(env, orders=30, customers=8)
    await import_members(infra.pool, "acme", [MemberData(member_id=f"M-{r['CustomerAccount']}",
                                                         external_id=r["CustomerAccount"])
                                              for r in env.rows["CustomersV3"].values()])
    await set_program(infra.pool, Program(tenant_id="acme", base_currency="USD", points_per_unit=Decimal(1)))
    async with serve(build_app(state)) as running:
        base = running.base_url
        creds = json.dumps({"tenant_id": app.tenant_id, "client_id": app.client_id,
                            "client_secret": app.client_secret})
        settings = {"authority": f"{base}/{app.tenant_id}", "ca_bundle": str(running.tls.ca_path)}
        add = ["connections", "add", "--tenant", "acme", "--id", "fo-1", "--source", "dynamics-fo",
               "--endpoint", f"{base}/envs/fabrikam", "--credentials", creds]
        capsys.readouterr()
        assert await flash(*add, "--settings", json.dumps({**settings, "field_map": {"colour": "X"}})) == 2
        assert "settings.field_map" in capsys.readouterr().err
        assert await flash(*add, "--settings", json.dumps(settings)) == 0
        assert await flash("connections", "verify", "--tenant", "acme", "--id", "fo-1") == 1
        io = capsys.readouterr()
        assert "FAIL  field status: field_map.status = SalesOrderHeadersV2.SalesOrderStatus: MISSING" in io.out
        assert "offers ZZOrderState (SalesStatus)" in io.out
        assert "ok    field order_total: field_map.order_total = SalesOrderHeadersV2.OrderTotalAmount: present, " \
               "Edm.Decimal" in io.out
        assert await flash("connections", "go-live", "--tenant", "acme", "--id", "fo-1") == 2
        err = capsys.readouterr().err
        assert "verify it first" in err and "SalesOrderStatus: MISSING" in err and "offers ZZOrderState" in err
        store = PgConnectionStore(infra.pool, CredentialCipher.from_settings(infra.settings))
        failed = await store.get("acme", "fo-1")
        assert failed.state == "failed" and "ZZOrderState" in (failed.last_error or "")

        mapped = {**settings, "field_map": {"status": "ZZOrderState", "change_date": "ZZModifiedDateTime"}}
        assert await flash(*add, "--settings", json.dumps(mapped)) == 0
        assert await flash("connections", "verify", "--tenant", "acme", "--id", "fo-1") == 0
        out = capsys.readouterr().out
        assert "ok    field status: field_map.status = SalesOrderHeadersV2.ZZOrderState: present, SalesStatus" in out
        assert "ok    field change_date" in out and "verified" in out
        assert ("ok    status values: ZZOrderState (SalesStatus) has None, Backorder, Delivered, Invoiced, "
                "Canceled") in out

        db_before, topics_before = await db_snapshot(infra.pool), await end_offsets(infra)
        assert await flash("connections", "dry-run", "--tenant", "acme", "--id", "fo-1", "--limit", "50") == 0
        report = json.loads(capsys.readouterr().out)
        assert await db_snapshot(infra.pool) == db_before, "a dry-run changed the database"
        assert await end_offsets(infra) == topics_before, "a dry-run published something"
        assert report["records"]["orders"] == 30 and report["records"]["customers"] == 16
        assert report["canonical"]["canonical.order.v1"] == 30
        assert report["members"]["match_rate"] == 1
        assert report["points"]["would_earn"] > 0 and report["would_dead_letter"] == []

        assert await flash("connections", "go-live", "--tenant", "acme", "--id", "fo-1") == 0
        assert (await store.get("acme", "fo-1")).state == "live"
