"""FLASH_METRICS_PORT: a running service answers /metrics, /healthz and /readyz; its logs carry the
instance, tenant and correlation ids; no metric label carries a tenant id."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import time

import httpx

from servicekit.kafka import OutMessage, ensure_topics
from servicekit.runtime import Infra
from servicekit.settings import FlashSettings
from servicekit.testing.infra import service_env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _value(text: str, name: str, **labels: str) -> float:
    """The sample of ``name`` whose labels include ``labels`` (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


async def test_a_running_service_serves_metrics_health_and_readiness(infra: Infra, settings: FlashSettings) -> None:
    port = _free_port()
    await ensure_topics(infra.bootstrap, settings)
    env = service_env(infra.bootstrap, infra.database_url, settings, FLASH_METRICS_PORT=str(port),
                      FLASH_INSTANCE_ID="normalizer-7", FLASH_LOG_LEVEL="INFO", FLASH_LOG_FORMAT="json",
                      FLASH_MAX_ATTEMPTS="1")
    proc = subprocess.Popen([sys.executable, "-m", "normalizer"], env=env, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(timeout=5) as http:
            ready = None
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                assert proc.poll() is None, "the service exited"
                try:
                    ready = await http.get(f"{base}/readyz")
                    if ready.status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.3)
            assert ready is not None and ready.status_code == 200, ready.text if ready else "never answered"
            assert (await http.get(f"{base}/healthz")).json() == {"status": "ok"}

            # A record the normalizer cannot decode (an event type it does not know), for tenant acme.
            bad = json.dumps({"event_type": "nope.v9", "tenant_id": "acme-secret-tenant", "event_id": "e-1",
                              "correlation_id": "corr-42"}).encode()
            await infra.publisher.send_all([OutMessage(settings.topic("raw.dynamics-ce.salesorder.v1"), bad, b"k")])

            text = ""
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                resp = await http.get(f"{base}/metrics")
                assert resp.status_code == 200
                assert resp.headers["content-type"].startswith("text/plain")
                text = resp.text
                if _value(text, "flash_dead_letters_total", consumer="normalizer") >= 1:
                    break
                await asyncio.sleep(0.3)
            assert _value(text, "flash_messages_total", consumer="normalizer") >= 1, text
            assert _value(text, "flash_dead_letters_total", consumer="normalizer") >= 1, text
            assert _value(text, "flash_messages_published_total", consumer="normalizer") >= 1, "the dead letter"
            assert _value(text, "flash_batch_seconds_count", consumer="normalizer") >= 1
            assert "flash_consumer_lag{" in text
            for family in ("flash_points_total", "flash_source_requests_total", "flash_vendor_quota_used",
                           "flash_messages_failed_total"):
                assert f"# TYPE {family}" in text, family
            labels = re.findall(r"\{([^}]*)\}", text)
            assert labels and not [ls for ls in labels if "tenant" in ls], "no label may carry a tenant id"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    lines = [json.loads(line) for line in err.decode().splitlines() if line.startswith("{")]
    assert lines, err.decode()[-2000:]
    assert all(line.get("instance_id") == "normalizer-7" for line in lines), lines[:3]
    dead = [line for line in lines if line.get("event") == "message dead-lettered"]
    assert dead and dead[0]["tenant_id"] == "acme-secret-tenant"
    assert dead[0].get("correlation_id") == "corr-42", dead[0]
