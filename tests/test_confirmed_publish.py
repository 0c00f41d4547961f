"""Publishing a set of messages in one write, against the real RabbitMQ: every message
arrives whole and in order, confirms and nacks reach the caller, and the channel's own
publishes still get their confirms afterwards (the delivery tags stay in step)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aio_pika
import aiormq
import pytest
from aiormq.exceptions import ChannelClosed, DeliveryError
from pamqp.commands import Basic

from tests.conftest import AMQP_URL
from worker.confirmed_publish import RawMessage, publish_confirmed


@dataclass
class Broker:
    channel: aiormq.abc.AbstractChannel
    inspect: aio_pika.abc.AbstractChannel
    queue: str


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        inspect = await connection.channel()
        queue = await inspect.declare_queue(f"test.{uuid.uuid4().hex[:10]}.publish", exclusive=True)
        publishing = await connection.channel(publisher_confirms=True)
        yield Broker(await publishing.get_underlay_channel(), inspect, queue.name)


async def publish(channel: aiormq.abc.AbstractChannel, messages: list[RawMessage]) -> None:
    """A lost confirm would hang the test: bound it."""
    await asyncio.wait_for(publish_confirmed(channel, messages), timeout=5)


def message(queue: str, body: bytes, **properties: object) -> RawMessage:
    return RawMessage("", queue, body, Basic.Properties(**properties))  # type: ignore[arg-type]


async def drain(
    inspect: aio_pika.abc.AbstractChannel, queue: str
) -> list[aio_pika.IncomingMessage]:
    source = await inspect.get_queue(queue, ensure=False)
    got = []
    while (m := await source.get(fail=False, no_ack=True)) is not None:
        got.append(m)
    return got


async def test_a_set_arrives_whole_in_order_with_its_properties(broker: Broker) -> None:
    large = bytes(range(256)) * 2000  # 512 KB: more than one body frame (frame_max 128 KB)
    assert len(large) > broker.channel.max_content_size  # type: ignore[attr-defined]
    messages = [
        message(broker.queue, f"event {n}".encode(), message_id=f"id-{n}", headers={"n": n})
        for n in range(500)
    ]
    messages.insert(250, message(broker.queue, large, message_id="large"))
    messages.insert(0, message(broker.queue, b"", message_id="empty"))

    await publish(broker.channel, messages)

    got = await drain(broker.inspect, broker.queue)
    assert [m.message_id for m in got] == [m.properties.message_id for m in messages]
    assert [m.body for m in got] == [m.body for m in messages]
    assert got[1].headers == {"n": 0}


async def test_the_channels_own_publishes_are_confirmed_after_a_set(broker: Broker) -> None:
    await publish(broker.channel, [message(broker.queue, b"a"), message(broker.queue, b"b")])
    confirm = await asyncio.wait_for(
        broker.channel.basic_publish(b"c", routing_key=broker.queue), timeout=5
    )
    assert isinstance(confirm, Basic.Ack)
    await publish(broker.channel, [message(broker.queue, b"d")])
    assert [m.body for m in await drain(broker.inspect, broker.queue)] == [b"a", b"b", b"c", b"d"]


async def test_a_nacked_message_fails_the_set(broker: Broker) -> None:
    full = await broker.inspect.declare_queue(
        f"test.{uuid.uuid4().hex[:10]}.full",
        exclusive=True,
        arguments={"x-max-length": 1, "x-overflow": "reject-publish"},
    )
    with pytest.raises(DeliveryError):
        await publish(broker.channel, [message(full.name, b"fits"), message(full.name, b"nacked")])
    assert [m.body for m in await drain(broker.inspect, full.name)] == [b"fits"]


async def test_a_channel_closed_by_the_broker_fails_the_set(broker: Broker) -> None:
    missing = RawMessage(f"test.{uuid.uuid4().hex}.missing", "x", b"lost", Basic.Properties())
    with pytest.raises(ChannelClosed):
        await publish(broker.channel, [missing])


async def test_a_channel_without_confirms_is_refused(broker: Broker) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        plain = await connection.channel(publisher_confirms=False)
        with pytest.raises(TypeError, match="publisher confirms"):
            await publish(await plain.get_underlay_channel(), [message(broker.queue, b"x")])
