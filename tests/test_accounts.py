"""Several gateway accounts through one worker: each request goes with its account's
credentials, an account's error 2 stops only it, error 4 pauses every one, RabbitMQ decides
who may use an account, and each account's state keys carry its own tag."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aio_pika
import aiormq
import pytest
import redis.asyncio
from pydantic import SecretStr, ValidationError

from tests.conftest import (
    AMQP_URL,
    REDIS_URL,
    collecting,
    delete_topology,
    gateway_and_worker,
    phone,
    unique_amqp,
)
from worker.accounts import accounts_of
from worker.contract import Status
from worker.lanes import Lane
from worker.ledger import CircuitView
from worker.protocol.fields import Channel
from worker.settings import (
    AccountSettings,
    AmqpSettings,
    GatewaySettings,
    RetrySettings,
    Settings,
    StateSettings,
)

BRAND = "brand"
BRAND_PASSWORD = "brand-pw"
ACCOUNTS = {BRAND: AccountSettings(login=BRAND, password=SecretStr(BRAND_PASSWORD))}
# The emulator's accounts: the default account's API key and the brand's login.
GATEWAY: dict[str, Any] = {"accounts": {BRAND: BRAND_PASSWORD}}
FAST_RETRY = RetrySettings(base_delay_s=1, max_delay_s=2, circuit_base_s=1, circuit_max_s=2)


@pytest.fixture
async def amqp() -> AsyncIterator[AmqpSettings]:
    settings = unique_amqp()
    yield settings
    await delete_topology(settings, (BRAND,))


async def publish_for(channel: aio_pika.abc.AbstractChannel, exchange: str, body: str) -> None:
    """Publish to a named account's exchange, normal lane, as the channel's user."""
    target = await channel.get_exchange(exchange, ensure=False)
    await target.publish(aio_pika.Message(body.encode()), routing_key="normal")


def request(request_id: str, n: int, text: str = "hello") -> str:
    return f'{{"request_id": "{request_id}", "to": "{phone(n)}", "text": "{text}"}}'


async def waiting_in(channel: aio_pika.abc.AbstractChannel, queue: str) -> int:
    declared = await channel.declare_queue(queue, passive=True)
    count = declared.declaration_result.message_count
    assert count is not None
    return count


async def test_each_account_sends_with_its_own_credentials_under_its_own_keys(
    amqp: AmqpSettings, shared_state: StateSettings
) -> None:
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp, GATEWAY, accounts=ACCOUNTS, state=shared_state) as (emulator, _),
    ):
        await broker.publish({"request_id": "same-id", "to": phone(1), "text": "for default"})
        await publish_for(
            broker.channel, amqp.account_exchange(BRAND), request("same-id", 2, "for brand")
        )
        await results.wait_until(
            lambda: [e.status for e in results.events].count(Status.accepted) == 2
        )

    billed = {d.recipient: d.account for d in emulator.deliveries}
    assert billed == {phone(1): "apikey:demo", phone(2): BRAND}
    accepted = {e.account: e for e in results.with_status(Status.accepted)}
    assert set(accepted) == {"default", BRAND}
    # One request id in two accounts: two requests, two ledgers, two event ids.
    assert accepted["default"].event_id != accepted[BRAND].event_id
    client = redis.asyncio.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        keys = [k async for k in client.scan_iter(match=f"{shared_state.key_prefix}:*")]
    finally:
        await client.aclose()
    entries = {k for k in keys if ":entry:" in k}
    assert entries == {
        f"{shared_state.key_prefix}:{{default}}:entry:same-id",
        f"{shared_state.key_prefix}:{{{BRAND}}}:entry:same-id",
    }
    assert all(k.split(":")[1] in ("{default}", f"{{{BRAND}}}") for k in keys)


async def test_error_2_stops_only_its_account_until_it_is_restored(
    amqp: AmqpSettings, shared_state: StateSettings
) -> None:
    broken = {"accounts": {BRAND: "not-the-workers-password"}}
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(
            amqp, broken, accounts=ACCOUNTS, state=shared_state, retry=FAST_RETRY
        ) as (emulator, service),
    ):
        brand_ids = [f"brand-{n}" for n in range(3)]
        for n, rid in enumerate(brand_ids):
            await publish_for(broker.channel, amqp.account_exchange(BRAND), request(rid, n))
        await results.wait_until(lambda: BRAND in service.stopped_accounts)
        for n in range(3):
            await broker.publish({"request_id": f"default-{n}", "to": phone(10 + n), "text": "x"})
        await results.wait_until(
            lambda: all(Status.accepted in results.statuses(f"default-{n}") for n in range(3))
        )
        # The brand's requests wait in its queue: neither lost nor failed.
        brand_queue = amqp.queue(Lane.normal, BRAND)
        async with asyncio.timeout(15):
            while await waiting_in(broker.channel, brand_queue) < 3:
                await asyncio.sleep(0.1)
        assert service.ready, "the default account is still served"
        assert not any(
            Status.failed in results.statuses(rid) or Status.accepted in results.statuses(rid)
            for rid in brand_ids
        )
        # The account is fixed at the gateway, and the operator clears the flag.
        emulator.set_password(BRAND, BRAND_PASSWORD)
        client = redis.asyncio.Redis.from_url(REDIS_URL)
        try:
            assert await client.delete(f"{shared_state.key_prefix}:{{{BRAND}}}:stopped") == 1
        finally:
            await client.aclose()
        await results.wait_until(
            lambda: all(Status.accepted in results.statuses(rid) for rid in brand_ids)
        )

    assert emulator.errors[2] == 1
    billed = {d.recipient: d.account for d in emulator.deliveries}
    assert billed == {
        **{phone(n): BRAND for n in range(3)},
        **{phone(10 + n): "apikey:demo" for n in range(3)},
    }
    stopped = [e for e in results.events if e.error and e.error.code == "account_stopped"]
    assert stopped and {e.account for e in stopped} == {BRAND}


async def test_error_4_pauses_every_account(amqp: AmqpSettings) -> None:
    gateway = {
        **GATEWAY,
        "denied_words": frozenset({"forbidden"}),
        "block_after_errors": 2,
        "block_for_s": 4.0,
    }
    retry = RetrySettings(base_delay_s=1, max_delay_s=2, circuit_base_s=5, circuit_max_s=10)
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp, gateway, accounts=ACCOUNTS, retry=retry) as (emulator, service),
    ):
        for n in range(2):
            await broker.publish({"request_id": f"denied-{n}", "to": phone(n), "text": "forbidden"})
            await results.wait_until(lambda n=n: Status.failed in results.statuses(f"denied-{n}"))
        # The IP is blocked now: the brand's e-mail meets error 4.
        await publish_for(broker.channel, amqp.account_exchange(BRAND), request("brand-1", 5))
        await results.wait_until(lambda: Status.deferred in results.statuses("brand-1"))
        assert await service.stores["default"].circuit() == CircuitView.open
        # The default account's next e-mail waits for the circuit instead of meeting the block.
        await broker.publish({"request_id": "default-1", "to": phone(6), "text": "fine"})
        await results.wait_until(
            lambda: (
                Status.accepted in results.statuses("default-1")
                and Status.accepted in results.statuses("brand-1")
            ),
            40,
        )

    assert emulator.errors[4] == 1, "an account went on sending into the block"
    deferred = next(e for e in results.of("brand-1") if e.status == Status.deferred)
    assert deferred.error is not None and deferred.error.gateway_error == 4


async def refusal(
    connection: aio_pika.abc.AbstractConnection,
    publish: Callable[[aio_pika.abc.AbstractChannel], Awaitable[object]],
) -> str:
    """What the broker said when it refused a publish (which closes the channel: the next
    call on it hears of it)."""
    channel = await connection.channel()
    try:
        await publish(channel)
        await channel.declare_queue(exclusive=True)
    except aiormq.exceptions.AMQPError as exc:
        return str(exc)
    raise AssertionError("the broker took the publish")


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True)


async def test_only_a_producer_given_the_account_can_use_it(amqp: AmqpSettings) -> None:
    user, password = f"test-{uuid.uuid4().hex[:10]}", uuid.uuid4().hex
    other = unique_amqp().account_exchange("other")
    rabbitmqctl("add_user", user, password)
    try:
        # Write on the brand's exchange only: not on the default exchange, not on another's.
        brand_exchange = amqp.account_exchange(BRAND)
        rabbitmqctl("set_permissions", "-p", "/", user, "", f"^{brand_exchange}$", "")
        async with (
            collecting(amqp) as (broker, results),
            gateway_and_worker(amqp, GATEWAY, accounts=ACCOUNTS) as (emulator, _),
        ):
            # A guest-declared exchange of an account this worker does not know of.
            await broker.channel.declare_exchange(other, aio_pika.ExchangeType.DIRECT)
            producer = await aio_pika.connect(AMQP_URL.replace("guest:guest", f"{user}:{password}"))
            async with producer:
                channel = await producer.channel()
                await publish_for(channel, brand_exchange, request("allowed", 1))
                to_other = await refusal(
                    producer, lambda ch: publish_for(ch, other, request("stolen", 1))
                )
                to_queue = await refusal(
                    producer,
                    lambda ch: ch.default_exchange.publish(
                        aio_pika.Message(request("stolen", 2).encode()),
                        routing_key=amqp.queue(Lane.normal, BRAND),
                    ),
                )
            # An account that does not exist has no exchange: the publish is refused too.
            guest = await aio_pika.connect(AMQP_URL)
            async with guest:
                unknown = await refusal(
                    guest,
                    lambda ch: publish_for(ch, amqp.account_exchange("nosuch"), request("lost", 3)),
                )
            await results.wait_until(lambda: Status.accepted in results.statuses("allowed"))
    finally:
        rabbitmqctl("delete_user", user)
        cleanup = await aio_pika.connect(AMQP_URL)
        async with cleanup:
            await (await cleanup.channel()).exchange_delete(other)

    assert "ACCESS_REFUSED" in to_other and "ACCESS_REFUSED" in to_queue
    assert "NOT_FOUND" in unknown
    assert [d.account for d in emulator.deliveries] == [BRAND]
    assert results.statuses("stolen") == [] and results.statuses("lost") == []


async def test_a_request_naming_another_or_an_unknown_account_is_rejected(
    amqp: AmqpSettings,
) -> None:
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp, GATEWAY, accounts=ACCOUNTS) as (emulator, _),
    ):
        # Published to the default account's queue, naming the brand: not billed to it.
        await broker.publish(
            {"request_id": "other", "to": phone(1), "text": "hi", "account": BRAND}
        )
        await broker.publish(
            {"request_id": "unknown", "to": phone(2), "text": "hi", "account": "nobody"}
        )
        # Naming its own queue's account is fine.
        await publish_for(
            broker.channel,
            amqp.account_exchange(BRAND),
            f'{{"request_id": "own", "to": "{phone(3)}", "text": "hi", "account": "{BRAND}"}}',
        )
        await results.wait_until(
            lambda: (
                Status.rejected in results.statuses("other")
                and Status.rejected in results.statuses("unknown")
                and Status.accepted in results.statuses("own")
            )
        )

    codes = {e.request_id: e.error.code for e in results.with_status(Status.rejected) if e.error}
    assert codes == {"other": "account_not_allowed", "unknown": "unknown_account"}
    assert [d.recipient for d in emulator.deliveries] == [phone(3)]


def test_a_named_account_has_default_senders_of_its_own() -> None:
    settings = Settings(
        gateway=GatewaySettings(default_senders={Channel.email: "shop@default.example"}),
        accounts={
            BRAND: AccountSettings(
                login=BRAND,
                password=SecretStr(BRAND_PASSWORD),
                default_sender="Brand",
                default_senders={Channel.email: "news@brand.example"},
            ),
            "bare": AccountSettings(login="bare", password=SecretStr("pw")),
        },
    )
    accounts = accounts_of(settings)
    brand, bare = accounts[BRAND].gateway, accounts["bare"].gateway
    assert (brand.default_sender, brand.default_senders) == (
        "Brand",
        {Channel.email: "news@brand.example"},
    )
    # Not the default account's: another account's address is no sender of this one.
    assert bare.default_senders == {}
    with pytest.raises(ValidationError, match="DEFAULT_SENDER is an e-mail address"):
        AccountSettings(login="x", password=SecretStr("pw"), default_sender="a@b.example")
    with pytest.raises(ValidationError, match="must be the sender's e-mail address"):
        AccountSettings(
            login="x", password=SecretStr("pw"), default_senders={Channel.email: "Brand"}
        )
