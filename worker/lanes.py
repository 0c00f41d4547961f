"""How urgent a request is: the queue it was published to says so.

RabbitMQ's quorum queues have no message priorities (and a priority inside one queue would
still leave an urgent request behind the bulk ones a consumer has prefetched), so each
class has a queue, a consumer and a prefetch of its own, and keeps its class through every
stage: retry copies return to its queue, e-mails never mix classes, a high-priority e-mail
waits a shorter batch window, finds a share of the account's pace kept free for it, and has
an SMTP connection of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections.abc import AsyncIterator
from enum import StrEnum


class Lane(StrEnum):
    high = "high"  # one-time codes, alerts: minutes matter
    normal = "normal"  # everything else, the requests queue as before
    bulk = "bulk"  # campaigns: they yield to the others, within a floor of the pace


RANK = {Lane.high: 0, Lane.normal: 1, Lane.bulk: 2}


class LaneSlots:
    """A semaphore whose waiters are served by lane (high, then normal, then bulk), and in
    the order they came within a lane: a normal e-mail never queues behind a hundred bulk
    ones for an SMTP connection."""

    def __init__(self, slots: int) -> None:
        self._free = slots
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._arrivals = itertools.count()

    @contextlib.asynccontextmanager
    async def hold(self, lane: Lane) -> AsyncIterator[None]:
        if self._free > 0 and not self._waiting:
            self._free -= 1
        else:
            turn = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiting, (RANK[lane], next(self._arrivals), turn))
            try:
                await turn
            except asyncio.CancelledError:
                # Cancelled after its turn came: the slot is passed on, not lost.
                if turn.done() and not turn.cancelled():
                    self._release()
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiting:
            _, _, turn = heapq.heappop(self._waiting)
            if not turn.done():
                turn.set_result(None)
                return
        self._free += 1
