"""RabbitMQ I/O: the queues and exchanges, confirmed publishing, and frugal acking.

Topology (all durable):
- `<requests>`: quorum queue, delivery limit, dead-letters at least once to `<dlx>`;
- `<dlx>` (fanout) -> `<dead letter queue>`: what could not be sent, with the reason in
  the message headers (`x-smsc-error-code`, `x-smsc-error`);
- `<retry>.<n>s`: delay queues, one per power-of-two delay, that dead-letter back to the
  requests queue when the message's time is up (a queue-wide TTL per tier, so a long
  delay never blocks a short one);
- `<results>` (topic): result events, routing key `sms.result.<status>`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from pamqp.commands import Basic
from tenacity import AsyncRetrying, stop_after_attempt, wait_random_exponential

from worker.confirmed_publish import RawMessage, publish_confirmed
from worker.contract import ResultEvent
from worker.settings import AmqpSettings

log = logging.getLogger(__name__)

ATTEMPT_HEADER = "x-smsc-attempt"
FIRST_SEEN_HEADER = "x-smsc-first-seen"
GROUP_HEADER = "x-smsc-group"
ERROR_CODE_HEADER = "x-smsc-error-code"
ERROR_HEADER = "x-smsc-error"
BasicProperties = Basic.Properties
PERSISTENT = int(aio_pika.DeliveryMode.PERSISTENT)
PUBLISH_ATTEMPTS = 3
RECONNECT_INTERVAL_S = 1.0
RETRY_TIERS_S = tuple(1 << n for n in range(11))  # 1 s .. 1024 s


def retry_queue_name(settings: AmqpSettings, tier_s: int) -> str:
    return f"{settings.retry_queue}.{tier_s}s"


def retry_tier(delay_s: float) -> int:
    """The largest tier not longer than the delay (at least the shortest)."""
    fitting = [t for t in RETRY_TIERS_S if t <= delay_s]
    return fitting[-1] if fitting else RETRY_TIERS_S[0]


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A result event and where, besides the results exchange, it must go."""

    event: ResultEvent
    reply_to: str | None = None
    correlation_id: str | None = None
    headers: Mapping[str, Any] | None = None


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
            headers=dict(message.headers or {}),
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
            content_type=message.content_type,
        )

    def to_message(
        self, exchange: str, routing_key: str, extra_headers: Mapping[str, Any]
    ) -> RawMessage:
        properties = BasicProperties(
            headers={**self.headers, **extra_headers},
            content_type=self.content_type,
            message_id=self.message_id,
            correlation_id=self.correlation_id,
            reply_to=self.reply_to,
            delivery_mode=PERSISTENT,
        )
        return RawMessage(exchange, routing_key, self.body, properties)


class Acker:
    """Acks with `multiple=True` whenever a run of settled messages starts at the oldest
    unacked one, so a batch of a thousand requests costs a few frames, not a thousand.

    Delivery tags belong to one channel; messages from a channel that has since been
    replaced (a reconnect) cannot be acked: the broker redelivers them, and the caller's
    idempotency keeps that harmless."""

    def __init__(self) -> None:
        self._outstanding: dict[int, deque[AbstractIncomingMessage]] = {}
        self._settled: dict[int, dict[int, bool]] = {}

    def received(self, message: AbstractIncomingMessage) -> None:
        key = id(message.channel)
        self._outstanding.setdefault(key, deque()).append(message)
        self._settled.setdefault(key, {})

    async def ack(self, messages: Iterable[AbstractIncomingMessage]) -> None:
        touched = set()
        for message in messages:
            key = id(message.channel)
            self._settled.setdefault(key, {})[self._tag(message)] = True
            touched.add(key)
        for key in touched:
            await self._flush(key)

    async def settled_otherwise(self, message: AbstractIncomingMessage) -> None:
        """The message was rejected or nacked by itself: no ack must cover it."""
        key = id(message.channel)
        self._settled.setdefault(key, {})[self._tag(message)] = False
        await self._flush(key)

    @staticmethod
    def _tag(message: AbstractIncomingMessage) -> int:
        tag = message.delivery_tag
        assert tag is not None
        return tag

    async def _flush(self, key: int) -> None:
        queue = self._outstanding.get(key)
        if queue is None:
            # A channel already given up on: nothing of it can be acked any more.
            self._settled.pop(key, None)
            return
        settled = self._settled[key]
        last_to_ack: AbstractIncomingMessage | None = None
        while queue and self._tag(queue[0]) in settled:
            message = queue.popleft()
            if settled.pop(self._tag(message)):
                last_to_ack = message
        if last_to_ack is None:
            return
        try:
            await last_to_ack.ack(multiple=True)
        except Exception as exc:
            log.warning("ack failed (%s); the broker will redeliver", exc)
            self._outstanding.pop(key, None)
            self._settled.pop(key, None)

    @property
    def unacked(self) -> int:
        return sum(len(q) for q in self._outstanding.values())


