"""Service protection budget per application user, shared by every connection of that user in the process.

Dataverse enforces (reference A5) 6,000 requests per 5-minute sliding window, 20 minutes of execution time
and 52 concurrent requests per user. The key of a user is ``(authority, client_id)``: connections that
share an app registration share its budget. :class:`UserBudget` keeps us under the request window and the
concurrency limit before the server has to say so, and widens a shared pause when it does (``Retry-After``)
or when the ``x-ms-ratelimit-*`` headers show the budget nearly spent.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType

from connectorkit.http import reset_governors, shared_governor
from servicekit import metrics
from servicekit.logging import get_logger

__all__ = ["UserBudget", "budget_for", "reset_budgets"]

log = get_logger(__name__)

BURST_HEADER = "x-ms-ratelimit-burst-remaining-xrm-requests"
TIME_HEADER = "x-ms-ratelimit-time-remaining-xrm-requests"


class UserBudget:
    """A sliding request window + a concurrency cap + a shared pause. Use as ``async with budget: ...``."""

    def __init__(
        self,
        *,
        requests_per_window: int = 6000,
        window_seconds: float = 300.0,
        concurrent: int = 52,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.requests_per_window = requests_per_window
        self.window_seconds = window_seconds
        self.concurrent = concurrent
        self._sem = asyncio.Semaphore(concurrent)
        self._stamps: deque[float] = deque()
        self._paused_until = 0.0
        self._clock = clock
        self._sleep = sleep
        self.inflight = 0
        self.peak_inflight = 0
        self.waited_s = 0.0
        self.throttled = 0

    async def __aenter__(self) -> UserBudget:
        await self._sem.acquire()
        try:
            while True:
                now = self._clock()
                horizon = now - self.window_seconds
                while self._stamps and self._stamps[0] <= horizon:
                    self._stamps.popleft()
                wait = self._paused_until - now
                if len(self._stamps) >= self.requests_per_window:
                    wait = max(wait, self._stamps[0] + self.window_seconds - now)
                if wait <= 0:
                    break
                self.waited_s += wait
                await self._sleep(min(wait, 5.0))
            self._stamps.append(self._clock())
        except BaseException:
            self._sem.release()
            raise
        self.inflight += 1
        self.peak_inflight = max(self.peak_inflight, self.inflight)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.inflight -= 1
        self._sem.release()

    def pause(self, seconds: float) -> None:
        """Hold every request of this user for ``seconds`` (a 429's Retry-After)."""
        self.throttled += 1
        self._paused_until = max(self._paused_until, self._clock() + seconds)

    def observe(self, headers: Mapping[str, str]) -> None:
        """Read the remaining-budget headers; near exhaustion, spread the rest of the window out."""
        burst = headers.get(BURST_HEADER)
        if burst is None:
            return
        try:
            remaining = int(float(burst))
        except ValueError:
            return
        metrics.observe_quota("dynamics-ce", max(0, self.requests_per_window - remaining), self.requests_per_window)
        if remaining <= max(1, self.requests_per_window // 50):
            # Less than 2 % left: the server counts differently from us (other clients of the same user,
            # another process); slow to the rate that reaches the end of the window.
            self._paused_until = max(self._paused_until, self._clock() + self.window_seconds / 60)
            log.warning("dataverse request budget nearly spent", remaining=remaining)
        time_left = headers.get(TIME_HEADER)
        if time_left:
            try:
                secs = float(time_left.replace(",", ""))
            except ValueError:
                return
            if secs < 30:
                self._paused_until = max(self._paused_until, self._clock() + 5)


def budget_for(authority: str, client_id: str, limits: Mapping[str, float] | None = None) -> UserBudget:
    """The process-wide budget of one application user (``connectorkit.http.shared_governor``: one per event
    loop and credential, shared by every connection, of every tenant, that uses the same app registration)."""
    lim = dict(limits or {})
    return shared_governor(
        ("dynamics-ce", authority.rstrip("/").lower(), client_id.lower()),
        lambda: UserBudget(
            requests_per_window=int(lim.get("requests_per_window", 6000)),
            window_seconds=float(lim.get("window_seconds", 300.0)),
            concurrent=int(lim.get("concurrent", 52)),
        ),
    )


def reset_budgets() -> None:
    reset_governors()
