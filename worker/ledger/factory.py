"""Which state store a process uses: Redis when `state.url` names one, else its memory."""

from __future__ import annotations

from worker.accounts import GatewayAccount, accounts_of
from worker.ledger import StateStore
from worker.ledger.memory import MemoryStateStore
from worker.settings import DEFAULT_ACCOUNT, Settings


def open_store(settings: Settings, account: GatewayAccount | None = None) -> StateStore:
    """An account's store (the default account's unless named), not started yet (call
    `start()`): shared through Redis when `state.url` is set, otherwise kept in this
    process only."""
    account = account or accounts_of(settings)[DEFAULT_ACCOUNT]
    if not settings.state.url.get_secret_value():
        return MemoryStateStore(account.limits, settings.retry)
    from worker.ledger.redis import RedisStateStore

    return RedisStateStore(settings, account=account)
