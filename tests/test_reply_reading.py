"""Replies as intermediate mail systems deliver them, read by a running worker (real
RabbitMQ, the real reply listener): a body in cp1251 with no charset declared and a full
stop after the ID, an SMS count that differs from the worker's, and a reply that cannot be
read at all (kept, masked, in the dead letters)."""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import logging
from types import SimpleNamespace

import aiosmtplib
import pytest

from tests.conftest import collecting, gateway_and_worker
from tests.test_reply_security import GATEWAY, NO_REPLIES, submitted_mail
from worker.contract import Status
from worker.logs import MASK
from worker.reply_receiver import ReplyAddresses, ReplyHandler, UnreadableCopy, masked_mail
from worker.service import Service
from worker.settings import AmqpSettings


async def send_raw(port: int, to: str, raw: bytes) -> None:
    await aiosmtplib.send(
        raw,
        hostname="127.0.0.1",
        port=port,
        sender=GATEWAY,
        recipients=[to],
        start_tls=False,
        timeout=10,
    )


def mismatches(service: Service) -> float:
    value = service.telemetry.metrics.registry.get_sample_value("smsc_reply_parts_mismatch_total")
    return value or 0.0


async def test_a_cp1251_reply_without_a_charset_and_a_full_stop_is_read(
    amqp: AmqpSettings,
) -> None:
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp, NO_REPLIES) as (_, service),
    ):
        mail_id = await submitted_mail(broker, results, "cp-1", 1)
        body = f"Ваше сообщение принято.\r\nOK - 1 SMS, ID - {mail_id}.\r\n".encode("cp1251")
        raw = b"From: " + GATEWAY.encode() + b"\r\nSubject: Re:\r\n\r\n" + body
        await send_raw(service.reply_port, service.reply_addresses.address(mail_id), raw)
        await results.wait_until(lambda: Status.accepted in results.statuses("cp-1"))
        assert mismatches(service) == 0


async def test_an_sms_count_that_differs_is_logged_counted_and_still_accepted(
    amqp: AmqpSettings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp, NO_REPLIES) as (_, service),
    ):
        mail_id = await submitted_mail(broker, results, "parts-1", 1)
        raw = f"From: {GATEWAY}\r\n\r\nOK - 3 SMS, ID - {mail_id}, balance - 10\r\n".encode()
        await send_raw(service.reply_port, service.reply_addresses.address(mail_id), raw)
        await results.wait_until(lambda: Status.accepted in results.statuses("parts-1"))
        assert mismatches(service) == 1
    logged = [r for r in caplog.records if "the worker expected" in r.getMessage()]
    assert len(logged) == 1
    assert logged[0].levelno == logging.WARNING
    assert "counted 3 SMS, the worker expected 1" in logged[0].getMessage()


def test_masked_mail_blanks_secrets_in_the_bytes_and_inside_encoded_parts() -> None:
    quoted = "> login:s3cret-pw:abc::0,0,,1::79991234567:hi\n"
    plain = f"Subject: Re:\r\n\r\nThank you\r\n{quoted}".encode()
    assert b"s3cret-pw" not in masked_mail(plain, ["s3cret-pw"])
    assert MASK.encode() in masked_mail(plain, ["s3cret-pw"])
    encoded = (
        b"Subject: Re:\r\nContent-Type: text/plain; charset=koi8-r\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(("Спасибо\n" + quoted).encode("koi8-r"))
    )
    masked = masked_mail(encoded, ["s3cret-pw"])
    assert b"s3cret-pw" not in masked
    message = email.message_from_bytes(masked, policy=email.policy.compat32)
    payload = message.get_payload(decode=True)
    assert isinstance(payload, bytes)
    assert payload.decode("koi8-r") == "Спасибо\n" + quoted.replace("s3cret-pw", MASK)
    # Nothing to mask: the bytes as received.
    assert masked_mail(encoded, ["absent-secret"]) == encoded
    assert masked_mail(encoded, []) == encoded


async def test_an_unreadable_reply_is_kept_masked_in_the_dead_letters_and_counted(
    amqp: AmqpSettings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp, NO_REPLIES) as (_, service),
    ):
        mail_id = await submitted_mail(broker, results, "garbled-1", 1)
        address = service.reply_addresses.address(mail_id)
        token = address.rpartition("@")[0].rpartition(".")[2]
        password = service.settings.gateway.password.get_secret_value()
        quoted = f"> login:{password}:{mail_id}::0,0,,1::79991234567:hi\r\n"
        raw = (
            f"From: {GATEWAY}\r\nTo: {address}\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        ).encode() + base64.encodebytes(f"Something went wrong\r\n{quoted}".encode())
        await send_raw(service.reply_port, address, raw)  # answered 250
        (dead,) = await broker.dead_letters(1)
        await asyncio.sleep(0.3)
        assert results.statuses("garbled-1") == [Status.submitted]
        assert unreadable(service) == 1
        # The e-mail keeps its record: a readable reply (sent again) still settles it.
        answer = f"From: {GATEWAY}\r\n\r\nOK - 1 SMS, ID - {mail_id}\r\n".encode()
        await send_raw(service.reply_port, address, answer)
        await results.wait_until(lambda: Status.accepted in results.statuses("garbled-1"))
    assert dead.headers["x-smsc-error-code"] == "unreadable_reply"
    assert dead.headers["x-smsc-gateway-id"] == mail_id
    assert dead.content_type == "message/rfc822"
    assert password.encode() not in dead.body
    assert token.encode() not in dead.body
    kept = email.message_from_bytes(dead.body, policy=email.policy.compat32)
    body = kept.get_payload(decode=True)
    assert isinstance(body, bytes)
    assert body.decode().startswith("Something went wrong")
    assert MASK in body.decode()
    logged = [r for r in caplog.records if "unreadable gateway reply" in r.getMessage()]
    assert len(logged) == 1


def unreadable(service: Service) -> float:
    value = service.telemetry.metrics.registry.get_sample_value("smsc_replies_unreadable_total")
    return value or 0.0


async def test_an_unreadable_reply_whose_copy_cannot_be_kept_is_asked_again() -> None:
    addresses = ReplyAddresses("replies@worker.test", b"key")

    async def sink(mail_id: str, reply: object) -> None:
        raise AssertionError("not a readable reply")

    async def keep(copy: UnreadableCopy) -> None:
        raise ConnectionError("broker gone")

    async def known(mail_id: str) -> bool:
        raise AssertionError("an unreadable reply names no e-mail to look up")

    handler = ReplyHandler(addresses, sink, known, keep_unreadable=keep)
    envelope = SimpleNamespace(
        original_content=b"Subject: x\r\n\r\nThank you",
        content=None,
        mail_from=GATEWAY,
        rcpt_tos=[addresses.address("a" * 32)],
    )
    answer = await handler.handle_DATA(None, SimpleNamespace(peer=("127.0.0.1", 1)), envelope)
    assert answer.startswith("451")
