"""The Salesforce cursors are typed: a stored cursor that is not a valid model is a ConfigError that says how
to reset it (never a silent restart), and every cursor the poller saves round-trips through the model."""

from __future__ import annotations

import pytest

from servicekit.connections import Connection, FakeCursorStore
from servicekit.errors import ConfigError
from servicekit.settings import FlashSettings
from sfconnect.config import parse_connection
from sfconnect.cursors import SfCursor, checked
from sfconnect.reader import RecordReader


def _reader(store: FakeCursorStore) -> RecordReader:
    conn = parse_connection(Connection("t", "c", "salesforce", "https://acme.my.salesforce.com",
                                       {"client_id": "a", "client_secret": "b"}, {}))
    return RecordReader(conn, None, None, store, FlashSettings())  # type: ignore[arg-type]


async def test_a_bad_stored_cursor_says_how_to_reset_it() -> None:
    store = FakeCursorStore()
    await store.save("t", "c", "Order", {"phase": "sideways", "ts": 5})
    with pytest.raises(ConfigError, match="reset it by deleting its row"):
        await _reader(store).load("Order")


async def test_saved_cursors_round_trip_through_the_model() -> None:
    store = FakeCursorStore()
    reader = _reader(store)
    bulk = {"phase": "bulk", "ts": None, "id": None,
            "bulk": {"job_id": "750x", "api_version": "66.0", "created_at": 1.5, "locator": None, "attempt": 1}}
    await reader.save("Order", bulk)
    assert await reader.load("Order") == {"phase": "bulk", "bulk": {"job_id": "750x", "api_version": "66.0",
                                                                     "created_at": 1.5, "attempt": 1},
                                          "bulk_failed": False}
    with pytest.raises(ConfigError):
        await reader.save("Order", {"phase": "incremental", "tss": "typo"})
    assert checked(SfCursor, {"ts": "2026-01-01T00:00:00.000Z", "id": "801"}, where="x")["phase"] == "incremental"
