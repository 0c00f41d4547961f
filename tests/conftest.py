"""Shared fixtures: a real RabbitMQ (names unique per test, deleted afterwards), the gateway
emulator over real SMTP, and a running worker wired to both."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import pytest
import redis.asyncio
from hypothesis import settings as hypothesis_settings
from pydantic import SecretStr

from worker import runner
from worker.broker import RETRY_TIERS_S, retry_queue_name
from worker.contract import ResultEvent, Status
from worker.emulator.config import EmulatorConfig
from worker.emulator.server import Emulator
from worker.lanes import Lane
from worker.service import Service
from worker.settings import (
    AmqpSettings,
    BatchSettings,
    LimitSettings,
    ReplySettings,
    RetrySettings,
    Settings,
    SmtpSettings,
    StateSettings,
)

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
REDIS_URL = "redis://127.0.0.1:6379/0"

# Property tests: "ci" (the default, so every `make test` too) draws the same examples on
# every run and keeps no example database, so a run passes or fails the same way on every
# machine; HYPOTHESIS_PROFILE=dev draws fresh random examples and remembers failures.
# A test's own max_examples, where it sets one, applies under either profile.
hypothesis_settings.register_profile(
    "ci", derandomize=True, database=None, deadline=None, print_blob=True, max_examples=100
)
hypothesis_settings.register_profile("dev", print_blob=True)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def free_port() -> int:
    return runner.free_port("127.0.0.1")


def phone(n: int) -> str:
    """A distinct, valid Russian mobile number."""
    return f"+7916{n:07d}"


def unique_amqp() -> AmqpSettings:
    tag = uuid.uuid4().hex[:10]
    return AmqpSettings(
        requests_queue=f"test.{tag}.requests",
        results_exchange=f"test.{tag}.results",
        dead_letter_exchange=f"test.{tag}.dlx",
        dead_letter_queue=f"test.{tag}.dead",
        retry_queue=f"test.{tag}.retry",
        publish_timeout_s=10,
    )


async def delete_topology(amqp: AmqpSettings) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        queues = [amqp.dead_letter_queue, *(amqp.queue(lane) for lane in Lane)]
        queues += [retry_queue_name(amqp, t, lane) for t in RETRY_TIERS_S for lane in Lane]
        for name in queues:
            await channel.queue_delete(name)
        for name in (amqp.results_exchange, amqp.dead_letter_exchange):
            await channel.exchange_delete(name)


def make_settings(
    amqp: AmqpSettings,
    reply_port: int,
    smtp_port: int,
    reply: dict[str, Any] | None = None,
    **groups: Any,
) -> Settings:
    """Settings for a test worker; `reply` adds to the reply receiver's test settings."""
    base: dict[str, Any] = {
        "amqp": amqp,
        "smtp": SmtpSettings(host="127.0.0.1", port=smtp_port, timeout_s=5, submit_deadline_s=10),
        "reply": ReplySettings(
            host="127.0.0.1", port=reply_port, address="replies@worker.test", **(reply or {})
        ),
        "batch": BatchSettings(max_wait_ms=30),
        "limits": LimitSettings(mails_per_second=1000, parts_per_second=100_000),
        "retry": RetrySettings(base_delay_s=1, max_delay_s=2),
    }
    base.update(groups)
    return Settings(**base)


class Results:
    """Every result event published while the test runs, by request id."""

    # A condition is checked at most this often: a stream of thousands of events must not
    # keep the test's loop (which also runs the emulator) busy checking.
    CHECK_EVERY_S = 0.05

    def __init__(self) -> None:
        self.events: list[ResultEvent] = []
        self.headers: list[dict[str, Any]] = []
        self._by_request: dict[str | None, list[ResultEvent]] = {}
        self._changed = asyncio.Event()

    def add(self, event: ResultEvent, headers: dict[str, Any]) -> None:
        self.events.append(event)
        self.headers.append(headers)
        self._by_request.setdefault(event.request_id, []).append(event)
        self._changed.set()

    def of(self, request_id: str) -> list[ResultEvent]:
        return list(self._by_request.get(request_id, ()))

    def statuses(self, request_id: str) -> list[Status]:
        return [e.status for e in self._by_request.get(request_id, ())]

    def with_status(self, status: Status) -> list[ResultEvent]:
        return [e for e in self.events if e.status == status]

    async def wait_until(self, condition: Callable[[], bool], timeout: float = 30) -> None:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            while True:
                self._changed.clear()
                checked = loop.time()
                if condition():
                    return
                await self._changed.wait()
                await asyncio.sleep(max(checked + self.CHECK_EVERY_S - loop.time(), 0))


class Broker:
    """The test's own connection: publishes requests, reads results and dead letters."""

    def __init__(self, amqp: AmqpSettings, channel: aio_pika.abc.AbstractChannel) -> None:
        self.amqp = amqp
        self.channel = channel

    async def publish(
        self, body: dict[str, Any] | bytes, lane: Lane = Lane.normal, **properties: Any
    ) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        await self.channel.default_exchange.publish(
            aio_pika.Message(raw, content_type="application/json", **properties),
            routing_key=self.amqp.queue(lane),
        )

    async def dead_letters(
        self, expected: int, timeout: float = 10
    ) -> list[aio_pika.abc.AbstractIncomingMessage]:
        queue = await self.channel.get_queue(self.amqp.dead_letter_queue)
        found: list[aio_pika.abc.AbstractIncomingMessage] = []
        async with asyncio.timeout(timeout):
            while len(found) < expected:
                message = await queue.get(fail=False)
                if message is None:
                    await asyncio.sleep(0.05)
                    continue
                await message.ack()
                found.append(message)
        extra = await queue.get(fail=False)
        if extra is not None:
            found.append(extra)
        return found


@asynccontextmanager
async def collecting(amqp: AmqpSettings) -> AsyncIterator[tuple[Broker, Results]]:
    connection = await aio_pika.connect(AMQP_URL)
    results = Results()
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            amqp.results_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, "sms.result.#")

        async def on_event(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await message.ack()
            results.add(ResultEvent.model_validate_json(message.body), dict(message.headers))

        await queue.consume(on_event)
        yield Broker(amqp, channel), results


async def delete_keys(prefix: str) -> None:
    """Every Redis key under a test's prefix (the server is shared: nothing is flushed)."""
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            await client.unlink(key)
    finally:
        await client.aclose()


@pytest.fixture
async def shared_state() -> AsyncIterator[StateSettings]:
    """A Redis state store of the test's own (a unique key prefix), deleted afterwards."""
    prefix = f"test-{uuid.uuid4().hex[:10]}"
    yield StateSettings(url=SecretStr(REDIS_URL), key_prefix=prefix, owner_ttl_s=3)
    await delete_keys(prefix)


@pytest.fixture
async def amqp() -> AsyncIterator[AmqpSettings]:
    settings = unique_amqp()
    yield settings
    await delete_topology(settings)


@asynccontextmanager
async def gateway_and_worker(
    amqp: AmqpSettings, emulator_config: dict[str, Any] | None = None, **groups: Any
) -> AsyncIterator[tuple[Emulator, Service]]:
    reply_port = free_port()
    config = EmulatorConfig(**{"reply_relay": ("127.0.0.1", reply_port), **(emulator_config or {})})
    async with Emulator(config) as emulator:
        settings = make_settings(amqp, reply_port, emulator.port, **groups)
        async with Service(settings) as service:
            yield emulator, service
