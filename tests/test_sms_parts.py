"""What a request costs in SMS parts, by the gateway's format: the Latin text with translit
on, bytes on binary_hex, unknown (null) where the message is not an SMS or the gateway's
count is not documented, and an unknown `sms_count` for a `G<n>` group. The emulator's
`OK - n SMS` agrees, so the mismatch metric stays quiet."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from tests.conftest import collecting, gateway_and_worker, phone
from tests.support.smtp import ManualClock
from tests.support.texts import sendable
from worker.contract import SendRequest, Status
from worker.emulator import EmulatorConfig
from worker.emulator.rules import Gateway
from worker.fate import read_request
from worker.prepare import PreparedRequest, prepare
from worker.protocol.decode import decode_mail
from worker.protocol.fields import Channel, Format, Translit
from worker.protocol.mail import Account, Envelope, MailBuilder
from worker.protocol.recipients import sms_count
from worker.protocol.replies import Accepted
from worker.protocol.segments import count_segments, sms_parts, transliterate
from worker.settings import AmqpSettings, GatewaySettings

RUSSIAN = "абвгдеёжзийклмнопрстуфхцчшщъыьэюя"
RUSSIAN_TEXT = st.text(alphabet=st.sampled_from(RUSSIAN + RUSSIAN.upper() + " .,!?0123456789"))
FAST = settings(max_examples=150, deadline=None)


def gsm_parts(units: int) -> int:
    return 1 if units <= 160 else math.ceil(units / 153)


@pytest.mark.parametrize(
    ("text", "translit", "parts"),
    [
        ("щ" * 50, Translit.off, 1),  # 50 UCS-2 characters
        ("щ" * 50, Translit.translit, 2),  # "Shchshch...": 200 Latin characters
        ("щ" * 50, Translit.mpahc, 1),  # "LLL" each: 150
        ("а" * 100, Translit.off, 2),  # 100 UCS-2: split at 67
        ("а" * 100, Translit.translit, 1),  # 100 Latin: one SMS
        ("ж" * 60, Translit.mpahc, 2),  # ">|<" each, `|` two septets: 240 units
        ("Hello, world", Translit.translit, 1),  # nothing to transliterate
        ("Привет 😀", Translit.translit, 1),  # the emoji keeps it UCS-2
        ("Привет 😀" * 10, Translit.translit, 2),  # "Privet 😀" * 10 = 100 UCS-2 units
    ],
)
def test_translit_counts_the_text_the_gateway_sends(
    text: str, translit: Translit, parts: int
) -> None:
    assert sms_parts(text, Format.sms, translit) == parts
    assert sms_parts(text, Format.flash, translit) == parts


def test_look_alike_translit_follows_the_gateways_own_example() -> None:
    assert transliterate("транслит", Translit.mpahc) == "mpaHc/Ium"
    assert transliterate("Щука", Translit.translit) == "Shchuka"


@FAST
@given(RUSSIAN_TEXT, st.sampled_from([Translit.translit, Translit.mpahc]))
def test_a_transliterated_text_is_latin_and_costs_what_its_latin_length_implies(
    text: str, translit: Translit
) -> None:
    latin = transliterate(text, translit)
    assert not any(c in RUSSIAN for c in latin.lower())
    units = count_segments(latin).units
    assert count_segments(latin).encoding == "gsm7"
    assert units >= len(latin)  # extension characters take two septets, never fewer
    assert sms_parts(text, Format.sms, translit) == gsm_parts(units)
    # Every letter is written, only the hard and soft signs may vanish (ъ, ь).
    signs = sum(c in "ъьЪЬ" for c in text)
    assert len(latin) >= len(text) - (signs if translit == Translit.translit else 0)


@pytest.mark.parametrize(
    ("size", "parts"), [(1, 1), (140, 1), (141, 2), (268, 2), (269, 3), (500, 4)]
)
def test_binary_hex_counts_bytes_140_in_one_sms_134_per_part(size: int, parts: int) -> None:
    data = bytes(range(256)) * 2
    assert sms_parts(data[:size].hex(), Format.binary_hex) == parts
    assert sms_parts(data[:size].hex().upper(), Format.binary_hex, Translit.translit) == parts


@FAST
@given(st.binary(min_size=1, max_size=500))
def test_hex_parts_follow_the_byte_count(data: bytes) -> None:
    expected = 1 if len(data) <= 140 else math.ceil(len(data) / 134)
    assert sms_parts(data.hex(), Format.binary_hex) == expected


@pytest.mark.parametrize("text", ["abc", "0g", "12 34", "ÿÿ"])
def test_a_hex_text_that_is_not_whole_bytes_has_no_count(text: str) -> None:
    assert sms_parts(text, Format.binary_hex) is None


@pytest.mark.parametrize(
    ("fmt", "parts"),
    [
        (Format.ping, 1),
        (Format.hlr, None),
        (Format.email, None),
        (Format.voice, None),
        (Format.viber, None),
        (Format.whatsapp, None),
        (Format.soc, None),
        (Format.wap_push, None),
    ],
)
def test_formats_that_are_not_a_plain_sms(fmt: Format, parts: int | None) -> None:
    assert sms_parts("x" * 400, fmt) == parts
    assert sms_parts("", fmt, Translit.translit) == parts


def test_every_gateway_format_says_how_it_counts() -> None:
    for fmt in Format:
        sms_parts("ab", fmt)  # a format without an entry raises KeyError


def test_a_group_makes_the_count_unknown_but_keeps_the_parts() -> None:
    assert sms_count(2, ["79161234567", "+79161234568"]) == 4
    assert sms_count(2, ["79161234567", "G12"]) is None
    assert sms_count(None, ["79161234567"]) is None


# --- the emulator's `OK - n SMS` against the worker's count -------------------------------

NOW = datetime(2025, 11, 25, 18, 0, tzinfo=UTC)
UTF8 = GatewaySettings(charset="utf-8")  # every text fits, so they all share one e-mail
TEXT_CHARS = st.sampled_from(list(RUSSIAN + "abcXYZ 019.,!?€[]|\n😀中ç"))


def request_of(body: dict[str, Any]) -> SendRequest:
    request = read_request(json.dumps({"request_id": "r", **body}).encode())
    assert isinstance(request, SendRequest), request
    return request


def test_the_pace_counts_a_message_without_a_count_as_one_part_per_recipient() -> None:
    email = {"to": ["a@example.com", "b@example.com"], "text": "hi", "subject": "Hi"}
    mail = prepare(
        request_of(email | {"channel": "email", "sender": "s@example.com"}), UTF8, Channel.sms, NOW
    )
    assert (mail.sms_parts, mail.sms_count, mail.pace_parts) == (None, None, 2)
    group = prepare(
        request_of({"to": [phone(1), "G12"], "text": "a" * 200}), UTF8, Channel.sms, NOW
    )
    assert (group.sms_parts, group.sms_count, group.pace_parts) == (2, None, 4)
    plain = prepare(
        request_of({"to": [phone(1), phone(2)], "text": "a" * 200}), UTF8, Channel.sms, NOW
    )
    assert (plain.sms_parts, plain.sms_count, plain.pace_parts) == (2, 4, 4)


def emulator_count(prepared: list[PreparedRequest]) -> int:
    """What the emulator answers for one e-mail built by the worker from `prepared`."""
    builder = MailBuilder(
        Envelope("replies@worker.test"),
        Account("", SecretStr("demo")),
        "mail-1",
        prepared[0].key.options,
        charset=prepared[0].key.charset,
        date="Tue, 25 Nov 2025 18:00:00 +0000",
        message_id="<mail-1@worker.test>",
    )
    for request in prepared:
        assert builder.try_add(request.line)
    verdict = Gateway(EmulatorConfig(), ManualClock()).judge(
        decode_mail(builder.build()).body, "192.0.2.1"
    )
    assert isinstance(verdict.reply, Accepted), verdict.reason
    return verdict.reply.sms_count


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    """Requests on the formats the worker has a count for (the others it never compares)."""
    body: dict[str, Any] = {
        "channel": draw(st.sampled_from(["sms", "flash", "binary_hex", "ping"]))
    }
    translit = draw(st.sampled_from([None, "off", "translit", "mpahc"]))
    if translit:
        body["translit"] = translit
    phones = draw(st.lists(st.integers(0, 9_999_999), min_size=1, max_size=3, unique=True))
    return body | {"to": [phone(n) for n in phones]}


# Repeated pieces: texts long enough to take several parts, where translit tells.
LONG_TEXTS = st.builds(
    lambda piece, times: (piece * times)[:1000],
    st.text(TEXT_CHARS, min_size=1, max_size=40),
    st.integers(1, 30),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests(), st.lists(LONG_TEXTS, min_size=1, max_size=3, unique=True))
def test_the_emulator_counts_what_the_worker_counts(
    template: dict[str, Any], texts: list[str]
) -> None:
    if template["channel"] == "binary_hex":
        texts = [t.encode()[:500].hex() for t in texts]
    texts = list(dict.fromkeys(t for t in texts if sendable(t))) or ["text"]
    prepared = [prepare(request_of(template | {"text": t}), UTF8, Channel.sms, NOW) for t in texts]
    counts = [p.sms_count for p in prepared]
    assert None not in counts
    assert emulator_count(prepared) == sum(c or 0 for c in counts)


# --- events from a running worker ----------------------------------------------------------

EXPECTED: dict[str, tuple[dict[str, Any], int | None, int | None]] = {
    # request id: (request, sms_parts, sms_count)
    "translit": ({"to": phone(1), "text": "щ" * 50, "translit": "translit"}, 2, 2),
    "mpahc": ({"to": [phone(2), phone(3)], "text": "ж" * 60, "translit": "mpahc"}, 2, 4),
    "cyrillic": ({"to": phone(4), "text": "щ" * 100}, 2, 2),
    "hex": ({"to": phone(5), "text": bytes(range(200)).hex(), "channel": "binary_hex"}, 2, 2),
    "ping": ({"to": [phone(6), phone(7)], "text": "", "channel": "ping"}, 1, 2),
    # Its own sender keeps it out of the other SMS's e-mail, which is then compared.
    "group": ({"to": [phone(8), "G12"], "text": "a" * 200, "sender": "Group"}, 2, None),
    "viber": ({"to": phone(9), "text": "hello", "channel": "viber"}, None, None),
    "email": (
        {
            "to": ["a@example.com", "b@example.com"],
            "text": "hello",
            "channel": "email",
            "sender": "shop@example.com",
            "subject": "Hi",
        },
        None,
        None,
    ),
}


async def test_events_carry_the_gateways_counts_and_no_count_differs(
    amqp: AmqpSettings,
) -> None:
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp) as (emulator, service),
    ):
        for request_id, (body, _, _) in EXPECTED.items():
            await broker.publish({"request_id": request_id, **body})
        await results.wait_until(
            lambda: all(Status.accepted in results.statuses(i) for i in EXPECTED)
        )
        mismatches = service.telemetry.metrics.registry.get_sample_value(
            "smsc_reply_parts_mismatch_total"
        )
    for request_id, (_, parts, count) in EXPECTED.items():
        for event in results.of(request_id):
            assert (event.sms_parts, event.sms_count) == (parts, count), request_id
    assert len(emulator.deliveries) == 12
    assert not mismatches
