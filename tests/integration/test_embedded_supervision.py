"""When the embedded broker dies, `flash run` stops with an error that says so, instead of running on
broker-less and logging hundreds of lines a second (issue 15)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from servicekit.runtime import Infra, Service, run_services
from servicekit.settings import FlashSettings
from servicekit.testing.infra import unique_name


async def test_run_services_exits_when_the_embedded_broker_dies(database_url: str, tmp_path: Path) -> None:
    schema = unique_name("emb")
    settings = FlashSettings(database_url=database_url, db_schema=schema, state_dir=tmp_path, kafka_bootstrap=None,
                             topic_prefix=f"{schema}.")
    killed: list[float] = []

    async def kill_broker(infra: Infra) -> None:
        assert infra.embedded is not None and infra.embedded.proc is not None
        infra.embedded.proc.kill()
        killed.append(time.monotonic())

    stop = asyncio.Event()
    code = await asyncio.wait_for(
        run_services([Service("idle")], settings, stop=stop, on_ready=kill_broker), timeout=30
    )
    assert code != 0, "a dead broker is a failure, not a clean stop"
    assert time.monotonic() - killed[0] < 10


async def test_a_service_started_during_a_database_outage_waits_it_out(
    settings: FlashSettings, database_url: str
) -> None:
    from urllib.parse import urlsplit, urlunsplit

    from servicekit.testing.chaos import ChaosProxy

    proxy = ChaosProxy(urlsplit(database_url).port or 5432)
    await proxy.start()
    parts = urlsplit(database_url)
    user = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    proxied = urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{proxy.port}"))
    proxy.cut()
    ready: list[float] = []
    stop = asyncio.Event()

    async def on_ready(infra: Infra) -> None:
        ready.append(time.monotonic())
        stop.set()

    restored_at = time.monotonic() + 2.0
    restorer = asyncio.get_running_loop().call_later(2.0, proxy.restore)
    try:
        code = await asyncio.wait_for(run_services([Service("idle")], settings.model_copy(
            update={"database_url": proxied}), stop=stop, on_ready=on_ready), timeout=60)
    finally:
        restorer.cancel()
        await proxy.stop()
    assert code == 0 and ready and ready[0] >= restored_at - 0.1, "started once the database answered"
