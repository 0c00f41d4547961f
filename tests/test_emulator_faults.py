"""The emulator's failure injection, seen from a real SMTP client, and its reply relay
when the relay itself is down."""

from __future__ import annotations

import asyncio
import logging
import time

import aiosmtplib
import pytest
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.support.smtp import SmtpSink, emulator_with_sink, raw_mail, send_mail
from worker.emulator import Emulator, EmulatorConfig
from worker.emulator import relay as relay_module
from worker.emulator.relay import ReplyRelay
from worker.smtp_server import bound_port, serve_smtp

PHONE = "79991234567"


def mail(text: str, mail_id: str = "1") -> bytes:
    return raw_mail(f"demo:demo:{mail_id}::,,,1:{PHONE}:{text}", mail_from="client@example.com")


async def test_refused_connections_then_accepted_again_on_the_same_port() -> None:
    async with emulator_with_sink() as (emu, sink):
        port = emu.port
        await emu.faults.refuse_connections()
        assert emu.faults.refusing
        with pytest.raises(aiosmtplib.SMTPConnectError) as refused:
            await send_mail(emu, mail("while down"))
        assert isinstance(refused.value.__cause__, ConnectionRefusedError)
        await emu.faults.accept_connections()
        assert not emu.faults.refusing
        assert emu.port == port
        await send_mail(emu, mail("back up"))
        (reply,) = await sink.wait_for(1)
    assert reply.text == "OK - 1 SMS, ID - 1"
    assert [d.text for d in emu.deliveries] == ["back up"]


async def test_refusing_cuts_open_sessions_unless_told_not_to() -> None:
    async with emulator_with_sink() as (emu, _sink):
        kept = aiosmtplib.SMTP(hostname=emu.host, port=emu.port, timeout=5)
        await kept.connect()
        await emu.faults.refuse_connections(drop_open=False)
        await kept.sendmail("client@example.com", [emu.config.gateway_address], mail("kept"))
        await kept.quit()
        await emu.faults.accept_connections()

        cut = aiosmtplib.SMTP(hostname=emu.host, port=emu.port, timeout=5)
        await cut.connect()
        await emu.faults.refuse_connections()
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            await cut.sendmail("client@example.com", [emu.config.gateway_address], mail("cut"))
        cut.close()
    assert [d.text for d in emu.deliveries] == ["kept"]


@pytest.mark.parametrize("code", [421, 451, 554])
async def test_data_answered_with_an_error_code_takes_nothing(code: int) -> None:
    async with emulator_with_sink() as (emu, sink):
        emu.faults.fail_data(code, times=2)
        for n in range(2):
            with pytest.raises(aiosmtplib.SMTPResponseException) as failed:
                await send_mail(emu, mail(f"try {n}", mail_id=str(n)))
            assert failed.value.code == code
        await send_mail(emu, mail("third", mail_id="3"))
        (reply,) = await sink.wait_for(1)
    assert reply.text == "OK - 1 SMS, ID - 3"
    assert [d.text for d in emu.deliveries] == ["third"]
    assert len(emu.mails) == 1


def test_fail_data_needs_a_failure_code() -> None:
    emu = Emulator()
    with pytest.raises(ValueError, match="4xx or 5xx"):
        emu.faults.fail_data(250)


async def test_drop_mid_data_takes_nothing() -> None:
    async with emulator_with_sink() as (emu, sink):
        emu.faults.drop_mid_data()
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            await send_mail(emu, mail("lost", mail_id="1"))
        await send_mail(emu, mail("next", mail_id="2"))
        (reply,) = await sink.wait_for(1)
    assert reply.text == "OK - 1 SMS, ID - 2"
    assert [d.text for d in emu.deliveries] == ["next"]
    assert [m.mail_id for m in emu.mails] == ["2"]


async def test_drop_after_the_final_dot_delivers_but_never_answers() -> None:
    async with emulator_with_sink() as (emu, sink):
        emu.faults.drop_after_dot()
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            await send_mail(emu, mail("unknown outcome", mail_id="7"))
        (reply,) = await sink.wait_for(1)
        assert [m.mail_id for m in emu.mails] == ["7"]
        await send_mail(emu, mail("answered", mail_id="8"))
        await sink.wait_for(2)
    assert reply.text == "OK - 1 SMS, ID - 7"
    assert emu.delivered(PHONE, "unknown outcome") == 1
    assert emu.delivered(PHONE, "answered") == 1


async def _reply(reader: asyncio.StreamReader) -> bytes:
    """One SMTP reply, all its lines; b"" once the server has closed the connection."""
    lines = b""
    try:
        while (line := await reader.readline()) and line[3:4] == b"-":
            lines += line
    except ConnectionResetError:
        return b""
    return lines + line


async def _up_to_data(emu: Emulator) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(emu.host, emu.port)
    assert (await _reply(reader)).startswith(b"220")
    gateway = emu.config.gateway_address.encode()
    for command in (
        b"EHLO client",
        b"MAIL FROM:<client@example.com>",
        b"RCPT TO:<" + gateway + b">",
    ):
        writer.write(command + b"\r\n")
        assert (await _reply(reader)).startswith(b"250")
    writer.write(b"DATA\r\n")
    assert (await _reply(reader)).startswith(b"354")
    return reader, writer


