"""Publishing a set of messages with one socket write and the broker's confirms awaited
together.

aiormq publishes one message per call: a turn of the channel lock, a write (one `send()`)
and a drain wait each, and a task of its own when several are awaited side by side. Result
events go out by the thousand, and those rounds cost more than the messages. This does
what `aiormq.Channel.basic_publish` does, once per set: the frames are marshalled first
(so a bad message fails before the channel's state is touched), then, holding the channel
lock, each message takes the next delivery tag and a confirmation future, and the whole
set goes to the connection's writer as one frame. It relies on the attributes of
`aiormq.Channel` that `basic_publish` itself uses; uv.lock pins the version, and the
tests publish through it against RabbitMQ (confirms, nacks, a closed channel).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import aiormq
import pamqp.frame
from aiormq.abc import ChannelFrame
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader


@dataclass(frozen=True, slots=True)
class RawMessage:
    exchange: str
    routing_key: str
    body: bytes
    properties: Basic.Properties


def _frames(channel: aiormq.Channel, message: RawMessage) -> bytes:
    number = channel.number
    body = message.body
    size = channel.max_content_size
    parts = [
        pamqp.frame.marshal(
            Basic.Publish(exchange=message.exchange, routing_key=message.routing_key), number
        ),
        pamqp.frame.marshal(ContentHeader(0, len(body), message.properties), number),
    ]
    parts.extend(
        pamqp.frame.marshal(ContentBody(body[i : i + size]), number)
        for i in range(0, len(body), size)
    )
    return b"".join(parts)


async def publish_confirmed(
    channel: aiormq.abc.AbstractChannel, messages: Sequence[RawMessage]
) -> None:
    """Publish every message; return once the broker has confirmed them all. Raises
    aiormq's `DeliveryError` when the broker nacks one, and the channel's error when it
    closes first. The caller bounds the wait: a confirm can be lost with the connection."""
    if not messages:
        return
    if not isinstance(channel, aiormq.Channel) or not channel.publisher_confirms:
        raise TypeError("publish_confirmed needs an aiormq channel with publisher confirms")
    payload = b"".join([_frames(channel, m) for m in messages])
    confirmations: list[asyncio.Future[object]] = []
    async with channel.lock:
        for _ in messages:
            channel.delivery_tag += 1
            confirmation: asyncio.Future[object] = channel.create_future()
            channel.confirmations[channel.delivery_tag] = confirmation
            confirmations.append(confirmation)
        written: asyncio.Future[None] = channel.create_future()
        try:
            await channel.write_queue.put(ChannelFrame(payload, False, written))
        except BaseException:
            # Not handed to the writer: the broker will never count these tags.
            for confirmation in reversed(confirmations):
                channel.confirmations.pop(channel.delivery_tag, None)
                channel.delivery_tag -= 1
                confirmation.cancel()
            raise
        await written
    # aiormq fails a nacked message's future with DeliveryError.
    await asyncio.gather(*confirmations)
