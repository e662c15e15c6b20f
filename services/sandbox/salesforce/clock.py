"""A simulated wall clock: real time plus an offset tests can advance (retention, sessions, limits)."""

from __future__ import annotations

import datetime as dt
import time

__all__ = ["ManualClock", "SimClock", "cdc_datetime", "rest_datetime"]


class SimClock:
    """Epoch-millisecond clock; never goes backwards; ``advance`` jumps it forward."""

    def __init__(self, start_ms: int | None = None) -> None:
        self._start = start_ms if start_ms is not None else int(time.time() * 1000)
        self._mono0 = time.monotonic()
        self._offset = 0
        self._last = 0

    def now_ms(self) -> int:
        value = self._start + int((time.monotonic() - self._mono0) * 1000) + self._offset
        self._last = max(self._last, value)
        return self._last

    def advance(self, seconds: float) -> int:
        self._offset += int(seconds * 1000)
        return self.now_ms()


class ManualClock(SimClock):
    """A clock that reads whatever was last ``set`` (used to lay out seed history deterministically)."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def now_ms(self) -> int:
        return self.value

    def set(self, value: int) -> None:
        self.value = value


def _utc(ms: int) -> dt.datetime:
    return dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(milliseconds=ms)


def rest_datetime(ms: int) -> str:
    """REST/SOQL JSON form: ``2024-05-01T10:00:00.000+0000``."""
    return _utc(ms).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}+0000"


def cdc_datetime(ms: int) -> str:
    """CometD CDC and Bulk CSV form: ``2024-05-01T10:00:00.000Z``."""
    return _utc(ms).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
