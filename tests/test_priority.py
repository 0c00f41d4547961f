"""A one-time code is not stuck behind a marketing blast: high-priority requests have a
queue, a consumer, a batch window, a share of the pace and SMTP connections of their own,
and keep their lane through retries; normal ones do not queue behind bulk ones either.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import collecting, gateway_and_worker, phone
from worker.broker import Broker
from worker.contract import Status
from worker.delivery import RequestCopy
from worker.lanes import Lane, LaneSlots
from worker.settings import AmqpSettings, BatchSettings, LimitSettings


async def test_slots_serve_high_then_normal_then_bulk_and_a_cancelled_waiter_loses_nothing() -> (
    None
):
    slots = LaneSlots(1)
    served: list[str] = []
    release = asyncio.Event()

    async def take(name: str, lane: Lane) -> None:
        async with slots.hold(lane):
            served.append(name)
            if name == "first":
                await release.wait()

    first = asyncio.create_task(take("first", Lane.bulk))
    await asyncio.sleep(0)
    waiters = [
        asyncio.create_task(take(name, lane))
        for name, lane in [
            ("bulk-1", Lane.bulk),
            ("normal-1", Lane.normal),
            ("gone", Lane.high),
            ("bulk-2", Lane.bulk),
            ("high-1", Lane.high),
            ("normal-2", Lane.normal),
        ]
    ]
    await asyncio.sleep(0)
    waiters[2].cancel()
    release.set()
    await asyncio.gather(first, *waiters, return_exceptions=True)
    assert served == ["first", "high-1", "normal-1", "normal-2", "bulk-1", "bulk-2"]
    # Every slot came back: one more holder gets in at once.
    async with asyncio.timeout(1), slots.hold(Lane.bulk):
        pass


async def test_a_retry_copy_returns_to_its_own_lanes_queue(amqp: AmqpSettings) -> None:
    broker = Broker(amqp)
    await broker.connect()
    try:
        for lane in Lane:
            copy = RequestCopy(body=f'{{"lane": "{lane}"}}'.encode(), headers={})
            await broker.publish(delays=[(copy, 1.0, {}, lane)])
        for lane in Lane:
            queue = broker.consuming_queue(lane)
            async with asyncio.timeout(10):
                while (message := await queue.get(fail=False)) is None:
                    await asyncio.sleep(0.1)
            await message.ack()
            assert message.body == f'{{"lane": "{lane}"}}'.encode()
            # Through the lane's own retry queues, dead-lettered back to its queue.
            assert message.headers["x-death"][0]["queue"] == f"{amqp.retry_queues(lane)}.1s"
    finally:
        await broker.close()


@pytest.mark.parametrize("urgent", [Lane.high, Lane.normal])
async def test_a_request_overtakes_a_bulk_backlog(amqp: AmqpSettings, urgent: Lane) -> None:
    # A slow pace and small e-mails: 240 bulk requests are a backlog of many seconds.
    bulk = [f"bulk-{n}" for n in range(240)]
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(
            amqp,
            limits=LimitSettings(mails_per_second=20, parts_per_second=100_000),
            batch=BatchSettings(max_lines=2, max_wait_ms=20),
        ) as (emulator, _),
    ):
        await asyncio.gather(
            *(
                broker.publish({"request_id": r, "to": phone(n), "text": f"sale {n}"}, Lane.bulk)
                for n, r in enumerate(bulk)
            )
        )
        await emulator.wait_for_deliveries(20, 30)
        before = len(emulator.deliveries)
        await broker.publish(
            {"request_id": "code", "to": phone(999), "text": "your code is 4711"}, urgent
        )
        await results.wait_until(lambda: Status.accepted in results.statuses("code"), 60)
        await results.wait_until(
            lambda: all(Status.accepted in results.statuses(r) for r in bulk), 60
        )

    recipients = [d.recipient for d in emulator.deliveries]
    overtaken = len(bulk) - recipients.index(phone(999))
    # Delivered ahead of nearly all the bulk requests waiting when it came: the few ahead
    # of it were already at the gate or on the wire.
    assert overtaken > (len(bulk) - before) - 20, (before, recipients.index(phone(999)))
