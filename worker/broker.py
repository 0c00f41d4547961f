"""RabbitMQ I/O: the queues and exchanges, and confirmed publishing.

Topology (all durable):
- `<requests>`, `<requests>.high`, `<requests>.bulk`: quorum queues, one per lane
  (`worker.lanes`), each with a delivery limit, dead-lettering at least once to `<dlx>`;
- `<dlx>` (fanout) -> `<dead letter queue>`: what could not be sent, with the reason in
  the message headers (`x-smsc-error-code`, `x-smsc-error`);
- `<retry>.<n>s` (and `<retry>.high.<n>s`, `<retry>.bulk.<n>s`): delay queues, one per
  power-of-two delay and lane, that dead-letter back to their lane's queue when the
  message's time is up (a queue-wide TTL per tier, so a long delay never blocks a short
  one);
- `<results>` (topic): result events, routing key `sms.result.<status>`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractQueue,
    AbstractRobustConnection,
)
from pamqp.commands import Basic
from tenacity import AsyncRetrying, stop_after_attempt, wait_random_exponential

from worker.confirmed_publish import RawMessage, publish_confirmed
from worker.contract import ResultEvent
from worker.delivery import ERROR_CODE_HEADER, ERROR_HEADER, RequestCopy
from worker.lanes import Lane
from worker.settings import AmqpSettings

log = logging.getLogger(__name__)

BasicProperties = Basic.Properties
PERSISTENT = int(aio_pika.DeliveryMode.PERSISTENT)
PUBLISH_ATTEMPTS = 3
RECONNECT_INTERVAL_S = 1.0
RETRY_TIERS_S = tuple(1 << n for n in range(11))  # 1 s .. 1024 s


def retry_queue_name(settings: AmqpSettings, tier_s: int, lane: Lane = Lane.normal) -> str:
    return f"{settings.retry_queues(lane)}.{tier_s}s"


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
    # The event as JSON, when the caller has it already (the ledger keeps it too).
    body: bytes | None = None


class Broker:
    """One robust connection, a consuming channel and a confirming publishing channel.
    `published` is told of every result event once the broker has confirmed it, and
    `dead_lettered` of the error code of every dead-letter copy."""

    def __init__(
        self,
        settings: AmqpSettings,
        *,
        published: Callable[[Sequence[ResultEvent]], None] | None = None,
        dead_lettered: Callable[[Sequence[str]], None] | None = None,
    ) -> None:
        self.settings = settings
        self._published = published
        self._dead_lettered = dead_lettered
        self.connection: AbstractRobustConnection | None = None
        self._high_connection: AbstractRobustConnection | None = None
        self._publish_channel: AbstractChannel | None = None
        # A channel per lane: its prefetch is the lane's own, so a prefetch full of bulk
        # requests never holds back an urgent one.
        self._consume_channels: dict[Lane, AbstractChannel] = {}
        self.results: AbstractExchange | None = None
        self.dead_letters: AbstractExchange | None = None
        self.requests: dict[Lane, AbstractQueue] = {}

    async def _connect(self, name: str) -> AbstractRobustConnection:
        return await aio_pika.connect_robust(
            self.settings.url.get_secret_value(),
            client_properties={"connection_name": name},
            # Unacked requests are redelivered to other consumers meanwhile; come back soon.
            reconnect_interval=RECONNECT_INTERVAL_S,
        )

    async def connect(self) -> None:
        self.connection = await self._connect(self.settings.connection_name)
        # High-priority deliveries come over a connection of their own: frames are read in
        # order per connection, and one behind a prefetch's worth of bulk deliveries would
        # wait for every one of them to be read first.
        self._high_connection = await self._connect(f"{self.settings.connection_name} (high)")
        self._publish_channel = await self.connection.channel(publisher_confirms=True)
        for lane in Lane:
            connection = self._high_connection if lane == Lane.high else self.connection
            channel = await connection.channel(publisher_confirms=True)
            await channel.set_qos(prefetch_count=self.settings.prefetch_of(lane))
            self._consume_channels[lane] = channel
        await self._declare()

    async def _declare(self) -> None:
        assert self._publish_channel is not None
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
        for lane, channel in self._consume_channels.items():
            self.requests[lane] = await channel.declare_queue(
                s.queue(lane),
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
                    retry_queue_name(s, tier, lane),
                    durable=True,
                    arguments={
                        "x-message-ttl": tier * 1000,
                        "x-dead-letter-exchange": "",
                        "x-dead-letter-routing-key": s.queue(lane),
                    },
                )

    async def close(self) -> None:
        for connection in (self._high_connection, self.connection):
            if connection is not None:
                await connection.close()

    @property
    def is_connected(self) -> bool:
        return all(
            c is not None and not c.is_closed for c in (self.connection, self._high_connection)
        )

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

    async def publish(
        self,
        events: Sequence[Outgoing] = (),
        dead_letters: Sequence[tuple[RequestCopy, str, str]] = (),
        delays: Sequence[tuple[RequestCopy, float, Mapping[str, Any], Lane]] = (),
    ) -> None:
        """Publish a settled set in one confirmed write: result events (to the results
        exchange and the request's reply_to), dead-letter copies with the reason in their
        headers, and copies sent back to the work queue through the retry queue fitting each
        delay (in the copy's own lane). Raise if any is not confirmed in time."""
        assert self.results is not None
        messages: list[RawMessage] = []
        for item in events:
            body = item.body or item.event.model_dump_json().encode()
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
        s = self.settings
        for copy, code, reason in dead_letters:
            reason_headers = {ERROR_CODE_HEADER: code, ERROR_HEADER: reason[:1000]}
            messages.append(
                copy.to_message(s.dead_letter_exchange, s.requests_queue, reason_headers)
            )
        for copy, delay_s, headers, lane in delays:
            target = (
                s.queue(lane) if delay_s <= 0 else retry_queue_name(s, retry_tier(delay_s), lane)
            )
            messages.append(copy.to_message("", target, headers))
        await self._confirmed(messages)
        if self._published is not None and events:
            self._published([item.event for item in events])
        if self._dead_lettered is not None and dead_letters:
            self._dead_lettered([code for _, code, _ in dead_letters])

    def consuming_queue(self, lane: Lane = Lane.normal) -> AbstractQueue:
        return self.requests[lane]
