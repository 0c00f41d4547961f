"""The message contract other services depend on: send requests in, result events out.

Both are frozen pydantic models; `smsc-worker schemas` writes their JSON Schema and an
AsyncAPI document into `schemas/`, and a test fails when those files drift from here.
Changing a field is a contract change: bump `SCHEMA_VERSION` when it is not additive.

Version 2 (from 1): the channels `binary` and `mms` are gone (a plain-text e-mail cannot
carry raw bytes or media) and `telegram` is new; `voice_params` carries a call's
parameters; #ids and @nicknames are Telegram's recipients only. A request naming version 1
is still read by the same rules (a v1 request on binary or mms is rejected with the code
`channel_not_offered`); every event says 2.
"""

from __future__ import annotations

import json
import unicodedata
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from worker.protocol.fields import (
    MAX_TEXT_CHARS,
    MAX_VOICE_PARAMS,
    NOT_OFFERED,
    VOICE_PARAMS_PATTERN,
    Channel,
    hides_reserved_prefix,
)

SCHEMA_VERSION: Literal[2] = 2
# The versions a request may name: 1 is read by the same rules as 2.
RequestSchemaVersion = Literal[1, 2]
MAX_METADATA_KEYS = 16
MAX_RECIPIENTS = 1000
# Every bound below is stated in the JSON Schema (schemas/) as well as enforced here.
MAX_RECIPIENT_CHARS = 254  # the longest e-mail address; phones, G<n>, #ids, @nicks are shorter
MAX_SENDER_CHARS = 254  # the email channel's sender is an address; names: 11 (or 15 digits)
MAX_SUBJECT_CHARS = 255  # one `subj:` option line of the e-mail body
MAX_VOICE_CHARS = 32  # a voice name (m, w, m2, ...)
MAX_VOICE_PARAMS_CHARS = MAX_VOICE_PARAMS  # a call's parameters, after `\n~~~\n`
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 256


def largest_request_bytes() -> int:
    """The longest JSON body a valid request can have: every field at its bound. A valid
    recipient is printable ASCII (a phone, G<n>, an address, a #id, an @nickname), counted
    with its quotes, comma and a pretty-printer's line and indent; every other string counts
    each character as the longest escape there is (`\\uXXXX\\uXXXX`, 12 bytes, for one
    character outside the BMP)."""
    escaped = 12
    recipients = MAX_RECIPIENTS * (MAX_RECIPIENT_CHARS + 16)
    strings = (
        MAX_TEXT_CHARS
        + MAX_SENDER_CHARS
        + MAX_SUBJECT_CHARS
        + MAX_VOICE_CHARS
        + MAX_VOICE_PARAMS_CHARS
    ) * escaped
    metadata = MAX_METADATA_KEYS * (
        (MAX_METADATA_KEY_CHARS + MAX_METADATA_VALUE_CHARS) * escaped + 16
    )
    # request_id, the field names, punctuation, dates, window, channel and the rest.
    rest = 4096
    return recipients + strings + metadata + rest


# Lone surrogates (`"\ud800"`) in a body are refused by the JSON parser (`not_json`). From
# Python, pydantic refuses them in some str fields (string_unicode) but not in all (an
# unconstrained str such as `text`): the validators below refuse them everywhere.
_SURROGATES = range(0xD800, 0xE000)

MetadataValue = str | int | float | bool | None
RequestId = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")
]
MetadataKey = Annotated[str, StringConstraints(max_length=MAX_METADATA_KEY_CHARS)]
RequestMetadataValue = (
    Annotated[str, StringConstraints(max_length=MAX_METADATA_VALUE_CHARS)]
    | int
    | float
    | bool
    | None
)
Recipient = Annotated[str, StringConstraints(min_length=1, max_length=MAX_RECIPIENT_CHARS)]

# Error types raised by the validators below; `worker.fate.read_request` reports them as
# the rejection's code.
CONTROL_CHARACTER = "control_character"
RESERVED_PREFIX = "reserved_prefix"
INVALID_UNICODE = "invalid_unicode"
TEXT_TOO_LONG = "text_too_long"
FRACTIONAL_TZ = "fractional_tz"
CHANNEL_NOT_OFFERED = "channel_not_offered"
# Real time zones run from UTC-12 to UTC+14: from Moscow (UTC+3), -15 to +11.
MIN_TZ, MAX_TZ = -15, 11


