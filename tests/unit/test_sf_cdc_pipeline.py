"""The CDC listener's pipelined batches without sockets: batch N+1 fetches its records back while batch N
is still publishing, but records reach the broker and replay ids reach the cursor store in batch order; a
batch that fails stops the ones behind it from publishing or saving; a reconcile runs alone."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from typing import Any

import pytest

from canonical.events import decode_raw
from cdc_listener.listener import CdcListener
from servicekit.connections import Connection, FakeCursorStore
from servicekit.errors import Transient
from servicekit.kafka import OutMessage
from servicekit.settings import FlashSettings
from sf_poller.sync import ConnectionSync
from sfconnect.config import parse_connection

INSTANCE = "https://acme.my.salesforce.com"
_IDS = re.compile(r"'([^']+)'")


class Log:
    def __init__(self) -> None:
        self.entries: list[tuple[str, Any]] = []


class FakeClient:
    """Answers ``WHERE Id IN (..)`` fetch-backs (and reconcile queries, with nothing) from memory."""

    def __init__(self, log: Log) -> None:
        self.log = log

    async def query_page(self, soql: str | None = None, **_: Any) -> tuple[dict[str, Any], str]:
        assert soql is not None
        if " Id IN (" not in soql:
            self.log.entries.append(("query", soql.split(" FROM ")[1].split()[0]))
            return {"totalSize": 0, "done": True, "records": []}, f"{INSTANCE}/query"
        ids = _IDS.findall(soql.split(" Id IN (")[1])
        self.log.entries.append(("fetch", ids))
        await asyncio.sleep(0)
        rows = [{"Id": i, "IsDeleted": False, "SystemModstamp": "2026-01-01T00:00:00.000+0000", "Status": "Fulfilled"}
                for i in ids]
        return {"totalSize": len(rows), "done": True, "records": rows}, f"{INSTANCE}/queryAll"


class GatedPublisher:
    """Records what was sent; the sends of a batch whose first id is in ``gates`` wait for that gate."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.gates: dict[str, asyncio.Event] = {}
        self.fail: set[str] = set()

    async def send_all(self, messages: Sequence[OutMessage]) -> list[tuple[int, int]]:
        ids = [decode_raw(m.value).source_id for m in messages]
        gate = self.gates.get(ids[0])
        if gate is not None:
            await gate.wait()
        if ids[0] in self.fail:
            raise Transient("broker down")
        self.log.entries.append(("send", ids))
        return [(0, i) for i in range(len(messages))]


class LoggingCursors(FakeCursorStore):
    def __init__(self, log: Log) -> None:
        super().__init__()
        self.log = log

    async def save(self, tenant_id: str, connection_id: str, entity: str, cursor: dict[str, Any]) -> None:
        await super().save(tenant_id, connection_id, entity, cursor)
        self.log.entries.append(("save", (entity, cursor["replay_id"])))


def _listener() -> tuple[CdcListener, Log, GatedPublisher]:
    conn = parse_connection(Connection("acme", "sf1", "salesforce", INSTANCE, {"client_id": "c", "client_secret": "s"},
                                       {"objects": ["Order", "Account"]}))
    log = Log()
    publisher = GatedPublisher(log)
    cursors = LoggingCursors(log)
    sync = ConnectionSync(conn, FakeClient(log), publisher, cursors, FlashSettings())  # type: ignore[arg-type]
    listener = CdcListener(conn, sync.client, sync, cursors, session=None)  # type: ignore[arg-type]
    return listener, log, publisher


def _event(replay: int, rid: str, *, tx: str, seq: int = 1, change: str = "UPDATE", entity: str = "Order",
           ids: list[str] | None = None) -> dict[str, Any]:
    header = {"entityName": entity, "changeType": change, "recordIds": ids if ids is not None else [rid],
              "transactionKey": tx, "sequenceNumber": seq, "commitTimestamp": 1_767_225_600_000 + replay}
    return {"channel": f"/data/{entity}ChangeEvent",
            "data": {"payload": {"ChangeEventHeader": header}, "event": {"replayId": replay}}}


async def _until(predicate: Any) -> None:
    for _ in range(200):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


@pytest.mark.timeout(10)
async def test_the_next_batch_fetches_while_the_previous_publishes_but_publishes_and_saves_after_it() -> None:
    listener, log, publisher = _listener()
    publisher.gates["801A"] = gate = asyncio.Event()
    first = listener._start([_event(1, "801A", tx="t1")], 0.0, None)
    second = listener._start([_event(3, "801C", tx="t2", seq=2), _event(2, "801B", tx="t2", seq=1)], 0.0, first)
    # batch 2 fetched its records back while batch 1 waits for the broker, and went no further
    await _until(lambda: ("fetch", ["801B", "801C"]) in log.entries)
    await asyncio.sleep(0.01)
    assert not second.published.done()
    assert [e for e in log.entries if e[0] in ("send", "save")] == []
    gate.set()
    await asyncio.gather(first.task, second.task)
    assert [e for e in log.entries if e[0] in ("send", "save")] == [
        ("send", ["801A"]),
        ("send", ["801B", "801C"]),  # sequenceNumber order within the transaction
        ("save", ("cdc:/data/OrderChangeEvent", 1)),
        ("save", ("cdc:/data/OrderChangeEvent", 3)),
    ]


@pytest.mark.timeout(10)
async def test_a_failed_batch_stops_the_batches_behind_it_from_publishing_or_saving() -> None:
    listener, log, publisher = _listener()
    publisher.fail.add("801A")
    first = listener._start([_event(1, "801A", tx="t1")], 0.0, None)
    second = listener._start([_event(2, "801B", tx="t2")], 0.0, first)
    results = await asyncio.gather(first.task, second.task, return_exceptions=True)
    assert all(isinstance(r, Transient) for r in results)
    assert [e for e in log.entries if e[0] in ("send", "save")] == []
    assert listener.replay.get("/data/OrderChangeEvent") is None


@pytest.mark.timeout(10)
async def test_a_batch_with_an_overflow_waits_for_the_previous_batch_to_finish() -> None:
    listener, log, publisher = _listener()
    publisher.gates["801A"] = gate = asyncio.Event()
    first = listener._start([_event(1, "801A", tx="t1")], 0.0, None)
    overflow = _event(2, "", tx="t2", change="GAP_OVERFLOW", entity="Account", ids=["000000000000000AAA"])
    second = listener._start([overflow], 0.0, first)
    await asyncio.sleep(0.01)
    assert ("query", "Account") not in log.entries  # the reconcile waits for batch 1
    gate.set()
    await asyncio.gather(first.task, second.task)
    kinds = [e[0] for e in log.entries if e[0] in ("send", "save", "query")]
    assert kinds == ["send", "save", "query", "save"]
    assert listener.reconciles and listener.reconciles[0][0] == "Account"
