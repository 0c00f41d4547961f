"""Keeping within the gateway's limits before anything is sent.

- identical content (same options, recipients and text) at most N times per window;
- per subscriber, no streak longer than the limit of messages each less than the gap
  after the previous one;
- a global pace in e-mails and SMS parts per second (GCRA);
- a circuit that pauses all sending after the gateway blocks the IP (error 4) or the
  account runs out of funds (error 3), then lets one probe through.

These are the rules as plain code, kept by the in-memory `StateStore`; the Redis store runs
the same arithmetic in its scripts so that every replica shares one count.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass

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

    def forget_latest(self, subscriber: str) -> None:
        """A message counted that never went: the streak is one shorter. Its time stays,
        which can only make the gap end later than the gateway's."""
        last = self._last.get(subscriber)
        if last is not None and last[1] > 0:
            self._last[subscriber] = (last[0], last[1] - 1)

    def prune(self, now: float) -> None:
        stale = [s for s, (t, _) in self._last.items() if now - t >= self._gap]
        for subscriber in stale:
            del self._last[subscriber]


class Pace:
    """The account's pace as a generic cell rate (GCRA): `rate` units per second with a
    burst of one second's worth. The same arithmetic runs in the Redis store's script, so
    every replica draws on one budget. A cost larger than the burst takes the whole burst,
    not forever."""

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate
        self._burst = rate
        self._tat = 0.0

    def take(self, cost: float, now: float, depth: float = 1.0) -> float:
        """0 and the cost is taken; otherwise the seconds to wait, and nothing is taken.
        `depth` is the share of the burst this cost may fill: what it leaves is kept free
        for takers allowed deeper (high-priority e-mails), without lowering the rate."""
        cost = min(cost, self._burst)
        tat = max(self._tat, now)
        allow_at = tat + min(cost, self._burst * depth) * self._interval - depth
        if allow_at > now:
            return allow_at - now
        self._tat = tat + cost * self._interval
        return 0.0


class CircuitRule:
    """Open: nothing is sent until the pause is over. Then one probe e-mail goes; its reply
    closes the circuit, or another error opens it again for twice as long. A probe that gets
    no verdict within a pause lets the next probe go."""

    def __init__(self, base: float, cap: float) -> None:
        self._base = base
        self._cap = cap
        self.pause = base
        self.open_until: float | None = None
        self.probe_until = 0.0
        self.reason = ""

    def open(self, reason: str, pause: float | None, now: float) -> float:
        if self.open_until is None:
            self.pause = self._base
        else:
            self.pause = min(self.pause * 2, self._cap)
        chosen = self.pause if pause is None else pause
        self.open_until = now + chosen
        self.probe_until = 0.0
        self.reason = reason
        return chosen

    def close(self) -> None:
        self.open_until = None
        self.reason = ""
        self.probe_until = 0.0

    def gate(self, now: float) -> tuple[float, bool]:
        """(seconds to wait, whether this e-mail is the probe)."""
        if self.open_until is None:
            return 0.0, False
        if now < self.open_until:
            return self.open_until - now, False
        if now < self.probe_until:
            return self.probe_until - now, False
        self.probe_until = now + self.pause
        return 0.0, True

    def view(self, now: float) -> str:
        if self.open_until is None:
            return "closed"
        return "open" if now < self.open_until else "half_open"
