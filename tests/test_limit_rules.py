"""The limit rules and the circuit on their own, with a clock the test moves."""

from __future__ import annotations

import asyncio

from worker.limits import Circuit, CircuitState, ContentWindow, SubscriberStreaks
from worker.settings import LimitSettings
from worker.state import MemoryStateStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_identical_content_goes_twice_per_window_then_waits_for_the_oldest() -> None:
    window = ContentWindow(allowed=2, window=60)
    window.record("k", 0)
    window.record("k", 10)
    assert window.wait("k", 20) == 40
    assert window.wait("other", 20) == 0
    assert window.wait("k", 60) == 0
    window.forget_latest("k")
    assert window.wait("k", 20) == 0


def test_a_subscriber_streak_stops_at_the_limit_until_the_gap_passes() -> None:
    streaks = SubscriberStreaks(limit=3, gap=120)
    for t in (0, 10, 20):
        assert streaks.wait("+79161234567", t) == 0
        streaks.record("+79161234567", t)
    assert streaks.wait("+79161234567", 30) == 110
    assert streaks.wait("+79161234568", 30) == 0
    assert streaks.wait("+79161234567", 140) == 0
    streaks.record("+79161234567", 140)
    assert streaks.wait("+79161234567", 150) == 0


async def test_the_store_admits_counts_and_refunds() -> None:
    clock = Clock()
    limits = LimitSettings(identical_window_s=60, subscriber_streak=50, subscriber_gap_s=120)
    store = MemoryStateStore(limits, clock)
    assert (await store.admit("same", ("a",))).wait == 0
    assert (await store.admit("same", ("b",))).wait == 0
    third = await store.admit("same", ("c",))
    assert third.reason == "identical_content" and third.wait == 60
    await store.refund("same")
    assert (await store.admit("same", ("c",))).wait == 0
    for n in range(49):  # with "same" above: 50 messages to "a" in one streak
        assert (await store.admit(f"text-{n}", ("a",))).wait == 0
    flood = await store.admit("one more", ("a",))
    assert flood.reason == "subscriber_flood" and flood.wait == 120
    clock.now += 120
    assert (await store.admit("one more", ("a",))).wait == 0


async def test_request_ids_are_duplicates_while_in_flight_or_sent_within_the_ttl() -> None:
    clock = Clock()
    store = MemoryStateStore(LimitSettings(dedup_ttl_s=100), clock)
    assert await store.claim("r1") == "new"
    assert await store.claim("r1") == "duplicate"
    await store.release("r1")
    assert await store.claim("r1") == "new"
    await store.mark_sent("r1")
    clock.now += 99
    assert await store.claim("r1") == "duplicate"
    clock.now += 2
    assert await store.claim("r1") == "new"


async def test_the_circuit_pauses_then_lets_one_probe_through() -> None:
    clock = Clock()
    circuit = Circuit(base=1, cap=4, clock=clock)
    assert circuit.open("blocked") == 1
    waiter = asyncio.create_task(circuit.acquire())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    clock.now += 1
    await asyncio.wait_for(waiter, 2)
    assert circuit.state == CircuitState.half_open
    second = asyncio.create_task(circuit.acquire())
    await asyncio.sleep(0.01)
    assert not second.done(), "only one probe while half-open"
    circuit.close()
    await asyncio.wait_for(second, 1)
    assert circuit.open("again") == 1
    assert circuit.open("and again") == 2
    assert circuit.open("still") == 4
    assert circuit.open("capped") == 4
