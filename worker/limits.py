"""Keeping within the gateway's limits before anything is sent.

- identical content (same options, recipients and text) at most N times per window;
- per subscriber, no streak longer than the limit of messages each less than the gap
  after the previous one;
- a global pace in e-mails and SMS parts per second (aiolimiter's leaky bucket);
- a circuit that pauses all sending after the gateway blocks the IP (error 4) or the
  account runs out of funds (error 3), then lets one probe through.

The counting rules (`ContentWindow`, `SubscriberStreaks`) are kept by the `StateStore`,
with the rest of the state a shared implementation will hold; `Limits` keeps what is
rightly per process: the pace of this process's sending and its circuit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from enum import StrEnum

from aiolimiter import AsyncLimiter

from worker.settings import LimitSettings, RetrySettings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Admission:
    """Zero `wait` means go now; otherwise the earliest the request could go, and why."""

    wait: float
    reason: str = ""


class ContentWindow:
    """At most `allowed` identical sends per `window` seconds."""

    def __init__(self, allowed: int, window: float) -> None:
        self._allowed = allowed
        self._window = window
        self._sent: dict[Hashable, deque[float]] = {}

    def wait(self, key: Hashable, now: float) -> float:
        times = self._sent.get(key)
        if times is None:
            return 0.0
        while times and times[0] <= now - self._window:
            times.popleft()
        if len(times) < self._allowed:
            return 0.0
        return times[0] + self._window - now

    def record(self, key: Hashable, now: float) -> None:
        self._sent.setdefault(key, deque()).append(now)

    def forget_latest(self, key: Hashable) -> None:
        times = self._sent.get(key)
        if times:
            times.pop()

    def prune(self, now: float) -> None:
        stale = [k for k, t in self._sent.items() if not t or t[-1] <= now - self._window]
        for key in stale:
            del self._sent[key]


class SubscriberStreaks:
    """The gateway's flood rule: a message less than `gap` after the previous one to the
    same subscriber extends a streak; a streak may not pass `limit` messages."""

    def __init__(self, limit: int, gap: float) -> None:
        self._limit = limit
        self._gap = gap
        self._last: dict[str, tuple[float, int]] = {}

    def wait(self, subscriber: str, now: float) -> float:
        last = self._last.get(subscriber)
        if last is None or now - last[0] >= self._gap or last[1] < self._limit:
            return 0.0
        return last[0] + self._gap - now

    def record(self, subscriber: str, now: float) -> None:
        last = self._last.get(subscriber)
        streak = 1 if last is None or now - last[0] >= self._gap else last[1] + 1
        self._last[subscriber] = (now, streak)

    def prune(self, now: float) -> None:
        stale = [s for s, (t, _) in self._last.items() if now - t >= self._gap]
        for subscriber in stale:
            del self._last[subscriber]


class CircuitState(StrEnum):
    closed = "closed"
    open = "open"
    half_open = "half_open"


class Circuit:
    """Open: nothing is sent until the pause is over. Then one probe e-mail goes; its reply
    closes the circuit, or another error opens it again for twice as long."""

    def __init__(self, base: float, cap: float, clock: Callable[[], float]) -> None:
        self._base = base
        self._cap = cap
        self._clock = clock
        self._pause = base
        self.state = CircuitState.closed
        self.reason = ""
        self._open_until = 0.0
        self._changed = asyncio.Event()
        self._probe_out = False

    def open(self, reason: str, pause: float | None = None) -> float:
        if self.state == CircuitState.closed:
            self._pause = self._base
        else:
            self._pause = min(self._pause * 2, self._cap)
        pause = self._pause if pause is None else pause
        self._open_until = self._clock() + pause
        self.state = CircuitState.open
        self.reason = reason
        self._probe_out = False
        log.warning("circuit open for %.0f s: %s", pause, reason)
        return pause

    def remaining(self) -> float:
        """Seconds until the circuit lets a probe through (0 when it is not open)."""
        if self.state == CircuitState.closed:
            return 0.0
        return max(self._open_until - self._clock(), 0.0)

    def close(self) -> None:
        if self.state != CircuitState.closed:
            log.info("circuit closed")
        self.state = CircuitState.closed
        self.reason = ""
        self._probe_out = False
        self._changed.set()
        self._changed = asyncio.Event()

    async def acquire(self) -> None:
        """Wait until this submission may go (closed, or the half-open probe)."""
        while True:
            if self.state == CircuitState.closed:
                return
            remaining = self._open_until - self._clock()
            if remaining <= 0 and not self._probe_out:
                self.state = CircuitState.half_open
                self._probe_out = True
                log.info("circuit half-open: sending one probe")
                return
            timeout = remaining if remaining > 0 else self._pause
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except TimeoutError:
                if self.state == CircuitState.half_open and self._probe_out:
                    # The probe got no verdict in a whole pause: let traffic resume.
                    self.close()


class Limits:
    """This process's pace and circuit."""

    def __init__(
        self,
        limits: LimitSettings,
        retry: RetrySettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._mails = AsyncLimiter(limits.mails_per_second, 1)
        self._parts = AsyncLimiter(limits.parts_per_second, 1)
        self._parts_max = limits.parts_per_second
        self.circuit = Circuit(retry.circuit_base_s, retry.circuit_max_s, clock)

    async def pace(self, parts: int) -> None:
        """Wait for the account's e-mail and SMS-part budget for one e-mail."""
        await self._mails.acquire()
        # An e-mail larger than one second's budget takes the whole budget, not forever.
        await self._parts.acquire(min(parts, self._parts_max))
