"""What an AMQP delivery is once captured, and how the worker's own headers are trusted.

A delivery is read once, when it arrives: its channel and tag (aio-pika's
`IncomingMessage.channel` raises once that channel is closed, so it cannot be read at
settling time), its body and properties, and whether the broker had handed it out before.

The worker writes a few headers on the copies it publishes itself (retry and split copies):
the attempt count, when the request was first seen, and the split group. A producer could
write them too, so they are signed with a key only the worker knows, and a copy whose
headers do not verify is rejected rather than believed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiormq.abc
from aio_pika.abc import AbstractIncomingMessage
from pamqp.commands import Basic

from worker.confirmed_publish import RawMessage
from worker.lanes import Lane

ATTEMPT_HEADER = "x-smsc-attempt"
FIRST_SEEN_HEADER = "x-smsc-first-seen"
GROUP_HEADER = "x-smsc-group"
IN_DOUBT_HEADER = "x-smsc-in-doubt"
SIGNATURE_HEADER = "x-smsc-signature"
ERROR_CODE_HEADER = "x-smsc-error-code"
ERROR_HEADER = "x-smsc-error"
# On the dead-letter copy of an unreadable reply: the e-mail(s) its address names.
GATEWAY_ID_HEADER = "x-smsc-gateway-id"
WORKER_HEADERS = (
    ATTEMPT_HEADER,
    FIRST_SEEN_HEADER,
    GROUP_HEADER,
    IN_DOUBT_HEADER,
    SIGNATURE_HEADER,
)
# Headers the broker adds on its way through the retry queues: not the request's own, and
# not of JSON's types (timestamps), so not kept in a shared store.
_BROKER_HEADERS = (
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-delivery-count",
)
PERSISTENT = 2


class ForgedHeaders(ValueError):
    """A message carries the worker's own headers without the worker's signature."""


def fingerprint(body: bytes) -> str:
    """Tells a redelivery (or a producer's repeated publish) of one request from a new
    message that reuses its request id."""
    return hashlib.sha256(body).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class RequestCopy:
    """What is needed to publish a request again after its delivery has been settled."""

    body: bytes
    headers: Mapping[str, Any]
    message_id: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    content_type: str | None = None

    @classmethod
    def of(cls, message: AbstractIncomingMessage) -> RequestCopy:
        return cls(
            body=message.body,
            headers={k: v for k, v in (message.headers or {}).items() if k not in _BROKER_HEADERS},
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
            content_type=message.content_type,
        )

    def to_message(
        self, exchange: str, routing_key: str, extra_headers: Mapping[str, Any]
    ) -> RawMessage:
        properties = Basic.Properties(
            headers={**self.headers, **extra_headers},
            content_type=self.content_type,
            message_id=self.message_id,
            correlation_id=self.correlation_id,
            reply_to=self.reply_to,
            delivery_mode=PERSISTENT,
        )
        return RawMessage(exchange, routing_key, self.body, properties)

    def to_json(self) -> dict[str, Any]:
        return {
            "body": base64.b64encode(self.body).decode(),
            "headers": {k: v for k, v in self.headers.items() if _plain(v)},
            "message_id": self.message_id,
            "correlation_id": self.correlation_id,
            "reply_to": self.reply_to,
            "content_type": self.content_type,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RequestCopy:
        return cls(
            body=base64.b64decode(data["body"]),
            headers=dict(data["headers"]),
            message_id=data["message_id"],
            correlation_id=data["correlation_id"],
            reply_to=data["reply_to"],
            content_type=data["content_type"],
        )


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


@dataclass(frozen=True, slots=True)
class Provenance:
    """The worker's own headers on a copy it published, once verified."""

    attempt: int = 1
    first_seen: float | None = None
    group: str = ""
    # A copy made while another copy of the request was in hand (see fate.in_flight).
    in_doubt: bool = False


class HeaderSigner:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def _mac(self, body: bytes, attempt: int, first_seen: int, group: str, doubt: int) -> str:
        message = b"|".join(
            (
                fingerprint(body).encode(),
                str(attempt).encode(),
                str(first_seen).encode(),
                group.encode(),
                str(doubt).encode(),
            )
        )
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()[:32]

    def headers(self, body: bytes, provenance: Provenance) -> dict[str, Any]:
        first_seen = int(provenance.first_seen or time.time())
        doubt = int(provenance.in_doubt)
        return {
            ATTEMPT_HEADER: provenance.attempt,
            FIRST_SEEN_HEADER: first_seen,
            GROUP_HEADER: provenance.group,
            IN_DOUBT_HEADER: doubt,
            SIGNATURE_HEADER: self._mac(
                body, provenance.attempt, first_seen, provenance.group, doubt
            ),
        }

    def read(self, body: bytes, headers: Mapping[str, Any]) -> Provenance:
        """The verified provenance of a message; a fresh request has none of these headers.
        Raise ForgedHeaders when any is present but the set does not verify."""
        if not any(name in headers for name in WORKER_HEADERS):
            return Provenance()
        try:
            attempt = _bounded_int(headers[ATTEMPT_HEADER], 1, 1_000_000)
            first_seen = _bounded_int(headers[FIRST_SEEN_HEADER], 0, 2**40)
            doubt = _bounded_int(headers[IN_DOUBT_HEADER], 0, 1)
            group = headers[GROUP_HEADER]
            signature = headers[SIGNATURE_HEADER]
            if not isinstance(group, str) or not isinstance(signature, str) or len(group) > 200:
                raise TypeError
        except (KeyError, TypeError, ValueError) as exc:
            raise ForgedHeaders(
                "the worker's x-smsc-* headers are incomplete or malformed"
            ) from exc
        expected = self._mac(body, attempt, first_seen, group, doubt)
        if not hmac.compare_digest(expected, signature):
            raise ForgedHeaders("the worker's x-smsc-* headers carry no valid signature")
        return Provenance(attempt, float(first_seen), group, bool(doubt))


def _bounded_int(value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError
    if not low <= value <= high:
        raise ValueError
    return value


@dataclass(eq=False, slots=True)
class Delivery:
    """One AMQP delivery, read once at arrival."""

    channel: aiormq.abc.AbstractChannel
    tag: int
    copy: RequestCopy
    redelivered: bool
    # Deliveries before this one that were returned to the quorum queue (its own count).
    returned: int = 0
    # The queue it came from says how urgent it is; its copies go back there.
    lane: Lane = Lane.normal

    @classmethod
    def capture(cls, message: AbstractIncomingMessage, lane: Lane = Lane.normal) -> Delivery:
        tag = message.delivery_tag
        assert tag is not None
        count = (message.headers or {}).get("x-delivery-count", 0)
        return cls(
            channel=message.channel,
            tag=tag,
            copy=RequestCopy.of(message),
            redelivered=bool(message.redelivered),
            returned=count if isinstance(count, int) and not isinstance(count, bool) else 0,
            lane=lane,
        )

    @property
    def body(self) -> bytes:
        return self.copy.body

    @property
    def headers(self) -> Mapping[str, Any]:
        return self.copy.headers

    def source(self) -> str:
        """Names a delivery whose body holds no readable request id."""
        return self.copy.message_id or fingerprint(self.body)
