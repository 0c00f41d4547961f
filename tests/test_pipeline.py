"""The worker end to end: real RabbitMQ, real SMTP to the emulator, replies back over SMTP."""

from __future__ import annotations

import asyncio
import subprocess
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from tests.conftest import collecting, gateway_and_worker, phone
from worker.contract import Status
from worker.delivery import ERROR_CODE_HEADER
from worker.emulator.rules import RUSSIAN_DESCRIPTIONS
from worker.lanes import Lane
from worker.protocol.replies import GatewayError
from worker.settings import AmqpSettings, BatchSettings, GatewaySettings, LimitSettings


async def test_a_thousand_requests_go_out_in_few_emails_each_exactly_once(
    amqp: AmqpSettings,
) -> None:
    # A wait long enough that batches fill up to the line limit even on a loaded machine.
    batching = BatchSettings(max_wait_ms=500, max_lines=500)
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp, batch=batching) as (emulator, _),
    ):
        await asyncio.gather(
            *(
                broker.publish({"request_id": f"r{n}", "to": phone(n), "text": f"code {n}"})
                for n in range(1000)
            )
        )
        await results.wait_until(lambda: len(results.with_status(Status.accepted)) == 1000, 60)

        deliveries = Counter((d.phone, d.text) for d in emulator.deliveries)
        assert len(deliveries) == 1000
        assert set(deliveries.values()) == {1}
        assert deliveries[(phone(7).lstrip("+"), "code 7")] + deliveries[(phone(7), "code 7")] == 1
        mails = {d.mail_id for d in emulator.deliveries}
        assert len(mails) <= 50, f"{len(mails)} e-mails for 1000 requests"
        for n in range(1000):
            assert results.statuses(f"r{n}") == [Status.submitted, Status.accepted]
        accepted = results.of("r3")[-1]
        assert accepted.gateway_id in mails
        assert accepted.sms_parts == 1 and accepted.sms_count == 1


async def test_requests_with_different_options_never_share_an_email(amqp: AmqpSettings) -> None:
    later = (datetime.now(UTC) + timedelta(hours=2)).isoformat()
    requests = [
        {"request_id": "alpha-1", "to": phone(1), "text": "a", "sender": "Alpha"},
        {"request_id": "alpha-2", "to": phone(2), "text": "b", "sender": "Alpha"},
        {"request_id": "beta-1", "to": phone(3), "text": "c", "sender": "Beta"},
        {"request_id": "flash-1", "to": phone(4), "text": "d", "channel": "flash"},
        {"request_id": "later-1", "to": phone(5), "text": "e", "send_at": later},
        {"request_id": "plain-1", "to": phone(6), "text": "f"},
    ]
    async with collecting(amqp) as (broker, results), gateway_and_worker(amqp):
        for request in requests:
            await broker.publish(request)
        ids = [r["request_id"] for r in requests]
        await results.wait_until(lambda: all(Status.accepted in results.statuses(i) for i in ids))
    mail_of = {i: results.of(i)[-1].gateway_id for i in ids}
    assert mail_of["alpha-1"] == mail_of["alpha-2"]
    others = [mail_of[i] for i in ("alpha-1", "beta-1", "flash-1", "later-1", "plain-1")]
    assert len(set(others)) == len(others)


async def test_each_kind_of_bad_input_is_rejected_and_dead_lettered(amqp: AmqpSettings) -> None:
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    bad: list[tuple[str | None, bytes | dict[str, object], str]] = [
        (None, b"this is not json", "not_json"),
        ("no-text", {"request_id": "no-text", "to": phone(1)}, "invalid_schema"),
        ("bad-phone", {"request_id": "bad-phone", "to": "+7000", "text": "x"}, "invalid_phone"),
        ("junk-to", {"request_id": "junk-to", "to": "hello", "text": "x"}, "invalid_recipient"),
        (
            "too-long",
            {"request_id": "too-long", "to": phone(2), "text": "x" * 1001},
            "text_too_long",
        ),
        (
            "expired",
            {"request_id": "expired", "to": phone(3), "text": "x", "expires_at": past},
            "expired",
        ),
        (
            "prefix",
            {"request_id": "prefix", "to": phone(4), "text": "__VIBER__:hi"},
            "reserved_prefix",
        ),
    ]
    async with collecting(amqp) as (broker, results), gateway_and_worker(amqp) as (emulator, _):
        for _, body, _ in bad:
            await broker.publish(body)
        await broker.publish({"request_id": "good", "to": phone(9), "text": "still working"})
        await results.wait_until(lambda: Status.accepted in results.statuses("good"))
        await results.wait_until(lambda: len(results.with_status(Status.rejected)) == len(bad))
        dead = await broker.dead_letters(len(bad))

    rejected = results.with_status(Status.rejected)
    assert sorted(e.error.code for e in rejected if e.error) == sorted(code for *_, code in bad)
    for request_id, _, code in bad:
        if request_id is not None:
            assert [e.error.code for e in results.of(request_id) if e.error] == [code]
    assert len(dead) == len(bad)
    assert sorted(str(m.headers[ERROR_CODE_HEADER]) for m in dead) == sorted(c for *_, c in bad)
    assert [d.text for d in emulator.deliveries] == ["still working"]


async def test_a_text_with_colons_newlines_cyrillic_and_emoji_arrives_unchanged(
    amqp: AmqpSettings,
) -> None:
    text = "Код: 12:34\nПривет, мир; a,b\\c 😀\nend"
    async with collecting(amqp) as (broker, results), gateway_and_worker(amqp) as (emulator, _):
        await broker.publish({"request_id": "tricky", "to": [phone(1), phone(2)], "text": text})
        await broker.publish({"request_id": "plain", "to": phone(3), "text": "plain"})
        await results.wait_until(
            lambda: all(Status.accepted in results.statuses(i) for i in ("tricky", "plain"))
        )
    texts = Counter(d.text for d in emulator.deliveries)
    assert texts == Counter({text: 2, "plain": 1})


