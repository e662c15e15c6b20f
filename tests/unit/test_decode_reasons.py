"""Every undecodable message gets a precise, actionable reason (no generic 'validation error')."""

from __future__ import annotations

import json

import pytest

from canonical.events import decode_event
from servicekit.consumer import decode_or_raise
from servicekit.errors import (
    MalformedMessage,
    MissingTenant,
    SchemaViolation,
    UnknownEventType,
    UnsupportedEventVersion,
)

GOOD = {
    "event_type": "product.upserted", "version": 1, "tenant_id": "acme", "connection_id": "c", "source": "flash",
    "entity": "product", "source_id": "p1", "source_version": "1", "product": {"sku": "A"},
}


@pytest.mark.parametrize(
    ("body", "error", "words"),
    [
        (b"{not json", MalformedMessage, "not valid JSON"),
        (None, MalformedMessage, "no body"),
        (b"[1, 2]", SchemaViolation, "expected an object"),
        (json.dumps({**GOOD, "tenant_id": None}).encode(), MissingTenant, "no tenant_id"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "tenant_id"}).encode(), MissingTenant, "no tenant_id"),
        (json.dumps({**GOOD, "event_type": "order.shipped"}).encode(), UnknownEventType, "order.shipped"),
        (json.dumps({**GOOD, "version": 2}).encode(), UnsupportedEventVersion, "version 2 is not supported"),
        (json.dumps({**GOOD, "source_id": ""}).encode(), SchemaViolation, "source_id"),
    ],
)
def test_reasons(body: bytes | None, error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words):
        decode_or_raise(body, decode_event)


def test_good_message_decodes_and_unexpected_type_is_rejected() -> None:
    body = json.dumps(GOOD).encode()
    assert decode_or_raise(body, decode_event).source_id == "p1"
    with pytest.raises(UnknownEventType, match="not handled here"):
        decode_or_raise(body, decode_event, frozenset({"order.upserted"}))
