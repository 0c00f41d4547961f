"""The gateway emulator over real SMTP sockets: e-mails in with aiosmtplib, replies out to
an SMTP sink, deliveries recorded."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from pydantic import SecretStr

from tests.support.smtp import (
    ManualClock,
    emulator_with_sink,
    raw_mail,
    send_mail,
)
from worker.emulator import Emulator, EmulatorConfig
from worker.emulator.rules import ACCEPTED_RU, RUSSIAN_DESCRIPTIONS
from worker.protocol.mail import (
    MAX_MAIL_BYTES,
    Account,
    ListLine,
    MailOptions,
    encode_mail,
    encode_single,
)
from worker.protocol.mail import (
    Envelope as MailEnvelope,
)
from worker.protocol.replies import Accepted, GatewayError, Rejected, parse_reply, read_reply
from worker.smtp_server import serve_smtp

PHONE = "79991234567"
OTHER = "79997654321"
DEMO = Account("demo", SecretStr("demo"))
CLIENT = "client+42@example.com"
DATE = "Mon, 01 Jan 2024 00:00:00 +0000"


def single(
    text: str,
    phones: tuple[str, ...] = (PHONE,),
    *,
    mail_id: str = "1",
    options: MailOptions | None = None,
    envelope: MailEnvelope | None = None,
    message_id: str = "<m1@example.com>",
) -> bytes:
    return encode_single(
        envelope or MailEnvelope(mail_from=CLIENT),
        DEMO,
        mail_id,
        options or MailOptions(),
        ListLine(phones, text),
        date=DATE,
        message_id=message_id,
    )


async def test_serve_smtp_on_a_free_port_runs_the_handler_on_this_loop() -> None:
    loops: list[asyncio.AbstractEventLoop] = []

    class Handler:
        async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
            loops.append(asyncio.get_running_loop())
            return "250 kept"

    server = await serve_smtp(Handler(), "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        assert port != 0
        _, answer = await aiosmtplib.send(
            b"Subject: x\r\n\r\nbody\r\n",
            hostname="127.0.0.1",
            port=port,
            sender="a@example.com",
            recipients=["b@example.com"],
        )
        assert answer == "kept"
        assert loops == [asyncio.get_running_loop()]
    finally:
        server.close()
        await server.wait_closed()


async def test_ok_reply_goes_to_the_from_address_in_reply_to_the_message_id() -> None:
    async with emulator_with_sink() as (emu, sink):
        assert await send_mail(emu, single("Привет", message_id="<req-1@example.com>"))
        (reply,) = await sink.wait_for(1)
    assert reply.rcpt_tos == (CLIENT,)
    assert reply.mail_from == emu.config.reply_from
    assert reply.message["In-Reply-To"] == "<req-1@example.com>"
    assert reply.message.get_content_type() == "text/plain"
    assert reply.message.get_content_charset() == "utf-8"
    assert reply.text == "OK - 1 SMS, ID - 1"
    assert [(d.phone, d.recipient, d.text, d.mail_id) for d in emu.deliveries] == [
        (PHONE, f"+{PHONE}", "Привет", "1")
    ]
    assert emu.errors == {}


async def test_ok_reply_counts_parts_times_recipients_over_the_mail() -> None:
    lines = [
        ListLine((PHONE, OTHER), "x" * 161),  # 2 parts, 2 recipients
        ListLine((PHONE,), "я" * 71),  # 2 parts (UCS-2)
        ListLine(("+79990001122",), "short"),
    ]
    content = encode_mail(
        MailEnvelope(mail_from=CLIENT),
        DEMO,
        "batch-7",
        MailOptions(),
        lines,
        date=DATE,
        message_id="<m@example.com>",
    )
    async with emulator_with_sink() as (emu, sink):
        await send_mail(emu, content)
        (reply,) = await sink.wait_for(1)
    assert reply.text == "OK - 7 SMS, ID - batch-7"
    assert parse_reply(reply.text) == Accepted(sms_count=7, mail_id="batch-7")
    assert len(emu.deliveries) == 4


async def test_no_ok_reply_without_test_1_but_errors_always_reply() -> None:
    quiet = MailOptions(test=False)
    async with emulator_with_sink() as (emu, sink):
        await send_mail(emu, single("quiet", options=quiet, mail_id="1"))
        await send_mail(emu, single("quiet", options=quiet, mail_id="2", phones=("123",)))
        await send_mail(emu, single("loud", mail_id="3"))
        replies = await sink.wait_for(2)
        await emu.wait_for_mails(3)
    assert [r.text for r in replies] == [
        "ERROR = 7 (invalid phone number format), ID - 2",
        "OK - 1 SMS, ID - 3",
    ]
    assert [m.reply_text for m in emu.mails] == [None, replies[0].text, replies[1].text]
    assert emu.delivered(PHONE, "quiet") == 1


ERROR_CASES: list[tuple[int, dict[str, Any], str, str]] = [
    (1, {}, f"demo:demo:1::,13,,1:{PHONE}:format 13", "ERROR = 1 (error in parameters)"),
    (2, {}, f"demo:nope:1::,,,1:{PHONE}:hi", "ERROR = 2 (invalid login or password)"),
    (
        3,
        {"balance": 1},
        f"demo:demo:5::,,,1:{PHONE},{OTHER}:hi",
        "ERROR = 3 (insufficient funds), ID - 5",
    ),
    (5, {}, f"demo:demo:1:31.02.2024:,,,1:{PHONE}:hi", "ERROR = 5 (invalid date format)"),
    (
        6,
        {"denied_senders": frozenset({"Spam"})},
        f"demo:demo:6::,,Spam,1:{PHONE}:hi",
        "ERROR = 6 (message denied), ID - 6",
    ),
    (
        7,
        {},
        f"demo:demo:7::,,,1::{PHONE}:ok\n12-34:hi",
        "ERROR = 7 (invalid phone number format), ID - 7",
    ),
    (
        8,
        {"undeliverable": frozenset({OTHER})},
        f"demo:demo:8::,,,1::{PHONE}:ok\n+{OTHER}:hi",
        "ERROR = 8 (message cannot be delivered), ID - 8",
    ),
]


@pytest.mark.parametrize(
    ("number", "config", "body", "expected"),
    ERROR_CASES,
    ids=[f"error-{c[0]}" for c in ERROR_CASES],
)
async def test_gateway_error_is_replied_and_rejects_the_whole_mail(
    number: int, config: dict[str, Any], body: str, expected: str
) -> None:
    async with emulator_with_sink(**config) as (emu, sink):
        answer = await send_mail(emu, raw_mail(body, mail_from=CLIENT))
        (reply,) = await sink.wait_for(1)
    assert answer.startswith("OK")  # SMTP takes it; the error comes by e-mail
    assert reply.text == expected
    assert reply.rcpt_tos == (CLIENT,)
    reply_parsed = parse_reply(reply.text)
    assert isinstance(reply_parsed, Rejected)
    assert reply_parsed.error == number
    assert emu.deliveries == []
    assert emu.errors == {number: 1}
    (mail,) = emu.mails
    assert isinstance(mail.reply, Rejected)
    assert mail.reply.error == number


async def test_malformed_body_is_error_1() -> None:
    async with emulator_with_sink() as (emu, sink):
        await send_mail(emu, raw_mail("hello, please send an SMS", mail_from=CLIENT))
        (reply,) = await sink.wait_for(1)
    assert reply.text == "ERROR = 1 (error in parameters)"
    assert emu.mails[0].decoded is None


async def test_frequent_errors_block_the_ip_with_error_4() -> None:
    clock = ManualClock()
    config = {"block_after_errors": 2, "block_window_s": 10, "block_for_s": 30}
    async with emulator_with_sink(clock=clock, **config) as (emu, sink):
        for _ in range(2):
            await send_mail(emu, raw_mail("garbage", mail_from=CLIENT))
        await send_mail(emu, single("fine"))
        clock.advance(30)
        await send_mail(emu, single("fine"))
        replies = await sink.wait_for(4)
    assert [r.text for r in replies] == [
        "ERROR = 1 (error in parameters)",
        "ERROR = 1 (error in parameters)",
        "ERROR = 4 (IP address is temporarily blocked)",
        "OK - 1 SMS, ID - 1",
    ]
    assert emu.errors == {1: 2, 4: 1}
    assert emu.delivered(PHONE, "fine") == 1


async def test_list_lines_may_separate_phones_and_message_with_a_semicolon() -> None:
    body = (
        f"demo:demo:7::,0,,1::{PHONE};Время: 10:00; зал 2\n"
        f"{OTHER}:colon as the worker writes it\n"
        f"{PHONE};{OTHER};to both"
    )
    async with emulator_with_sink() as (emu, sink):
        await send_mail(emu, raw_mail(body, mail_from=CLIENT))
        (reply,) = await sink.wait_for(1)
    assert reply.text == "OK - 4 SMS, ID - 7"
    assert emu.delivery_counts() == {
        (f"+{PHONE}", "Время: 10:00; зал 2"): 1,
        (f"+{OTHER}", "colon as the worker writes it"): 1,
        (f"+{PHONE}", "to both"): 1,
        (f"+{OTHER}", "to both"): 1,
    }


@pytest.mark.parametrize("charset", ["cp1251", "koi8-r"])
async def test_replies_in_russian_declare_no_charset_when_asked(charset: str) -> None:
    async with emulator_with_sink(reply_charset=charset, denied_words={"casino"}) as (emu, sink):
        await send_mail(emu, single("hello", mail_id="1"))
        await send_mail(emu, single("best casino", mail_id="2"))
        ok, denied = await sink.wait_for(2)
    for reply in (ok, denied):
        assert reply.message["Content-Type"] == "text/plain"
        assert reply.message.get_content_charset() is None
    expected_ok = f"OK - 1 SMS, ID - 1\n{ACCEPTED_RU}".encode(charset)
    expected_denied = (
        f"ERROR = 6 ({RUSSIAN_DESCRIPTIONS[GatewayError.message_denied]}), ID - 2".encode(charset)
    )
    assert ok.message.get_payload(decode=True).rstrip(b"\r\n") == expected_ok.replace(
        b"\n", b"\r\n"
    )
    assert denied.message.get_payload(decode=True).rstrip(b"\r\n") == expected_denied
    assert read_reply(ok.content) == Accepted(sms_count=1, mail_id="1")
    assert read_reply(denied.content) == Rejected(
        error=GatewayError.message_denied,
        description=RUSSIAN_DESCRIPTIONS[GatewayError.message_denied],
        mail_id="2",
    )


async def test_second_identical_request_in_a_minute_is_error_9_even_with_a_new_id() -> None:
    clock = ManualClock()
    async with emulator_with_sink(clock=clock) as (emu, sink):
        for n in range(2):
            await send_mail(emu, single("same text", mail_id=str(n + 1)))
            clock.advance(1)
        clock.advance(60)
        await send_mail(emu, single("same text", mail_id="3"))
        replies = await sink.wait_for(3)
    assert [r.text for r in replies] == [
        "OK - 1 SMS, ID - 1",
        "ERROR = 9 (duplicate request)",
        "OK - 1 SMS, ID - 3",
    ]
    assert emu.delivered(PHONE, "same text") == 2


async def test_identical_copies_per_window_can_be_raised_to_the_seeds_two() -> None:
    clock = ManualClock()
    async with emulator_with_sink(clock=clock, identical_copies=2) as (emu, sink):
        for n in range(3):
            await send_mail(emu, single("same text", mail_id=str(n + 1)))
            clock.advance(1)
        replies = await sink.wait_for(3)
    assert [r.text for r in replies] == [
        "OK - 1 SMS, ID - 1",
        "OK - 1 SMS, ID - 2",
        "ERROR = 9 (duplicate request)",
    ]
    assert emu.delivered(PHONE, "same text") == 2


async def test_flood_rule_holds_back_the_51st_message_and_delivers_the_rest() -> None:
    lines = [ListLine((PHONE,), f"message {n}") for n in range(52)]
    lines.append(ListLine((OTHER,), "message 0"))
    content = encode_mail(
        MailEnvelope(mail_from=CLIENT),
        DEMO,
        "flood",
        MailOptions(),
        lines,
        date=DATE,
        message_id="<f@example.com>",
    )
    async with emulator_with_sink() as (emu, sink):
        await send_mail(emu, content)
        (reply,) = await sink.wait_for(1)
    assert reply.text == "OK - 53 SMS, ID - flood"
    assert len(emu.deliveries) == 51
    assert emu.floods == [(PHONE, "message 50", "flood"), (PHONE, "message 51", "flood")]
    assert emu.delivered(PHONE, "message 49") == 1
    assert emu.delivered(PHONE, "message 50") == 0
    assert emu.delivered(OTHER, "message 0") == 1


async def test_mail_of_exactly_100_kb_is_taken_and_one_byte_more_is_552() -> None:
    def padded(size: int) -> bytes:
        base = single("padded")
        head, sep, body = base.partition(b"\r\n\r\n")
        # Header lines "X-Pad: <value>\r\n" of at most 909 octets fill the gap exactly.
        missing = size - len(base)
        count = -(-missing // 909)
        total, extra = divmod(missing - 9 * count, count)
        pad_lines = [b"X-Pad: " + b"p" * (total + (i < extra)) for i in range(count)]
        mail = head + b"\r\n" + b"\r\n".join(pad_lines) + sep + body
        assert len(mail) == size
        return mail

    async with emulator_with_sink() as (emu, sink):
        await send_mail(emu, padded(MAX_MAIL_BYTES))
        (reply,) = await sink.wait_for(1)
        assert reply.text == "OK - 1 SMS, ID - 1"
        # aiosmtplib announces the size in MAIL FROM, so the refusal comes there.
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as announced:
            await send_mail(emu, padded(MAX_MAIL_BYTES + 1))
        assert announced.value.code == 552
        # A client that announces nothing is refused at the end of DATA.
        async with aiosmtplib.SMTP(hostname=emu.host, port=emu.port) as client:
            await client.mail("client@example.com")
            await client.rcpt(emu.config.gateway_address)
            with pytest.raises(aiosmtplib.SMTPDataError) as unannounced:
                await client.data(padded(MAX_MAIL_BYTES + 1))
        assert unannounced.value.code == 552
    assert len(emu.mails) == 1


async def test_only_the_gateway_address_is_a_recipient() -> None:
    async with emulator_with_sink(gateway_address="send@send.smsc.ru") as (emu, _sink):
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
            await aiosmtplib.send(
                single("x"),
                hostname=emu.host,
                port=emu.port,
                sender=CLIENT,
                recipients=["send@send.smscentre.com"],
            )
        assert refused.value.recipients[0].code == 550
        await aiosmtplib.send(
            single("x"),
            hostname=emu.host,
            port=emu.port,
            sender=CLIENT,
            recipients=["SEND@send.smsc.ru"],
        )
    assert emu.delivered(PHONE, "x") == 1


@pytest.mark.parametrize(
    ("text", "envelope", "charset", "encoding"),
    [
        ("Привет, мир", MailEnvelope(mail_from=CLIENT), "koi8-r", "8bit"),
        ("Emoji 🙂 and €", MailEnvelope(mail_from=CLIENT), "utf-8", "8bit"),
        ("Hej då", MailEnvelope(mail_from=CLIENT, charset="iso-8859-1"), "iso-8859-1", "8bit"),
        ("В тегах", MailEnvelope(mail_from=CLIENT, text_tags=True), "koi8-r", "8bit"),
        ("Длинный " * 120, MailEnvelope(mail_from=CLIENT, charset="utf-8"), "utf-8", "base64"),
    ],
    ids=["koi8-r", "utf-8-fallback", "latin-1", "text-tags", "base64"],
)
async def test_body_is_read_in_its_declared_charset(
    text: str, envelope: MailEnvelope, charset: str, encoding: str
) -> None:
    text = text.strip()
    content = single(text, envelope=envelope)
    assert f'charset="{charset}"'.encode() in content
    assert f"Content-Transfer-Encoding: {encoding}".encode() in content
    async with emulator_with_sink() as (emu, sink):
        await send_mail(emu, content)
        await sink.wait_for(1)
    assert [d.text for d in emu.deliveries] == [text]
    decoded = emu.mails[0].decoded
    assert decoded is not None
    assert decoded.charset == charset


async def test_body_without_charset_is_read_as_koi8_r() -> None:
    async with emulator_with_sink() as (emu, sink):
        await send_mail(emu, raw_mail(f"demo:demo:1::,,,1:{PHONE}:Ёлка", charset=None))
        await sink.wait_for(1)
    assert [d.text for d in emu.deliveries] == ["Ёлка"]


async def test_text_tags_around_a_hand_written_body() -> None:
    body = f"Hello gateway,\n[text]demo:demo:1::,,,1:{PHONE}:tagged[/text]\n-- \nsignature"
    async with emulator_with_sink() as (emu, sink):
        await send_mail(emu, raw_mail(body))
        (reply,) = await sink.wait_for(1)
    assert reply.text == "OK - 1 SMS, ID - 1"
    assert [d.text for d in emu.deliveries] == ["tagged"]


async def test_base64_body_with_an_upper_case_charset_is_decoded() -> None:
    body = f"demo:demo:1::,,,1:{PHONE}:через base64".encode("koi8-r")
    content = (
        b"From: client@example.com\r\nTo: send@send.smscentre.com\r\nSubject: \r\n"
        b'MIME-Version: 1.0\r\nContent-Type: text/plain; charset="KOI8-R"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(body)
    )
    async with emulator_with_sink() as (emu, sink):
        await send_mail(emu, content)
        await sink.wait_for(1)
    assert [d.text for d in emu.deliveries] == ["через base64"]


async def test_newline_escape_in_a_list_line_becomes_a_line_break() -> None:
    content = encode_mail(
        MailEnvelope(mail_from=CLIENT),
        DEMO,
        "nl",
        MailOptions(),
        [ListLine((PHONE,), "two\nlines"), ListLine((OTHER,), "one line")],
        date=DATE,
        message_id="<nl@example.com>",
    )
    async with emulator_with_sink() as (emu, sink):
        await send_mail(emu, content)
        await sink.wait_for(1)
    assert emu.delivery_counts() == {(f"+{PHONE}", "two\nlines"): 1, (f"+{OTHER}", "one line"): 1}


async def test_deliveries_are_appended_to_the_record_file(tmp_path: Path) -> None:
    record = tmp_path / "deliveries.jsonl"
    async with emulator_with_sink(record_path=record) as (emu, sink):
        await send_mail(emu, single("first", mail_id="a"))
        await send_mail(emu, single("second", mail_id="b", phones=(PHONE, OTHER)))
        await sink.wait_for(2)
    rows = [json.loads(line) for line in record.read_text(encoding="utf-8").splitlines()]
    assert [(r["mail_id"], r["phone"], r["recipient"], r["text"]) for r in rows] == [
        ("a", PHONE, f"+{PHONE}", "first"),
        ("b", PHONE, f"+{PHONE}", "second"),
        ("b", OTHER, f"+{OTHER}", "second"),
    ]
    assert rows[0]["format"] == 0
    assert rows[0]["accepted_at"] == emu.deliveries[0].accepted_at


async def test_delivered_counts_a_phone_however_it_is_written() -> None:
    async with emulator_with_sink() as (emu, sink):
        await send_mail(emu, single("hi", phones=(f"+{PHONE}",)))
        await sink.wait_for(1)
    assert emu.delivered(PHONE, "hi") == 1
    assert emu.delivered(f"+{PHONE}", "hi") == 1
    assert emu.delivered("8 (999) 123-45-67", "hi") == 1
    assert emu.delivered(PHONE, "other") == 0
    assert emu.delivered(OTHER, "hi") == 0


async def test_emulator_without_relay_sends_no_reply_but_records_it() -> None:
    async with Emulator(EmulatorConfig()) as emu:
        await send_mail(emu, single("hi"))
        await emu.wait_for_deliveries(1)
    assert emu.mails[0].reply == Accepted(1, "1")
    assert emu.mails[0].reply_text is None


async def test_wait_for_deliveries_times_out_with_what_it_saw() -> None:
    async with Emulator() as emu:
        with pytest.raises(TimeoutError, match="0 of 1 deliveries"):
            await emu.wait_for_deliveries(1, timeout_s=0.05)


async def test_port_is_known_only_while_running_and_start_twice_fails() -> None:
    emu = Emulator()
    with pytest.raises(RuntimeError):
        _ = emu.port
    await emu.start()
    try:
        assert emu.port > 0
        with pytest.raises(RuntimeError):
            await emu.start()
    finally:
        await emu.stop()
    with pytest.raises(RuntimeError):
        _ = emu.port


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="host:port"):
        EmulatorConfig(reply_relay="no-port")
    with pytest.raises(ValueError, match="not a plain e-mail address"):
        EmulatorConfig(gateway_address="not an address")
    assert EmulatorConfig(reply_relay="[::1]:2525").reply_relay == ("::1", 2525)
