"""Source dead letters of the Salesforce poller (``sf-poller``) and CDC listener (``cdc-listener``), on the
connector kit's path (:mod:`connectorkit.deadletters`): ``dlq.<producer>.v1`` plus the ``dead_letters``
index, with the consumers' ``x-flash-*`` headers and ``x-flash-refetch``.

A record or change event the connector cannot publish (a CDC message without a readable
``ChangeEventHeader``, a record without ``Id``, a credit memo whose OrderSummary cannot be read) is
dead-lettered BEFORE the cursor or replay id that covers it moves, so nothing is skipped silently.

``flash dlq replay`` re-reads from Salesforce through the connector's ``refetch``
(``sf_poller.control.SfConnector``): the locator ``{"object", "id"}`` names the record; ``{"object",
"since_ms"}`` (a change event that named no record) re-reads the object by SOQL since the channel's last
commit time when the message arrived. The fresh records are published; the letter's descriptor never is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from canonical.topics import raw
from connectorkit.deadletters import PgSourceDeadLetters, Refetch
from connectorkit.deadletters import SourceLetter as KitLetter
from servicekit.errors import Poison
from servicekit.logging import get_logger
from servicekit.settings import FlashSettings

__all__ = ["CONSUMERS", "DeadLetterSink", "FakeDeadLetters", "KitDeadLetters", "SourceLetter",
           "SourceUnreadable", "UnreadableChangeEvent", "kit_letter"]

log = get_logger(__name__)

CONSUMERS = ("sf-poller", "cdc-listener")
SOURCE = "salesforce"


class SourceUnreadable(Poison):
    """A record Salesforce served that the connector cannot publish (the message says what to fix)."""


class UnreadableChangeEvent(Poison):
    """A CDC message that cannot be read (no ChangeEventHeader, no entity, change type or record ids)."""


@dataclass(frozen=True)
class SourceLetter:
    consumer: str
    tenant_id: str
    connection_id: str
    entity: str
    reason: str
    error_class: str = "SourceUnreadable"
    source_id: str | None = None
    channel: str | None = None
    replay_id: int | None = None
    since_ms: int | None = None
    body: str = ""

    def locator(self) -> dict[str, str]:
        out = {"object": self.entity}
        if self.source_id:
            out["id"] = self.source_id
        elif self.since_ms is not None:
            out["since_ms"] = str(self.since_ms)
        if self.channel:
            out["channel"] = self.channel
        if self.replay_id is not None:
            out["replay_id"] = str(self.replay_id)
        return out


def kit_letter(settings: FlashSettings, letter: SourceLetter) -> KitLetter:
    error_type = UnreadableChangeEvent if letter.error_class == "UnreadableChangeEvent" else SourceUnreadable
    return KitLetter(
        Refetch(SOURCE, letter.tenant_id, letter.connection_id, letter.entity or "unknown", letter.source_id or "?",
                letter.locator()),
        settings.topic(raw(SOURCE, letter.entity or "unknown")), error_type(letter.reason), letter.body)


class DeadLetterSink(Protocol):
    async def write(self, letters: Sequence[SourceLetter]) -> None: ...


@dataclass
class FakeDeadLetters:
    letters: list[SourceLetter] = field(default_factory=list)

    async def write(self, letters: Sequence[SourceLetter]) -> None:
        self.letters.extend(letters)


class KitDeadLetters:
    """Writes through the kit's :class:`connectorkit.deadletters.PgSourceDeadLetters` (acknowledged on the
    DLQ topic and indexed before it returns)."""

    def __init__(self, pool: Any, publisher: Any, settings: FlashSettings, producer: str) -> None:
        self.settings = settings
        self.inner = PgSourceDeadLetters(pool, publisher, settings, producer)

    async def write(self, letters: Sequence[SourceLetter]) -> None:
        if not letters:
            return
        await self.inner.send([kit_letter(self.settings, x) for x in letters])
        for x in letters:
            log.warning("source record dead-lettered", consumer=x.consumer, entity=x.entity, source_id=x.source_id,
                        replay_id=x.replay_id, reason=x.reason[:300])