class Broker:
    """One robust connection, a consuming channel and a confirming publishing channel.
    `published` is told of every result event once the broker has confirmed it."""

    def __init__(
        self,
        settings: AmqpSettings,
        *,
        published: Callable[[Sequence[ResultEvent]], None] | None = None,
    ) -> None:
        self.settings = settings
        self._published = published
        self.connection: AbstractRobustConnection | None = None
        self._publish_channel: AbstractChannel | None = None
        self._consume_channel: AbstractChannel | None = None
        self.results: AbstractExchange | None = None
        self.dead_letters: AbstractExchange | None = None
        self.requests: AbstractQueue | None = None

    async def connect(self) -> None:
        self.connection = await aio_pika.connect_robust(
            self.settings.url.get_secret_value(),
            client_properties={"connection_name": self.settings.connection_name},
            # Unacked requests are redelivered to other consumers meanwhile; come back soon.
            reconnect_interval=RECONNECT_INTERVAL_S,
        )
        self._publish_channel = await self.connection.channel(publisher_confirms=True)
        self._consume_channel = await self.connection.channel(publisher_confirms=True)
        await self._consume_channel.set_qos(prefetch_count=self.settings.prefetch)
        await self._declare()

    async def _declare(self) -> None:
        assert self._publish_channel is not None and self._consume_channel is not None
        s = self.settings
        ch = self._publish_channel
        self.results = await ch.declare_exchange(
            s.results_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        self.dead_letters = await ch.declare_exchange(
            s.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
        dead_queue = await ch.declare_queue(
            s.dead_letter_queue, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await dead_queue.bind(self.dead_letters)
        self.requests = await self._consume_channel.declare_queue(
            s.requests_queue,
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-delivery-limit": s.delivery_limit,
                "x-dead-letter-exchange": s.dead_letter_exchange,
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            },
        )
        for tier in RETRY_TIERS_S:
            await ch.declare_queue(
                retry_queue_name(s, tier),
                durable=True,
                arguments={
                    "x-message-ttl": tier * 1000,
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": s.requests_queue,
                },
            )

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()

    @property
    def is_connected(self) -> bool:
        return self.connection is not None and not self.connection.is_closed

    async def _confirmed(self, messages: list[RawMessage]) -> None:
        """Publish a set in one write, its confirms awaited together, within the deadline.

        A set that is not confirmed in time (a reconnect, a lost confirm) is published again
        a few times before the caller hears of it; a consumer may then see an event twice,
        which its stable `event_id` lets it drop."""
        if not messages:
            return
        assert self._publish_channel is not None
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(PUBLISH_ATTEMPTS),
            wait=wait_random_exponential(multiplier=0.2, max=2),
            reraise=True,
        ):
            with attempt:
                async with asyncio.timeout(self.settings.publish_timeout_s):
                    channel = await self._publish_channel.get_underlay_channel()
                    await publish_confirmed(channel, messages)

    async def publish_events(self, outgoing: Iterable[Outgoing]) -> None:
        """Publish every event with a confirm; raise if any is not confirmed in time."""
        assert self.results is not None
        messages: list[RawMessage] = []
        events = []
        for item in outgoing:
            events.append(item.event)
            body = item.event.model_dump_json().encode()
            properties = BasicProperties(
                content_type="application/json",
                delivery_mode=PERSISTENT,
                message_id=item.event.event_id,
                correlation_id=item.correlation_id,
                message_type=f"sms.result.{item.event.status.value}",
                headers=dict(item.headers or {}),
            )
            messages.append(RawMessage(self.results.name, item.event.routing_key, body, properties))
            if item.reply_to:
                messages.append(RawMessage("", item.reply_to, body, properties))
        await self._confirmed(messages)
        if self._published is not None:
            self._published(events)

    async def dead_letter(self, items: Iterable[tuple[RequestCopy, str, str]]) -> None:
        """Copy each request to the dead-letter exchange with the reason in its headers."""
        await self._confirmed(
            [
                copy.to_message(
                    self.settings.dead_letter_exchange,
                    self.settings.requests_queue,
                    {ERROR_CODE_HEADER: code, ERROR_HEADER: reason[:1000]},
                )
                for copy, code, reason in items
            ]
        )

    async def delay(self, items: Iterable[tuple[RequestCopy, float, Mapping[str, Any]]]) -> None:
        """Send each request back to the work queue after (about) the given delay, with
        headers updated (attempt count, split group): the wait is held by RabbitMQ, not
        in this process's memory."""
        messages: list[RawMessage] = []
        for copy, delay_s, headers in items:
            if delay_s <= 0:
                target = self.settings.requests_queue
            else:
                target = retry_queue_name(self.settings, retry_tier(delay_s))
            messages.append(copy.to_message("", target, headers))
        await self._confirmed(messages)

    def consuming_queue(self) -> AbstractQueue:
        assert self.requests is not None
        return self.requests