def check_characters(field: str, value: str, *, newline: bool = False) -> str:
    """Refuse C0/C1 control characters (category Cc: U+0000-U+001F, U+007F-U+009F; the
    newline only where `newline` allows it) and lone surrogates, as a pydantic error whose
    type is the rejection's code."""
    if value.isascii() and value.isprintable():
        return value  # the common case, checked at C speed
    for c in value:
        if unicodedata.category(c) == "Cc" and not (newline and c == "\n"):
            raise PydanticCustomError(
                CONTROL_CHARACTER,
                "{field} contains the control character {code}",
                {"field": field, "code": f"U+{ord(c):04X}"},
            )
        if ord(c) in _SURROGATES:
            raise PydanticCustomError(
                INVALID_UNICODE,
                "{field} contains a lone surrogate (broken UTF-16), which no charset can carry",
                {"field": field},
            )
    return value


class HourWindow(BaseModel):
    """Deliver only between two hours of the day: in the account's own time zone, or in
    Moscow time shifted by the request's `tz`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    start_hour: int = Field(ge=0, le=24)
    end_hour: int = Field(ge=0, le=24)


class SendRequest(BaseModel):
    """One request to send one text to one or more recipients."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        title="SendRequest",
        json_schema_extra={"$id": "https://smsc-worker.dev/schemas/send-request.json"},
    )

    schema_version: RequestSchemaVersion = Field(
        SCHEMA_VERSION,
        description="2; a request naming 1 is read by the same rules (version 2 removed the "
        "channels binary and mms, refused as channel_not_offered).",
    )
    request_id: RequestId = Field(
        description="The caller's idempotency key; echoed in every result event."
    )
    to: list[Recipient] = Field(
        min_length=1,
        max_length=MAX_RECIPIENTS,
        description="Phone numbers (+ means 'do not auto-correct'), G<n> groups, "
        "e-mail addresses (email channel only), or #ids and @nicknames (telegram channel "
        "only, which takes phone numbers and groups too).",
    )
    # The length is checked by the validator (code `text_too_long`, after \r\n became
    # \n) and stated in the schema here.
    text: str = Field(
        description="At most 1000 characters; newlines are kept; no other control "
        "characters; must not begin with a channel prefix (__VIBER__: ...).",
        json_schema_extra={"maxLength": MAX_TEXT_CHARS},
    )
    channel: Channel | None = Field(
        None,
        description="The gateway's message format by name, or telegram (format 0, every "
        "text behind __BOT__:); the worker's default if absent.",
    )
    sender: str | None = Field(
        None,
        max_length=MAX_SENDER_CHARS,
        description="A sender name registered with the account (at most 11 characters or "
        "15 digits), or the sender's e-mail address on the email channel (required there, "
        "unless the worker has a default sender address for email).",
    )
    translit: Literal["off", "translit", "mpahc"] | None = None
    send_at: AwareDatetime | None = Field(None, description="Deliver at this moment.")
    window: HourWindow | None = Field(None, description="Deliver only within these hours.")
    tz: int | None = Field(
        None,
        ge=MIN_TZ,
        le=MAX_TZ,
        description="For window only: whole hours relative to Moscow (UTC+3), from -15 "
        "(UTC-12) to +11 (UTC+14). Without tz the window is in the account's own time "
        "zone (set in the gateway's account), not Moscow's.",
    )
    subject: str | None = Field(
        None, max_length=MAX_SUBJECT_CHARS, description="Subject line, email channel only."
    )
    voice: str | None = Field(
        None, max_length=MAX_VOICE_CHARS, description="Voice name, voice channel only."
    )
    voice_params: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_VOICE_PARAMS_CHARS,
        pattern=f"^{VOICE_PARAMS_PATTERN}$",
        description="The call's parameters, voice channel only: the worker writes them "
        "after '\\n~~~\\n' at the end of the text (which itself may not hold '~~~').",
    )
    account: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="Optional: the gateway account the producer means to bill. The queue the "
        "request was published to decides the account (RabbitMQ's permissions guard it); a "
        "request naming another account, or one that does not exist, is rejected "
        "(account_not_allowed, unknown_account) rather than billed to either.",
    )
    expires_at: AwareDatetime | None = Field(
        None, description="Not sent at all after this moment: rejected as expired."
    )
    metadata: dict[MetadataKey, RequestMetadataValue] = Field(
        default_factory=dict,
        max_length=MAX_METADATA_KEYS,
        description="Small object echoed back in every result event.",
    )

    @field_validator("to", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("channel", mode="before")
    @classmethod
    def _offered(cls, value: Any) -> Any:
        if isinstance(value, str) and value in NOT_OFFERED:
            raise PydanticCustomError(
                CHANNEL_NOT_OFFERED,
                "channel {channel} is not offered (since schema version 2): {why}",
                {"channel": value, "why": NOT_OFFERED[value]},
            )
        return value

    @field_validator("text")
    @classmethod
    def _text(cls, value: str) -> str:
        value = value.replace("\r\n", "\n").replace("\r", "\n")
        if len(value) > MAX_TEXT_CHARS:
            raise PydanticCustomError(
                TEXT_TOO_LONG,
                "text is {length} characters; the gateway takes at most {limit}",
                {"length": len(value), "limit": MAX_TEXT_CHARS},
            )
        check_characters("text", value, newline=True)
        if hides_reserved_prefix(value):
            raise PydanticCustomError(
                RESERVED_PREFIX,
                "text begins with a prefix the gateway reserves for switching channels "
                "(__CALL__:, __VIBER__:, __SOC__:, __MAIL__:, __BOT__:, __PING__, __HLR__), "
                "perhaps behind blanks or invisible format characters",
            )
        return value

    @field_validator("to")
    @classmethod
    def _recipients(cls, value: list[str]) -> list[str]:
        for item in value:
            if not (item.isascii() and item.isprintable()):
                check_characters("to", item)
        return value

    @field_validator("sender", "subject", "voice")
    @classmethod
    def _one_line(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and not (value.isascii() and value.isprintable()):
            check_characters(info.field_name or "field", value)
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, MetadataValue]) -> dict[str, MetadataValue]:
        for key, item in value.items():
            check_characters("metadata key", key)
            if isinstance(item, str):
                check_characters("metadata value", item)
        return value

    @field_validator("tz", mode="before")
    @classmethod
    def _whole_hours(cls, value: Any) -> Any:
        if isinstance(value, float) and not value.is_integer():
            raise PydanticCustomError(
                FRACTIONAL_TZ,
                "tz is whole hours relative to Moscow; a zone {tz} hours from Moscow cannot "
                "be given to the gateway (give the moment as send_at instead)",
                {"tz": value},
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> SendRequest:
        if self.send_at is not None and self.window is not None:
            raise ValueError("give send_at or window, not both")
        if self.tz is not None and self.window is None:
            raise ValueError("tz applies to window only: give a window, or leave tz out")
        if self.subject is not None and self.channel != "email":
            raise ValueError("subject is for the email channel only")
        if self.voice is not None and self.channel != "voice":
            raise ValueError("voice is for the voice channel only")
        if self.voice_params is not None and self.channel != "voice":
            raise ValueError("voice_params is for the voice channel only")
        if self.channel == "email" and not self.subject:
            raise ValueError("the email channel needs a subject")
        return self


class Status(StrEnum):
    rejected = "rejected"  # never sent: invalid, expired or a duplicate
    submitted = "submitted"  # the e-mail carrying it was accepted over SMTP
    accepted = "accepted"  # the gateway replied OK
    failed = "failed"  # the gateway replied with an error, or the worker gave up
    retrying = "retrying"  # a transient failure; it will be tried again
    deferred = "deferred"  # held back to stay within the gateway's limits
    # the SMTP session broke after the data was sent (a `failed` or `accepted` follows), or
    # the gateway never answered (code no_reply: final)
    unknown = "unknown"


class ErrorInfo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    code: str = Field(description="Stable machine-readable code, e.g. invalid_phone, gateway_7.")
    message: str
    retryable: bool = Field(description="Whether sending the same request again could help.")
    gateway_error: int | None = Field(None, description="The gateway's error number, if any.")


class ResultEvent(BaseModel):
    """What happened to a request. Published to the results exchange with routing key
    `sms.result.<status>`; `event_id` is stable, so consumers can drop duplicates."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        title="ResultEvent",
        json_schema_extra={"$id": "https://smsc-worker.dev/schemas/result-event.json"},
    )

    schema_version: Literal[2] = SCHEMA_VERSION
    event_id: str
    request_id: str | None = Field(description="None only when the request was not readable.")
    status: Status
    gateway_id: str | None = Field(None, description="Id of the e-mail that carried the request.")
    recipients: list[str] = Field(default_factory=list)
    sms_parts: int | None = Field(
        None,
        description=(
            "SMS parts per recipient, as the gateway counts them: the text after "
            "transliteration when translit is on; bytes on binary_hex (140 in one part, "
            "134 per part when split); 1 on ping. Null when it is not known: before "
            "sending, and on channels that do not send an SMS or whose count the gateway "
            "does not document (wap_push, hlr, email, voice, viber, whatsapp, soc)."
        ),
    )
    sms_count: int | None = Field(
        None,
        description=(
            "Parts times recipients. Null when sms_parts is, or when a recipient is a "
            "G<n> group, whose size only the gateway knows."
        ),
    )
    error: ErrorInfo | None = None
    attempt: int = Field(1, ge=1)
    retry_at: datetime | None = Field(None, description="For retrying/deferred: next attempt.")
    timestamp: datetime
    metadata: dict[str, MetadataValue] = Field(default_factory=dict)
    account: str | None = Field(
        None,
        description="The gateway account the request was for: the account whose queue it "
        "arrived on (`default`, or a named account's). Null only in events published "
        "before the worker had accounts.",
    )

    @property
    def routing_key(self) -> str:
        return f"sms.result.{self.status.value}"

    @classmethod
    def from_stored(cls, stored: str) -> tuple[ResultEvent, bytes]:
        """An event as the ledger keeps it (to publish again on a redelivery), and the
        bytes to publish: as stored, or, for an event a version-1 worker stored before an
        upgrade, the same event as version 2 (no other field of an event changed)."""
        try:
            return cls.model_validate_json(stored), stored.encode()
        except ValidationError:
            data = json.loads(stored)
            if not (isinstance(data, dict) and data.get("schema_version") == 1):
                raise
        event = cls.model_validate({**data, "schema_version": SCHEMA_VERSION})
        return event, event.model_dump_json().encode()

    @classmethod
    def create(
        cls,
        request_id: str | None,
        status: Status,
        *,
        attempt: int = 1,
        source: str = "",
        gateway_id: str | None = None,
        recipients: list[str] | None = None,
        sms_parts: int | None = None,
        sms_count: int | None = None,
        error: ErrorInfo | None = None,
        retry_at: datetime | None = None,
        timestamp: datetime | None = None,
        metadata: dict[str, MetadataValue] | None = None,
        account: str | None = None,
    ) -> ResultEvent:
        """An event with a stable id: the same outcome of the same attempt gets the same id.
        `source` tells apart events that have no request id (the AMQP message id).

        Every field is a typed parameter (mypy --strict checks each call, and a misspelled
        name is a TypeError), so nothing outside the schema can be published: the event is
        built with `model_construct`, without validating it again, because its values come
        from requests the worker has validated already and events are published by the
        thousand."""
        name = f"{request_id}|{status.value}|{attempt}|{gateway_id}|{source}"
        if account not in (None, "default"):
            # Each account has a ledger of its own, so a request id may be used in two; the
            # default account's ids stay what they were before accounts had names.
            name = f"{name}|{account}"
        return cls.model_construct(
            schema_version=SCHEMA_VERSION,
            event_id=str(uuid.uuid5(uuid.NAMESPACE_URL, name)),
            request_id=request_id,
            status=status,
            gateway_id=gateway_id,
            recipients=[] if recipients is None else recipients,
            sms_parts=sms_parts,
            sms_count=sms_count,
            error=error,
            attempt=attempt,
            retry_at=retry_at,
            timestamp=timestamp or datetime.now(UTC),
            metadata={} if metadata is None else metadata,
            account=account,
        )
