"""The message contract other services depend on: send requests in, result events out.

Both are frozen pydantic models; `smsc-worker schemas` writes their JSON Schema and an
AsyncAPI document into `schemas/`, and a test fails when those files drift from here.
Changing a field is a contract change: bump `SCHEMA_VERSION` when it is not additive.
"""

from __future__ import annotations

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
    field_validator,
    model_validator,
)

SCHEMA_VERSION: Literal[1] = 1
MAX_METADATA_KEYS = 16
MAX_RECIPIENTS = 1000

Channel = Literal[
    "sms",
    "flash",
    "wap_push",
    "hlr",
    "binary",
    "binary_hex",
    "ping",
    "mms",
    "email",
    "voice",
    "viber",
    "whatsapp",
    "soc",
]
MetadataValue = str | int | float | bool | None
RequestId = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")
]


class HourWindow(BaseModel):
    """Deliver only between two hours of the day (Moscow time shifted by `tz`)."""

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

    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: RequestId = Field(
        description="The caller's idempotency key; echoed in every result event."
    )
    to: list[str] = Field(
        min_length=1,
        max_length=MAX_RECIPIENTS,
        description="Phone numbers (+ means 'do not auto-correct'), G<n> groups, "
        "e-mail addresses (email channel) or #ids (messenger channels).",
    )
    text: str = Field(description="At most 1000 characters; newlines are kept.")
    channel: Channel | None = Field(
        None, description="The gateway's message format by name; the worker's default if absent."
    )
    sender: str | None = Field(None, description="A sender name registered with the account.")
    translit: Literal["off", "translit", "mpahc"] | None = None
    send_at: AwareDatetime | None = Field(None, description="Deliver at this moment.")
    window: HourWindow | None = Field(None, description="Deliver only within these hours.")
    tz: int | None = Field(None, ge=-12, le=12, description="Hours relative to Moscow for window.")
    subject: str | None = Field(None, description="Subject line, email channel only.")
    voice: str | None = Field(None, description="Voice name, voice channel only.")
    expires_at: AwareDatetime | None = Field(
        None, description="Not sent at all after this moment: rejected as expired."
    )
    metadata: dict[str, MetadataValue] = Field(
        default_factory=dict, description="Small object echoed back in every result event."
    )

    @field_validator("to", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("text")
    @classmethod
    def _normalise_newlines(cls, value: str) -> str:
        return value.replace("\r\n", "\n").replace("\r", "\n")

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, value: dict[str, MetadataValue]) -> dict[str, MetadataValue]:
        if len(value) > MAX_METADATA_KEYS:
            raise ValueError(f"metadata has more than {MAX_METADATA_KEYS} keys")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> SendRequest:
        if self.send_at is not None and self.window is not None:
            raise ValueError("give send_at or window, not both")
        if self.subject is not None and self.channel != "email":
            raise ValueError("subject is for the email channel only")
        if self.voice is not None and self.channel != "voice":
            raise ValueError("voice is for the voice channel only")
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
    unknown = "unknown"  # the SMTP session broke after the data was sent


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

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: str
    request_id: str | None = Field(description="None only when the request was not readable.")
    status: Status
    gateway_id: str | None = Field(None, description="Id of the e-mail that carried the request.")
    recipients: list[str] = Field(default_factory=list)
    sms_parts: int | None = Field(None, description="SMS parts per recipient.")
    sms_count: int | None = Field(None, description="Parts times recipients.")
    error: ErrorInfo | None = None
    attempt: int = Field(1, ge=1)
    retry_at: datetime | None = Field(None, description="For retrying/deferred: next attempt.")
    timestamp: datetime
    metadata: dict[str, MetadataValue] = Field(default_factory=dict)

    @property
    def routing_key(self) -> str:
        return f"sms.result.{self.status.value}"

    @classmethod
    def create(
        cls,
        request_id: str | None,
        status: Status,
        *,
        attempt: int = 1,
        source: str = "",
        **fields: Any,
    ) -> ResultEvent:
        """An event with a stable id: the same outcome of the same attempt gets the same id.
        `source` tells apart events that have no request id (the AMQP message id)."""
        gateway_id = fields.get("gateway_id")
        name = f"{request_id}|{status.value}|{attempt}|{gateway_id}|{source}"
        # Built from values the worker has already validated; events are published by the
        # thousand, and validating them again would cost a fair share of the hot path.
        return cls.model_construct(
            event_id=str(uuid.uuid5(uuid.NAMESPACE_URL, name)),
            request_id=request_id,
            status=status,
            attempt=attempt,
            timestamp=fields.pop("timestamp", None) or datetime.now(UTC),
            **fields,
        )