async def test_where_exactly_the_connection_is_cut() -> None:
    async with emulator_with_sink() as (emu, sink):
        emu.faults.drop_mid_data()
        reader, writer = await _up_to_data(emu)
        # After 354 the server reads no more: the message never completes.
        assert await _reply(reader) == b""
        writer.close()

        emu.faults.drop_after_dot()
        reader, writer = await _up_to_data(emu)
        writer.write(mail("cut after the dot", mail_id="9") + b".\r\n")
        assert await _reply(reader) == b""
        writer.close()
        await sink.wait_for(1)
    assert [m.mail_id for m in emu.mails] == ["9"]
    assert emu.delivered(PHONE, "cut after the dot") == 1


async def test_faults_apply_in_transaction_order_and_clear_disarms_them() -> None:
    async with emulator_with_sink() as (emu, _sink):
        emu.faults.drop_after_dot()
        emu.faults.fail_data(451)
        emu.faults.drop_mid_data()
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            await send_mail(emu, mail("a", mail_id="1"))
        assert emu.deliveries == []
        with pytest.raises(aiosmtplib.SMTPDataError):
            await send_mail(emu, mail("b", mail_id="2"))
        assert emu.deliveries == []
        emu.faults.fail_data(451, times=5)
        emu.faults.latency_s = 5
        emu.faults.clear()
        assert await send_mail(emu, mail("c", mail_id="3"), timeout=2)
    assert [d.text for d in emu.deliveries] == ["c"]


async def test_latency_delays_the_answer_and_a_client_that_gives_up_leaves_it_delivered() -> None:
    async with emulator_with_sink(latency_s=0.3) as (emu, _sink):
        started = time.monotonic()
        await send_mail(emu, mail("slow", mail_id="1"))
        assert time.monotonic() - started >= 0.3
        emu.faults.latency_s = 2.0
        with pytest.raises(aiosmtplib.SMTPTimeoutError):
            await send_mail(emu, mail("gave up", mail_id="2"), timeout=0.3)
        assert emu.delivered(PHONE, "gave up") == 1


async def test_reply_is_retried_until_the_relay_comes_up() -> None:
    async with SmtpSink() as probe:
        port = probe.port
    # Nothing listens on `port` now; the emulator's first reply attempts are refused.
    config = EmulatorConfig(reply_relay=("127.0.0.1", port))
    async with Emulator(config) as emu:
        await send_mail(emu, mail("hello"))
        await asyncio.sleep(0.15)
        async with SmtpSink(port=port) as sink:
            (reply,) = await sink.wait_for(1, timeout=5)
    assert reply.text == "OK - 1 SMS, ID - 1"


async def test_reply_to_a_relay_that_stays_down_is_dropped_after_the_retries(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(relay_module, "RETRY_DELAYS_S", (0.01, 0.01))
    async with SmtpSink() as probe:
        port = probe.port
    relay = ReplyRelay("127.0.0.1", port, "gateway@example.com")
    with caplog.at_level(logging.INFO, logger=relay_module.__name__):
        relay.send("client@example.com", "OK - 1 SMS, ID - 1", None)
        async with asyncio.timeout(5):
            while relay.pending:
                await asyncio.sleep(0.01)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("retrying" in m for m in messages) == 2
    assert "dropped: relay unreachable" in messages[-1]


class RefusingRelay:
    """A relay that refuses every recipient with `code`, counting the attempts."""

    def __init__(self, code: int) -> None:
        self.code = code
        self.attempts = 0

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self.attempts += 1
        return f"{self.code} {'no such user' if self.code >= 500 else 'try again later'}"


@pytest.mark.parametrize("lmtp", [False, True], ids=["smtp", "lmtp"])
@pytest.mark.parametrize("code", [550, 451])
async def test_a_relay_refusing_the_reply_for_good_is_asked_once_and_for_now_again(
    code: int, lmtp: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(relay_module, "RETRY_DELAYS_S", (0.01, 0.01))
    refusing = RefusingRelay(code)
    server = await serve_smtp(refusing, "127.0.0.1", 0, smtp_class=LMTP if lmtp else SMTP)
    try:
        relay = ReplyRelay("127.0.0.1", bound_port(server), "gateway@example.com", lmtp=lmtp)
        with caplog.at_level(logging.INFO, logger=relay_module.__name__):
            relay.send("client@example.com", "OK - 1 SMS, ID - 1", None)
            async with asyncio.timeout(5):
                while relay.pending:
                    await asyncio.sleep(0.01)
    finally:
        server.close()
        await server.wait_closed()
    # 5xx: the relay's answer is final; 4xx: asked again after each delay.
    assert refusing.attempts == (1 if code >= 500 else 3)
    assert f"dropped: relay said {code}" in caplog.records[-1].getMessage()


async def test_stop_does_not_wait_for_replies_the_relay_cannot_take() -> None:
    async with SmtpSink() as probe:
        port = probe.port
    async with Emulator(EmulatorConfig(reply_relay=("127.0.0.1", port))) as emu:
        await send_mail(emu, mail("hello"))
        started = time.monotonic()
    assert time.monotonic() - started < 1
    assert emu.delivered(PHONE, "hello") == 1


async def test_stop_closes_open_client_sessions() -> None:
    emu = Emulator()
    await emu.start()
    client = aiosmtplib.SMTP(hostname=emu.host, port=emu.port, timeout=5)
    await client.connect()
    await emu.stop()
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await client.noop()
    client.close()
