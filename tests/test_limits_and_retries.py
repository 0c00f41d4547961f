"""Staying within the gateway's limits, backing off, and never losing or doubling a message.

The windows of the emulator and of the worker are shrunk alike (seconds, not minutes), so
the same rules are exercised without the tests waiting for minutes.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

from pydantic import SecretStr

from tests.conftest import collecting, gateway_and_worker, phone
from worker.contract import Status
from worker.ledger import StateUnavailable
from worker.settings import (
    AmqpSettings,
    GatewaySettings,
    LimitSettings,
    RetrySettings,
    StateSettings,
)

WINDOW_S = 2.0
SHORT_WINDOWS = {"duplicate_window_s": WINDOW_S, "streak_gap_s": WINDOW_S}
# The worker counts a request when it admits it, the gateway when it receives it a moment
# later: the worker's windows carry a margin over the gateway's.
WORKER_LIMITS = LimitSettings(
    identical_window_s=WINDOW_S + 0.5,
    subscriber_gap_s=WINDOW_S + 0.5,
    mails_per_second=1000,
    parts_per_second=100_000,
)
FAST_RETRY = RetrySettings(base_delay_s=1, max_delay_s=2, circuit_base_s=1, circuit_max_s=2)


def accepted_once(results: object, request_ids: list[str]) -> bool:
    return all(Status.accepted in results.statuses(r) for r in request_ids)  # type: ignore[attr-defined]


async def test_a_stream_that_would_trip_the_limits_trips_none(amqp: AmqpSettings) -> None:
    subscriber = phone(500)
    stream = [{"request_id": f"flood-{n}", "to": subscriber, "text": f"m{n}"} for n in range(60)]
    stream += [{"request_id": f"same-{n}", "to": phone(1), "text": "same text"} for n in range(3)]
    stream += [
        {"request_id": "again", "to": phone(2), "text": "once"},
        {"request_id": "again", "to": phone(2), "text": "a new message reusing the id"},
    ]
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp, SHORT_WINDOWS, limits=WORKER_LIMITS, retry=FAST_RETRY) as (
            emulator,
            _,
        ),
    ):
        for request in stream:
            await broker.publish(request)
        unique_ids = sorted({str(r["request_id"]) for r in stream})
        await results.wait_until(lambda: accepted_once(results, unique_ids), 60)
        await asyncio.sleep(0.5)

    assert emulator.errors[9] == 0
    assert emulator.floods == []
    counts = Counter((d.recipient, d.text) for d in emulator.deliveries)
    assert all(counts[(subscriber, f"m{n}")] == 1 for n in range(60))
    assert counts[(phone(1), "same text")] == 3
    assert counts[(phone(2), "once")] == 1
    assert sum(counts.values()) == 60 + 3 + 1
    duplicates = [e for e in results.of("again") if e.status == Status.rejected]
    assert [e.error.code for e in duplicates if e.error] == ["duplicate"]
    assert any(e.status == Status.deferred for e in results.of("flood-59"))


async def test_refused_connections_are_retried_through_rabbitmq_until_they_succeed(
    amqp: AmqpSettings,
) -> None:
    ids = [f"refused-{n}" for n in range(30)]
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp, retry=FAST_RETRY) as (emulator, service),
    ):
        await emulator.faults.refuse_connections()
        for n, request_id in enumerate(ids):
            await broker.publish({"request_id": request_id, "to": phone(n), "text": "hi"})
        await results.wait_until(
            lambda: {e.request_id for e in results.with_status(Status.retrying)} == set(ids)
        )
        # Waiting requests sit in RabbitMQ's retry queues, not in the worker's memory: it
        # comes back to holding nothing between their attempts.
        async with asyncio.timeout(10):
            while service.batched or service._acker.unacked:
                await asyncio.sleep(0.01)
        await emulator.faults.accept_connections()
        await results.wait_until(lambda: accepted_once(results, ids), 60)

    counts = Counter(d.recipient for d in emulator.deliveries)
    assert counts == Counter(phone(n) for n in range(len(ids)))
    retry = results.with_status(Status.retrying)[0]
    assert retry.error is not None and retry.error.retryable and retry.retry_at is not None


async def test_one_undeliverable_number_fails_alone_and_the_rest_are_sent(
    amqp: AmqpSettings,
) -> None:
    bad = phone(13)
    ids = [f"line-{n}" for n in range(40)]
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp, {"undeliverable": frozenset({bad})}) as (emulator, _),
    ):
        await asyncio.gather(
            *(
                broker.publish({"request_id": r, "to": phone(n), "text": "x"})
                for n, r in enumerate(ids)
            )
        )
        good = [r for r in ids if r != "line-13"]
        await results.wait_until(
            lambda: accepted_once(results, good) and Status.failed in results.statuses("line-13"),
            60,
        )

    failed = results.with_status(Status.failed)
    assert [e.request_id for e in failed] == ["line-13"]
    assert failed[0].error is not None and failed[0].error.gateway_error == 8
    counts = Counter(d.recipient for d in emulator.deliveries)
    assert counts == Counter(phone(n) for n in range(40) if n != 13)
    # Halving finds one bad line among 40 in about log2(40) rounds, not 40 e-mails.
    assert emulator.errors[8] <= 7


async def test_an_ip_block_pauses_sending_then_resumes(amqp: AmqpSettings) -> None:
    gateway = {
        "denied_words": frozenset({"forbidden"}),
        "block_after_errors": 2,
        "block_for_s": 2.0,
    }
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp, gateway, retry=FAST_RETRY) as (emulator, _),
    ):
        for n in range(2):
            await broker.publish({"request_id": f"denied-{n}", "to": phone(n), "text": "forbidden"})
            await results.wait_until(lambda n=n: Status.failed in results.statuses(f"denied-{n}"))
        await broker.publish({"request_id": "after-block", "to": phone(9), "text": "fine"})
        await results.wait_until(lambda: Status.accepted in results.statuses("after-block"), 30)

    statuses = results.statuses("after-block")
    assert Status.deferred in statuses
    deferred = next(e for e in results.of("after-block") if e.status == Status.deferred)
    assert deferred.error is not None and deferred.error.gateway_error == 4
    assert emulator.errors[4] <= 3, "the worker kept sending into the block"
    assert Counter(d.recipient for d in emulator.deliveries) == Counter({phone(9): 1})


async def test_bad_credentials_stop_the_account_without_a_retry_storm(amqp: AmqpSettings) -> None:
    wrong = GatewaySettings(login="demo", password=SecretStr("wrong-password"))
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp, gateway=wrong, retry=FAST_RETRY) as (emulator, service),
    ):
        for n in range(5):
            await broker.publish({"request_id": f"cred-{n}", "to": phone(n), "text": "x"})
        await results.wait_until(lambda: service.account_stopped)
        await asyncio.sleep(3)
        assert not service.ready
        queue = await broker.channel.declare_queue(amqp.requests_queue, passive=True)
        waiting = queue.declaration_result.message_count

    assert emulator.errors[2] == 1
    assert emulator.deliveries == []
    stopped = [e for e in results.events if e.error and e.error.code == "account_stopped"]
    assert stopped and all(e.error and e.error.retryable for e in stopped)
    assert "wrong-password" not in str([e.model_dump() for e in results.events])
    assert waiting == 5, "the requests must wait in the queue, not be dropped"


def close_connection_named(name: str) -> None:
    """Close the worker's connection from the broker's side (once it has one again)."""
    for _ in range(30):
        listing = subprocess.run(
            ["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        pids = [line.split("\t")[0] for line in listing.splitlines() if name in line]
        if pids:
            break
        time.sleep(0.5)
    assert pids, f"no connection named {name}"
    for pid in pids:
        subprocess.run(["rabbitmqctl", "-q", "close_connection", pid, "test"], check=True)


async def test_a_request_redelivered_after_a_broker_side_close_is_not_sent_again(
    amqp: AmqpSettings,
) -> None:
    name = f"smsc-worker-test-{uuid.uuid4().hex[:8]}"
    amqp = amqp.model_copy(update={"connection_name": name})
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp, {"latency_s": 3.0}) as (emulator, service),
    ):
        await broker.publish({"request_id": "once-only", "to": phone(1), "text": "exactly once"})
        await emulator.wait_for_mails(1, timeout_s=10)
        # The e-mail is recorded by the gateway; its 250 is still 3 s away. Cut the
        # worker's broker connection now, so the ack after the 250 cannot reach RabbitMQ.
        await asyncio.to_thread(close_connection_named, name)
        await results.wait_until(lambda: Status.accepted in results.statuses("once-only"), 30)
        await results.wait_until(lambda: Status.submitted in results.statuses("once-only"), 30)
        async with asyncio.timeout(10):
            while service._acker.unacked:
                await asyncio.sleep(0.05)
        queue = await broker.channel.declare_queue(amqp.requests_queue, passive=True)
        left = queue.declaration_result.message_count

    assert emulator.delivered(phone(1), "exactly once") == 1
    # The redelivery is answered from the ledger: the same `submitted` event (same id),
    # never a second e-mail, never a "duplicate".
    events = results.of("once-only")
    assert Status.rejected not in [e.status for e in events]
    assert len({e.event_id for e in events if e.status == Status.submitted}) == 1
    assert left == 0


async def test_an_unknown_outcome_is_reported_and_never_resent(amqp: AmqpSettings) -> None:
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp, retry=FAST_RETRY) as (emulator, _),
    ):
        emulator.faults.drop_after_dot(1)
        await broker.publish({"request_id": "maybe", "to": phone(1), "text": "sent or not?"})
        await results.wait_until(lambda: Status.accepted in results.statuses("maybe"))
        await asyncio.sleep(2)
        queue = await broker.channel.declare_queue(amqp.requests_queue, passive=True)
        left = queue.declaration_result.message_count

    assert results.statuses("maybe") == [Status.unknown, Status.accepted]
    unknown = results.of("maybe")[0]
    assert unknown.error is not None and unknown.error.code == "outcome_unknown"
    assert emulator.delivered(phone(1), "sent or not?") == 1
    assert left == 0


async def test_an_unknown_outcome_without_a_reply_fails_without_a_resend(
    amqp: AmqpSettings,
) -> None:
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp, {"reply_relay": None}, reply={"timeout_s": 1.0}) as (emulator, _),
    ):
        emulator.faults.drop_after_dot(1)
        await broker.publish({"request_id": "silent", "to": phone(1), "text": "no answer"})
        await results.wait_until(lambda: Status.failed in results.statuses("silent"), 20)

    assert results.statuses("silent") == [Status.unknown, Status.failed]
    failed = results.of("silent")[-1]
    assert failed.error is not None and failed.error.code == "outcome_unknown"
    assert not failed.error.retryable
    assert emulator.delivered(phone(1), "no answer") == 1


async def test_an_e_mail_whose_reply_never_comes_ends_unknown_no_reply(
    amqp: AmqpSettings,
) -> None:
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp, {"reply_relay": None}, reply={"timeout_s": 1.0}) as (emulator, _),
    ):
        request = {"request_id": "unanswered", "to": phone(1), "text": "no reply"}
        await broker.publish(request)
        await results.wait_until(lambda: Status.unknown in results.statuses("unanswered"), 20)
        # Final: the ledger has it answered, so a copy sent again is not resent; its last
        # event is published again instead.
        await broker.publish(request)
        await results.wait_until(lambda: len(results.of("unanswered")) == 3, 20)
        await asyncio.sleep(1.5)  # another sweep: nothing more comes

    assert results.statuses("unanswered") == [Status.submitted, Status.unknown, Status.unknown]
    submitted, unknown, replayed = results.of("unanswered")
    assert unknown.error is not None and unknown.error.code == "no_reply"
    assert not unknown.error.retryable
    assert unknown.error.message == (
        "the gateway did not answer within 1 s; the message may or may not have been delivered"
    )
    assert unknown.gateway_id == submitted.gateway_id
    assert replayed.event_id == unknown.event_id
    assert emulator.delivered(phone(1), "no reply") == 1


async def test_retries_give_up_only_at_the_age_limit_and_dead_letter(amqp: AmqpSettings) -> None:
    retry = RetrySettings(max_age_s=4, base_delay_s=0.5, max_delay_s=1)
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp, retry=retry) as (emulator, _),
    ):
        await emulator.faults.refuse_connections()
        await broker.publish({"request_id": "doomed", "to": phone(1), "text": "x"})
        await results.wait_until(lambda: Status.failed in results.statuses("doomed"), 30)
        dead = await broker.dead_letters(1)

    statuses = results.statuses("doomed")
    assert statuses[-1] == Status.failed
    assert set(statuses[:-1]) == {Status.retrying}
    # Attempts are not counted against it: about one a second until the age limit.
    assert len(statuses) >= 3
    failed = results.of("doomed")[-1]
    assert failed.error is not None and failed.error.code == "retries_exhausted"
    assert failed.attempt == len(statuses)
    assert [m.headers["x-smsc-error-code"] for m in dead] == ["retries_exhausted"]
    assert emulator.deliveries == []


async def test_attempts_an_outage_refused_do_not_count_towards_the_subscriber_streak(
    amqp: AmqpSettings,
) -> None:
    """The gateway counts the messages it gets: an attempt refused at the door is none. A
    request retried through an outage must not run its subscriber's streak up to the limit
    and then wait out the gap once the gateway is back."""
    limits = WORKER_LIMITS.model_copy(update={"subscriber_streak": 3, "subscriber_gap_s": 300})
    retry = RetrySettings(base_delay_s=0.3, max_delay_s=0.6)
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp, limits=limits, retry=retry) as (emulator, _),
    ):
        await emulator.faults.refuse_connections()
        await broker.publish({"request_id": "patient", "to": phone(1), "text": "x"})
        await results.wait_until(lambda: results.statuses("patient").count(Status.retrying) >= 5)
        await emulator.faults.accept_connections()
        await results.wait_until(lambda: Status.accepted in results.statuses("patient"), 30)

    codes = {e.error.code for e in results.of("patient") if e.error is not None}
    assert codes == {"smtp_transient"}
    assert emulator.delivered(phone(1), "x") == 1


async def test_error_9_waits_out_the_window_and_retries(amqp: AmqpSettings) -> None:
    # The worker's own window is set shorter than the gateway's, so the gateway's rule trips.
    limits = WORKER_LIMITS.model_copy(update={"identical_window_s": 0.2})
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp, {"duplicate_window_s": 3.0}, limits=limits, retry=FAST_RETRY) as (
            emulator,
            _,
        ),
    ):
        ids = [f"copy-{n}" for n in range(2)]
        for request_id in ids:
            await broker.publish({"request_id": request_id, "to": phone(1), "text": "same"})
            await results.wait_until(lambda r=request_id: Status.submitted in results.statuses(r))
        await results.wait_until(lambda: accepted_once(results, ids), 30)

    assert emulator.errors[9] >= 1
    assert emulator.errors[9] <= 4, "retried faster than the window"
    assert Status.retrying in results.statuses("copy-1")
    assert emulator.delivered(phone(1), "same") == 2


async def test_error_3_pauses_the_account_and_says_why(amqp: AmqpSettings) -> None:
    retry = FAST_RETRY.model_copy(update={"funds_pause_s": 1.0})
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp, {"balance": 0}, retry=retry) as (emulator, service),
    ):
        await broker.publish({"request_id": "broke", "to": phone(1), "text": "x"})
        await results.wait_until(lambda: Status.deferred in results.statuses("broke"))
        assert not service.ready
        await asyncio.sleep(3)

    deferred = [e for e in results.of("broke") if e.status == Status.deferred]
    assert deferred[0].error is not None and deferred[0].error.gateway_error == 3
    assert Status.failed not in results.statuses("broke")
    assert 1 <= emulator.errors[3] <= 4
    assert emulator.deliveries == []


async def test_identical_copies_past_the_limit_can_be_rejected_instead(amqp: AmqpSettings) -> None:
    limits = WORKER_LIMITS.model_copy(update={"identical_policy": "reject"})
    ids = [f"copy-{n}" for n in range(2)]
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp, SHORT_WINDOWS, limits=limits) as (emulator, _),
    ):
        for request_id in ids:
            await broker.publish({"request_id": request_id, "to": phone(1), "text": "same"})
        await results.wait_until(
            lambda: accepted_once(results, ids[:1]) and Status.rejected in results.statuses(ids[1])
        )

    rejected = results.of(ids[1])
    assert [e.error.code for e in rejected if e.error] == ["duplicate"]
    assert emulator.delivered(phone(1), "same") == 1
    assert emulator.errors[9] == 0


async def test_broker_side_closes_mid_stream_lose_nothing_and_double_nothing(
    amqp: AmqpSettings,
) -> None:
    name = f"smsc-worker-test-{uuid.uuid4().hex[:8]}"
    amqp = amqp.model_copy(update={"connection_name": name})
    total = 300
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp, {"latency_s": 0.05}) as (emulator, _),
    ):
        for n in range(total):
            await broker.publish({"request_id": f"m{n}", "to": phone(n), "text": f"t{n}"})
            if n in (100, 200):
                await asyncio.to_thread(close_connection_named, name)
        ids = [f"m{n}" for n in range(total)]
        await results.wait_until(lambda: accepted_once(results, ids), 60)

    counts = Counter(d.recipient for d in emulator.deliveries)
    assert counts == Counter(phone(n) for n in range(total))


async def test_a_request_that_expires_while_waiting_to_be_retried_is_not_sent(
    amqp: AmqpSettings,
) -> None:
    expires = (datetime.now(UTC) + timedelta(seconds=1.5)).isoformat()
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp, retry=FAST_RETRY) as (emulator, _),
    ):
        await emulator.faults.refuse_connections()
        await broker.publish(
            {"request_id": "short-lived", "to": phone(1), "text": "x", "expires_at": expires}
        )
        await results.wait_until(lambda: Status.retrying in results.statuses("short-lived"))
        await asyncio.sleep(1.6)
        await emulator.faults.accept_connections()
        await results.wait_until(lambda: Status.rejected in results.statuses("short-lived"), 20)

    rejected = results.of("short-lived")[-1]
    assert rejected.error is not None and rejected.error.code == "expired"
    assert emulator.deliveries == []


async def test_requests_do_not_wait_at_an_open_circuit_longer_than_one_pause(
    amqp: AmqpSettings,
) -> None:
    retry = FAST_RETRY.model_copy(update={"funds_pause_s": 30.0, "circuit_max_s": 1.0})
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp, {"balance": 0}, retry=retry) as (emulator, service),
    ):
        await broker.publish({"request_id": "first", "to": phone(1), "text": "x"})
        await results.wait_until(lambda: Status.deferred in results.statuses("first"))
        await broker.publish({"request_id": "second", "to": phone(2), "text": "y"})
        await results.wait_until(lambda: Status.deferred in results.statuses("second"), 10)
        # Handed back to RabbitMQ, not held unacked while the account has no funds.
        async with asyncio.timeout(5):
            while service._acker.unacked:
                await asyncio.sleep(0.05)

    deferred = next(e for e in results.of("second") if e.status == Status.deferred)
    assert deferred.error is not None and deferred.error.code == "circuit_open"
    assert emulator.errors[3] == 1


async def test_a_request_returned_to_the_queue_too_often_ends_failed_not_silently_dropped(
    amqp: AmqpSettings,
) -> None:
    amqp = amqp.model_copy(update={"delivery_limit": 2})
    quick = StateSettings(owner_ttl_s=0.3)
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp, state=quick) as (emulator, service),
    ):

        async def unreachable(items: object) -> list[object]:
            raise StateUnavailable("the state store is down for this test")

        # Each delivery is judged with the store down, so it goes back to the queue, until
        # its last delivery before RabbitMQ's limit: that one ends here, with an event.
        service.store.intake = unreachable  # type: ignore[method-assign,assignment]
        await broker.publish({"request_id": "bounced", "to": phone(1), "text": "x"})
        await results.wait_until(lambda: Status.failed in results.statuses("bounced"), 30)
        dead = await broker.dead_letters(1)

    failed = results.of("bounced")[-1]
    assert failed.error is not None and failed.error.code == "delivery_limit"
    assert [m.headers["x-smsc-error-code"] for m in dead] == ["delivery_limit"]
    assert emulator.deliveries == []
