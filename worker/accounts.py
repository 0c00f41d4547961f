"""The gateway accounts one worker sends for: the default one (`SMSC_GATEWAY__*`, as before
there were several) and the named ones (`SMSC_ACCOUNTS__<NAME>__*`).

Each account has its own credentials, default sender, pace, circuit and stopped flag (its
own `StateStore`, whose keys carry its Redis hash tag), its own queues and consumers, and
its own e-mails. Who may use an account is RabbitMQ's business: a named account's requests
arrive through its own exchange, which only producers given write permission on it can
publish to (`AmqpSettings.account_exchange`).
"""

from __future__ import annotations

from dataclasses import dataclass

from worker.protocol.mail import Account
from worker.settings import DEFAULT_ACCOUNT, GatewaySettings, LimitSettings, Settings


@dataclass(frozen=True, slots=True)
class GatewayAccount:
    name: str
    # What its state keys carry: `<prefix>:{<tag>}:...`. The default account keeps the tag
    # it had before accounts were named (its login, or "default"), so an upgrade keeps its
    # ledger; a named account's is its name.
    tag: str
    gateway: GatewaySettings
    limits: LimitSettings

    @property
    def credentials(self) -> Account:
        return Account(self.gateway.login, self.gateway.password)


def accounts_of(settings: Settings) -> dict[str, GatewayAccount]:
    """Every account, the default one first."""
    found = {
        DEFAULT_ACCOUNT: GatewayAccount(
            DEFAULT_ACCOUNT,
            settings.gateway.login or DEFAULT_ACCOUNT,
            settings.gateway,
            settings.limits,
        )
    }
    for name, account in settings.accounts.items():
        pace = {
            "mails_per_second": account.mails_per_second or settings.limits.mails_per_second,
            "parts_per_second": account.parts_per_second or settings.limits.parts_per_second,
        }
        found[name] = GatewayAccount(
            name,
            name,
            settings.gateway.model_copy(
                update={
                    "login": account.login,
                    "password": account.password,
                    "default_sender": account.default_sender,
                    "default_senders": account.default_senders,
                }
            ),
            settings.limits.model_copy(update=pace),
        )
    return found
