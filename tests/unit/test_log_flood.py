"""An outage must not flood the logs: library lines are structured like ours, and repeats of one message
are rate-limited with a count of what was suppressed (issue 15: ~4,000 plain-text lines per service in a
40 s broker outage)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator

import pytest

from servicekit.logging import configure_logging, get_logger


@pytest.fixture
def json_logs() -> Iterator[None]:
    logging.disable(logging.NOTSET)  # other tests may have silenced loggers; this one needs them as deployed
    for name in ("aiokafka", "aiokafka.conn"):
        lg = logging.getLogger(name)
        lg.disabled, lg.propagate = False, True
        lg.setLevel(logging.NOTSET)
    configure_logging("INFO", "json", service="flood-test")
    yield
    configure_logging(os.environ.get("FLASH_LOG_LEVEL", "WARNING"), "console")


def test_a_repeated_library_error_is_structured_and_rate_limited(
    json_logs: None, capsys: pytest.CaptureFixture[str]
) -> None:
    lib = logging.getLogger("aiokafka.conn")
    for _ in range(4000):
        lib.error("Unable connect to node with id %s: %s", 1, "Connect call failed")
    ours = get_logger("servicekit.consumer")
    for i in range(500):
        ours.warning("batch failed, retrying", attempt=i)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) <= 60, f"{len(lines)} lines for two repeated messages"
    parsed = [json.loads(ln) for ln in lines]  # every line is JSON, the library's too
    lib_lines = [p for p in parsed if p.get("logger") == "aiokafka.conn"]
    assert lib_lines and lib_lines[0]["level"] == "error" and "Unable connect" in lib_lines[0]["event"]


def test_distinct_messages_are_not_suppressed(json_logs: None, capsys: pytest.CaptureFixture[str]) -> None:
    log = get_logger("x")
    for i in range(100):
        log.info(f"distinct message {i}")
    assert len(capsys.readouterr().err.splitlines()) == 100
