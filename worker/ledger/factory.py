"""Which state store a process uses: Redis when `state.url` names one, else its memory."""

from __future__ import annotations

from worker.ledger import StateStore
from worker.ledger.memory import MemoryStateStore
from worker.settings import Settings


def open_store(settings: Settings) -> StateStore:
    """A store not started yet (call `start()`): shared through Redis when `state.url` is
    set, otherwise kept in this process only."""
    if not settings.state.url.get_secret_value():
        return MemoryStateStore(settings.limits, settings.retry)
    from worker.ledger.redis import RedisStateStore

    return RedisStateStore(settings)
