"""Errors 1, 6, 7 and 8 name a whole e-mail although one line may have caused them: the
worker sends the halves apart until only the guilty requests fail, stops when the cause
is what every line shares, and never spends more than a bounded number of e-mails.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import collecting, gateway_and_worker, phone
from worker.contract import ResultEvent, Status
from worker.emulator.server import Emulator
from worker.fate import Fail, Later, Split, after_error
from worker.ledger.memory import MemoryStateStore
from worker.protocol.replies import GatewayError, Rejected
from worker.settings import AmqpSettings, BatchSettings, LimitSettings, RetrySettings

DENIED = Rejected(GatewayError.message_denied, "message denied", "m")


@dataclass
class Search:
    """The worker's decisions against a gateway that refuses any e-mail holding a bad line
    (or every e-mail, for a shared cause). E-mails go out in rounds, as the halves of one
    reply do, and each round's replies are handled in a chosen order."""

    bad: frozenset[int]
    shared: bool = False
    sent: Counter[int] = field(default_factory=Counter)
    failed: set[int] = field(default_factory=set)
    mails: int = 0

    async def run(self, lines: int, order: random.Random) -> None:
        store = MemoryStateStore(LimitSettings(), RetrySettings())
        round_: list[tuple[str, str, list[int]]] = [("m", "", list(range(lines)))]
        while round_:
            order.shuffle(round_)
            following: list[tuple[str, str, list[int]]] = []
            for mail_id, group, members in round_:
                following += await self.answer(store, mail_id, group, members)
            round_ = following

    async def answer(
        self, store: MemoryStateStore, mail_id: str, group: str, members: list[int]
    ) -> list[tuple[str, str, list[int]]]:
        self.mails += 1
        split = Split.of(group, mail_id, len(members))
        if not self.shared and not self.bad & set(members):
            self.sent.update(members)
            if split.path:
                await store.note_split(split.root, failed=False, allowance=0, ttl=60)
            return []
        notes = None
        if len(members) > 1:
            notes = await store.note_split(
                split.root, failed=True, allowance=split.allowance, ttl=60
            )
        plan = after_error(DENIED, mail_id, len(members), 60, split, notes)
        halves: dict[str, list[int]] = {}
        for line, fate in zip(members, plan.fates, strict=True):
            if isinstance(fate, Fail):
                self.failed.add(line)
            else:
                assert isinstance(fate, Later) and fate.group
                halves.setdefault(fate.group, []).append(line)
        return [(f"{mail_id}{g[-1]}", g, half) for g, half in halves.items()]


def allowance(lines: int) -> int:
    return Split("root", lines).allowance


def searches(lines: int) -> int:
    """E-mails a binary search spends per bad line: two per halving."""
    return 2 * math.ceil(math.log2(lines))


@given(
    lines=st.integers(2, 300),
    bad=st.sets(st.integers(0, 299), max_size=2),
    seed=st.integers(0, 2**16),
)
async def test_one_or_two_bad_lines_fail_alone_whatever_order_the_replies_come_in(
    lines: int, bad: set[int], seed: int
) -> None:
    search = Search(frozenset(b for b in bad if b < lines))
    await search.run(lines, random.Random(seed))
    assert search.failed == search.bad
    assert search.sent == Counter(n for n in range(lines) if n not in search.bad)
    assert search.mails <= 1 + max(1, len(search.bad)) * searches(lines)


@given(
    lines=st.integers(2, 300),
    bad=st.sets(st.integers(0, 299), max_size=60),
    shared=st.booleans(),
    seed=st.integers(0, 2**16),
)
async def test_the_search_is_bounded_sends_nothing_twice_and_always_fails_the_bad(
    lines: int, bad: set[int], shared: bool, seed: int
) -> None:
    search = Search(frozenset(b for b in bad if b < lines), shared)
    await search.run(lines, random.Random(seed))
    assert max(search.sent.values(), default=1) == 1
    assert search.failed | set(search.sent) == set(range(lines))
    assert search.bad <= search.failed
    assert search.mails <= 1 + max(allowance(lines), len(search.bad) * searches(lines))
    if shared:
        assert not search.sent


@given(lines=st.integers(2, 1000), seed=st.integers(0, 2**16))
async def test_a_cause_every_line_shares_fails_all_within_the_allowance(
    lines: int, seed: int
) -> None:
    search = Search(frozenset(), shared=True)
    await search.run(lines, random.Random(seed))
    assert search.failed == set(range(lines))
    assert search.mails <= 1 + allowance(lines)


def test_a_split_reads_back_from_its_group_and_a_foreign_group_starts_a_new_one() -> None:
    split = Split("abc", 40).half(1).half(0)
    assert Split.of(split.group, "other", 10) == split
    assert Split.of("abc.0", "m7", 10) == Split("m7", 10)
    assert Split.of("", "m7", 10) == Split("m7", 10)


def test_an_unknown_error_number_fails_the_requests_with_the_gateways_text() -> None:
    plan = after_error(Rejected(42, "something new", "m"), "m", 3, 60)
    assert all(isinstance(f, Fail) and "something new" in f.reason for f in plan.fates)


# -- through RabbitMQ and the gateway emulator ------------------------------------------

WORKER_LIMITS = LimitSettings(mails_per_second=1000, parts_per_second=100_000)
FAST_RETRY = RetrySettings(base_delay_s=1, max_delay_s=2, circuit_base_s=1, circuit_max_s=2)


