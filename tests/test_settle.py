"""Every path of the settler: what is not confirmed goes back to the queue, a ledger step
that fails is kept and applied later, acks for a closed channel are skipped and counted,
hostile bodies end rejected and dead-lettered without holding back the rest, and the
worker's own headers are trusted only when they carry its signature.

The seams are real: a publish or a store call that fails on the service instance, a
connection closed from the broker's side. The broker, SMTP and the gateway are real.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.conftest import Broker as RequestsClient
from tests.conftest import collecting, gateway_and_worker, phone
from tests.test_limits_and_retries import close_connection_named
from worker.broker import Outgoing
from worker.contract import SendRequest, Status
from worker.delivery import (
    ATTEMPT_HEADER,
    ERROR_CODE_HEADER,
    FIRST_SEEN_HEADER,
    GROUP_HEADER,
    SIGNATURE_HEADER,
    WORKER_HEADERS,
    Delivery,
    ForgedHeaders,
    HeaderSigner,
    Provenance,
    RequestCopy,
)
from worker.fate import Fail, Later, Reject, Subject, give_up_or_later, read_request, request_id_of
from worker.ledger import Finish, StateUnavailable
from worker.service import Arrival, Service
from worker.settings import (
    AmqpSettings,
    ObservabilitySettings,
    RetrySettings,
    StateSettings,
)

FAST_RETRY = RetrySettings(base_delay_s=1, max_delay_s=2, circuit_base_s=1, circuit_max_s=2)
# No reply e-mails: a request stays `sent` in the ledger, so a redelivery is answered with
# its `submitted` event again, deterministically. The worker then waits for replies only
# as long as its drain time.
NO_REPLIES: dict[str, Any] = {"reply_relay": None}
QUICK_DRAIN = ObservabilitySettings(drain_timeout_s=1)


async def eventually(condition: Callable[[], bool], timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


async def waiting_in(broker: RequestsClient, queue_name: str) -> int:
    queue = await broker.channel.declare_queue(queue_name, passive=True)
    count = queue.declaration_result.message_count
    assert count is not None
    return count


def recording_reads(service: Service, monkeypatch: pytest.MonkeyPatch) -> list[Delivery]:
    """Every delivery the consumer reads, in order (redeliveries and retry copies too)."""
    seen: list[Delivery] = []
    real_read = service._read

    def read(delivery: Delivery) -> Arrival:
        seen.append(delivery)
        return real_read(delivery)

    monkeypatch.setattr(service, "_read", read)
    return seen


def failing_publish(
    service: Service,
    monkeypatch: pytest.MonkeyPatch,
    times: int,
    when: Callable[[Sequence[Outgoing], Sequence[Any], Sequence[Any]], bool],
) -> list[int]:
    """Make the first `times` publishes that match `when` go unconfirmed; the rest go
    through to RabbitMQ. Returns the list the failures are counted in."""
    real_publish = service.broker.publish
    failures: list[int] = []

    async def publish(
        events: Sequence[Outgoing] = (),
        dead_letters: Sequence[tuple[RequestCopy, str, str]] = (),
        delays: Sequence[tuple[RequestCopy, float, Mapping[str, Any]]] = (),
    ) -> None:
        if len(failures) < times and when(events, dead_letters, delays):
            failures.append(len(events) + len(dead_letters) + len(delays))
            raise TimeoutError("the broker's confirm never came")
        await real_publish(events, dead_letters, delays)

    monkeypatch.setattr(service.broker, "publish", publish)
    return failures


# 1. a publish that is not confirmed --------------------------------------------------------


async def test_an_unconfirmed_publish_returns_its_requests_to_the_queue_and_loses_nothing(
    amqp: AmqpSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp, NO_REPLIES, observability=QUICK_DRAIN) as (emulator, service),
    ):
        reads = recording_reads(service, monkeypatch)
        failures = failing_publish(
            service,
            monkeypatch,
            2,
            lambda events, _d, _r: any(o.event.status == Status.submitted for o in events),
        )
        await broker.publish({"request_id": "unconfirmed", "to": phone(1), "text": "once"})
        await results.wait_until(lambda: Status.submitted in results.statuses("unconfirmed"), 12)
        await eventually(lambda: service._acker.unacked == 0)
        left = await waiting_in(broker, amqp.requests_queue)

    # The e-mail went out once; its first two `submitted` events were not confirmed, so the
    # request went back to the queue (twice) and its redelivery was answered from the
    # ledger: the same event, never a second e-mail.
    assert len(failures) == 2
    assert [(d.recipient, d.text) for d in emulator.deliveries] == [(phone(1), "once")]
    events = results.of("unconfirmed")
    assert {e.status for e in events} == {Status.submitted}
    assert len({e.event_id for e in events}) == 1
    assert any(d.redelivered for d in reads), "the request was never handed back"
    assert left == 0


async def test_a_reply_whose_events_are_not_confirmed_is_asked_again_and_still_counts(
    amqp: AmqpSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp) as (emulator, service),
    ):
        failures = failing_publish(
            service,
            monkeypatch,
            1,
            lambda events, _d, _r: any(o.event.status == Status.accepted for o in events),
        )
        await broker.publish({"request_id": "answered", "to": phone(1), "text": "once"})
        # The first try of the reply is answered 451 (its events were not confirmed); the
        # gateway's mail server sends it again, and it must still find its e-mail.
        await results.wait_until(lambda: Status.accepted in results.statuses("answered"), 20)

    assert failures == [1]
    assert results.statuses("answered") == [Status.submitted, Status.accepted]
    assert [(d.recipient, d.text) for d in emulator.deliveries] == [(phone(1), "once")]


async def test_an_unconfirmed_dead_letter_is_dead_lettered_once_later(
    amqp: AmqpSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp) as (_, service),
    ):
        failures = failing_publish(service, monkeypatch, 1, lambda _e, dead, _r: bool(dead))
        await broker.publish(b"not json at all", message_id="poison-1")
        await broker.publish({"request_id": "fine", "to": phone(2), "text": "fine"})
        await results.wait_until(lambda: len(results.with_status(Status.rejected)) >= 1)
        await results.wait_until(lambda: Status.accepted in results.statuses("fine"))
        dead = await broker.dead_letters(1)
        await eventually(lambda: service._acker.unacked == 0)
        left = await waiting_in(broker, amqp.requests_queue)

    assert failures == [2]  # its `rejected` event and its dead-letter copy
    assert [m.headers[ERROR_CODE_HEADER] for m in dead] == ["not_json"]
    rejected = results.with_status(Status.rejected)
    assert len({e.event_id for e in rejected}) == 1
    assert left == 0


# 2. a ledger step that fails ---------------------------------------------------------------


async def test_a_ledger_step_that_fails_is_kept_acked_and_applied_when_the_store_answers(
    amqp: AmqpSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    store_down = True
    refused: list[Finish] = []
    request = {"request_id": "ledger-late", "to": phone(3), "text": "recorded late"}
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(
            amqp,
            NO_REPLIES,
            observability=QUICK_DRAIN,
            state=StateSettings(owner_ttl_s=1.5),
        ) as (emulator, service),
    ):
        real_finish = service.store.finish

        async def finish(step: Finish) -> None:
            if store_down:
                refused.append(step)
                raise StateUnavailable("the store does not answer")
            await real_finish(step)

        monkeypatch.setattr(service.store, "finish", finish)
        await broker.publish(request)
        await results.wait_until(lambda: Status.submitted in results.statuses("ledger-late"))
        # Published and acked although the ledger did not take the step: it is kept.
        await eventually(lambda: service._acker.unacked == 0)
        assert [(name, list(step.sent)) for name, step in service.settler.backlog] == [
            ("default", ["ledger-late"])
        ]
        assert await waiting_in(broker, amqp.requests_queue) == 0

        store_down = False
        await eventually(lambda: not service.settler.backlog and service.state_ok)
        # A producer publishes the same request again: answered from the ledger.
        await broker.publish(request)
        await results.wait_until(lambda: len(results.of("ledger-late")) == 2)
        await eventually(lambda: service._acker.unacked == 0)
        left = await waiting_in(broker, amqp.requests_queue)

    assert refused and "ledger-late" in refused[0].sent
    assert emulator.delivered(phone(3), "recorded late") == 1
    assert len(emulator.deliveries) == 1
    events = results.of("ledger-late")
    assert [e.status for e in events] == [Status.submitted, Status.submitted]
    assert len({e.event_id for e in events}) == 1
    assert left == 0


# 3. acks on a channel that closed ----------------------------------------------------------


async def test_acks_for_a_closed_channel_are_skipped_and_counted_never_raised(
    amqp: AmqpSettings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    name = f"smsc-worker-test-{uuid.uuid4().hex[:8]}"
    amqp = amqp.model_copy(update={"connection_name": name})
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp, {"latency_s": 3.0}) as (emulator, service),
    ):
        registry = service.telemetry.metrics.registry
        before = registry.get_sample_value("smsc_settle_skipped_total") or 0
        await broker.publish({"request_id": "closed-ch", "to": phone(4), "text": "one ack"})
        await emulator.wait_for_mails(1, timeout_s=10)
        # The gateway holds its 250 for 3 s: the ack that follows it finds its channel gone.
        await asyncio.to_thread(close_connection_named, name)
        await results.wait_until(
            lambda: {Status.submitted, Status.accepted} <= set(results.statuses("closed-ch")), 15
        )
        await eventually(lambda: service._acker.unacked == 0)
        skipped = (registry.get_sample_value("smsc_settle_skipped_total") or 0) - before
        left = await waiting_in(broker, amqp.requests_queue)
    gc.collect()
    await asyncio.sleep(0)

    assert skipped >= 1
    assert len(emulator.deliveries) == 1
    assert Status.rejected not in results.statuses("closed-ch")
    # `msg`, not `getMessage()`: aio-pika logs objects whose repr fails once closed.
    loud = [
        str(r.msg)
        for r in caplog.records
        if "never retrieved" in str(r.msg) or str(r.msg).startswith("submission failed")
    ]
    assert loud == []
    assert left == 0


# 4. hostile bodies through the real consumer -----------------------------------------------


def _valid(request_id: str, n: int) -> bytes:
    return json.dumps(
        {"request_id": request_id, "to": phone(n), "text": f"t-{request_id}"}
    ).encode()


async def test_hostile_bodies_are_rejected_and_dead_lettered_and_the_rest_is_sent(
    amqp: AmqpSettings,
) -> None:
    to = phone(90)
    now = int(time.time())
    poison: list[tuple[str | None, bytes, dict[str, Any], str]] = [
        (None, b"[" * 1000, {}, "not_json"),
        (
            None,
            b'{"request_id": "\\ud800", "to": "' + to.encode() + b'", "text": "x"}',
            {},
            "not_json",
        ),
        (
            "surrogate-text",
            b'{"request_id": "surrogate-text", "to": "' + to.encode() + b'", "text": "a\\ud800"}',
            {},
            "not_json",
        ),
        (
            None,
            b'{"request_id": "latin-1", "to": "+79160000090", "text": "caf\xe9"}',
            {},
            "not_json",
        ),
        (None, b"", {}, "not_json"),
        (
            None,
            b'[{"request_id": "in-array", "to": "+79160000090", "text": "x"}]',
            {},
            "invalid_schema",
        ),
        ("forged-attempt", _valid("forged-attempt", 91), {ATTEMPT_HEADER: -1}, "forged_header"),
        (
            "forged-seen",
            _valid("forged-seen", 92),
            {FIRST_SEEN_HEADER: now - 86_400},
            "forged_header",
        ),
        (
            "forged-sig",
            _valid("forged-sig", 93),
            {
                ATTEMPT_HEADER: 5,
                FIRST_SEEN_HEADER: now,
                GROUP_HEADER: "",
                SIGNATURE_HEADER: "0" * 32,
            },
            "forged_header",
        ),
    ]
    valid = [f"valid-{n}" for n in range(len(poison) + 1)]
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp) as (emulator, service),
    ):
        await broker.publish(_valid(valid[0], 0))
        for n, (_, body, headers, _) in enumerate(poison, start=1):
            await broker.publish(body, headers=headers)
            await broker.publish(_valid(valid[n], n))
        await results.wait_until(
            lambda: (
                all(Status.accepted in results.statuses(r) for r in valid)
                and len(results.with_status(Status.rejected)) >= len(poison)
            ),
            15,
        )
        dead = await broker.dead_letters(len(poison))
        await eventually(lambda: service._acker.unacked == 0)
        left = await waiting_in(broker, amqp.requests_queue)

    rejected = results.with_status(Status.rejected)
    assert len(rejected) == len(poison)
    assert Counter(e.error.code for e in rejected if e.error) == Counter(c for *_, c in poison)
    for request_id, *_, code in poison:
        if request_id is not None:
            assert [(e.status, e.error and e.error.code) for e in results.of(request_id)] == [
                (Status.rejected, code)
            ]
    unreadable = [e for e in rejected if e.request_id is None]
    assert len(unreadable) == sum(1 for rid, *_ in poison if rid is None)
    assert len(dead) == len(poison)
    assert Counter(str(m.headers[ERROR_CODE_HEADER]) for m in dead) == Counter(
        c for *_, c in poison
    )
    # Only the valid requests went out, each once; none of the forged ones.
    assert Counter(d.text for d in emulator.deliveries) == Counter(f"t-{r}" for r in valid)
    assert left == 0


# 5. the worker's own retry copies verify ---------------------------------------------------


async def test_a_retry_copy_published_by_the_worker_carries_a_signature_that_verifies(
    amqp: AmqpSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp, retry=FAST_RETRY) as (emulator, service),
    ):
        reads = recording_reads(service, monkeypatch)
        await emulator.faults.refuse_connections()
        await broker.publish({"request_id": "signed", "to": phone(5), "text": "again"})
        await results.wait_until(lambda: Status.retrying in results.statuses("signed"))
        await emulator.faults.accept_connections()
        await results.wait_until(lambda: Status.accepted in results.statuses("signed"), 12)

    copies = [d for d in reads if SIGNATURE_HEADER in d.headers]
    assert copies, "no retry copy came back through the queue"
    provenance = service.signer.read(copies[0].body, copies[0].headers)
    assert provenance.attempt >= 2
    assert Status.rejected not in results.statuses("signed")
    accepted = [e for e in results.of("signed") if e.status == Status.accepted]
    assert accepted[0].attempt is not None and accepted[0].attempt >= 2
    assert len(emulator.deliveries) == 1


# 6. HeaderSigner ---------------------------------------------------------------------------

BODY = b'{"request_id": "h", "to": "+79160000001", "text": "x"}'
SIGNER = HeaderSigner(b"test key")


def signed(**changes: Any) -> dict[str, Any]:
    headers = SIGNER.headers(BODY, Provenance(3, 1_700_000_000.0, "g.1"))
    headers.update(changes)
    return headers


def test_signed_headers_read_back_as_their_provenance() -> None:
    assert SIGNER.read(BODY, signed()) == Provenance(3, 1_700_000_000.0, "g.1")
    # A producer's own request carries none of them, and other headers do not matter.
    assert SIGNER.read(BODY, {}) == Provenance()
    assert SIGNER.read(BODY, {"traceparent": "00-x", "x-other": 1}) == Provenance()


def test_a_first_seen_left_out_is_now() -> None:
    headers = SIGNER.headers(BODY, Provenance(2))
    assert abs(headers[FIRST_SEEN_HEADER] - time.time()) < 5
    assert SIGNER.read(BODY, headers).attempt == 2


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        pytest.param(BODY.replace(b'"x"', b'"y"'), signed(), id="tampered-body"),
        pytest.param(BODY, signed(**{ATTEMPT_HEADER: 4}), id="tampered-attempt"),
        pytest.param(BODY, signed(**{FIRST_SEEN_HEADER: 1_700_000_001}), id="tampered-first-seen"),
        pytest.param(BODY, signed(**{GROUP_HEADER: "g.0"}), id="tampered-group"),
        pytest.param(BODY, signed(**{SIGNATURE_HEADER: "0" * 32}), id="made-up-signature"),
        pytest.param(BODY, signed(**{ATTEMPT_HEADER: "3"}), id="attempt-as-text"),
        pytest.param(BODY, signed(**{ATTEMPT_HEADER: 3.0}), id="attempt-as-float"),
        pytest.param(BODY, signed(**{FIRST_SEEN_HEADER: 1_700_000_000.0}), id="first-seen-float"),
        pytest.param(BODY, signed(**{GROUP_HEADER: 1}), id="group-not-text"),
        pytest.param(BODY, signed(**{GROUP_HEADER: "g" * 201}), id="group-too-long"),
        pytest.param(BODY, signed(**{SIGNATURE_HEADER: b"sig"}), id="signature-bytes"),
        pytest.param(BODY, signed(**{SIGNATURE_HEADER: None}), id="signature-none"),
        pytest.param(BODY, signed(**{ATTEMPT_HEADER: -1}), id="attempt-negative"),
        pytest.param(BODY, signed(**{ATTEMPT_HEADER: 0}), id="attempt-zero"),
        pytest.param(BODY, signed(**{ATTEMPT_HEADER: 10**30}), id="attempt-huge"),
        pytest.param(BODY, signed(**{FIRST_SEEN_HEADER: 2**41}), id="first-seen-huge"),
        pytest.param(BODY, signed(**{FIRST_SEEN_HEADER: -1}), id="first-seen-negative"),
    ],
)
def test_tampered_or_malformed_headers_are_forged(body: bytes, headers: dict[str, Any]) -> None:
    with pytest.raises(ForgedHeaders):
        SIGNER.read(body, headers)


def test_a_bool_is_not_an_attempt_even_with_a_signature_for_its_int_value() -> None:
    # True == 1 in Python; a header table can carry a bool: it must not pass for 1.
    headers = SIGNER.headers(BODY, Provenance(1, 1_700_000_000.0, ""))
    assert SIGNER.read(BODY, headers).attempt == 1
    with pytest.raises(ForgedHeaders):
        SIGNER.read(BODY, {**headers, ATTEMPT_HEADER: True})
    # Not even when the set is signed with the key: a bool is never taken for a count.
    with pytest.raises(ForgedHeaders):
        SIGNER.read(BODY, SIGNER.headers(BODY, Provenance(True, 1_700_000_000.0, "")))


@pytest.mark.parametrize("missing", WORKER_HEADERS)
def test_any_one_header_missing_is_forged(missing: str) -> None:
    # Also from a set of default-looking values, so that no header may be assumed.
    for provenance in (Provenance(3, 1_700_000_000.0, "g.1"), Provenance(1, 1.0, "")):
        headers = SIGNER.headers(BODY, provenance)
        del headers[missing]
        with pytest.raises(ForgedHeaders):
            SIGNER.read(BODY, headers)


@pytest.mark.parametrize(
    "provenance",
    [
        Provenance(0, 1_700_000_000.0, ""),
        Provenance(-1, 1_700_000_000.0, ""),
        Provenance(1_000_001, 1_700_000_000.0, ""),
        Provenance(10**30, 1_700_000_000.0, ""),
        Provenance(1, float(2**40 + 1), ""),
        Provenance(1, 1_700_000_000.0, "g" * 201),
    ],
    ids=["attempt-0", "attempt-neg", "attempt-over", "attempt-huge", "seen-huge", "long-group"],
)
def test_out_of_range_values_are_refused_even_when_signed(provenance: Provenance) -> None:
    with pytest.raises(ForgedHeaders):
        SIGNER.read(BODY, SIGNER.headers(BODY, provenance))


def test_another_key_does_not_verify() -> None:
    with pytest.raises(ForgedHeaders):
        HeaderSigner(b"another key").read(BODY, signed())


# 7. reading hostile bodies, and when to give up ---------------------------------------------

HOSTILE: list[tuple[bytes, str, str | None]] = [
    (b"[" * 1000, "not_json", None),
    (b"[" * 100_000, "not_json", None),
    (b'{"a":' * 50_000, "not_json", None),
    (b'{"request_id": "deep", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "not_json", None),
    (b'{"request_id": "\\ud800", "to": "+79160000001", "text": "x"}', "not_json", None),
    (b'{"request_id": "lone", "to": "+79160000001", "text": "a\\udc00b"}', "not_json", "lone"),
    (b'{"request_id": "bytes", "to": "+79160000001", "text": "\xff\xfe"}', "not_json", None),
    (b"\xc3\x28", "not_json", None),
    (b"", "not_json", None),
    (b"   ", "not_json", None),
    (b"null", "invalid_schema", None),
    (b'"a string"', "invalid_schema", None),
    (b'[{"request_id": "arr", "to": "+79160000001", "text": "x"}]', "invalid_schema", None),
    (b'{"request_id": 5, "to": "+79160000001", "text": "x"}', "invalid_schema", None),
    (b'{"request_id": "no-text", "to": "+79160000001"}', "invalid_schema", "no-text"),
    (b'{"request_id": "a b", "text": 1}', "invalid_schema", None),
    (b'{"request_id": "' + b"r" * 129 + b'"}', "invalid_schema", None),
    (b'{"request_id": "big", "n": 1' + b"0" * 5000 + b"}", "not_json", None),
]


@pytest.mark.parametrize(("body", "code", "request_id"), HOSTILE)
def test_hostile_bodies_are_read_without_an_exception(
    body: bytes, code: str, request_id: str | None
) -> None:
    parsed = read_request(body)
    assert isinstance(parsed, Reject)
    assert parsed.code == code
    assert parsed.dead_letter
    assert len(parsed.reason) <= 1000
    parsed.reason.encode()  # printable, no lone surrogate
    assert request_id_of(body) == request_id


def test_a_valid_body_is_read_and_its_id_is_readable() -> None:
    body = _valid("good-1", 1)
    assert isinstance(read_request(body), SendRequest)
    assert request_id_of(body) == "good-1"


RETRY = RetrySettings(base_delay_s=1, max_delay_s=2, max_age_s=60)


def subject(attempt: int, age_s: float, now: float) -> Subject:
    return Subject(None, "r", RequestCopy(b"{}", {}), attempt=attempt, first_seen=now - age_s)


def test_a_young_request_is_retried_however_many_attempts_it_had() -> None:
    now = time.time()
    for attempt in (1, 2, 50, 10_000):
        fate = give_up_or_later(subject(attempt, 0, now), None, RETRY, now, "refused")
        assert isinstance(fate, Later), attempt
        assert fate.status == Status.retrying and fate.next_attempt
        assert 0.5 <= fate.wait <= RETRY.max_delay_s


def test_age_ends_the_retries() -> None:
    now = time.time()
    # The longest wait (2 s) still lands within the age bound; the shortest (0.5 s) not.
    assert isinstance(give_up_or_later(subject(1, 57, now), None, RETRY, now, "x"), Later)
    fate = give_up_or_later(subject(1, 59.6, now), None, RETRY, now, "refused")
    assert isinstance(fate, Fail)
    assert fate.code == "retries_exhausted" and fate.refund
    assert "refused" in fate.reason


def test_the_requests_own_expiry_ends_the_retries() -> None:
    now = time.time()
    soon = datetime.fromtimestamp(now, UTC) + timedelta(milliseconds=100)
    fate = give_up_or_later(subject(1, 0, now), soon, RETRY, now, "refused")
    assert isinstance(fate, Reject) and fate.code == "expired"
    later = datetime.fromtimestamp(now, UTC) + timedelta(minutes=10)
    assert isinstance(give_up_or_later(subject(1, 0, now), later, RETRY, now, "x"), Later)


async def test_a_background_loop_that_fails_is_started_again(
    amqp: AmqpSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp, observability=QUICK_DRAIN) as (_, service),
    ):
        real_judge = service._judge
        failed: list[int] = []

        async def judge_with_a_bug(burst: list[Any]) -> None:
            if not failed:
                failed.append(len(burst))
                raise RuntimeError("a bug in the intake")
            await real_judge(burst)

        monkeypatch.setattr(service, "_judge", judge_with_a_bug)
        await broker.publish({"request_id": "hit-by-the-bug", "to": phone(1), "text": "a"})
        await eventually(lambda: bool(failed))
        await broker.publish({"request_id": "after-the-bug", "to": phone(2), "text": "b"})
        await results.wait_until(lambda: Status.accepted in results.statuses("after-the-bug"))

    assert failed == [1]
