"""Replay of source dead letters: re-fetch the record from the vendor, publish the fresh raw record.

:func:`source_rewriter` builds the hook ``servicekit.dlq.replay(..., rewrite=...)`` calls for every dead
letter it replays. For a letter carrying ``x-flash-refetch`` it loads the connection (decrypting its
credentials), finds the connector through the registry and asks it to ``refetch`` the record; the fresh
raw record(s) are published instead of the letter's body (a descriptor never reaches a raw topic). If
the vendor still serves a record the connector cannot deliver, the connector raises and the letter stays
pending with the reason. Letters of consumers (no ``x-flash-refetch``) are replayed unchanged.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from connectorkit.deadletters import refetch_of
from connectorkit.registry import load_connector
from servicekit.connections import Connection
from servicekit.dlq import LEGACY_SOURCE_HEADER
from servicekit.errors import Poison
from servicekit.kafka import OutMessage
from servicekit.settings import FlashSettings

__all__ = ["source_rewriter"]

ConnectionLoader = Callable[[str, str], Awaitable[Connection]]


def source_rewriter(
    load_connection: ConnectionLoader, settings: FlashSettings
) -> Callable[[Mapping[str, Any]], Awaitable[Sequence[OutMessage] | None]]:
    """The ``rewrite`` hook of ``servicekit.dlq.replay`` for source letters (see the module docstring)."""

    async def rewrite(row: Mapping[str, Any]) -> Sequence[OutMessage] | None:
        headers = row.get("headers") or []
        ref = refetch_of(headers)
        if ref is None:
            if any(h[0] == LEGACY_SOURCE_HEADER for h in headers):
                raise Poison("a source dead letter written before the connector kit carries no re-fetch locator: fix "
                             "the record at the source (change tracking then delivers it) and leave this letter")
            return None
        connector = load_connector(ref.source)
        conn = await load_connection(ref.tenant_id, ref.connection_id)
        config = connector.parse(conn)
        messages: Sequence[OutMessage] = await connector.refetch(config, settings, ref)
        return messages

    return rewrite
