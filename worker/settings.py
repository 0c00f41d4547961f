"""All configuration in one place: environment variables `SMSC_<GROUP>__<NAME>`, a `.env`
file, and a secrets directory (one file per secret, named like the variable) for
Kubernetes Secrets. Secrets are `SecretStr`: masked in `repr`, logs and `config` output."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NestedSecretsSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from worker.contract import largest_request_bytes
from worker.errors import InvalidRequest
from worker.lanes import Lane
from worker.protocol.fields import (
    NOT_OFFERED,
    Channel,
    Format,
    check_login,
    check_password,
    check_sender,
    is_email_sender,
)
from worker.protocol.mail import DEFAULT_MAIL_BYTES, MAX_MAIL_BYTES, Envelope

ENV_PREFIX = "SMSC_"
SECRETS_DIR_VARIABLE = "SMSC_SECRETS_DIR"
DEFAULT_SECRETS_DIR = "/run/secrets/smsc-worker"


class _Group(BaseModel):
    model_config = {"frozen": True, "extra": "forbid"}


# The body charsets the gateway reads (a fixed list, checked at start-up: an unknown name
# stops the worker with a message naming SMSC_GATEWAY__CHARSET).
Charset = Literal["koi8-r", "utf-8", "cp1251"]
_MIB = 1024 * 1024
# Twice the longest valid request, rounded up to whole MiB (1 MiB with today's bounds).
DEFAULT_MAX_BODY_BYTES = -(-2 * largest_request_bytes() // _MIB) * _MIB


# A named account's name: lowercase (environment variable names are read case-blind), no
# dots (its queues are <requests_queue>.account.<name>, then .high or .bulk), short enough
# to be a Redis hash tag and a metric label.
ACCOUNT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
# The name of the account that SMSC_GATEWAY__LOGIN and SMSC_GATEWAY__PASSWORD describe.
DEFAULT_ACCOUNT = "default"


class AmqpSettings(_Group):
    url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    connection_name: str = Field("smsc-worker", description="shown in the broker's connection list")
    requests_queue: str = Field(
        "sms.requests",
        description="normal requests; high and bulk ones go to <requests_queue>.high and "
        "<requests_queue>.bulk",
    )
    results_exchange: str = "sms.results"
    dead_letter_exchange: str = "sms.dead-letter"
    dead_letter_queue: str = "sms.requests.dead-letter"
    retry_queue: str = "sms.requests.retry"
    delivery_limit: int = Field(10, ge=1, description="redeliveries before dead-lettering")
    prefetch: int = Field(2000, ge=1, description="unacked normal requests the worker may hold")
    prefetch_high: int = Field(200, ge=1, description="unacked high-priority requests")
    prefetch_bulk: int = Field(2000, ge=1, description="unacked bulk requests")
    publish_timeout_s: float = Field(10.0, gt=0, description="deadline for a publish confirm")
    max_body_bytes: int = Field(
        DEFAULT_MAX_BODY_BYTES,
        ge=1024,
        description="a request body longer than this is rejected (too_large) unread",
    )

    def queue(self, lane: Lane, account: str = DEFAULT_ACCOUNT) -> str:
        """A lane's queue of an account: the default account's are the requests queues as
        before; a named account's are `<requests_queue>.account.<name>` (then `.high`,
        `.bulk`): the `.account.` segment keeps them apart from the lanes, the retry and
        dead-letter queues, and an account name has no dot, so no two names can meet."""
        base = self.requests_queue if account == DEFAULT_ACCOUNT else self.account_exchange(account)
        return base if lane == Lane.normal else f"{base}.{lane}"

    def account_exchange(self, account: str) -> str:
        """Where a named account's producers publish (routing key: the lane): RabbitMQ
        checks a publisher's write permission on the exchange, never on the queue (the
        default exchange is `amq.default` to it, and reaches every queue), so this exchange
        is what a producer is given to use the account."""
        return f"{self.requests_queue}.account.{account}"

    def retry_queues(self, lane: Lane, account: str = DEFAULT_ACCOUNT) -> str:
        """The name the retry queues of a lane start with (`.<n>s` follows)."""
        base = (
            self.retry_queue
            if account == DEFAULT_ACCOUNT
            else f"{self.retry_queue}.account.{account}"
        )
        return base if lane == Lane.normal else f"{base}.{lane}"

    def prefetch_of(self, lane: Lane) -> int:
        return {Lane.high: self.prefetch_high, Lane.bulk: self.prefetch_bulk}.get(
            lane, self.prefetch
        )


class GatewaySettings(_Group):
    address: str = "send@send.smscentre.com"
    login: str = ""
    password: SecretStr = Field(
        SecretStr("demo"), description="account password; with an empty login, the API key"
    )
    charset: Charset = "koi8-r"
    text_tags: bool = Field(False, description="wrap the body in [text]...[/text]")
    default_region: str = Field("RU", description="region for numbers given without +")
    national_first: bool = Field(
        True,
        description="a number without + that is valid both as a national number of "
        "default_region and as an international number with the + left off (84951234567: "
        "Moscow, or Vietnam +84) is read as the national one; false: as the international one",
    )
    default_sender: str = Field(
        "",
        description="sender name for a request that names none, on every channel but email "
        "(and those default_senders names); empty: the account's own",
    )
    default_senders: dict[Channel, str] = Field(
        default_factory=dict,
        description="a default sender per channel, over default_sender: for email the "
        "sender's e-mail address (which that channel requires), for the others a sender name",
    )

    @field_validator("login")
    @classmethod
    def _login(cls, value: str) -> str:
        return check_login(value)

    @field_validator("password")
    @classmethod
    def _password(cls, value: SecretStr) -> SecretStr:
        check_password(value.get_secret_value())
        return value

    @field_validator("default_sender")
    @classmethod
    def _sender(cls, value: str) -> str:
        return check_default_sender(f"{ENV_PREFIX}GATEWAY__DEFAULT_SENDER", value)

    @field_validator("default_senders")
    @classmethod
    def _senders(cls, value: dict[Channel, str]) -> dict[Channel, str]:
        return check_default_senders(f"{ENV_PREFIX}GATEWAY__DEFAULT_SENDERS", value)

    @field_validator("charset", mode="before")
    @classmethod
    def _charset(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value


def check_default_sender(variable: str, value: str) -> str:
    """The default sender goes on every request that names none, on every channel but
    email (which needs the sender's e-mail address: prepare() leaves a name off there). So
    it must be a sender name each of those channels takes, never an e-mail address."""
    if is_email_sender(value):
        raise ValueError(
            f"{variable} is an e-mail address, but it would be the sender of every sms (and "
            "other non-email) request that names none, where an address is not a valid "
            "sender: use a sender name registered with the account (at most 11 characters, "
            "or at most 15 digits), or leave it empty (the email channel's address goes in "
            "its DEFAULT_SENDERS)"
        )
    for channel in Channel:
        if channel is not Channel.email:
            _check_sender_name(variable, channel, value)
    return value


def check_default_senders(variable: str, value: dict[Channel, str]) -> dict[Channel, str]:
    """A default sender per channel: the sender's e-mail address for email, a sender name
    that channel takes for the others."""
    for channel, sender in value.items():
        if channel is Channel.email:
            if sender and not is_email_sender(sender):
                raise ValueError(
                    f"{variable}: the email channel's sender must be the sender's e-mail "
                    f"address (the gateway requires it), not {sender!r}"
                )
        elif is_email_sender(sender):
            raise ValueError(
                f"{variable}: an e-mail address is a sender on the email channel only, not "
                f"on {channel.value}: use a sender name registered with the account"
            )
        else:
            _check_sender_name(variable, channel, sender)
    return value


def _check_sender_name(variable: str, channel: Channel, sender: str) -> None:
    try:
        check_sender(sender, fmt=channel.gateway_format)
    except InvalidRequest as exc:
        raise ValueError(
            f"{variable} is not a valid sender for the {channel.value} channel: {exc.message}"
        ) from None


class AccountSettings(_Group):
    """A named gateway account (`SMSC_ACCOUNTS__<NAME>__<FIELD>`; its password in the
    secrets directory as `SMSC_ACCOUNTS__<NAME>__PASSWORD`). Everything else about the
    gateway (address, charset, region) is the default account's."""

    login: str = ""
    password: SecretStr = Field(
        SecretStr(""), description="account password; with an empty login, the API key"
    )
    default_sender: str = Field(
        "", description="sender name when a request names none (not email); empty: the account's"
    )
    default_senders: dict[Channel, str] = Field(
        default_factory=dict,
        description="a default sender per channel, over default_sender (for email the "
        "sender's e-mail address); the default account's are not this account's",
    )
    mails_per_second: float = Field(
        0.0, ge=0, description="the account's pace in e-mails; 0: limits.mails_per_second"
    )
    parts_per_second: float = Field(
        0.0, ge=0, description="the account's pace in SMS parts; 0: limits.parts_per_second"
    )

    @field_validator("default_sender")
    @classmethod
    def _sender(cls, value: str) -> str:
        return check_default_sender(f"{ENV_PREFIX}ACCOUNTS__<NAME>__DEFAULT_SENDER", value)

    @field_validator("default_senders")
    @classmethod
    def _senders(cls, value: dict[Channel, str]) -> dict[Channel, str]:
        return check_default_senders(f"{ENV_PREFIX}ACCOUNTS__<NAME>__DEFAULT_SENDERS", value)

    @field_validator("login")
    @classmethod
    def _login(cls, value: str) -> str:
        return check_login(value)

    @field_validator("password")
    @classmethod
    def _password(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value():
            raise ValueError(
                "a named account needs its password (the secret SMSC_ACCOUNTS__<NAME>__PASSWORD)"
            )
        check_password(value.get_secret_value())
        return value


class SmtpSettings(_Group):
    host: str = "send.smscentre.com"
    port: int = Field(25, ge=1, le=65535)
    security: Literal["opportunistic", "none", "starttls", "tls"] = Field(
        "opportunistic",
        description="opportunistic: STARTTLS whenever the server offers it, certificate not "
        "verified; starttls or tls (implicit): required and verified; none: cleartext",
    )
    ca_file: str = Field(
        "", description="CA bundle to verify the server (starttls, tls); empty: the system's"
    )
    username: str = ""
    password: SecretStr = SecretStr("")
    timeout_s: float = Field(30.0, gt=0, description="per socket operation")
    submit_deadline_s: float = Field(60.0, gt=0, description="overall deadline for one e-mail")
    connections: int = Field(2, ge=1, le=32, description="parallel SMTP connections")
    high_connections: int = Field(
        1, ge=1, le=8, description="SMTP connections of their own for high-priority e-mails"
    )

    @model_validator(mode="after")
    def _no_cleartext_auth(self) -> SmtpSettings:
        if self.security == "none" and self.username:
            raise ValueError(
                f"{ENV_PREFIX}SMTP__USERNAME is set with {ENV_PREFIX}SMTP__SECURITY=none: the "
                "SMTP password would travel in clear; use opportunistic, starttls or tls, or "
                "leave the username empty"
            )
        return self


class ImapSettings(_Group):
    """The mailbox the gateway's replies are read from when `reply.source` is `imap`."""

    host: str = Field("", description="the IMAP server (required with source imap)")
    port: int = Field(993, ge=1, le=65535)
    security: Literal["tls", "none"] = Field(
        "tls",
        description="tls: implicit TLS (port 993), certificate and host name verified; none: "
        "cleartext, password included (a mail server on the same host or network only)",
    )
    ca_file: str = Field("", description="CA bundle to verify the server with; empty: the system's")
    user: str = Field("", description="the mailbox's login (required with source imap)")
    password: SecretStr = SecretStr("")
    folder: str = Field("INBOX", description="where the replies arrive")
    processed_folder: str = Field(
        "smsc-replies-done", description="replies go here once applied (created if missing)"
    )
    not_reply_folder: str = Field(
        "smsc-not-replies",
        description="bounces, spam, forged replies and replies to unknown or expired e-mails "
        "go here (created if missing), never applied",
    )
    plus_addressing: bool = Field(
        True,
        description="the mailbox takes local+tag@domain: replies carry the address token; "
        "false: e-mails go out From the bare address and a reply is matched by the ID in its "
        "body, accepted only when Authentication-Results of authserv_id show the gateway's "
        "domain passing SPF or DKIM",
    )
    authserv_id: str = Field(
        "",
        description="the mail provider's authserv-id: only its Authentication-Results "
        "headers are believed (needed without plus-addressing)",
    )
    gateway_domain: str = Field(
        "",
        description="the domain that must pass SPF or DKIM (itself or a subdomain); empty: "
        "the domain of the gateway's address",
    )
    insecure_body_id_only: bool = Field(
        False,
        description="without plus-addressing and without authserv_id, accept any reply "
        "whose body names an e-mail: anyone who knows a gateway id can answer for it",
    )
    poll_interval_s: float = Field(
        30.0,
        gt=0,
        description="how often the folder is read without IDLE; with IDLE, the longest "
        "wait before it is read again anyway",
    )
    timeout_s: float = Field(30.0, gt=0, description="deadline for one IMAP command")
    reconnect_max_s: float = Field(
        60.0, gt=0, description="longest wait between reconnection attempts (doubling from 1 s)"
    )

    @model_validator(mode="after")
    def _folders(self) -> ImapSettings:
        if len({self.folder, self.processed_folder, self.not_reply_folder}) != 3:
            raise ValueError(
                f"{ENV_PREFIX}REPLY__IMAP__FOLDER, __PROCESSED_FOLDER and __NOT_REPLY_FOLDER "
                "must be three different folders"
            )
        return self


class ReplySettings(_Group):
    source: Literal["smtp", "imap"] = Field(
        "smtp",
        description="smtp: the built-in listener takes the replies (an MX pointed at it); "
        "imap: they are read from a mailbox (reply.imap)",
    )
    imap: ImapSettings = ImapSettings()
    host: str = "0.0.0.0"
    port: int = Field(2525, ge=0, le=65535)
    address: str = Field(
        "smsc-replies@localhost",
        description="From of every e-mail (its local part at most 14 octets); replies come "
        "back to local+<mail id>.<token>@domain",
    )
    timeout_s: float = Field(
        900.0, gt=0, description="how long to wait for the gateway's reply to an e-mail"
    )
    max_message_bytes: int = Field(
        262_144,
        ge=1024,
        description="largest reply e-mail taken (advertised as SIZE; a bigger one is refused "
        "552 and its connection closed as soon as it passes the limit)",
    )
    max_recipients: int = Field(5, ge=1, description="recipients per reply e-mail at most")
    max_sessions: int = Field(100, ge=1, description="open SMTP sessions at most (more: 421)")
    max_sessions_per_peer: int = Field(
        20, ge=1, description="open SMTP sessions from one address at most (more: 421)"
    )
    command_timeout_s: float = Field(
        30.0, gt=0, description="a session silent this long is closed (DATA included)"
    )
    session_timeout_s: float = Field(
        300.0, gt=0, description="a session is closed this long after it opened"
    )
    tls_cert_file: str = Field(
        "", description="certificate chain (PEM) to offer STARTTLS with; empty: no STARTTLS"
    )
    tls_key_file: str = Field("", description="private key (PEM) of tls_cert_file")
    token_key: SecretStr = Field(
        SecretStr(""),
        description="signs the token in every reply address; empty: derived from the "
        "gateway password",
    )
    token_keys_old: SecretStr = Field(
        SecretStr(""),
        description="previous token keys, comma-separated: still accepted on replies, "
        "never used for new e-mails",
    )
    allowed_networks: str = Field(
        "",
        description="CIDRs, comma-separated, that may connect to the reply receiver; empty: any",
    )
    allowed_senders: str = Field(
        "",
        description="envelope senders (addresses or @domains, comma-separated) the reply "
        "receiver takes mail from; empty: any",
    )

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        from worker.reply_receiver import ADDRESS_OVERHEAD, LOCAL_PART_MAX, local_part_room

        Envelope(mail_from=value)
        if local_part_room(value) < 0:
            raise ValueError(
                f"{ENV_PREFIX}REPLY__ADDRESS: its local part is too long: a reply address "
                f"adds {ADDRESS_OVERHEAD} octets (+<mail id>.<token>) and a local part may "
                f"have {LOCAL_PART_MAX}, so at most {LOCAL_PART_MAX - ADDRESS_OVERHEAD} are left"
            )
        return value

    @field_validator("allowed_networks")
    @classmethod
    def _networks(cls, value: str) -> str:
        from worker.reply_receiver import parse_networks

        try:
            parse_networks(value)
        except ValueError as exc:
            raise ValueError(f"{ENV_PREFIX}REPLY__ALLOWED_NETWORKS: {exc}") from None
        return value

    @field_validator("allowed_senders")
    @classmethod
    def _senders(cls, value: str) -> str:
        from worker.reply_receiver import parse_senders

        try:
            parse_senders(value)
        except ValueError as exc:
            raise ValueError(f"{ENV_PREFIX}REPLY__ALLOWED_SENDERS: {exc}") from None
        return value

    @model_validator(mode="after")
    def _imap(self) -> ReplySettings:
        if self.source != "imap":
            return self
        imap = f"{ENV_PREFIX}REPLY__IMAP__"
        if not self.imap.host or not self.imap.user:
            raise ValueError(f"source imap needs {imap}HOST and {imap}USER")
        if (
            not self.imap.plus_addressing
            and not self.imap.authserv_id
            and not self.imap.insecure_body_id_only
        ):
            raise ValueError(
                f"{imap}PLUS_ADDRESSING=false: a reply can then only be matched by the ID in "
                "its body, which every producer sees in its events; set "
                f"{imap}AUTHSERV_ID to the provider's authserv-id (its Authentication-Results "
                f"must show the gateway's domain passing SPF or DKIM), or accept the risk with "
                f"{imap}INSECURE_BODY_ID_ONLY=true"
            )
        return self

    @model_validator(mode="after")
    def _tls_files(self) -> ReplySettings:
        cert, key = f"{ENV_PREFIX}REPLY__TLS_CERT_FILE", f"{ENV_PREFIX}REPLY__TLS_KEY_FILE"
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError(f"set both {cert} and {key} (to offer STARTTLS), or neither")
        if self.tls_cert_file:
            import ssl

            try:
                context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                context.load_cert_chain(self.tls_cert_file, self.tls_key_file)
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(
                    f"{cert} / {key}: cannot load the certificate and key: {exc}"
                ) from None
        return self


class BatchSettings(_Group):
    max_lines: int = Field(500, ge=1, description="lines per e-mail at most")
    max_wait_ms: int = Field(50, ge=0, description="oldest request's wait before a flush")
    high_max_wait_ms: int = Field(
        5, ge=0, description="the same for high-priority requests: a code is not kept waiting"
    )
    max_bytes: int = Field(
        DEFAULT_MAIL_BYTES,
        ge=1024,
        le=MAX_MAIL_BYTES,
        description="an e-mail is filled to at most this many bytes, headers included; the "
        "default leaves a margin under 100,000 bytes for the headers mail servers on the way "
        "add (the gateway's limit is 100 KB, at most 102,400)",
    )


class LimitSettings(_Group):
    dedup_ttl_s: float = Field(6 * 3600, ge=0, description="how long a request_id is remembered")
    # The seed's error table says error 9 is "more than one identical request within a
    # minute", its prose "more than two": error 9 holds up a whole e-mail of unrelated
    # requests, while this limit holds up only the copy, so the cautious reading is the default.
    identical_per_window: int = Field(
        1, ge=1, description="identical requests (same options, recipients, text) per window"
    )
    # A second over the gateway's minute and two minutes: the worker counts a request when
    # it admits it, the gateway a moment later, when the e-mail arrives.
    identical_window_s: float = Field(61.0, gt=0)
    identical_policy: Literal["wait", "reject"] = "wait"
    subscriber_streak: int = Field(50, ge=1)
    subscriber_gap_s: float = Field(121.0, gt=0)
    mails_per_second: float = Field(10.0, gt=0)
    parts_per_second: float = Field(500.0, gt=0)
    high_share: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="share of the pace's one-second burst that normal and bulk e-mails "
        "always leave free, so a high-priority e-mail goes at once",
    )
    others_floor: float = Field(
        0.1,
        gt=0,
        le=1,
        description="share of the pace's rate that high-priority e-mails leave to the "
        "others, so that bulk never starves",
    )


class RetrySettings(_Group):
    base_delay_s: float = Field(1.0, gt=0)
    max_delay_s: float = Field(300.0, gt=0)
    max_age_s: float = Field(3600.0, gt=0)
    circuit_base_s: float = Field(30.0, gt=0)
    circuit_max_s: float = Field(600.0, gt=0)
    funds_pause_s: float = Field(300.0, gt=0)


class StateSettings(_Group):
    url: SecretStr = Field(
        SecretStr(""),
        description="Redis holding the shared ledger and limits (redis://, rediss://, "
        "redis+sentinel://, redis+cluster://); empty: in this process only",
    )
    key_prefix: str = Field("smsc", min_length=1, description="first part of every Redis key")
    owner_ttl_s: float = Field(
        15.0, gt=0, description="a replica silent this long is taken for dead: its claims lapse"
    )
    reset_grace_s: float = Field(
        1800.0,
        ge=0,
        description="after Redis lost its data: how long a redelivered request with no "
        "ledger entry is reported unknown instead of sent",
    )
    header_key: SecretStr = Field(
        SecretStr(""),
        description="signs the worker's own message headers; empty: derived from the "
        "gateway password",
    )
    timeout_s: float = Field(2.0, gt=0, description="deadline for one Redis call")


class ObservabilitySettings(_Group):
    health_port: int = Field(8080, ge=0, le=65535)
    metrics_port: int = Field(9100, ge=0, le=65535)
    # auto: readable text on a terminal (a person is watching), JSON lines otherwise (a
    # collector is reading).
    log_format: Literal["auto", "json", "text"] = "auto"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    drain_timeout_s: float = Field(30.0, gt=0)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        env_file=".env",
        extra="ignore",
        frozen=True,
        secrets_dir_missing="ok",
        secrets_nested_delimiter="__",
    )

    amqp: AmqpSettings = AmqpSettings()
    gateway: GatewaySettings = GatewaySettings()
    smtp: SmtpSettings = SmtpSettings()
    reply: ReplySettings = ReplySettings()
    batch: BatchSettings = BatchSettings()
    limits: LimitSettings = LimitSettings()
    retry: RetrySettings = RetrySettings()
    state: StateSettings = StateSettings()
    observability: ObservabilitySettings = ObservabilitySettings()
    default_channel: Channel = Field(
        Channel.sms, description="the channel of a request that names none"
    )
    # Named accounts beside the default one (SMSC_GATEWAY__LOGIN/PASSWORD), by name.
    accounts: dict[str, AccountSettings] = {}

    @field_validator("default_channel", mode="before")
    @classmethod
    def _channel(cls, value: Any) -> Any:
        """A channel by name; a format number (the form this setting once took) is read as
        its channel, and binary (4) and MMS (7), which are not offered, stop start-up."""
        if isinstance(value, str) and value.strip().isdecimal() and value.isascii():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            try:
                value = Format(value).name
            except ValueError:
                return value  # refused below, with the list of channels
        if isinstance(value, str) and value in NOT_OFFERED:
            raise ValueError(f"channel {value} is not offered: {NOT_OFFERED[value]}")
        return value

    @model_validator(mode="after")
    def _delays(self) -> Settings:
        if self.retry.base_delay_s > self.retry.max_delay_s:
            raise ValueError("retry.base_delay_s must not exceed retry.max_delay_s")
        return self

    @model_validator(mode="after")
    def _account_names(self) -> Settings:
        # The default account's Redis tag is its login (as before accounts had names), so
        # a named account must not take it, nor the default account's name.
        taken = {DEFAULT_ACCOUNT, self.gateway.login}
        for name, account in self.accounts.items():
            if not ACCOUNT_NAME.fullmatch(name):
                raise ValueError(
                    f"{ENV_PREFIX}ACCOUNTS__{name.upper()}: an account name is 1 to 32 "
                    "lowercase letters, digits, '-' or '_', starting with a letter or digit"
                )
            if name in taken:
                raise ValueError(
                    f"{ENV_PREFIX}ACCOUNTS__{name.upper()}: the name {name!r} is the default "
                    "account's (its name or its login)"
                )
            try:
                GatewaySettings(default_sender=account.default_sender)
            except ValueError as exc:
                raise ValueError(f"{ENV_PREFIX}ACCOUNTS__{name.upper()}: {exc}") from None
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        secrets_dir = Path(os.environ.get(SECRETS_DIR_VARIABLE, DEFAULT_SECRETS_DIR))
        secrets = NestedSecretsSettingsSource(file_secret_settings, secrets_dir=secrets_dir)
        return init_settings, env_settings, dotenv_settings, secrets

    def masked(self) -> dict[str, Any]:
        """The effective configuration with every secret replaced by `**********`."""
        return self.model_dump(mode="json")
