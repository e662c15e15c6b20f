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
