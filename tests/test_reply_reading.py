"""Replies as intermediate mail systems deliver them, read by a running worker (real
RabbitMQ, the real reply listener): a body in cp1251 with no charset declared and a full
stop after the ID, and an SMS count that differs from the worker's."""

from __future__ import annotations

import logging

import aiosmtplib
import pytest

from tests.conftest import collecting, gateway_and_worker
from tests.test_reply_security import GATEWAY, NO_REPLIES, submitted_mail
from worker.contract import Status
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
