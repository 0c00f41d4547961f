"""The emulator's gateway rules as pure code: bodies in, verdicts out, time moved by hand."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.smtp import ManualClock
from worker.emulator import EmulatorConfig
from worker.emulator.rules import Gateway, Verdict
from worker.protocol.decode import MalformedMail, decode_body
from worker.protocol.replies import Accepted, Rejected, render_reply

PHONE = "79991234567"
OTHER = "79997654321"
PEER = "192.0.2.1"


def make(clock: ManualClock | None = None, **config: Any) -> tuple[Gateway, ManualClock]:
    clock = clock or ManualClock()
    return Gateway(EmulatorConfig(**config), clock), clock


def judge(gateway: Gateway, body: str, peer: str = PEER) -> Verdict:
    try:
        decoded = decode_body(body)
    except MalformedMail as exc:
        return gateway.judge(exc, peer)
    return gateway.judge(decoded, peer)


def error_of(verdict: Verdict) -> int:
    assert isinstance(verdict.reply, Rejected), verdict
    assert verdict.deliveries == ()
    return int(verdict.reply.error)


def sms_count(verdict: Verdict) -> int:
    assert isinstance(verdict.reply, Accepted), verdict
    return verdict.reply.sms_count


def test_accepted_mail_delivers_each_recipient_and_counts_parts() -> None:
    gateway, clock = make()
    verdict = judge(gateway, f"demo:demo:7::,0,Shop,1:{PHONE},+{OTHER}:hello")
    assert sms_count(verdict) == 2
    assert verdict.reply_wanted
    assert [(d.phone, d.recipient, d.text, d.sender, d.mail_id) for d in verdict.deliveries] == [
        (PHONE, f"+{PHONE}", "hello", "Shop", "7"),
        (f"+{OTHER}", f"+{OTHER}", "hello", "Shop", "7"),
    ]
    assert all(d.accepted_at == clock.now for d in verdict.deliveries)


def test_parts_times_recipients_summed_over_list_lines() -> None:
    gateway, _ = make()
    latin_two_parts = "x" * 161
    cyrillic_two_parts = "я" * 71
    body = (
        f"demo:demo:8::,0,,1::{PHONE},{OTHER}:{latin_two_parts}\n"
        f"{PHONE}:{cyrillic_two_parts}\n"
        f"{OTHER}:short"
    )
    assert sms_count(judge(gateway, body)) == 2 * 2 + 2 + 1


def test_same_recipient_twice_on_a_line_is_sent_once() -> None:
    gateway, _ = make()
    verdict = judge(gateway, f"demo:demo:1::,,,1:{PHONE},+{PHONE}:hi")
    assert sms_count(verdict) == 1
    assert len(verdict.deliveries) == 1


def test_ok_reply_is_wanted_only_with_test_1() -> None:
    gateway, _ = make()
    assert not judge(gateway, f"demo:demo:1::,,,0:{PHONE}:a").reply_wanted
    assert not judge(gateway, f"demo:demo:2::,,,:{PHONE}:b").reply_wanted
    assert not judge(gateway, f"demo:demo:3::,,,2:{PHONE}:c").reply_wanted
    assert judge(gateway, f"demo:demo:4::,,,1:{PHONE}:d").reply_wanted
    rejected = judge(gateway, f"demo:wrong:5::,,,0:{PHONE}:e")
    assert error_of(rejected) == 2
    assert rejected.reply_wanted


def test_missing_id_is_assigned() -> None:
    gateway, _ = make()
    first = judge(gateway, f"demo:demo:::,,,1:{PHONE}:a")
    second = judge(gateway, f"demo:demo:::,,,1:{PHONE}:b")
    assert isinstance(first.reply, Accepted)
    assert isinstance(second.reply, Accepted)
    assert first.reply.mail_id != second.reply.mail_id
    assert first.deliveries[0].mail_id == first.reply.mail_id


@pytest.mark.parametrize(
    "body",
    [
        "not a send record",
        "demo:demo:1",
        "",
        f"demo:demo:0::,,,1:{PHONE}:id zero",
        f"demo:demo:2147483648::,,,1:{PHONE}:id too big",
        f"demo:demo:{'a' * 41}::,,,1:{PHONE}:id too long",
        f"demo:demo:bad/id::,,,1:{PHONE}:id with a slash",
        f"demo:demo:1::3,,,1:{PHONE}:translit 3",
        f"demo:demo:1::x,,,1:{PHONE}:translit x",
        f"demo:demo:1::,13,,1:{PHONE}:format 13",
        f"demo:demo:1::,-1,,1:{PHONE}:format -1",
        f"demo:demo:1::,,,3:{PHONE}:test 3",
        f"demo:demo:1::,0,,1,9:{PHONE}:five sub-fields",
        f"demo:demo:1::,0,This name is too long,1:{PHONE}:sender",
        f"demo:demo:1::,,,1:{PHONE}:",
        f"demo:demo:1::,,,1:{PHONE}:" + "x" * 1001,
        "demo:demo:1::,,,1:,:no recipients",
        "demo:demo:1::,8,,1:someone@example.com:no subject",
        f"demo:demo:1::,,,1::{PHONE}:fine\nline without a colon",
    ],
)
def test_parameter_errors_are_1(body: str) -> None:
    gateway, _ = make()
    verdict = judge(gateway, body)
    assert error_of(verdict) == 1
    assert render_reply(verdict.reply) == "ERROR = 1 (error in parameters)"


def test_limits_of_text_and_id_are_inclusive() -> None:
    gateway, _ = make()
    assert sms_count(judge(gateway, f"demo:demo:2147483647::,,,1:{PHONE}:" + "x" * 1000)) == 7
    assert sms_count(judge(gateway, f"demo:demo:{'a' * 40}::,,,1:{PHONE}:y")) == 1


def test_formats_without_text_and_email_with_subject_are_accepted() -> None:
    gateway, _ = make()
    assert sms_count(judge(gateway, f"demo:demo:1::,3,,1:{PHONE}:")) == 1
    assert sms_count(judge(gateway, f"demo:demo:2::,6,,1:{PHONE}:")) == 1
    mail = judge(gateway, "demo:demo:3::,8,me@example.org,1::someone@example.com:body\nsubj:Hi")
    assert [(d.phone, d.format, d.sender) for d in mail.deliveries] == [
        ("someone@example.com", 8, "me@example.org")
    ]
    assert error_of(judge(gateway, f"demo:demo:4::,0,me@example.org,1:{PHONE}:sms")) == 1


@pytest.mark.parametrize(
    "login_password",
    ["demo:wrong", "nobody:demo", ":not-a-key", "DEMO:demo"],
)
def test_credentials_errors_are_2(login_password: str) -> None:
    gateway, _ = make(api_keys=frozenset({"key-1"}))
    verdict = judge(gateway, f"{login_password}:1::,,,1:{PHONE}:hi")
    assert error_of(verdict) == 2
    assert render_reply(verdict.reply) == "ERROR = 2 (invalid login or password)"


def test_api_key_with_empty_login_and_extra_accounts() -> None:
    gateway, _ = make(accounts={"alice": "s3cret"}, api_keys=frozenset({"key-1"}))
    assert sms_count(judge(gateway, f":key-1:1::,,,1:{PHONE}:a")) == 1
    assert sms_count(judge(gateway, f"alice:s3cret:2::,,,1:{PHONE}:b")) == 1
    assert error_of(judge(gateway, f"demo:demo:3::,,,1:{PHONE}:c")) == 2


def test_balance_3_names_the_id_and_only_delivered_parts_are_charged() -> None:
    gateway, _ = make(balance=3, streak_limit=1)
    assert sms_count(judge(gateway, f"demo:demo:1::,,,1::{PHONE}:a\n{PHONE}:b")) == 2
    # The second line was held back by the streak rule: one part charged, two left.
    assert gateway.balance == 2
    too_much = judge(gateway, f"demo:demo:2::,,,1:{OTHER}:" + "x" * 400)
    assert error_of(too_much) == 3
    assert render_reply(too_much.reply) == "ERROR = 3 (insufficient funds), ID - 2"
    assert gateway.balance == 2
    assert sms_count(judge(gateway, f"demo:demo:3::,,,1:{OTHER}:" + "x" * 200)) == 2
    assert gateway.balance == 0


@pytest.mark.parametrize(
    ("when", "valid"),
    [
        ("", True),
        ("0", True),
        ("0101251230", True),
        ("01.01.25 12.30", True),
        ("9-21", True),
        ("01700000000", True),
        ("+30", True),
        ("0,3", True),
        ("+30,-2", True),
        ("0,-24", True),
        ("0,+24", True),
        ("3201251230", False),
        ("01.13.25 12.30", False),
        ("tomorrow", False),
        ("9-25", False),
        ("+", False),
        ("0,x", False),
        ("0,100", False),
        ("0,25", False),
        ("0,-25", False),
    ],
)
def test_time_format_errors_are_5(when: str, valid: bool) -> None:
    gateway, _ = make()
    verdict = judge(gateway, f"demo:demo:1:{when}:,,,1:{PHONE}:hi")
    if valid:
        assert sms_count(verdict) == 1
    else:
        assert error_of(verdict) == 5
        assert render_reply(verdict.reply) == "ERROR = 5 (invalid date format)"


def test_denied_sender_and_words_are_6_with_id() -> None:
    gateway, _ = make(denied_senders=frozenset({"Bank"}), denied_words=frozenset({"Casino"}))
    by_sender = judge(gateway, f"demo:demo:11::,,BANK,1:{PHONE}:hello")
    assert error_of(by_sender) == 6
    assert render_reply(by_sender.reply) == "ERROR = 6 (message denied), ID - 11"
    by_word = judge(gateway, f"demo:demo:12::,,,1::{PHONE}:fine\n{OTHER}:best cAsInO in town")
    assert error_of(by_word) == 6
    assert sms_count(judge(gateway, f"demo:demo:13::,,Shop,1:{PHONE}:hello")) == 1


@pytest.mark.parametrize(
    "recipient",
    ["12345", "phone", "+7999", "#user", "a@b.c", "G"],
)
def test_bad_recipients_are_7_with_id(recipient: str) -> None:
    gateway, _ = make()
    verdict = judge(gateway, f"demo:demo:21::,,,1::{PHONE}:ok\n{recipient}:hi")
    assert error_of(verdict) == 7
    assert render_reply(verdict.reply) == "ERROR = 7 (invalid phone number format), ID - 21"


def test_recipients_valid_for_their_format() -> None:
    gateway, _ = make()
    assert sms_count(judge(gateway, "demo:demo:1::,,,1:G12:to a group")) == 1
    assert sms_count(judge(gateway, f"demo:demo:2::,10,,1:{PHONE}:viber")) == 1
    assert error_of(judge(gateway, f"demo:demo:3::,8,me@example.org,1:{PHONE}:x\nsubj:s")) == 7


@pytest.mark.parametrize("fmt", [0, 1, 9, 10, 11, 12])
@pytest.mark.parametrize("recipient", ["#42", "@shop_bot", "#user_1"])
def test_ids_and_nicknames_are_7_outside_a_telegram_line(fmt: int, recipient: str) -> None:
    gateway, _ = make()
    verdict = judge(gateway, f"demo:demo:41::,{fmt},,1::{PHONE}:ok\n{recipient}:hi")
    assert error_of(verdict) == 7


def test_a_bot_line_goes_to_telegram_by_id_nickname_or_phone() -> None:
    gateway, _ = make()
    verdict = judge(
        gateway, f"demo:demo:51::,0,Shop,1::#42,@Shop_Bot:__BOT__:hello: you\n{PHONE}:__BOT__:hi"
    )
    assert sms_count(verdict) == 3
    assert [(d.phone, d.recipient, d.text, d.format, d.telegram) for d in verdict.deliveries] == [
        ("#42", "#42", "hello: you", 0, True),
        ("@Shop_Bot", "@shop_bot", "hello: you", 0, True),
        (PHONE, f"+{PHONE}", "hi", 0, True),
    ]
    # Not every line of an e-mail need be a Telegram one: the prefix decides per line.
    mixed = judge(gateway, f"demo:demo:52::,0,,1::{PHONE}:plain\n#42:__BOT__:bot")
    assert [(d.phone, d.telegram) for d in mixed.deliveries] == [(PHONE, False), ("#42", True)]


@pytest.mark.parametrize("recipient", ["#", "#12a", "@abc", "@bad-nick", "a@b.cc", "hello"])
def test_a_bot_line_refuses_what_is_not_a_telegram_recipient_with_7(recipient: str) -> None:
    gateway, _ = make()
    assert error_of(judge(gateway, f"demo:demo:61::,0,,1:{recipient}:__BOT__:hi")) == 7


def test_a_bot_line_still_needs_a_text() -> None:
    gateway, _ = make()
    assert error_of(judge(gateway, "demo:demo:62::,0,,1:#42:__BOT__:")) == 1


def test_telegram_and_sms_copies_are_different_requests() -> None:
    gateway, _ = make(identical_copies=1)
    assert sms_count(judge(gateway, f"demo:demo:71::,0,,1:{PHONE}:same")) == 1
    assert sms_count(judge(gateway, f"demo:demo:72::,0,,1:{PHONE}:__BOT__:same")) == 1
    assert error_of(judge(gateway, f"demo:demo:73::,0,,1:{PHONE}:__BOT__:same")) == 9


@pytest.mark.parametrize(
    "body",
    [
        "demo:demo:81::,8,,1:a@example.com:no sender\nsubj:S",
        "demo:demo:82::,8,Shop,1:a@example.com:a sender name\nsubj:S",
        "demo:demo:83::,0,Shop,1::a@example.com:__MAIL__:a mail line\nsubj:S",
    ],
)
def test_an_email_line_without_the_senders_address_is_1(body: str) -> None:
    gateway, _ = make()
    verdict = judge(gateway, body)
    assert error_of(verdict) == 1
    assert "sender's e-mail address" in verdict.reason


def test_an_email_line_with_the_senders_address_is_delivered() -> None:
    gateway, _ = make()
    mail = judge(gateway, "demo:demo:84::,8,me@example.org,1:a@example.com:hi\nsubj:S")
    assert [(d.phone, d.format, d.sender) for d in mail.deliveries] == [
        ("a@example.com", 8, "me@example.org")
    ]


def test_a_voice_lines_call_parameters_are_read_apart_from_its_text() -> None:
    gateway, _ = make()
    verdict = judge(
        gateway, f"demo:demo:91::,9,,1::{PHONE}:hello\\n~~~\\n10,20,3\n{OTHER}:plain\nvoice:w"
    )
    assert [(d.phone, d.text, d.voice_params) for d in verdict.deliveries] == [
        (PHONE, "hello", "10,20,3"),
        (OTHER, "plain", None),
    ]
    assert sms_count(verdict) == 2
    # Elsewhere the mark is just text.
    sms = judge(gateway, f"demo:demo:92::,0,,1:{PHONE}:hello\\n~~~\\nx")
    assert [(d.text, d.voice_params) for d in sms.deliveries] == [("hello\n~~~\nx", None)]


def test_channel_prefix_switches_the_line_format() -> None:
    gateway, _ = make()
    verdict = judge(gateway, f"demo:demo:1::,0,,1::{PHONE}:plain\n{OTHER}:__VIBER__:in viber")
    assert [(d.phone, d.format, d.text) for d in verdict.deliveries] == [
        (PHONE, 0, "plain"),
        (OTHER, 10, "in viber"),
    ]
    hlr = judge(gateway, f"demo:demo:2::,0,,1:{PHONE}:__HLR__")
    assert [(d.format, d.text) for d in hlr.deliveries] == [(3, "")]


def test_undeliverable_numbers_are_8_however_written() -> None:
    gateway, _ = make(undeliverable=frozenset({"+79990000000"}))
    verdict = judge(gateway, f"demo:demo:31::,,,1::{PHONE}:ok\n7 (999) 000-00-00:hi")
    assert error_of(verdict) == 8
    assert render_reply(verdict.reply) == "ERROR = 8 (message cannot be delivered), ID - 31"


def test_second_identical_request_within_the_window_is_9_whatever_its_id() -> None:
    gateway, clock = make(duplicate_window_s=60)
    assert sms_count(judge(gateway, f"demo:demo:1::,,,1:{PHONE}:same")) == 1
    clock.advance(10)
    second = judge(gateway, f"demo:demo:2::,,,1:+{PHONE}:same")
    assert error_of(second) == 9
    assert render_reply(second.reply) == "ERROR = 9 (duplicate request)"
    # Anything that differs is another request.
    assert sms_count(judge(gateway, f"demo:demo:4::,,,1:{PHONE}:other")) == 1
    assert sms_count(judge(gateway, f"demo:demo:5::,,Shop,1:{PHONE}:same")) == 1
    assert sms_count(judge(gateway, f"demo:demo:6:+5:,,,1:{PHONE}:same")) == 1
    assert sms_count(judge(gateway, f"demo:demo:7::,1,,1:{PHONE}:same")) == 1
    assert sms_count(judge(gateway, f"demo:demo:8::,,,1:{PHONE},{OTHER}:same")) == 2
    # The copy leaves the window 60 s after it came.
    clock.advance(49)
    assert error_of(judge(gateway, f"demo:demo:9::,,,1:{PHONE}:same")) == 9
    clock.advance(1)
    assert sms_count(judge(gateway, f"demo:demo:10::,,,1:{PHONE}:same")) == 1


def test_two_copies_per_window_when_configured() -> None:
    gateway, clock = make(duplicate_window_s=60, identical_copies=2)
    assert sms_count(judge(gateway, f"demo:demo:1::,,,1:{PHONE}:same")) == 1
    clock.advance(10)
    assert sms_count(judge(gateway, f"demo:demo:2::,,,1:{PHONE}:same")) == 1
    clock.advance(10)
    assert error_of(judge(gateway, f"demo:demo:3::,,,1:{PHONE}:same")) == 9
    clock.advance(40)
    assert sms_count(judge(gateway, f"demo:demo:4::,,,1:{PHONE}:same")) == 1


def test_copies_inside_one_mail_count_and_rejected_mails_do_not() -> None:
    gateway, _ = make()
    line = f"{PHONE}:same"
    assert error_of(judge(gateway, f"demo:demo:1::,,,1::{line}\n{line}")) == 9
    assert sms_count(judge(gateway, f"demo:demo:2::,,,1::{line}")) == 1
    assert error_of(judge(gateway, f"demo:demo:3::,,,1:{line}")) == 9


def test_streak_rule_holds_back_message_51_and_a_gap_resets_it() -> None:
    gateway, clock = make(streak_limit=3, streak_gap_s=100)
    for n in range(3):
        assert len(judge(gateway, f"demo:demo:{n + 1}::,,,1:{PHONE}:m{n}").deliveries) == 1
        clock.advance(99)
    held = judge(gateway, f"demo:demo:4::,,,1::{PHONE}:m3\n{OTHER}:m3")
    assert sms_count(held) == 2
    assert [d.phone for d in held.deliveries] == [OTHER]
    assert held.floods == ((PHONE, "m3", "4"),)
    # A held-back message still extends the streak: 99 s later it is still held back.
    clock.advance(99)
    assert judge(gateway, f"demo:demo:5::,,,1:{PHONE}:m4").floods == ((PHONE, "m4", "5"),)
    clock.advance(100)
    assert len(judge(gateway, f"demo:demo:6::,,,1:{PHONE}:m5").deliveries) == 1


def test_frequent_errors_block_the_ip_with_4_for_a_while() -> None:
    gateway, clock = make(block_after_errors=3, block_window_s=10, block_for_s=30)
    good = f"demo:demo:1::,,,1:{PHONE}:hi"
    for _ in range(2):
        assert error_of(judge(gateway, "garbage")) == 1
    clock.advance(11)  # those two fall out of the window
    for _ in range(2):
        assert error_of(judge(gateway, "garbage")) == 1
    assert sms_count(judge(gateway, good)) == 1
    assert error_of(judge(gateway, f"demo:wrong:2::,,,1:{PHONE}:hi")) == 2
    blocked = judge(gateway, good.replace("hi", "again"))
    assert error_of(blocked) == 4
    assert render_reply(blocked.reply) == "ERROR = 4 (IP address is temporarily blocked)"
    assert sms_count(judge(gateway, good.replace("hi", "other ip"), peer="192.0.2.2")) == 1
    clock.advance(29)
    assert error_of(judge(gateway, "garbage")) == 4
    clock.advance(1)
    assert sms_count(judge(gateway, good.replace("hi", "later"))) == 1


def test_first_failing_check_answers() -> None:
    gateway, _ = make(undeliverable=frozenset({PHONE}), denied_words=frozenset({"bad"}))
    assert error_of(judge(gateway, "demo:wrong:1:x:9,,,1:12:bad")) == 2
    assert error_of(judge(gateway, "demo:demo:1:x:9,,,1:12:bad")) == 1
    assert error_of(judge(gateway, "demo:demo:1:x:,,,1:12:bad")) == 5
    assert error_of(judge(gateway, f"demo:demo:1::,,,1:12,{PHONE}:bad")) == 7
    assert error_of(judge(gateway, f"demo:demo:1::,,,1:{PHONE}:bad")) == 6
    assert error_of(judge(gateway, f"demo:demo:1::,,,1:{PHONE}:good")) == 8
