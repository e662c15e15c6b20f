"""Streaming API (CometD/Bayeux long-polling) for Change Data Capture channels.

Channels: ``/data/ChangeEvents`` (every entity) and ``/data/<Object>ChangeEvent``. Subscriptions take
``ext.replay = {channel: -1 | -2 | replayId}``; a replay id is valid while it is not older than the oldest
event still inside the 72 h retention window and not beyond the newest event. The first
``/meta/connect`` after a handshake answers at once; later ones hold up to ``cometd_timeout_s``.
A client that does not reconnect within ``cometd_client_ttl_s`` is forgotten
(``403::Unknown client``, ``advice.reconnect = handshake``).
"""

from __future__ import annotations

import asyncio
import bisect
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sandbox.salesforce.org import CdcEvent, Org
from sandbox.salesforce.schema import SCHEMA

if TYPE_CHECKING:
    from sandbox.salesforce.state import SalesforceState

__all__ = ["CometdClient", "CometdHub"]

MAX_EVENTS_PER_CONNECT = 1000


@dataclass
class CometdClient:
    id: str
    org: str
    positions: dict[str, int] = field(default_factory=dict)  # channel -> next index into org.events
    last_seen: float = field(default_factory=time.monotonic)
    connects: int = 0
    in_connect: bool = False
    kicked: asyncio.Event = field(default_factory=asyncio.Event)


def _entity_of(channel: str) -> str | None:
    """``/data/OrderChangeEvent`` -> ``Order``; ``/data/ChangeEvents`` -> ``*``; anything else -> None."""
    if channel == "/data/ChangeEvents":
        return "*"
    if channel.startswith("/data/") and channel.endswith("ChangeEvent"):
        name = channel[len("/data/") : -len("ChangeEvent")]
        if name in SCHEMA:
            return name
    return None


def _invalid_replay(replay: object) -> str:
    return (
        f"400::The replayId {{{replay}}} you provided was invalid. Please provide a valid ID, "
        "-2 to replay all events, or -1 to replay only new events."
    )