async def test_results_also_go_to_reply_to_with_correlation_id(amqp: AmqpSettings) -> None:
    async with collecting(amqp) as (broker, results), gateway_and_worker(amqp):
        inbox = await broker.channel.declare_queue(exclusive=True, auto_delete=True)
        await broker.publish(
            {"request_id": "rpc", "to": phone(1), "text": "hi", "metadata": {"order": 42}},
            reply_to=inbox.name,
            correlation_id="corr-1",
        )
        await results.wait_until(lambda: Status.accepted in results.statuses("rpc"))
        got = []
        for _ in range(2):
            message = await inbox.get(timeout=5)
            await message.ack()
            got.append(message)
    assert [m.correlation_id for m in got] == ["corr-1", "corr-1"]
    assert all(e.metadata == {"order": 42} for e in results.of("rpc"))


async def test_the_work_queues_are_quorum_queues_with_a_delivery_limit_and_dead_lettering(
    amqp: AmqpSettings,
) -> None:
    async with gateway_and_worker(amqp):
        listing = await asyncio.to_thread(
            subprocess.run,
            ["rabbitmqctl", "-q", "list_queues", "name", "type", "arguments"],
            capture_output=True,
            text=True,
            check=True,
        )
    rows = {row.split("\t")[0]: row for row in listing.stdout.splitlines()}
    for lane in Lane:
        line = rows[amqp.queue(lane)]
        assert "\tquorum\t" in line
        assert "x-delivery-limit" in line
        assert amqp.dead_letter_exchange in line
        assert "at-least-once" in line


async def test_the_account_pace_spreads_emails_out(amqp: AmqpSettings) -> None:
    pace = LimitSettings(mails_per_second=2, parts_per_second=100_000)
    senders = ["Alpha", "Beta", "Gamma", "Delta", "Epsilon"]
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp, limits=pace) as (emulator, _),
    ):
        for n, sender in enumerate(senders):
            await broker.publish(
                {"request_id": f"p{n}", "to": phone(n), "text": "x", "sender": sender}
            )
        ids = [f"p{n}" for n in range(len(senders))]
        await results.wait_until(lambda: all(Status.accepted in results.statuses(i) for i in ids))
    times = sorted(d.accepted_at for d in emulator.deliveries)
    assert len(times) == 5
    # A bucket of two per second: the last three e-mails wait about half a second each.
    assert times[-1] - times[0] >= 1.2


async def test_international_numbers_without_plus_are_accepted_and_delivered_once(
    amqp: AmqpSettings,
) -> None:
    numbers = ["380501234567", "375291234567", "998901234567", "447911123456", "84951234567"]
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp) as (emulator, _),
    ):
        for n, number in enumerate(numbers):
            await broker.publish({"request_id": f"intl-{n}", "to": number, "text": f"intl {n}"})
        ids = [f"intl-{n}" for n in range(len(numbers))]
        await results.wait_until(lambda: all(Status.accepted in results.statuses(i) for i in ids))
    for n, number in enumerate(numbers[:4]):
        assert results.statuses(f"intl-{n}") == [Status.submitted, Status.accepted]
        assert emulator.delivered("+" + number, f"intl {n}") == 1
    # Valid both ways: the default region's national reading (Moscow) wins.
    assert emulator.delivered("+74951234567", "intl 4") == 1
    assert emulator.delivered("+84951234567", "intl 4") == 0
    assert len(emulator.deliveries) == len(numbers)


async def test_the_international_reading_wins_when_national_first_is_off(
    amqp: AmqpSettings,
) -> None:
    gateway = GatewaySettings(national_first=False)
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp, gateway=gateway) as (emulator, _),
    ):
        await broker.publish({"request_id": "vn", "to": "84951234567", "text": "xin chao"})
        await results.wait_until(lambda: Status.accepted in results.statuses("vn"))
    assert emulator.delivered("+84951234567", "xin chao") == 1
    assert emulator.delivered("+74951234567", "xin chao") == 0
    assert [d.phone for d in emulator.deliveries] == ["+84951234567"]


@pytest.mark.parametrize("charset", ["cp1251", "koi8-r"])
async def test_russian_replies_with_no_charset_declared_are_read(
    amqp: AmqpSettings, charset: str
) -> None:
    gateway = {"reply_charset": charset, "denied_words": frozenset({"casino"})}
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp, gateway) as (emulator, service),
    ):
        await broker.publish({"request_id": "fine", "to": phone(1), "text": "hello"})
        # A sender of its own keeps the denied text in an e-mail of its own.
        await broker.publish(
            {"request_id": "denied", "to": phone(2), "text": "best casino", "sender": "Other"}
        )
        await results.wait_until(
            lambda: (
                Status.accepted in results.statuses("fine")
                and Status.failed in results.statuses("denied")
            )
        )
        unreadable = service.telemetry.metrics.registry.get_sample_value(
            "smsc_replies_unreadable_total"
        )
    assert unreadable == 0
    assert [r.reply_text is not None for r in emulator.mails] == [True, True]
    (failed,) = [e for e in results.of("denied") if e.status == Status.failed]
    assert failed.error is not None and failed.error.gateway_error == 6
    # The description, in a charset no header named, still reads as the gateway wrote it.
    assert RUSSIAN_DESCRIPTIONS[GatewayError.message_denied] in failed.error.message
    assert emulator.delivered(phone(1), "hello") == 1
