"""docs/asyncapi.yaml and the topic table of docs/events.md are generated from the code and checked in:
they match, every topic and event type is documented, references resolve, and the documented headers are
the ones the code writes."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
import yaml

from canonical import asyncapi
from canonical.events import EVENT_TYPES
from canonical.topics import TOPICS
from servicekit.consumer import DeadLetter
from servicekit.outbox import message_headers

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DOC: dict[str, Any] = yaml.safe_load((ROOT / "docs" / "asyncapi.yaml").read_text())


def test_checked_in_documents_match_the_code() -> None:
    assert asyncapi.main(["--check", "--root", str(ROOT)]) == 0, "run `python -m canonical.asyncapi` and commit"


def test_a_stale_document_is_caught(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    text = (ROOT / "docs" / "events.md").read_text()
    (tmp_path / "docs" / "events.md").write_text(text.replace("| `points.member-ledger.v1` |", "| `gone` |", 1))
    (tmp_path / "docs" / "asyncapi.yaml").write_text((ROOT / "docs" / "asyncapi.yaml").read_text())
    assert asyncapi.main(["--check", "--root", str(tmp_path)]) == 1


def _resolve(ref: str) -> Any:
    node: Any = DOC
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def test_every_topic_and_event_type_is_documented_and_every_reference_resolves() -> None:
    assert DOC["asyncapi"].startswith("3.")
    assert set(DOC["channels"]) == {t.name for t in TOPICS}
    for t in TOPICS:
        ch = DOC["channels"][t.name]
        assert ch["bindings"]["kafka"]["partitions"] == t.partitions
        assert ch["bindings"]["kafka"]["topicConfiguration"]["retention.ms"] == t.retention_ms
        assert t.key in ch["description"].replace(">:<", ":").replace("<", "").replace(">", "") or t.key == "unchanged"
        for msg in ch["messages"].values():
            _resolve(msg["$ref"])
    for op in DOC["operations"].values():
        _resolve(op["channel"]["$ref"])
        for m in op["messages"]:
            _resolve(m["$ref"])
    for event_type in EVENT_TYPES:
        payload = DOC["components"]["messages"][event_type]["payload"]["schema"]["$ref"]
        assert (ROOT / "docs" / payload).resolve() == (ROOT / "schemas/events" / f"{event_type}.v1.json").resolve()
        assert (ROOT / "docs" / payload).exists()


def test_documented_headers_are_the_ones_written() -> None:
    ev = next(iter(EVENT_TYPES.values()))
    assert [k for k, _ in message_headers(ev.model_construct(tenant_id="a", correlation_id="c",
                                                              event_type="x", event_id="e"))] == list(asyncapi.HEADERS)
    assert DOC["components"]["schemas"]["Headers"]["required"] == list(asyncapi.HEADERS)

    class Rec:
        topic, partition, offset, key, value, headers, timestamp = "t", 0, 1, b"k", b"v", [("tenant_id", b"a")], 0

    now = dt.datetime.now(dt.UTC)
    letter = DeadLetter("points", Rec(), "Poison", "why", "handle", 1, now, now, tenant_id="a")  # type: ignore[arg-type]
    written = {k for k, _ in letter.headers() if k.startswith("x-flash-")}
    assert written == set(asyncapi.DEAD_LETTER_HEADERS)
    events_md = (ROOT / "docs" / "events.md").read_text()
    for h in [*asyncapi.HEADERS, *asyncapi.DEAD_LETTER_HEADERS, *asyncapi.OPTIONAL_HEADERS]:
        assert f"`{h}`" in events_md, h