class CometdHub:
    def __init__(self, state: SalesforceState) -> None:
        self.state = state
        self.clients: dict[str, CometdClient] = {}

    def count(self, org: str) -> int:
        return sum(1 for c in self.clients.values() if c.org == org)

    def drop(self, org: str | None = None) -> int:
        doomed = [c for c in self.clients.values() if org is None or c.org == org]
        for c in doomed:
            del self.clients[c.id]
            c.kicked.set()
        return len(doomed)

    def _client(self, client_id: str | None, org: Org) -> CometdClient | None:
        client = self.clients.get(client_id or "")
        if client is None or client.org != org.name:
            return None
        if not client.in_connect and time.monotonic() - client.last_seen > self.state.cometd_client_ttl_s:
            del self.clients[client.id]
            return None
        return client

    def _advice(self) -> dict[str, Any]:
        return {"interval": 0, "timeout": int(self.state.cometd_timeout_s * 1000), "reconnect": "retry"}

    async def handle(self, org: Org, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        replies: list[dict[str, Any]] = []
        for msg in messages:
            channel = msg.get("channel")
            base: dict[str, Any] = {"channel": channel}
            if "id" in msg:
                base["id"] = msg["id"]
            if channel == "/meta/handshake":
                fresh = CometdClient(id=secrets.token_hex(16), org=org.name)
                self.clients[fresh.id] = fresh
                self.state.bump("cometd_handshakes")
                replies.append(
                    {
                        **base,
                        "version": "1.0",
                        "minimumVersion": "1.0",
                        "clientId": fresh.id,
                        "supportedConnectionTypes": ["long-polling"],
                        "advice": self._advice(),
                        "ext": {"replay": True, "payload.format": True},
                        "successful": True,
                    }
                )
                continue
            client = self._client(msg.get("clientId"), org)
            if client is None:
                replies.append(
                    {
                        **base,
                        "clientId": msg.get("clientId"),
                        "successful": False,
                        "error": "403::Unknown client",
                        "advice": {"reconnect": "handshake", "interval": 0},
                    }
                )
                continue
            base["clientId"] = client.id
            client.last_seen = time.monotonic()
            if channel == "/meta/subscribe":
                replies.append(self._subscribe(org, client, msg, base))
            elif channel == "/meta/unsubscribe":
                sub = msg.get("subscription")
                client.positions.pop(str(sub), None)
                replies.append({**base, "subscription": sub, "successful": True})
            elif channel == "/meta/disconnect":
                self.clients.pop(client.id, None)
                replies.append({**base, "successful": True})
            elif channel == "/meta/connect":
                replies.extend(await self._connect(org, client, base))
            else:
                replies.append({**base, "successful": False, "error": f"400::Unsupported channel {channel}"})
        return replies

    def _subscribe(self, org: Org, client: CometdClient, msg: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
        sub = msg.get("subscription")
        reply = {**base, "subscription": sub}
        if not isinstance(sub, str) or _entity_of(sub) is None:
            return {
                **reply,
                "successful": False,
                "error": f"400::The channel you requested to subscribe to does not exist {{{sub}}}",
            }
        replay_map = (msg.get("ext") or {}).get("replay") or {}
        replay = replay_map.get(sub, -1)
        if not isinstance(replay, int) or isinstance(replay, bool):
            return {
                **reply,
                "successful": False,
                "error": _invalid_replay(replay),
            }
        oldest = org.oldest_retained_index()
        if replay == -1:
            position = len(org.events)
        elif replay == -2:
            position = oldest
        else:
            # the stored id itself must still be inside the retention window (as on a quiet channel in
            # Salesforce: a checkpoint older than 72 h is rejected even if nothing happened since)
            if oldest == 0:
                floor = 0
            elif oldest < len(org.events):
                floor = org.event_replay_ids[oldest]
            else:
                floor = org.latest_replay_id() + 1
            if replay < floor or replay > org.latest_replay_id():
                return {
                    **reply,
                    "successful": False,
                    "error": _invalid_replay(replay),
                }
            position = bisect.bisect_right(org.event_replay_ids, replay)
        client.positions[sub] = position
        self.state.bump("cometd_subscribes")
        return {**reply, "successful": True}

    def _collect(self, org: Org, client: CometdClient) -> list[dict[str, Any]]:
        oldest = org.oldest_retained_index()
        picked: list[tuple[int, str, CdcEvent]] = []
        for channel, pos in list(client.positions.items()):
            entity = _entity_of(channel)
            pos = max(pos, oldest)
            while pos < len(org.events) and len(picked) < MAX_EVENTS_PER_CONNECT:
                ev = org.events[pos]
                pos += 1
                if entity in ("*", ev.entity):
                    picked.append((ev.replay_id, channel, ev))
            client.positions[channel] = pos
        picked.sort(key=lambda p: p[0])
        return [
            {
                "channel": ch,
                "data": {"schema": ev.schema, "payload": ev.payload, "event": {"replayId": ev.replay_id}},
            }
            for _, ch, ev in picked
        ]

    async def _connect(self, org: Org, client: CometdClient, base: dict[str, Any]) -> list[dict[str, Any]]:
        client.connects += 1
        client.in_connect = True
        try:
            deadline = time.monotonic() + (0.0 if client.connects == 1 else self.state.cometd_timeout_s)
            while True:
                if client.kicked.is_set() or client.id not in self.clients:
                    return [
                        {
                            **base,
                            "successful": False,
                            "error": "403::Unknown client",
                            "advice": {"reconnect": "handshake", "interval": 0},
                        }
                    ]
                events = self._collect(org, client)
                remaining = deadline - time.monotonic()
                if events or remaining <= 0:
                    self.state.bump("cometd_events_delivered", len(events))
                    return [*events, {**base, "successful": True, "advice": self._advice()}]
                wake = org.wakeup
                waiters = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(client.kicked.wait())]
                try:
                    await asyncio.wait(waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waiters:
                        w.cancel()
        finally:
            client.in_connect = False
            client.last_seen = time.monotonic()
