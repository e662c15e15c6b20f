"""Graceful shutdown within the documented bound, on real processes: `flash demo` after Ctrl-C (it used
to take ~61 s: the simulators' web server waited aiohttp's default 60 s for a CometD long poll whose
client had already left), and services after SIGTERM (what Kubernetes and docker compose send)."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

import pytest

from servicekit.runtime import SHUTDOWN_BOUND_S
from servicekit.settings import FlashSettings
from servicekit.testing.infra import service_env

DEMO_EXIT_BOUND_S = 15.0
"""README: the demo exits within 15 s of Ctrl-C."""


async def _start(args: list[str], env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(*args, env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)


async def _wait_for_line(proc: asyncio.subprocess.Process, needle: str, timeout: float, seen: list[str]) -> None:
    async def scan() -> None:
        assert proc.stdout is not None
        while True:
            line = await proc.stdout.readline()
            if not line:
                raise AssertionError(f"process exited before printing {needle!r}:\n" + "".join(seen[-40:]))
            seen.append(line.decode(errors="replace"))
            if needle in seen[-1]:
                return

    await asyncio.wait_for(scan(), timeout)


async def _stop_and_time(proc: asyncio.subprocess.Process, sig: int, seen: list[str]) -> float:
    started = time.monotonic()
    proc.send_signal(sig)
    assert proc.stdout is not None
    rest, _ = await asyncio.wait_for(proc.communicate(), SHUTDOWN_BOUND_S * 2)
    seen.append(rest.decode(errors="replace"))
    return time.monotonic() - started


@pytest.mark.timeout(240)
async def test_demo_exits_within_its_bound_after_ctrl_c(settings: FlashSettings, tmp_path: Path) -> None:
    assert settings.kafka_bootstrap and settings.database_url
    env = service_env(settings.kafka_bootstrap, settings.database_url, settings, FLASH_LOG_LEVEL="INFO",
                      FLASH_LOG_FORMAT="console", PYTHONUNBUFFERED="1")
    proc = await _start([sys.executable, "-m", "controlplane", "demo", "--orders", "40", "--mutate-every", "1"], env)
    seen: list[str] = []
    try:
        await _wait_for_line(proc, "6. Live changes", 180, seen)
        await _wait_for_line(proc, "ledger ", 30, seen)  # a live change went through CDC / change tracking
        elapsed = await _stop_and_time(proc, signal.SIGINT, seen)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, "".join(seen[-40:])
    assert elapsed < DEMO_EXIT_BOUND_S, f"demo took {elapsed:.1f}s to exit after Ctrl-C"


@pytest.mark.timeout(240)
async def test_services_exit_within_the_bound_after_sigterm(settings: FlashSettings) -> None:
    assert settings.kafka_bootstrap and settings.database_url
    env = service_env(settings.kafka_bootstrap, settings.database_url, settings, FLASH_LOG_LEVEL="INFO",
                      FLASH_LOG_FORMAT="console", PYTHONUNBUFFERED="1")
    procs = [await _start([sys.executable, "-m", module], env) for module in ("normalizer", "ce_poller")]
    logs: list[list[str]] = [[] for _ in procs]
    try:
        for proc, seen in zip(procs, logs, strict=True):
            await _wait_for_line(proc, "services started", 120, seen)
        times = await asyncio.gather(*(_stop_and_time(p, signal.SIGTERM, s) for p, s in zip(procs, logs, strict=True)))
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    for proc, seen, took in zip(procs, logs, times, strict=True):
        assert proc.returncode == 0, "".join(seen[-30:])
        assert took < SHUTDOWN_BOUND_S, f"took {took:.1f}s"
