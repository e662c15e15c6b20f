"""No exception - classified or not - lets a later batch's offset commit move past an unhandled record."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from servicekit.consumer import PipeConsumer
from servicekit.runtime import subscribe
from servicekit.settings import FlashSettings


class FakeBroker:
    def __init__(self) -> None:
        self.handler: Callable[[Any], Awaitable[None]] | None = None

    def subscriber(self, *topics: str, **kw: Any) -> Callable[[Any], Any]:
        def register(fn: Callable[[Any], Awaitable[None]]) -> Any:
            self.handler = fn
            return fn
        return register


class Rec:
    def __init__(self, offset: int) -> None:
        self.topic, self.partition, self.offset = "t", 0, offset
        self.key, self.value, self.headers, self.timestamp = None, b"{}", [], 0


class KafkaConsumerStub:
    def __init__(self) -> None:
        self.commits: list[Any] = []

    async def commit(self, offsets: Any) -> None:
        self.commits.append(offsets)

    def highwater(self, tp: Any) -> int | None:
        return None


class Msg:
    def __init__(self, records: Sequence[Rec], consumer: KafkaConsumerStub) -> None:
        self.raw_message = tuple(records)
        self.consumer = consumer
        self.nacked = False

    async def nack(self) -> None:
        self.nacked = True


class Exploding(PipeConsumer[Any]):
    """A consumer whose batch handling hits a defect on the first batch and works afterwards."""

    calls = 0

    async def handle_batch(self, records: Any, after_publish: Any = None) -> None:
        if self._closing:
            return
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("a defect nobody classified")
        if after_publish is not None:
            await after_publish()


async def test_an_unclassified_exception_stops_the_consumer_before_any_later_commit() -> None:
    settings = FlashSettings(kafka_bootstrap="x:1", database_url="postgresql://x")
    consumer = Exploding("guard", ["t"], lambda b, u: None, settings=settings, pool=None,  # type: ignore[arg-type]
                         publisher=None)  # type: ignore[arg-type]
    broker = FakeBroker()
    stops: list[BaseException] = []
    subscribe(broker, consumer, settings, stops.append)  # type: ignore[arg-type]
    assert broker.handler is not None
    kc = KafkaConsumerStub()
    first = Msg([Rec(0), Rec(1)], kc)
    await broker.handler(first)
    await broker.handler(Msg([Rec(2)], kc))
    assert len(stops) == 1 and isinstance(stops[0], RuntimeError), "the service is told to stop"
    assert first.nacked, "the failed batch is rewound"
    assert kc.commits == [], "no later batch commits an offset past the unhandled records"


async def test_a_background_task_survives_one_bad_round_but_stops_on_configuration() -> None:
    import asyncio

    import pytest

    from servicekit.errors import ConfigError
    from servicekit.runtime import every

    stop = asyncio.Event()
    rounds: list[int] = []

    async def job() -> int:
        rounds.append(1)
        if len(rounds) == 1:
            raise RuntimeError("one tenant's odd row")
        if len(rounds) == 3:
            stop.set()
        return 0

    await asyncio.wait_for(every(0.01, stop, job, what="test job"), 5)
    assert len(rounds) == 3, "the task went on after an unexpected error"

    async def misconfigured() -> int:
        raise ConfigError("set FLASH_SOMETHING")

    with pytest.raises(ConfigError):
        await asyncio.wait_for(every(0.01, asyncio.Event(), misconfigured, what="test job"), 5)
