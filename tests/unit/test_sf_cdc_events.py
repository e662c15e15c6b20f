"""CDC events mapped as Salesforce documents them (docs/vendor-facts.md, Salesforce, Change Data Capture):
CREATE and UNDELETE from the body (no fetch-back), UPDATE applied to the last published state (changed and
nulled fields), fetch-back only for what the event cannot give, UNDELETE never a delete, and a message
without ``ChangeEventHeader`` dead-lettered with its replay id before the replay id moves."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Sequence
from typing import Any

from canonical.events import RawRecord, decode_raw
from cdc_listener.listener import CdcListener
from normalizer.mappers.salesforce import map_record
from servicekit.connections import Connection, FakeCursorStore
from servicekit.kafka import OutMessage
from servicekit.settings import FlashSettings
from sfconnect.config import parse_connection
from sfconnect.deadletters import FakeDeadLetters, SourceLetter
from sfconnect.published import FakePublishedStore, Published
from sfconnect.reader import RecordReader

INSTANCE = "https://acme.my.salesforce.com"
_IDS = re.compile(r"'([^']+)'")
T0 = 1_767_225_600_000


class Client:
    def __init__(self, rows: dict[str, dict[str, Any]], order: list[tuple[str, Any]]) -> None:
        self.rows, self.order, self.fetches = rows, order, 0

    async def query_page(self, soql: str | None = None, **_: Any) -> tuple[dict[str, Any], str]:
        assert soql is not None and " Id IN (" in soql
        self.fetches += 1
        ids = _IDS.findall(soql.split(" Id IN (")[1])
        rows = [self.rows[i] for i in ids if i in self.rows]
        return {"totalSize": len(rows), "done": True, "records": rows}, f"{INSTANCE}/queryAll"


class Publisher:
    def __init__(self, order: list[tuple[str, Any]]) -> None:
        self.sent: list[RawRecord] = []
        self.order = order

    async def send_all(self, messages: Sequence[OutMessage]) -> None:
        raws = [decode_raw(m.value) for m in messages]
        self.sent.extend(raws)
        self.order.append(("send", [r.source_id for r in raws]))


class Cursors(FakeCursorStore):
    def __init__(self, order: list[tuple[str, Any]]) -> None:
        super().__init__()
        self.order = order

    async def save(self, tenant_id: str, connection_id: str, entity: str, cursor: dict[str, Any]) -> None:
        await super().save(tenant_id, connection_id, entity, cursor)
        self.order.append(("save", cursor["replay_id"]))


class Letters(FakeDeadLetters):
    def __init__(self, order: list[tuple[str, Any]]) -> None:
        super().__init__()
        self.order = order

    async def write(self, letters: Sequence[SourceLetter]) -> None:
        await super().write(letters)
        self.order.append(("dead", [x.replay_id for x in letters]))


def _setup(rows: dict[str, dict[str, Any]] | None = None, objects: Sequence[str] = ("Account", "Order")) -> Any:
    conn = parse_connection(Connection("acme", "sf1", "salesforce", INSTANCE, {"client_id": "c", "client_secret": "s"},
                                       {"objects": list(objects)}))
    order: list[tuple[str, Any]] = []
    client, pub, cursors = Client(rows or {}, order), Publisher(order), Cursors(order)
    store = FakePublishedStore()
    reader = RecordReader(conn, client, pub, cursors, FlashSettings(), store=store)  # type: ignore[arg-type]
    listener = CdcListener(conn, client, reader, cursors, session=None,  # type: ignore[arg-type]
                           dead_letters=Letters(order))
    return listener, client, pub, store, order


def _event(replay: int, entity: str, change: str, ids: list[str], body: dict[str, Any] | None = None,
           **header: Any) -> dict[str, Any]:
    h = {"entityName": entity, "changeType": change, "recordIds": ids, "transactionKey": f"tx{replay}",
         "sequenceNumber": 1, "commitTimestamp": T0 + replay, "changedFields": [], "nulledFields": [],
         "diffFields": [], **header}
    return {"channel": f"/data/{entity}ChangeEvent",
            "data": {"schema": "s", "payload": {"ChangeEventHeader": h, **(body or {})}, "event": {"replayId": replay}}}


async def test_create_is_mapped_from_the_body_without_a_fetch() -> None:
    listener, client, pub, _, _ = _setup()
    body = {"Name": "Acme Corp", "AccountNumber": "A-1", "CreatedDate": "2026-01-01T00:00:00.000Z",
            "LastModifiedDate": "2026-01-01T00:00:00.000Z", "OwnerId": "005xx"}
    await listener.handle([_event(10, "Account", "CREATE", ["001A"], body)])
    assert client.fetches == 0
    (raw,) = pub.sent
    assert raw.op == "upsert" and raw.source_id == "001A" and raw.source_version == "2026-01-01T00:00:00.000Z"
    (_, ev), = map_record(raw, {}).events
    assert ev.customer.external_id == "A-1" and ev.customer.display_name == "Acme Corp"


async def test_undelete_is_an_upsert_from_the_body_never_a_delete() -> None:
    listener, client, pub, _, _ = _setup()
    body = {"Name": "Back Again", "LastModifiedDate": "2026-01-02T00:00:00.000Z"}
    # the old code fetched it back and, finding nothing, published a tombstone ("UNDELETE".endswith("DELETE"))
    await listener.handle([_event(11, "Account", "UNDELETE", ["001B"], body)])
    assert client.fetches == 0
    (raw,) = pub.sent
    assert raw.op == "upsert"
    assert map_record(raw, {}).events[0][0].startswith("canonical.customer")


async def test_update_applies_changed_and_nulled_fields_to_the_last_published_state() -> None:
    listener, client, pub, store, _ = _setup()
    last = {"Id": "001C", "IsDeleted": False, "SystemModstamp": "2026-01-01T00:00:00.000Z", "Name": "Old",
            "AccountNumber": "A-9", "IsPersonAccount": False}
    await store.remember("acme", "sf1", "Account", [Published("001C", "2026-01-01T00:00:00.000Z", json.dumps(last))])
    body = {"Name": "New", "LastModifiedDate": "2026-01-03T00:00:00.000Z"}
    await listener.handle([_event(12, "Account", "UPDATE", ["001C"], body, changedFields=["Name", "AccountNumber",
                                                                                         "LastModifiedDate"],
                                  nulledFields=["AccountNumber"])])
    assert client.fetches == 0
    (raw,) = pub.sent
    rec = json.loads(raw.payload)
    assert rec["Name"] == "New" and rec["AccountNumber"] is None and rec["IsPersonAccount"] is False
    assert raw.source_version == "2026-01-03T00:00:00.000Z"


async def test_update_without_known_state_or_with_a_changed_lookup_is_fetched_back() -> None:
    fetched = {"Id": "801A", "IsDeleted": False, "SystemModstamp": "2026-01-04T00:00:00.000Z", "Status": "Activated",
               "AccountId": "001Z", "TotalAmount": 10, "CurrencyIsoCode": "EUR", "StatusCode": "Activated"}
    listener, client, _pub, store, _ = _setup({"801A": fetched})
    await listener.handle([_event(13, "Order", "UPDATE", ["801A"], {"Status": "Activated"},
                                  changedFields=["Status"])])
    assert client.fetches == 1  # nothing known to apply the change to
    last = {**fetched, "Account": {"PersonEmail": None, "IsPersonAccount": False}}
    await store.remember("acme", "sf1", "Order", [Published("801A", "2026-01-04T00:00:00.000Z", json.dumps(last))])
    await listener.handle([_event(14, "Order", "UPDATE", ["801A"], {"AccountId": "001Y"},
                                  changedFields=["AccountId"])])
    assert client.fetches == 2  # Account.* of the new account: the event cannot give them


async def test_order_create_takes_parent_fields_from_the_parents_state_person_account() -> None:
    listener, client, pub, store, _ = _setup()
    person = {"Id": "001P", "IsDeleted": False, "SystemModstamp": "2026-01-01T00:00:00.000Z", "IsPersonAccount": True,
              "PersonEmail": "pat@example.com", "Name": "Pat"}
    await store.remember("acme", "sf1", "Account", [Published("001P", person["SystemModstamp"], json.dumps(person))])
    body = {"AccountId": "001P", "Status": "Draft", "StatusCode": "Draft", "TotalAmount": 25.5,
            "CurrencyIsoCode": "EUR", "OrderNumber": "00000100", "LastModifiedDate": "2026-01-05T00:00:00.000Z",
            "EffectiveDate": "2026-01-05"}
    await listener.handle([_event(15, "Order", "CREATE", ["801P"], body)])
    assert client.fetches == 0
    (raw,) = pub.sent
    (_, ev), = map_record(raw, {}).events
    assert ev.order.customer_entity == "person_account" and ev.order.email == "pat@example.com"


async def test_delete_uses_the_last_state_and_a_republished_version_is_skipped() -> None:
    listener, client, pub, store, _ = _setup()
    last = {"Id": "001D", "IsDeleted": False, "SystemModstamp": "2026-01-01T00:00:00.000Z", "Name": "Gone"}
    await store.remember("acme", "sf1", "Account", [Published("001D", last["SystemModstamp"], json.dumps(last))])
    delete = _event(16, "Account", "DELETE", ["001D"])
    await listener.handle([delete])
    await listener.handle([delete])  # redelivered (replay after a crash): same version, not sent again
    assert client.fetches == 0
    assert [(r.op, r.source_id) for r in pub.sent] == [("delete", "001D")]


async def test_a_message_without_change_event_header_is_dead_lettered_before_the_replay_id_moves() -> None:
    listener, _client, _pub, _, order = _setup()
    broken = {"channel": "/data/AccountChangeEvent", "data": {"payload": {"Name": "x"}, "event": {"replayId": 20}}}
    good = _event(21, "Account", "CREATE", ["001E"], {"Name": "E", "LastModifiedDate": "2026-01-06T00:00:00.000Z"})
    await listener.handle([broken, good])
    (letter,) = listener.dead_letters.letters
    assert letter.replay_id == 20 and letter.entity == "Account" and "ChangeEventHeader" in letter.reason
    assert order.index(("dead", [20])) < order.index(("save", 21))
    assert json.loads(letter.body)["data"]["payload"] == {"Name": "x"}


async def test_an_update_in_the_next_batch_builds_on_the_previous_batch_still_publishing() -> None:
    """Batch N+1 is built while batch N waits for the broker, before N's records reach the published store:
    it must apply its UPDATE to N's record, not to the older stored state (that would undo N's change)."""
    listener, client, pub, store, _ = _setup()
    last = {"Id": "001C", "IsDeleted": False, "SystemModstamp": "2026-01-01T00:00:00.000Z", "Name": "Old",
            "AccountNumber": "A-9", "IsPersonAccount": False}
    await store.remember("acme", "sf1", "Account", [Published("001C", "2026-01-01T00:00:00.000Z", json.dumps(last))])
    gate = asyncio.Event()
    send_all = pub.send_all

    async def gated(messages: Sequence[OutMessage]) -> None:
        await gate.wait()
        await send_all(messages)

    pub.send_all = gated
    first = listener._start([_event(30, "Account", "UPDATE", ["001C"], {
        "Name": "New", "LastModifiedDate": "2026-01-02T00:00:00.000Z"}, changedFields=["Name", "LastModifiedDate"])],
        0.0, None)
    second = listener._start([_event(31, "Account", "UPDATE", ["001C"], {
        "AccountNumber": "A-10", "LastModifiedDate": "2026-01-03T00:00:00.000Z"},
        changedFields=["AccountNumber", "LastModifiedDate"])], 0.0, first)
    assert first.built is not None
    await asyncio.wait_for(first.built, 5)
    for _ in range(50):  # let batch N+1 build while N is held at the broker
        await asyncio.sleep(0)
    gate.set()
    await asyncio.wait_for(asyncio.gather(first.task, second.task), 5)
    assert client.fetches == 0
    assert [json.loads(r.payload)["Name"] for r in pub.sent] == ["New", "New"]
    assert [json.loads(r.payload)["AccountNumber"] for r in pub.sent] == ["A-9", "A-10"]


async def test_a_batch_of_several_objects_is_one_broker_round_trip_and_one_store_read_per_object() -> None:
    listener, client, _pub, store, order = _setup()
    events = []
    for i in range(5):  # Account, Order, Account, Order..: runs of one record each
        events.append(_event(40 + 2 * i, "Account", "CREATE", [f"001{i}"], {
            "Name": f"A{i}", "IsPersonAccount": True, "PersonEmail": f"a{i}@example.com",
            "LastModifiedDate": "2026-01-02T00:00:00.000Z"}))
        events.append(_event(41 + 2 * i, "Order", "CREATE", [f"801{i}"], {
            "AccountId": f"001{i}", "Status": "Draft", "LastModifiedDate": "2026-01-02T00:00:00.000Z"}))
    await listener.handle(events)
    assert client.fetches == 0  # the orders' Account.* from the accounts created in the same batch
    sends = [ids for kind, ids in order if kind == "send"]
    assert len(sends) == 1 and len(sends[0]) == 10
    assert [i for i in sends[0] if i.startswith("801")] == [f"801{i}" for i in range(5)]  # order kept per object
    assert store.loads == 2  # the dedupe: one read per object
