"""What the gateway emulator accepts, refuses and limits: one frozen model, so a test states
its whole gateway in one place and the command line maps onto it option for option."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from worker.errors import InvalidRequest
from worker.protocol.mail import Envelope

DEFAULT_GATEWAY_ADDRESS = "send@send.smscentre.com"


def parse_host_port(value: str) -> tuple[str, int]:
    """`host:port` (an IPv6 host in brackets) as a pair; ValueError says what is wrong."""
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdecimal() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not host:port")
    return host, int(port)


class EmulatorConfig(BaseModel):
    """The emulated gateway. Durations are seconds; `None` switches a limit off."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535, description="0: any free port")
    gateway_address: str = Field(
        DEFAULT_GATEWAY_ADDRESS, description="the only RCPT accepted; others get 550"
    )
    accounts: dict[str, str] = Field(
        default_factory=lambda: {"demo": "demo"}, description="login -> password"
    )
    api_keys: frozenset[str] = Field(
        frozenset({"demo"}), description="accepted as the password when the login is empty"
    )
    balance: int | None = Field(None, ge=0, description="SMS parts left; None: unlimited")
    denied_senders: frozenset[str] = Field(frozenset(), description="error 6, case-insensitive")
    denied_words: frozenset[str] = Field(
        frozenset(), description="error 6 when a text contains one, case-insensitive"
    )
    undeliverable: frozenset[str] = Field(frozenset(), description="recipients that get error 8")
    duplicate_window_s: float = Field(60.0, gt=0)
    identical_copies: int = Field(
        1,
        ge=1,
        description="identical requests allowed per window (the seed's error table: one a "
        "minute; its prose: two)",
    )
    streak_limit: int = Field(50, ge=1, description="messages per subscriber streak")
    streak_gap_s: float = Field(120.0, gt=0, description="a gap this long ends a streak")
    block_after_errors: int | None = Field(
        None, ge=1, description="errors from one IP within block_window_s that block it"
    )
    block_window_s: float = Field(60.0, gt=0)
    block_for_s: float = Field(300.0, gt=0, description="how long a blocked IP gets error 4")
    reply_relay: tuple[str, int] | None = Field(
        None, description="SMTP host:port that reply e-mails go to; None: no replies"
    )
    reply_lmtp: bool = Field(
        False,
        description="reply_relay speaks LMTP: replies are delivered straight into a mailbox "
        "server (Dovecot), for the worker's IMAP reply source",
    )
    reply_from: str = DEFAULT_GATEWAY_ADDRESS
    reply_charset: Literal["utf-8", "cp1251", "koi8-r"] = Field(
        "utf-8",
        description="utf-8: English descriptions, charset declared; cp1251 or koi8-r: "
        "Russian descriptions (and a Russian line under OK) in that charset, with no charset "
        "declared, as NOTES.md warns real replies may come",
    )
    latency_s: float = Field(0.0, ge=0, description="delay before answering DATA")
    record_path: Path | None = Field(None, description="deliveries appended as JSON lines")

    @field_validator("reply_relay", mode="before")
    @classmethod
    def _relay(cls, value: object) -> object:
        return parse_host_port(value) if isinstance(value, str) else value

    @field_validator("gateway_address", "reply_from")
    @classmethod
    def _address(cls, value: str) -> str:
        try:
            Envelope(mail_from=value)
        except InvalidRequest as exc:
            raise ValueError(exc.message) from None
        return value