async def one_denied_among(
    amqp: AmqpSettings, total: int, bad: int, gateway: dict[str, Any]
) -> tuple[list[ResultEvent], Emulator]:
    """`total` requests through the worker, request `bad` holding the denied word "pills";
    once every other is accepted and it failed: the failed events and the emulator."""
    ids = [f"line-{n}" for n in range(total)]
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(
            amqp,
            {"denied_words": ("pills",), **gateway},
            batch=BatchSettings(max_wait_ms=300),
            limits=WORKER_LIMITS,
            retry=FAST_RETRY,
        ) as (emulator, _),
    ):
        await asyncio.gather(
            *(
                broker.publish(
                    {"request_id": r, "to": phone(n), "text": "buy pills" if n == bad else "hi"}
                )
                for n, r in enumerate(ids)
            )
        )
        await results.wait_until(
            lambda: (
                all(Status.accepted in results.statuses(r) for r in ids if r != ids[bad])
                and Status.failed in results.statuses(ids[bad])
            ),
            90,
        )
    assert Counter(d.recipient for d in emulator.deliveries) == Counter(
        phone(n) for n in range(total) if n != bad
    )
    return results.with_status(Status.failed), emulator


async def test_one_denied_text_among_forty_fails_alone(amqp: AmqpSettings) -> None:
    [failed], emulator = await one_denied_among(amqp, 40, 21, {})
    assert failed.request_id == "line-21"
    assert failed.error is not None and failed.error.gateway_error == 6
    assert emulator.errors[6] <= 1 + searches(40)


async def test_a_denied_sender_on_every_line_fails_all_after_a_bounded_number_of_mails(
    amqp: AmqpSettings,
) -> None:
    ids = [f"spam-{n}" for n in range(64)]
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(
            amqp,
            {"denied_senders": frozenset({"Spam"})},
            batch=BatchSettings(max_wait_ms=300),
            limits=WORKER_LIMITS,
            retry=FAST_RETRY,
        ) as (emulator, _),
    ):
        await asyncio.gather(
            *(
                broker.publish(
                    {"request_id": r, "to": phone(n), "text": f"offer {n}", "sender": "Spam"}
                )
                for n, r in enumerate(ids)
            )
        )
        await results.wait_until(lambda: all(Status.failed in results.statuses(r) for r in ids), 60)

    assert not emulator.deliveries
    assert {e.error.gateway_error for e in results.with_status(Status.failed) if e.error} == {6}
    assert len(emulator.mails) <= search_bound(emulator), len(emulator.mails)


def search_bound(emulator: Emulator) -> int:
    """The e-mails the searches may take: each e-mail that carried its lines for the first
    time, and its allowance."""
    seen: set[str] = set()
    bound = 0
    for mail in emulator.mails:
        assert mail.decoded is not None
        phones = {p for line in mail.decoded.body.lines for p in line.phones}
        if not phones & seen:
            bound += 1 + allowance(len(mail.decoded.body.lines))
        seen |= phones
    return bound


async def test_a_search_that_trips_the_ip_block_waits_at_the_circuit_and_still_finishes(
    amqp: AmqpSettings,
) -> None:
    gateway = {"block_after_errors": 3, "block_for_s": 2.0}
    [failed], emulator = await one_denied_among(amqp, 32, 5, gateway)
    assert failed.request_id == "line-5"
    assert emulator.errors[4] >= 1
    # At the open circuit the search waits: one probe per pause, not its halves in a row.
    assert emulator.errors[4] <= 4, emulator.errors


async def test_600_requests_with_5_denied_texts_and_russian_cp1251_replies_fail_only_those(
    amqp: AmqpSettings,
) -> None:
    """The issue's own case: the gateway answers in Russian, in cp1251, with no charset
    declared; five denied texts are spread among 600 requests."""
    denied = {37, 151, 298, 420, 577}
    ids = [f"r-{n}" for n in range(600)]

    def text(n: int) -> str:
        return f"Купите таблетки, код {n}" if n in denied else f"Ваш код {n}"

    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(
            amqp,
            {"denied_words": ("таблетки",), "reply_charset": "cp1251"},
            limits=WORKER_LIMITS,
            retry=FAST_RETRY,
        ) as (emulator, _),
    ):
        await asyncio.gather(
            *(
                broker.publish({"request_id": r, "to": phone(n), "text": text(n)})
                for n, r in enumerate(ids)
            )
        )
        await results.wait_until(
            lambda: all({Status.accepted, Status.failed} & set(results.statuses(r)) for r in ids),
            120,
        )

    failed = {e.request_id for e in results.with_status(Status.failed)}
    assert failed == {f"r-{n}" for n in denied}
    assert all(Status.accepted in results.statuses(r) for r in ids if r not in failed)
    assert all(
        e.error is not None and e.error.gateway_error == 6
        for e in results.with_status(Status.failed)
    )
    # The Russian description came through the cp1251 bytes.
    assert any(
        "Сообщение запрещено" in e.error.message
        for e in results.with_status(Status.failed)
        if e.error
    )
    assert Counter(d.recipient for d in emulator.deliveries) == Counter(
        phone(n) for n in range(600) if n not in denied
    )
    assert len(emulator.mails) <= search_bound(emulator) + 5 * searches(600)
