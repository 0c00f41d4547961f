"""The fields of a send e-mail: what each one accepts, and the clear refusals."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.support.texts import sendable
from worker.errors import InvalidRequest
from worker.protocol.fields import (
    MAX_TEXT_CHARS,
    Format,
    SendTime,
    check_login,
    check_mail_id,
    check_option_line,
    check_password,
    check_plain_field,
    check_sender,
    check_text,
    escape_text,
    is_valid_time,
    new_mail_id,
    unescape_text,
)

FAST = settings(max_examples=150, deadline=None)


# --- login / password -------------------------------------------------------------------


@pytest.mark.parametrize("login", ["", "alex", "Alex-1_b.c", "логин", "user@example"])
def test_plain_logins_are_accepted(login: str) -> None:
    assert check_login(login) == login


@pytest.mark.parametrize(
    "login", ["al:ex", "al,ex", "al;ex", "al\nex", "al\rex", "al\u2028ex", "x[text]", "[/TEXT]"]
)
def test_logins_that_could_break_the_record_are_refused(login: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        check_login(login)
    assert info.value.code == "invalid_login"


def test_check_plain_field_may_allow_commas_but_never_colons() -> None:
    assert check_plain_field("x", "a,b", allow_comma=True) == "a,b"
    with pytest.raises(InvalidRequest):
        check_plain_field("x", "a,b")
    with pytest.raises(InvalidRequest):
        check_plain_field("x", "a:b", allow_comma=True)


def test_an_empty_password_is_refused() -> None:
    with pytest.raises(InvalidRequest) as info:
        check_password("")
    assert info.value.code == "invalid_password"


@pytest.mark.parametrize("bad", [":", ",", ";", "\n", "\r", "\x0b", "\u2029", "[text]", "[/Text]"])
def test_passwords_that_could_break_the_record_are_refused(bad: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        check_password(f"S3cr3tPa55{bad}word")
    assert info.value.code == "invalid_password"


@FAST
@given(
    secret=st.text(min_size=1, max_size=30),
    bad=st.sampled_from([":", ",", ";", "\n", "\r\n", "\u0085", "[text]", "\ud800"]),
    cut=st.integers(0, 30),
)
def test_password_errors_never_reveal_the_password(secret: str, bad: str, cut: int) -> None:
    password = "Pw#" + secret[:cut] + bad + secret[cut:]
    with pytest.raises(InvalidRequest) as info:
        check_password(password)
    for shown in (str(info.value), info.value.message, repr(info.value)):
        assert password not in shown
        assert "Pw#" not in shown
    assert info.value.code == "invalid_password"


@pytest.mark.parametrize("password", ["demo", "p@ss w0rd!", "пароль", "a" * 64, "ключ😀"])
def test_ordinary_passwords_are_accepted(password: str) -> None:
    assert check_password(password) == password


# --- id -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mail_id", ["1", "2147483647", "42", "abc", "a" * 40, "A.b-C_9", "batch-2024.01_x", "007"]
)
def test_documented_ids_are_accepted(mail_id: str) -> None:
    assert check_mail_id(mail_id) == mail_id


@pytest.mark.parametrize(
    "mail_id",
    ["", "0", "2147483648", "99999999999", "a" * 41, "a b", "a:b", "a,b", "a\nb", "é", "١٢٣", "+1"],
)
def test_ids_outside_the_documented_form_are_refused(mail_id: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        check_mail_id(mail_id)
    assert info.value.code == "invalid_id"


def test_a_new_mail_id_is_never_digits_alone() -> None:
    # About one uuid4 in 2.7 million is hex digits with no letter: a number to the gateway,
    # far past 2147483647, which it would refuse.
    draws = iter(["12345678123412341234123456789012", "0123456789abcdef0123456789abcdef"])
    mail_id = new_mail_id(lambda: next(draws))
    assert mail_id == "0123456789abcdef0123456789abcdef"
    assert check_mail_id(mail_id) == mail_id
    assert check_mail_id(new_mail_id()) != ""


@FAST
@given(st.integers(min_value=0, max_value=10**12))
def test_numeric_ids_are_accepted_exactly_within_range(number: int) -> None:
    # An id of digits alone is the numeric form, so it must be within 1..2147483647.
    if 1 <= number <= 2_147_483_647:
        assert check_mail_id(str(number)) == str(number)
    else:
        with pytest.raises(InvalidRequest):
            check_mail_id(str(number))


# --- sender -------------------------------------------------------------------------------


@pytest.mark.parametrize("sender", ["", "Alex", "SMS Centre", "A" * 11, "1" * 15, "Shop-1.ru"])
def test_registered_sender_forms_are_accepted(sender: str) -> None:
    assert check_sender(sender) == sender


@pytest.mark.parametrize(
    "sender", ["A" * 12, "1" * 16, "Al:ex", "Al,ex", "Al;ex", "Al\nex", "Алекс", "[text]"]
)
def test_other_senders_are_refused(sender: str) -> None:
    with pytest.raises(InvalidRequest):
        check_sender(sender)


def test_the_email_format_takes_the_senders_e_mail_address() -> None:
    address = "noreply@shop.example.com"
    assert check_sender(address, fmt=Format.email) == address
    assert check_sender("Shop", fmt=Format.email) == "Shop"
    with pytest.raises(InvalidRequest):
        check_sender(address)  # an SMS sender name is at most 11 characters
    with pytest.raises(InvalidRequest):
        check_sender(address, fmt=Format.sms)


@pytest.mark.parametrize(
    "sender", ["a@b", "a:b@c.de", "a,b@c.de", "a b@c.de", "@c.de", "x@[text].d"]
)
def test_the_email_format_refuses_what_is_not_a_plain_address(sender: str) -> None:
    with pytest.raises(InvalidRequest):
        check_sender(sender, fmt=Format.email)


# --- subj: / voice: lines ------------------------------------------------------------------


@pytest.mark.parametrize("value", ["Hello", "", "Тема: важное", "a,b;c:d", "C:\\temp"])
def test_option_lines_accept_single_line_values(value: str) -> None:
    assert check_option_line("subject", value) == value


@pytest.mark.parametrize("value", ["a\nvoice:x", "a\rb", "a\u2028b", "a\\nb", "[text]", "x[/text]"])
def test_option_lines_refuse_what_would_forge_a_line(value: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        check_option_line("subject", value)
    assert info.value.code == "invalid_subject"


# --- the message text -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "__CALL__:hello",
        "__VIBER__:hi",
        "__SOC__:hi",
        "__MAIL__:hi",
        "__BOT__:hi",
        "__PING__",
        "__HLR__",
        "  __CALL__:leading blanks",
        "\n__VIBER__:after a newline",
        "__call__:lower case",
        "__PING__ and more",
    ],
)
def test_texts_starting_with_a_reserved_prefix_are_refused(text: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        check_text(text)
    assert info.value.code == "reserved_prefix"
    assert "prefix" in info.value.message


@pytest.mark.parametrize(
    "text", ["call me: __CALL__:x", "__CALL__ without colon", "_PING_", "x__HLR__"]
)
def test_reserved_words_elsewhere_in_a_text_are_fine(text: str) -> None:
    assert check_text(text) == text


@pytest.mark.parametrize("text", ["C:\\new", "a\\nb", "\\n", "line\\n\nnext"])
def test_texts_with_a_literal_backslash_n_are_refused(text: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        check_text(text)
    assert info.value.code == "unsendable_text"
    assert "backslash" in info.value.message


@pytest.mark.parametrize("text", ["[text]hi", "hi[/text]", "x [TEXT] y", "[/Text]"])
def test_texts_with_text_tags_are_refused(text: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        check_text(text)
    assert info.value.code == "unsendable_text"
    assert "[text]" in info.value.message


@pytest.mark.parametrize("text", ["a\rb", "a\x0bb", "a\x0cb", "a\x85b", "a\u2028b", "a\u2029b"])
def test_texts_with_line_separators_other_than_newline_are_refused(text: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        check_text(text)
    assert info.value.code == "unsendable_text"


def test_a_lone_surrogate_is_refused() -> None:
    with pytest.raises(InvalidRequest) as info:
        check_text("broken \ud83d text")
    assert info.value.code == "unsendable_text"


def test_the_text_length_limit_is_1000_characters() -> None:
    assert check_text("я" * MAX_TEXT_CHARS) == "я" * MAX_TEXT_CHARS
    assert check_text("😀" * MAX_TEXT_CHARS) == "😀" * MAX_TEXT_CHARS
    with pytest.raises(InvalidRequest) as info:
        check_text("a" * (MAX_TEXT_CHARS + 1))
    assert info.value.code == "text_too_long"
    assert "1001" in info.value.message


@pytest.mark.parametrize(
    "text", ["", "a:b;c,d", "back\\slash", "trailing\\", "\\\n", "x\n~~~\nparam", "[text", "ёЁ😀"]
)
def test_ordinary_texts_are_accepted(text: str) -> None:
    assert check_text(text) == text


def test_newlines_are_written_as_backslash_n() -> None:
    assert escape_text("one\ntwo\n") == "one\\ntwo\\n"
    assert "\n" not in escape_text("a\n\n\nb")


@FAST
@given(st.text(alphabet=st.sampled_from(list("ab\\n\n:;, \r[]")), max_size=60))
@example("\\\n")
@example("\\\nn")
def test_escaping_round_trips_and_never_leaves_a_line_break(text: str) -> None:
    if not sendable(text):
        with pytest.raises(InvalidRequest):
            escape_text(text)
        return
    escaped = escape_text(text)
    assert "\n" not in escaped
    assert "\r" not in escaped
    assert unescape_text(escaped) == text


# --- time / tz -------------------------------------------------------------------------------


def test_send_at_is_written_as_unix_seconds() -> None:
    moment = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert SendTime.at(moment).render() == f"0{int(moment.timestamp())}"
    moscow = moment.astimezone(timezone(timedelta(hours=3)))
    assert SendTime.at(moscow) == SendTime.at(moment)


def test_send_at_needs_a_time_zone() -> None:
    with pytest.raises(InvalidRequest):
        SendTime.at(datetime(2030, 1, 1, 12, 0))


def test_a_long_past_send_at_is_sent_now_and_never_reads_as_a_date() -> None:
    # 0 + 9 digits would be ten digits, the DDMMYYhhmm form: "0101301200" is 01.01.30 12:00.
    assert SendTime.at(datetime(1973, 3, 18, 1, 0, tzinfo=UTC)).render() == "0"
    assert SendTime.at(datetime(1960, 1, 1, tzinfo=UTC)).render() == "0"


def test_window_and_delay_forms() -> None:
    assert SendTime.window(9, 21).render() == "9-21"
    assert SendTime.window(9, 21, tz=-2).render() == "9-21,-2"
    assert SendTime.after_minutes(30).render() == "+30"
    assert SendTime().render() == ""
    assert SendTime("0112251230", tz=0).render() == "0112251230,0"
    with pytest.raises(InvalidRequest):
        SendTime.window(9, 25)
    with pytest.raises(InvalidRequest):
        SendTime.after_minutes(-1)


@pytest.mark.parametrize("time", ["12:30", "1,2", "tomorrow", "0112251230\n", "+٣", "32122512.30"])
def test_a_time_outside_the_documented_forms_is_refused(time: str) -> None:
    with pytest.raises(InvalidRequest):
        SendTime(time)


@pytest.mark.parametrize("tz", [25, -25, 100])
def test_a_tz_out_of_range_is_refused(tz: int) -> None:
    with pytest.raises(InvalidRequest):
        SendTime("9-21", tz=tz)


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("", True),
        ("0", True),
        ("0112251230", True),
        ("01.12.25 12.30", True),
        ("9-21", True),
        ("01700000000", True),
        ("+15", True),
        ("3213251230", False),
        ("1513251230", False),
        ("01.12.25 24.00", False),
        ("9-25", False),
        ("+", False),
        ("abc", False),
        ("0١٢", False),
    ],
)
def test_is_valid_time(value: str, valid: bool) -> None:
    assert is_valid_time(value) is valid
