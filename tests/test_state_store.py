"""The `StateStore` contract, checked on both stores: in memory (with a clock the test moves)
and in a real Redis (server time, short windows, real sleeps). Redis-only tests cover what
only a shared store has: several replicas, owners that die, keys and TTLs, a Redis that
loses its data, and a Redis that cannot be reached.

Every Redis test uses its own key prefix and deletes every key under it afterwards (SCAN +
UNLINK): the server is shared with other tests, so nothing here flushes it."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
import redis.asyncio
from pydantic import SecretStr
from redis.asyncio.cluster import RedisCluster

from worker import runner
from worker.delivery import RequestCopy
from worker.errors import ConfigurationError
from worker.lanes import Lane
from worker.ledger import (
    CarriedRequest,
    CircuitView,
    Finish,
    GateKind,
    Intake,
    MailBusy,
    MailRecord,
    Refund,
    SplitNotes,
    StateStore,
    StateUnavailable,
    VerdictKind,
)
from worker.ledger.factory import open_store
from worker.ledger.memory import MemoryStateStore
from worker.ledger.redis import RedisStateStore, connect, describe, parse_sentinel_url
from worker.settings import (
    GatewaySettings,
    LimitSettings,
    RetrySettings,
    Settings,
    StateSettings,
)

REDIS_URL = "redis://127.0.0.1:6379/0"
WINDOW_S = 0.4
LIMITS: dict[str, Any] = {
    "dedup_ttl_s": 60,
    "identical_per_window": 2,
    "identical_window_s": WINDOW_S,
    "subscriber_streak": 3,
    "subscriber_gap_s": WINDOW_S,
    "mails_per_second": 1000,
    "parts_per_second": 100_000,
}
RETRY: dict[str, Any] = {"circuit_base_s": 0.2, "circuit_max_s": 0.6}


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    """One store kind with one settings; `store()` makes a replica (Redis: same prefix)."""

    kind: str
    settings: Settings
    clock: Clock
    stores: list[StateStore] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        return self.settings.state.key_prefix

    async def store(self) -> StateStore:
        store: StateStore
        if self.kind == "memory":
            store = MemoryStateStore(self.settings.limits, self.settings.retry, self.clock)
        else:
            store = RedisStateStore(self.settings)
        await store.start()
        self.stores.append(store)
        return store

    async def advance(self, seconds: float) -> None:
        if self.kind == "memory":
            self.clock.now += seconds
        else:
            await asyncio.sleep(seconds)

    def approx(self, seconds: float) -> Any:
        # Redis runs on the server's clock: a test's own steps take some of the time.
        return pytest.approx(seconds, abs=1e-6 if self.kind == "memory" else 0.15)


MakeHarness = Callable[..., Awaitable[Harness]]


async def delete_prefix(prefix: str) -> int:
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await client.unlink(*keys)
        return len(keys)
    finally:
        await client.aclose()


async def _harnesses(kind: str) -> AsyncIterator[MakeHarness]:
    made: list[Harness] = []

    async def make(
        limits: dict[str, Any] | None = None,
        retry: dict[str, Any] | None = None,
        state: dict[str, Any] | None = None,
        login: str = "",
    ) -> Harness:
        prefix = f"test-ledger-{uuid.uuid4().hex[:12]}"
        settings = Settings(
            gateway=GatewaySettings(login=login),
            state=StateSettings(
                url=SecretStr(REDIS_URL if kind == "redis" else ""),
                key_prefix=prefix,
                **(state or {}),
            ),
            limits=LimitSettings(**{**LIMITS, **(limits or {})}),
            retry=RetrySettings(**{**RETRY, **(retry or {})}),
        )
        harness = Harness(kind, settings, Clock())
        made.append(harness)
        return harness

    try:
        yield make
    finally:
        for harness in made:
            for store in harness.stores:
                await store.close()
            if kind == "redis":
                await delete_prefix(harness.prefix)


@pytest.fixture(params=["memory", "redis"])
async def make(request: pytest.FixtureRequest) -> AsyncIterator[MakeHarness]:
    async for factory in _harnesses(request.param):
        yield factory


@pytest.fixture
async def make_redis() -> AsyncIterator[MakeHarness]:
    async for factory in _harnesses("redis"):
        yield factory


def item(
    rid: str,
    *,
    fp: str = "fp",
    content: str | None = None,
    subs: tuple[str, ...] = (),
    redelivered: bool = False,
) -> Intake:
    return Intake(rid, fp, content if content is not None else f"c-{rid}", subs, redelivered)


def record(
    mail_id: str,
    *rids: str,
    parts: int = 1,
    submitted_at: float | None = None,
    body: bytes = b'{"text": "hi"}',
    lane: Lane = Lane.normal,
) -> MailRecord:
    carried = tuple(
        CarriedRequest(
            request_id=rid,
            recipients=("+79161234567",),
            sms_parts=1,
            attempt=1,
            first_seen=1_700_000_000.125,
            metadata={"order": 7, "note": "ж", "flag": True, "none": None},
            copy=RequestCopy(body=body, headers={"h": "v", "n": 1}, message_id=rid),
            content_key=f"c-{rid}",
            lane=lane,
            subscribers=("79161234567",),
        )
        for rid in rids
    )
    at = time.time() if submitted_at is None else submitted_at
    return MailRecord(mail_id, carried, at, parts, trace={"traceparent": "00-ab-cd-01"})


async def claim(store: StateStore, *rids: str) -> None:
    verdicts = await store.intake([item(r) for r in rids])
    assert [v.kind for v in verdicts] == [VerdictKind.new] * len(rids)


# -- the ledger -------------------------------------------------------------------------


async def test_a_sent_request_replays_its_event_and_another_fingerprint_is_a_duplicate(
    make: MakeHarness,
) -> None:
    store = await (await make()).store()
    await claim(store, "r1")
    assert (await store.begin_sending(record("m1", "r1"))).kind == GateKind.go
    await store.finish(Finish(sent={"r1": ("m1", '{"event": 1}', "fp")}))
    again = await store.intake([item("r1"), item("r1", fp="other")])
    assert again[0].kind == VerdictKind.replay
    assert (again[0].mail_id, again[0].event) == ("m1", '{"event": 1}')
    assert again[1].kind == VerdictKind.duplicate

    await store.finish(Finish(answered={"r1": ('{"event": 2}', "fp")}))
    # Never `sent` over `answered`: the answered event is the one replayed.
    await store.finish(Finish(sent={"r1": ("m1", '{"event": 3}', "fp")}))
    [answered] = await store.intake([item("r1")])
    assert answered.kind == VerdictKind.replay
    assert (answered.mail_id, answered.event) == ("m1", '{"event": 2}')


async def test_ids_and_events_with_any_characters_round_trip_exactly(make: MakeHarness) -> None:
    """Request ids may hold quotes and backslashes, events any text: what a burst carries
    to the store (one JSON argument per script call in Redis) comes back unchanged."""
    store = await (await make()).store()
    rids = ['q"uote', "back\\slash", "{braces}[1]", "plain"]
    verdicts = await store.intake(
        [item(r, subs=(f"@ник_{n}", f"+7916123456{n}")) for n, r in enumerate(rids)]
    )
    assert [v.kind for v in verdicts] == [VerdictKind.new] * len(rids)
    assert (await store.begin_sending(record('m"1', *rids))).kind == GateKind.go
    events = {
        rid: json.dumps({"rid": rid, "text": 'ж "😀" \\ \u2028 \x1f end'}, ensure_ascii=False)
        for rid in rids
    }
    await store.finish(Finish(sent={rid: ('m"1', events[rid], "fp") for rid in rids}))
    replayed = await store.intake([item(r) for r in rids])
    assert [(v.kind, v.mail_id, v.event) for v in replayed] == [
        (VerdictKind.replay, 'm"1', events[rid]) for rid in rids
    ]
    await store.finish(Finish(mails_done=('m"1',)))
    assert not await store.knows_mail('m"1')


async def test_a_claimed_request_is_a_duplicate_with_another_fingerprint(
    make: MakeHarness,
) -> None:
    store = await (await make()).store()
    await claim(store, "r1")
    [verdict] = await store.intake([item("r1", fp="other")])
    assert verdict.kind == VerdictKind.duplicate


async def test_a_released_request_may_be_claimed_again_even_as_another_message(
    make: MakeHarness,
) -> None:
    store = await (await make()).store()
    await claim(store, "r1", "r2")
    assert (await store.begin_sending(record("m1", "r2"))).kind == GateKind.go
    await store.finish(Finish(released=["r1", "r2", "never-seen"]))
    verdicts = await store.intake([item("r1", fp="other"), item("r2"), item("never-seen")])
    assert [v.kind for v in verdicts] == [VerdictKind.new] * 3
    assert all(v.mail_id is None for v in verdicts)


async def test_a_request_this_process_holds_is_claimed_again(make: MakeHarness) -> None:
    store = await (await make()).store()
    await claim(store, "r1")
    await claim(store, "r1")
    assert (await store.begin_sending(record("m1", "r1"))).kind == GateKind.go


async def test_a_request_being_sent_with_no_outcome_is_unknown(make: MakeHarness) -> None:
    store = await (await make()).store()
    await claim(store, "r1")
    assert (await store.begin_sending(record("m1", "r1"))).kind == GateKind.go
    [verdict] = await store.intake([item("r1", redelivered=True)])
    assert verdict.kind == VerdictKind.unknown
    assert verdict.mail_id == "m1"


async def test_sent_and_answered_are_kept_even_where_the_entry_was_lost(
    make: MakeHarness,
) -> None:
    store = await (await make()).store()
    await store.finish(
        Finish(sent={"ghost": ("m1", "ev", "fp")}, answered={"ghost2": ("ev2", "fp")})
    )
    verdicts = await store.intake([item("ghost"), item("ghost2")])
    assert [(v.kind, v.event) for v in verdicts] == [
        (VerdictKind.replay, "ev"),
        (VerdictKind.replay, "ev2"),
    ]


async def test_sent_never_overwrites_an_answer(make: MakeHarness) -> None:
    store = await (await make()).store()
    await claim(store, "r1")
    await store.finish(Finish(answered={"r1": ("accepted", "fp")}))
    await store.finish(Finish(sent={"r1": ("m1", "submitted", "fp")}))
    [verdict] = await store.intake([item("r1")])
    assert (verdict.kind, verdict.event) == (VerdictKind.replay, "accepted")


# -- admission --------------------------------------------------------------------------


async def test_identical_content_is_admitted_twice_per_window_within_one_burst(
    make: MakeHarness,
) -> None:
    harness = await make()
    store = await harness.store()
    verdicts = await store.intake([item(f"r{n}", content="same") for n in range(3)])
    assert [v.kind for v in verdicts[:2]] == [VerdictKind.new, VerdictKind.new]
    assert verdicts[2].kind == VerdictKind.wait
    assert verdicts[2].reason == "identical_content"
    assert verdicts[2].wait == harness.approx(WINDOW_S)
    # Not claimed: nothing of r2 may be sent.
    gate = await store.begin_sending(record("m1", "r2"))
    assert (gate.kind, gate.lost) == (GateKind.lost, ("r2",))

    await harness.advance(verdicts[2].wait + 0.05)
    [later] = await store.intake([item("r2", content="same")])
    assert later.kind == VerdictKind.new


async def test_a_refund_gives_back_the_latest_admission(make: MakeHarness) -> None:
    store = await (await make()).store()
    await store.intake([item("r0", content="same"), item("r1", content="same")])
    [waiting] = await store.intake([item("r2", content="same")])
    assert waiting.kind == VerdictKind.wait
    await store.finish(Finish(released=["r1"], refunds=[Refund("same")]))
    [admitted] = await store.intake([item("r2", content="same")])
    assert admitted.kind == VerdictKind.new


async def test_a_refund_gives_back_a_message_of_each_subscribers_streak(
    make: MakeHarness,
) -> None:
    """An attempt whose e-mail never reached the gateway (refused, cut before DATA, held
    back) is no message to its subscribers: retried through an outage, a request must not
    run its own streak up to the limit."""
    store = await (await make()).store()
    subs = ("+79161234567", "+79167654321")
    for attempt in range(5):
        [admitted] = await store.intake([item("r1", subs=subs)])
        assert admitted.kind == VerdictKind.new, attempt
        await store.finish(Finish(released=["r1"], refunds=[Refund("c-r1", subs)]))
    # Three real messages still fill the streak (limit 3), refunds or not.
    verdicts = await store.intake([item(f"s{n}", subs=subs[:1]) for n in range(4)])
    assert [v.kind for v in verdicts] == [VerdictKind.new] * 3 + [VerdictKind.wait]
    assert verdicts[3].reason == "subscriber_flood"


async def test_a_subscriber_streak_waits_for_the_gap_then_starts_anew(
    make: MakeHarness,
) -> None:
    harness = await make()
    store = await harness.store()
    subs = ("+79161234567",)
    verdicts = await store.intake([item(f"r{n}", subs=subs) for n in range(4)])
    assert [v.kind for v in verdicts[:3]] == [VerdictKind.new] * 3
    assert (verdicts[3].kind, verdicts[3].reason) == (VerdictKind.wait, "subscriber_flood")
    assert verdicts[3].wait == harness.approx(WINDOW_S)
    # Another subscriber, in the same message, holds the whole message back.
    [both] = await store.intake([item("r9", subs=("+79160000000", *subs))])
    assert both.reason == "subscriber_flood"

    await harness.advance(verdicts[3].wait + 0.05)
    fresh = await store.intake([item(f"s{n}", subs=subs) for n in range(4)])
    assert [v.kind for v in fresh] == [VerdictKind.new] * 3 + [VerdictKind.wait]


# -- sending ----------------------------------------------------------------------------


async def test_begin_sending_writes_nothing_unless_every_request_is_claimed(
    make: MakeHarness,
) -> None:
    store = await (await make()).store()
    await claim(store, "r1")
    gate = await store.begin_sending(record("m1", "r1", "r2"))
    assert (gate.kind, gate.lost) == (GateKind.lost, ("r2",))
    assert await store.take_mail("m1") is None
    [still] = await store.intake([item("r1")])
    assert still.kind == VerdictKind.new  # claimed, not sending
    assert (await store.begin_sending(record("m1", "r1"))).kind == GateKind.go
    # Sending now, no longer claimed: a second e-mail for it is refused.
    gate = await store.begin_sending(record("m2", "r1"))
    assert (gate.kind, gate.lost) == (GateKind.lost, ("r1",))


async def test_the_pace_counts_mails_and_parts(make: MakeHarness) -> None:
    # No share kept for the high lane: the account's pace alone.
    harness = await make(limits={"mails_per_second": 2, "parts_per_second": 10, "high_share": 0})
    store = await harness.store()
    await claim(store, *(f"r{n}" for n in range(5)))
    # A burst of one second's worth: two e-mails, ten parts (25 parts count as the burst).
    assert (await store.begin_sending(record("m0", "r0", parts=25))).kind == GateKind.go
    gate = await store.begin_sending(record("m1", "r1", parts=1))
    assert (gate.kind, gate.reason) == (GateKind.wait, "pace")
    assert gate.wait == harness.approx(0.1)
    await harness.advance(gate.wait + 0.02)
    assert (await store.begin_sending(record("m1", "r1", parts=1))).kind == GateKind.go
    gate = await store.begin_sending(record("m2", "r2", parts=1))
    assert (gate.kind, gate.reason) == (GateKind.wait, "pace")
    # The mails' cell: two e-mails a second, the second of them 0.12 s after the first.
    assert gate.wait == harness.approx(0.5 - 0.12)
    assert await store.take_mail("m2") is None
    await harness.advance(gate.wait + 0.02)
    assert (await store.begin_sending(record("m2", "r2", parts=1))).kind == GateKind.go


async def test_normal_and_bulk_leave_a_share_of_the_burst_to_high_priority(
    make: MakeHarness,
) -> None:
    # Rates that are sums of powers of two: the GCRA's sums stay exact.
    harness = await make(
        limits={"mails_per_second": 8, "parts_per_second": 1024, "high_share": 0.5}
    )
    store = await harness.store()

    async def burst(prefix: str, lane: Lane) -> int:
        await claim(store, *(f"{prefix}{n}" for n in range(10)))
        sent = 0
        while (
            await store.begin_sending(record(f"m{prefix}{sent}", f"{prefix}{sent}", lane=lane))
        ).kind == GateKind.go:
            sent += 1
        return sent

    # Normal and bulk e-mails stop at half the burst, and high-priority ones still find the
    # rest free.
    assert await burst("n", Lane.normal) == 4
    assert await burst("h", Lane.high) == 4
    assert (await store.begin_sending(record("mb", "n9", lane=Lane.bulk))).kind == GateKind.wait


async def test_over_time_bulk_keeps_its_floor_and_uses_the_whole_pace_alone() -> None:
    clock = Clock()
    limits = LimitSettings(
        mails_per_second=8, parts_per_second=1024, high_share=0.25, others_floor=0.25
    )
    store = MemoryStateStore(limits, RetrySettings(), clock)
    await claim(store, *(f"h{n}" for n in range(200)), *(f"b{n}" for n in range(200)))
    sent = {Lane.high: 0, Lane.bulk: 0}

    async def greedy(lanes: tuple[Lane, ...], seconds: float) -> None:
        end = clock.now + seconds
        while clock.now < end:
            for lane in lanes:
                n = sent[lane]
                rid = f"{'h' if lane == Lane.high else 'b'}{n}"
                gate = await store.begin_sending(record(f"m{rid}", rid, lane=lane))
                sent[lane] += gate.kind == GateKind.go
            clock.now += 1 / 64

    # Both lanes greedy for 10 s: high takes at most its share of the rate (and a burst),
    # bulk keeps the rest.
    await greedy((Lane.high, Lane.bulk), 10)
    assert sent[Lane.high] <= 8 * 0.75 * 10 + 8
    assert sent[Lane.bulk] >= 8 * 0.25 * 10 - 2
    # Bulk alone: the whole pace, the kept share of the burst notwithstanding.
    before = sent[Lane.bulk]
    await greedy((Lane.bulk,), 5)
    assert sent[Lane.bulk] - before >= 8 * 5 - 2


async def test_a_stopped_account_sends_nothing(make: MakeHarness) -> None:
    store = await (await make()).store()
    assert await store.account_stopped() is None
    await claim(store, "r1")
    await store.stop_account("login refused")
    assert await store.account_stopped() == "login refused"
    gate = await store.begin_sending(record("m1", "r1"))
    assert (gate.kind, gate.reason) == (GateKind.stopped, "login refused")


async def test_the_circuit_opens_lets_one_probe_through_doubles_and_closes(
    make: MakeHarness,
) -> None:
    harness = await make()
    store = await harness.store()
    await claim(store, "r1", "r2", "r3")
    assert await store.circuit() == CircuitView.closed
    assert await store.open_circuit("ip blocked", None) == pytest.approx(0.2)
    assert await store.circuit() == CircuitView.open
    gate = await store.begin_sending(record("m1", "r1"))
    assert (gate.kind, gate.reason) == (GateKind.wait, "circuit_open")
    assert gate.wait == harness.approx(0.2)

    await harness.advance(gate.wait + 0.05)
    assert await store.circuit() == CircuitView.half_open
    probe = await store.begin_sending(record("m1", "r1"))
    assert (probe.kind, probe.probe) == (GateKind.go, True)
    behind = await store.begin_sending(record("m2", "r2"))
    assert (behind.kind, behind.reason) == (GateKind.wait, "circuit_open")
    assert behind.wait == harness.approx(0.2)

    # The probe failed: twice as long, up to the cap.
    assert await store.open_circuit("ip blocked", None) == pytest.approx(0.4)
    assert await store.open_circuit("ip blocked", None) == pytest.approx(0.6)
    assert await store.open_circuit("ip blocked", None) == pytest.approx(0.6)
    assert await store.circuit() == CircuitView.open

    await store.close_circuit()
    assert await store.circuit() == CircuitView.closed
    gate = await store.begin_sending(record("m2", "r2"))
    assert (gate.kind, gate.probe) == (GateKind.go, False)
    assert await store.open_circuit("no funds", 5.0) == pytest.approx(5.0)
    gate = await store.begin_sending(record("m3", "r3"))
    assert gate.wait == harness.approx(5.0)
    await store.close_circuit()
    assert await store.open_circuit("ip blocked", None) == pytest.approx(0.2)


# -- mail records -----------------------------------------------------------------------


async def test_mail_records_round_trip_with_any_bytes(make: MakeHarness) -> None:
    store = await (await make()).store()
    await claim(store, "r1", "r2")
    sent = record("m1", "r1", "r2", parts=3, body=bytes(range(256)) + b"\x00\xff" * 10)
    assert (await store.begin_sending(sent)).kind == GateKind.go
    taken = await store.take_mail("m1")
    assert taken == sent
    assert taken is not None and taken.requests[0].copy.body == sent.requests[0].copy.body


async def test_a_mail_is_taken_by_one_reply_at_a_time(make: MakeHarness) -> None:
    store = await (await make()).store()
    await claim(store, "r1")
    assert await store.take_mail("m1") is None  # unknown yet
    await store.begin_sending(record("m1", "r1"))
    assert await store.take_mail("m1") is not None
    # Its own lease is the process's to take again (it knows what it is handling).
    assert await store.take_mail("m1") is not None
    await store.give_back_mail("m1")
    assert await store.take_mail("m1") is not None
    await store.finish(Finish(answered={"r1": ("ev", "fp")}, mails_done=["m1"]))
    assert await store.take_mail("m1") is None
    assert await store.unanswered(time.time() + 3600) == []


async def test_a_mail_whose_reply_was_applied_is_known_as_replied(make: MakeHarness) -> None:
    """A mailbox reads a reply again after a crash before moving it: the ledger must tell
    "applied already" from "never heard of" (an e-mail that ended without a reply)."""
    store = await (await make()).store()
    for mail_id, request_id in (("m1", "r1"), ("m2", "r2")):
        await claim(store, request_id)
        await store.begin_sending(record(mail_id, request_id))
        assert await store.take_mail(mail_id) is not None
    await store.finish(Finish(replied=["m1"]))
    await store.finish(Finish(mails_done=["m2"]))
    assert await store.take_mail("m1") is None and await store.take_mail("m2") is None
    assert await store.mail_replied("m1")
    assert not await store.mail_replied("m2")
    assert not await store.mail_replied("m3")
    assert await store.unanswered(time.time() + 3600) == []


async def test_a_mail_is_known_from_its_record_until_it_is_settled(make: MakeHarness) -> None:
    harness = await make()
    store = await harness.store()
    await claim(store, "r1")
    assert not await store.knows_mail("m1")
    await store.begin_sending(record("m1", "r1"))
    assert await store.knows_mail("m1")
    assert not await store.knows_mail("m2")
    if harness.kind == "redis":
        # Shared: another replica knows it too, and asking takes no lease from it.
        assert await (await harness.store()).knows_mail("m1")
    assert await store.take_mail("m1") is not None
    assert await store.knows_mail("m1")  # taken, not yet settled
    await store.finish(Finish(answered={"r1": ("ev", "fp")}, mails_done=["m1"]))
    assert not await store.knows_mail("m1")


async def test_unanswered_mails_and_unknown_outcomes(make: MakeHarness) -> None:
    store = await (await make()).store()
    await claim(store, "r1", "r2", "r3")
    for n, at in ((1, 1000.0), (2, 2000.0), (3, 3000.0)):
        assert (await store.begin_sending(record(f"m{n}", f"r{n}", submitted_at=at))).kind == (
            GateKind.go
        )
    assert sorted(await store.unanswered(3000.0)) == ["m1", "m2"]
    assert await store.take_mail("m1") is not None
    assert await store.unanswered(3000.0) == ["m2"]  # m1 is being handled

    assert await store.mark_unknown("nope") is None
    flagged = await store.mark_unknown("m2")
    assert flagged is not None and flagged.outcome_unknown
    taken = await store.take_mail("m2")
    assert taken is not None and taken.outcome_unknown
    assert taken == replace(record("m2", "r2", submitted_at=2000.0), outcome_unknown=True)


# -- several replicas (Redis) -----------------------------------------------------------


async def test_a_split_grants_halves_within_its_allowance_until_one_gets_through(
    make: MakeHarness,
) -> None:
    harness = await make()
    store = await harness.store()

    async def fail(root: str = "root", ttl: float = 60) -> SplitNotes:
        return await store.note_split(root, failed=True, allowance=4, ttl=ttl)

    assert await fail() == SplitNotes(1, 0, True)
    assert await fail() == SplitNotes(2, 0, True)
    assert await fail() == SplitNotes(3, 0, False)
    # An e-mail through: the cause is a line's own, and the search goes on.
    await store.note_split("root", failed=False, allowance=4, ttl=60)
    assert await fail() == SplitNotes(4, 1, True)
    assert await fail() == SplitNotes(5, 1, True)
    # Other splits are apart, and a split is forgotten after its ttl.
    assert await fail("other") == SplitNotes(1, 0, True)
    await fail("brief", ttl=0.2)
    await fail("brief", ttl=0.2)
    await harness.advance(0.4)
    assert await fail("brief", ttl=0.2) == SplitNotes(1, 0, True)


async def test_replicas_count_one_split(make_redis: MakeHarness) -> None:
    harness = await make_redis()
    a, b = await harness.store(), await harness.store()
    await a.note_split("root", failed=True, allowance=2, ttl=60)
    assert await b.note_split("root", failed=True, allowance=2, ttl=60) == SplitNotes(2, 0, False)


async def test_a_live_replica_holds_its_claims_and_a_dead_ones_lapse(
    make_redis: MakeHarness,
) -> None:
    harness = await make_redis()
    a, b = await harness.store(), await harness.store()
    await claim(a, "r1", "r2")
    assert (await a.begin_sending(record("m1", "r1"))).kind == GateKind.go
    verdicts = await b.intake([item("r1", redelivered=True), item("r2", redelivered=True)])
    assert [v.kind for v in verdicts] == [VerdictKind.busy, VerdictKind.busy]
    assert verdicts[0].wait == pytest.approx(harness.settings.state.owner_ttl_s / 3)

    await _kill(harness, a)
    verdicts = await b.intake([item("r1", redelivered=True), item("r2", redelivered=True)])
    assert (verdicts[0].kind, verdicts[0].mail_id) == (VerdictKind.unknown, "m1")
    assert verdicts[1].kind == VerdictKind.new  # claimed again, by b
    gate = await a.begin_sending(record("m2", "r2"))
    assert (gate.kind, gate.lost) == (GateKind.lost, ("r2",))
    assert (await b.begin_sending(record("m2", "r2"))).kind == GateKind.go


async def _kill(harness: Harness, store: StateStore) -> None:
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        assert await client.delete(f"{harness.prefix}:{{default}}:owner:{store.owner}") == 1
    finally:
        await client.aclose()


async def test_a_silent_replica_is_taken_for_dead_after_owner_ttl(
    make_redis: MakeHarness,
) -> None:
    harness = await make_redis(state={"owner_ttl_s": 0.4})
    a, b = await harness.store(), await harness.store()
    await claim(a, "r1", "r2")
    await asyncio.sleep(0.25)
    await a.heartbeat()
    await asyncio.sleep(0.25)
    [held] = await b.intake([item("r1")])
    assert held.kind == VerdictKind.busy
    await asyncio.sleep(0.5)  # no heartbeat
    [lapsed] = await b.intake([item("r1")])
    assert lapsed.kind == VerdictKind.new


async def test_replicas_share_the_limits(make_redis: MakeHarness) -> None:
    harness = await make_redis(limits={"mails_per_second": 2, "high_share": 0})
    a, b = await harness.store(), await harness.store()
    [first] = await a.intake([item("r1", content="same", subs=("s",))])
    [second] = await b.intake([item("r2", content="same", subs=("s",))])
    [third] = await a.intake([item("r3", content="same")])
    assert [first.kind, second.kind] == [VerdictKind.new, VerdictKind.new]
    assert (third.kind, third.reason) == (VerdictKind.wait, "identical_content")
    [streak] = await b.intake([item("r4", subs=("s",))])
    assert streak.kind == VerdictKind.new
    [flood] = await a.intake([item("r5", subs=("s",))])
    assert (flood.kind, flood.reason) == (VerdictKind.wait, "subscriber_flood")
    # A refund by one replica frees the other's window.
    await b.finish(Finish(refunds=[Refund("same")]))
    [refunded] = await a.intake([item("r3", content="same")])
    assert refunded.kind == VerdictKind.new

    await claim(a, "p1", "p3")
    await claim(b, "p2")
    assert (await a.begin_sending(record("m1", "p1"))).kind == GateKind.go
    assert (await b.begin_sending(record("m2", "p2"))).kind == GateKind.go
    gate = await a.begin_sending(record("m3", "p3"))
    assert (gate.kind, gate.reason) == (GateKind.wait, "pace")
    assert 0.3 < gate.wait <= 0.5


async def test_replicas_share_the_circuit_and_the_stop(make_redis: MakeHarness) -> None:
    harness = await make_redis()
    a, b = await harness.store(), await harness.store()
    await claim(b, "r1")
    await a.open_circuit("blocked", 0.2)
    assert await b.circuit() == CircuitView.open
    assert (await b.begin_sending(record("m1", "r1"))).reason == "circuit_open"
    await asyncio.sleep(0.25)
    assert await b.circuit() == CircuitView.half_open
    await claim(a, "r2")
    assert (await a.begin_sending(record("m2", "r2"))).probe is True
    assert (await b.begin_sending(record("m1", "r1"))).reason == "circuit_open"
    await b.close_circuit()
    await a.stop_account("blocked for good")
    assert await b.account_stopped() == "blocked for good"
    assert (await b.begin_sending(record("m1", "r1"))).kind == GateKind.stopped


async def test_a_mail_is_taken_by_one_replica_at_a_time(make_redis: MakeHarness) -> None:
    harness = await make_redis()
    a, b = await harness.store(), await harness.store()
    await claim(a, "r1")
    await a.begin_sending(record("m1", "r1", submitted_at=1000.0))
    taken = await asyncio.gather(a.take_mail("m1"), b.take_mail("m1"), return_exceptions=True)
    assert sum(isinstance(t, MailRecord) for t in taken) == 1
    assert sum(isinstance(t, MailBusy) for t in taken) == 1
    holder, other = (a, b) if isinstance(taken[0], MailRecord) else (b, a)
    assert await other.unanswered(2000.0) == []
    await other.give_back_mail("m1")  # not its to give back
    with pytest.raises(MailBusy):
        await other.take_mail("m1")
    await holder.give_back_mail("m1")
    assert await other.unanswered(2000.0) == ["m1"]
    assert await other.take_mail("m1") is not None


async def test_a_reply_held_by_a_replica_that_died_is_taken_over_at_once(
    make_redis: MakeHarness,
) -> None:
    harness = await make_redis()
    a, b = await harness.store(), await harness.store()
    await claim(a, "r1")
    await a.begin_sending(record("m1", "r1", submitted_at=1000.0))
    assert await a.take_mail("m1") is not None
    with pytest.raises(MailBusy):
        await b.take_mail("m1")
    await _kill(harness, a)
    assert await b.take_mail("m1") is not None


# -- keys, generations, failures (Redis) -----------------------------------------------


async def test_every_key_carries_the_account_tag_and_a_ttl(make_redis: MakeHarness) -> None:
    harness = await make_redis(login="acme")
    store = await harness.store()
    await claim(store, "r0")
    await delete_prefix(harness.prefix)  # a loss, so that the reset mark is there too
    await claim(store, "r1", "r2")
    await store.intake([item("r3", content="c-r1", subs=("+79161234567",))])
    await store.begin_sending(record("m1", "r1", "r3"))
    await store.begin_sending(record("m2", "r2"))
    await store.finish(
        Finish(sent={"r1": ("m1", "ev", "fp")}, released=["r2"], refunds=[Refund("c-r2")])
    )
    await store.take_mail("m1")
    await store.mark_unknown("m1")
    await store.open_circuit("blocked", None)
    await store.stop_account("stopped")
    await store.note_split("m1", failed=True, allowance=10, ttl=60)
    await store.heartbeat()

    client = redis.asyncio.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        keys = [k async for k in client.scan_iter(match=f"{harness.prefix}:*")]
        ttls = {k.removeprefix(f"{harness.prefix}:"): await client.pttl(k) for k in keys}
    finally:
        await client.aclose()
    kinds = {k.split(":")[1] for k in ttls}
    assert {"gen", "reset", "owner", "entry", "mail", "taken", "unanswered", "window"} <= kinds
    assert {"streak", "pace", "circuit", "stopped", "split"} <= kinds
    assert all(k.startswith("{acme}:") for k in ttls), ttls
    assert ttls.pop("{acme}:gen") == -1
    assert all(ttl > 0 for ttl in ttls.values()), ttls


async def test_an_injected_clock_replaces_the_servers(make_redis: MakeHarness) -> None:
    harness = await make_redis()
    clock = Clock()
    store = RedisStateStore(harness.settings, clock)
    harness.stores.append(store)
    await store.start()
    verdicts = await store.intake([item(f"r{n}", content="same") for n in range(3)])
    assert verdicts[2].wait == pytest.approx(WINDOW_S, abs=1e-5)
    clock.now += WINDOW_S
    [later] = await store.intake([item("r2", content="same")])
    assert later.kind == VerdictKind.new


async def test_a_redis_that_lost_its_data_reports_redelivered_requests_lost(
    make_redis: MakeHarness, caplog: pytest.LogCaptureFixture
) -> None:
    harness = await make_redis()
    a, b = await harness.store(), await harness.store()
    await claim(a, "r1")
    # A first start against an empty Redis is a new account, not a loss.
    assert (await a.intake([item("x", redelivered=True)]))[0].kind == VerdictKind.new
    assert await delete_prefix(harness.prefix) > 0  # Redis restarted empty, for this prefix
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="worker.ledger.redis"):
        verdicts = await a.intake(
            [item("r1", redelivered=True), item("r2", redelivered=True), item("r3")]
        )
        assert [v.kind for v in verdicts] == [
            VerdictKind.ledger_lost,
            VerdictKind.ledger_lost,
            VerdictKind.new,
        ]
        gate = await a.begin_sending(record("m1", "r1"))
        assert (gate.kind, gate.lost) == (GateKind.lost, ("r1",))
        await b.heartbeat()
        await b.heartbeat()
        await a.heartbeat()
    lost = [r.getMessage() for r in caplog.records if "Redis lost its data" in r.getMessage()]
    assert len(lost) == 2, lost  # once by the replica that found it, once by the other


async def test_the_ledger_lost_rule_ends_after_the_grace(make_redis: MakeHarness) -> None:
    harness = await make_redis(state={"reset_grace_s": 0.3})
    store = await harness.store()
    await claim(store, "r0")
    await delete_prefix(harness.prefix)
    [lost] = await store.intake([item("r1", redelivered=True)])
    assert lost.kind == VerdictKind.ledger_lost
    await asyncio.sleep(0.4)
    [new] = await store.intake([item("r1", redelivered=True)])
    assert new.kind == VerdictKind.new


async def test_an_unreachable_redis_is_unavailable_and_its_password_never_shown() -> None:
    port = runner.free_port("127.0.0.1")
    secret = "s3cr/t-pass"
    url = f"redis://user:s3cr%2Ft-pass@127.0.0.1:{port}/0"
    settings = Settings(state=StateSettings(url=SecretStr(url), timeout_s=0.5))
    store = RedisStateStore(settings)
    started = time.monotonic()
    with pytest.raises(StateUnavailable) as caught:
        await store.start()
    assert time.monotonic() - started < 2
    with pytest.raises(StateUnavailable):
        await store.intake([item("r1")])
    await store.close()
    for text in (str(caught.value), repr(caught.value), caught.value.message):
        assert secret not in text and "s3cr%2Ft" not in text
    assert f"127.0.0.1:{port}" in str(caught.value)
    assert caught.value.code == "state_unavailable"


async def test_a_redis_that_does_not_answer_is_unavailable_within_the_deadline() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(1 << 16):  # reads every command, answers none
            pass
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        url = f"redis://:hunter2@127.0.0.1:{port}/0"
        store = RedisStateStore(Settings(state=StateSettings(url=SecretStr(url), timeout_s=0.3)))
        started = time.monotonic()
        with pytest.raises(StateUnavailable) as caught:
            await store.start()
        assert time.monotonic() - started < 1.5
        assert "hunter2" not in str(caught.value)
        await store.close()
    finally:
        server.close()
        await server.wait_closed()


# -- construction -----------------------------------------------------------------------


def test_the_factory_picks_memory_without_a_url_and_redis_with_one() -> None:
    assert isinstance(open_store(Settings()), MemoryStateStore)
    store = open_store(Settings(state=StateSettings(url=SecretStr(REDIS_URL))))
    assert isinstance(store, RedisStateStore)


def test_sentinel_and_cluster_urls() -> None:
    target = parse_sentinel_url(
        "redis+sentinel://:p%40ss@h1:26379,h2:26380,[::1]:26381/mymaster/2?sentinel_password=sp"
    )
    assert target.sentinels == (("h1", 26379), ("h2", 26380), ("::1", 26381))
    assert (target.service, target.db, target.password) == ("mymaster", 2, "p@ss")
    assert target.sentinel_password == "sp"
    plain = parse_sentinel_url("redis+sentinel://sentinel/mymaster")
    assert (plain.sentinels, plain.db, plain.password) == ((("sentinel", 26379),), 0, None)
    assert isinstance(connect("redis+sentinel://:pw@h1:26379/mymaster", 1), redis.asyncio.Redis)
    assert isinstance(connect("redis+cluster://:pw@127.0.0.1:7000", 1), RedisCluster)
    assert describe("redis+sentinel://:pw@h1:1,h2:2/m/0") == "redis+sentinel://h1:1,h2:2/m/0"
    for bad in (
        "http://:pw@host/0",
        "redis+sentinel://:pw@h1:26379/",
        "redis+sentinel://:pw@h:x/m",
    ):
        with pytest.raises(ConfigurationError) as caught:
            connect(bad, 1)
        assert "pw" not in str(caught.value)


def test_a_key_prefix_may_not_carry_a_hash_tag() -> None:
    settings = Settings(state=StateSettings(url=SecretStr(REDIS_URL), key_prefix="a{b}"))
    with pytest.raises(ConfigurationError):
        RedisStateStore(settings)
