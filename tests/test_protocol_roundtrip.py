"""decode(encode(x)) == x: every field, every line, in koi8-r and utf-8, with and without
text tags; and no text, however hostile, changes the recipients or the number of lines."""

from __future__ import annotations

import email
import email.policy
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from tests.support.texts import sendable
from worker.errors import InvalidRequest
from worker.protocol.decode import (
    DecodedBody,
    DecodedLine,
    MalformedMail,
    body_text,
    decode_body,
    decode_mail,
    first_item,
    recipient_shaped,
    split_phones,
)
from worker.protocol.fields import (
    Format,
    SendTime,
    Translit,
    check_login,
    check_option_line,
    check_password,
    check_sender,
    is_email_sender,
)
from worker.protocol.mail import (
    Account,
    Envelope,
    ListLine,
    MailOptions,
    encode_mail,
    encode_single,
)

ROUND_TRIP = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
DATE = "Tue, 25 Nov 2025 18:00:00 +0000"
MSG_ID = "<rt@worker.example>"


def fits(text: str, charset: str) -> bool:
    try:
        text.encode(charset)
    except UnicodeEncodeError:
        return False
    return True


KOI8_CHARS = sorted(
    {bytes([b]).decode("koi8-r") for b in range(256)} - set("\r\x0b\x0c\x1c\x1d\x1e")
)
TRICKY = list(":;,\\\n []/_~€ёЁжЯİ😀🎉#+G\t\"'<>.-=~")

any_char = st.characters(codec="utf-8")  # every code point but lone surrogates
koi8_char = st.sampled_from(KOI8_CHARS)


def joined(pieces: st.SearchStrategy[str], max_size: int) -> st.SearchStrategy[str]:
    """Strings made of whole pieces (st.text takes single characters only)."""
    return st.lists(pieces, max_size=max_size).map("".join)


def texts(chars: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Texts the encoder accepts: short mixes of tricky and arbitrary characters, and
    texts of exactly 1000 characters."""
    pieces = st.one_of(chars, st.sampled_from(TRICKY), st.sampled_from(["\n", "\\", ":", "\\\n"]))
    short = joined(pieces, 60)
    long = st.builds(lambda seed, pad: (seed + pad * 1000)[:1000], joined(pieces, 30), chars)
    return st.one_of(short, short, long).filter(sendable)


def option_values(chars: st.SearchStrategy[str]) -> st.SearchStrategy[str | None]:
    def ok(value: str) -> bool:
        try:
            check_option_line("subject", value)
        except InvalidRequest:
            return False
        return True

    return st.one_of(st.none(), st.text(alphabet=chars, max_size=40).filter(ok))


PHONES = st.sampled_from(["79991234567", "+79997654321", "G12", "79990000001", "+447911123456"])
EMAILS = st.sampled_from(["a@example.com", "John.Doe+x@mail.example.ru", "b_c@d.org"])
TELEGRAM_IDS = st.sampled_from(["#1", "#42", "#123456789012", "@shop_bot", "@Nick_Name"])
VOICE_PARAMS = st.one_of(st.none(), st.from_regex(r"[A-Za-z0-9,.=_+-]{1,64}", fullmatch=True))

mail_ids = st.one_of(
    st.integers(min_value=1, max_value=2_147_483_647).map(str),
    st.text(alphabet="abcxyzABCXYZ0123456789._-", min_size=1, max_size=40).filter(
        lambda s: not (s.isdecimal() and not 1 <= int(s) <= 2_147_483_647)
    ),
)
send_times = st.one_of(
    st.just(SendTime()),
    st.builds(
        SendTime.at,
        st.datetimes(
            min_value=datetime(2002, 1, 1), max_value=datetime(2099, 1, 1), timezones=st.just(UTC)
        ),
    ),
    st.builds(
        SendTime.window,
        st.integers(0, 24),
        st.integers(0, 24),
        st.one_of(st.none(), st.integers(-24, 24)),
    ),
    st.builds(SendTime.after_minutes, st.integers(0, 10**6)),
    st.just(SendTime("0112251230", tz=2)),
    st.just(SendTime("01.12.25 12.30")),
)
# A sender is drawn for the format it goes with: the email format's sender is the sender's
# e-mail address (and check_sender reads any sender with `@` there as one); every other
# format takes a registered name (which may hold `@`, but is not an address) or digits.
SMS_SENDERS = st.one_of(
    st.just(""),
    st.from_regex(r"[A-Za-z0-9 .\-_!&'+@#]{1,11}", fullmatch=True).filter(
        lambda s: not is_email_sender(s)
    ),
    st.from_regex(r"[0-9]{1,15}", fullmatch=True),
)
EMAIL_SENDERS = st.one_of(
    EMAILS,
    st.from_regex(
        r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,30}@[A-Za-z0-9-]{1,12}(\.[A-Za-z0-9-]{1,12}){1,3}",
        fullmatch=True,
    ),
)


def senders(fmt: Format) -> st.SearchStrategy[str]:
    return EMAIL_SENDERS if fmt == Format.email else SMS_SENDERS


@dataclass(frozen=True)
class Case:
    envelope: Envelope
    account: Account
    mail_id: str
    options: MailOptions
    lines: tuple[ListLine, ...]
    single: bool


def logins(chars: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    def ok(value: str) -> bool:
        try:
            check_login(value)
        except InvalidRequest:
            return False
        return True

    return st.one_of(st.just(""), st.text(alphabet=chars, min_size=1, max_size=20).filter(ok))


def passwords(chars: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    def ok(value: str) -> bool:
        try:
            check_password(value)
        except InvalidRequest:
            return False
        return True

    return st.text(alphabet=chars, min_size=1, max_size=40).filter(ok)


@st.composite
def cases(draw: st.DrawFn, alphabet: str) -> Case:
    """`alphabet` "koi8-r" keeps every field within koi8-r; "any" takes any character."""
    chars = koi8_char if alphabet == "koi8-r" else any_char
    charset = draw(st.sampled_from(["koi8-r", "koi8-r", "utf-8", "windows-1251"]))
    fmt = draw(st.sampled_from(list(Format)))
    telegram = fmt == Format.sms and draw(st.booleans())
    recipients = TELEGRAM_IDS | PHONES if telegram else EMAILS if fmt == Format.email else PHONES
    subject = draw(option_values(chars))
    if fmt == Format.email and not subject:
        subject = "Subject"
    options = MailOptions(
        send_time=draw(send_times),
        translit=draw(st.one_of(st.none(), st.sampled_from(list(Translit)))),
        format=fmt,
        sender=draw(senders(fmt)),
        test=draw(st.booleans()),
        subject=subject,
        voice=draw(option_values(chars)),
        telegram=telegram,
    )
    single = draw(st.booleans())
    phones = st.lists(recipients, min_size=1, max_size=4).map(tuple)
    if fmt == Format.voice:
        # A voice text holds no `~~~`; its call's parameters, if any, go after `\n~~~\n`.
        voice_texts = texts(chars).filter(lambda t: "~~~" not in t)
        line = st.builds(ListLine, phones, voice_texts, VOICE_PARAMS).filter(
            lambda line: len(line.message) <= 1000
        )
    else:
        line = st.builds(ListLine, phones, texts(chars))
    lines = draw(st.lists(line, min_size=1, max_size=1 if single else 5))
    return Case(
        envelope=Envelope(
            mail_from="worker@example.com", charset=charset, text_tags=draw(st.booleans())
        ),
        account=Account(draw(logins(chars)), SecretStr(draw(passwords(chars)))),
        mail_id=draw(mail_ids),
        options=options,
        lines=tuple(lines),
        single=single,
    )


def encode(case: Case) -> bytes:
    if case.single:
        (line,) = case.lines
        return encode_single(
            case.envelope,
            case.account,
            case.mail_id,
            case.options,
            line,
            date=DATE,
            message_id=MSG_ID,
        )
    return encode_mail(
        case.envelope,
        case.account,
        case.mail_id,
        case.options,
        case.lines,
        date=DATE,
        message_id=MSG_ID,
    )


def expected_body(case: Case) -> DecodedBody:
    options = case.options
    return DecodedBody(
        login=case.account.login,
        password=case.account.password.get_secret_value(),
        mail_id=case.mail_id,
        time=options.send_time.time,
        tz=None if options.send_time.tz is None else str(options.send_time.tz),
        translit="" if options.translit is None else str(int(options.translit)),
        format=str(int(options.format)),
        sender=options.sender,
        test="1" if options.test else "0",
        list_mode=not case.single,
        lines=tuple(
            DecodedLine(line.phones, ("__BOT__:" if options.telegram else "") + line.message)
            for line in case.lines
        ),
        subject=options.subject,
        voice=options.voice,
    )


def check_round_trip(case: Case) -> None:
    raw = encode(case)
    decoded = decode_mail(raw)
    assert decoded.body == expected_body(case)
    everything = [
        case.account.login,
        case.account.password.get_secret_value(),
        case.options.sender,
        case.options.subject or "",
        case.options.voice or "",
        *(line.message for line in case.lines),
    ]
    carried = all(fits(t, case.envelope.charset) for t in everything)
    # The configured charset when it can carry everything; otherwise utf-8, never a
    # lossy substitution.
    assert decoded.charset == (case.envelope.charset if carried else "utf-8")
    assert decoded.mail_from == case.envelope.mail_from
    assert decoded.to == (case.envelope.gateway_address,)
    assert decoded.message_id == MSG_ID
    event(f"charset {decoded.charset}")
    event("1000-character text" if any(len(x.text) == 1000 for x in case.lines) else "short texts")
    event("single" if case.single else "list mode")
    if case.options.format == Format.email:
        event("email format, e-mail address sender")
    if case.options.telegram:
        event("telegram")
    if any(line.voice_params for line in case.lines):
        event("voice call parameters")


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(list(Format)), st.data())
def test_senders_are_drawn_valid_for_their_format(fmt: Format, data: st.DataObject) -> None:
    sender = data.draw(senders(fmt))
    assert check_sender(sender, fmt=fmt) == sender
    assert is_email_sender(sender) == (fmt == Format.email)


@ROUND_TRIP
@given(cases("koi8-r"))
def test_round_trip_koi8r_texts(case: Case) -> None:
    check_round_trip(case)


@ROUND_TRIP
@given(cases("any"))
def test_round_trip_any_texts(case: Case) -> None:
    # In a koi8-r envelope, whatever koi8-r cannot carry must switch the whole e-mail to
    # utf-8 (declared in Content-Type), never be dropped or transliterated.
    check_round_trip(case)


def encode_as_alex(
    envelope: Envelope, options: MailOptions, lines: list[ListLine], single: bool
) -> bytes:
    """Account alex:pw, mail id 5: the single-message form of lines[0], or list mode."""
    account = Account("alex", SecretStr("pw"))
    if single:
        return encode_single(
            envelope, account, "5", options, lines[0], date=DATE, message_id=MSG_ID
        )
    return encode_mail(envelope, account, "5", options, lines, date=DATE, message_id=MSG_ID)


HOSTILE = st.sampled_from(
    [
        "\n", "\n79990000000:evil", ":", "::", ",", ";", "\\", "\\\n", "subj:", "voice:",
        "\nsubj:x", "\nvoice:y", "G1", "79990000000", "+79990000000", "[text]", "[/text]",
        "\r\n", "\r", "\\n", "__CALL__:", "__PING__", "\u2028", "\x85", "#x", "\n\n",
        "a@b.com", " ", "ж", "😀",
    ]
)  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.lists(HOSTILE, max_size=8).map("".join), min_size=1, max_size=4),
    st.booleans(),
    st.booleans(),
)
@example(["\n79990000000:evil"], True, False)
@example(["a\\\n79990000000:evil"], False, True)
def test_no_text_changes_the_recipients_or_the_number_of_lines(
    texts_: list[str], single: bool, text_tags: bool
) -> None:
    """Texts the encoder rejects raise InvalidRequest; all others leave the recipients and
    the line count exactly as they were."""
    envelope = Envelope(mail_from="worker@example.com", text_tags=text_tags)
    if single:
        texts_ = texts_[:1]
    lines = [ListLine(("79991234567", f"G{i}"), text) for i, text in enumerate(texts_)]
    try:
        raw = encode_as_alex(envelope, MailOptions(subject="S"), lines, single)
    except InvalidRequest:
        assert not all(sendable(t) for t in texts_)
        return
    assert all(sendable(t) for t in texts_)
    body = decode_mail(raw).body
    assert len(body.lines) == len(lines)
    assert [line.phones for line in body.lines] == [line.phones for line in lines]
    assert [line.text for line in body.lines] == texts_
    assert body.subject == "S"
    assert body.voice is None
    assert (body.login, body.password, body.mail_id) == ("alex", "pw", "5")


@settings(max_examples=200, deadline=None)
@given(joined(st.one_of(any_char, HOSTILE), 12))
def test_rejected_texts_raise_invalid_request_in_both_encoders(text: str) -> None:
    """Whatever check_text refuses, both encoders refuse with InvalidRequest; whatever it
    accepts, both send."""
    envelope = Envelope(mail_from="worker@example.com")
    account = Account("alex", SecretStr("pw"))
    line = ListLine(("79991234567",), text)

    def both() -> None:
        encode_single(envelope, account, "5", MailOptions(), line, date=DATE, message_id=MSG_ID)
        encode_mail(envelope, account, "5", MailOptions(), [line], date=DATE, message_id=MSG_ID)

    if sendable(text):
        event("accepted")
        both()
    else:
        event("rejected")
        with pytest.raises(InvalidRequest):
            both()


FIELDS = ("login", "password", "sender", "mail_id", "subject", "voice")


@settings(max_examples=400, deadline=None)
@given(
    field=st.sampled_from(FIELDS),
    value=joined(HOSTILE | st.sampled_from("ab1"), 5),
    text_tags=st.booleans(),
)
@example(field="password", value="[text]", text_tags=False)
@example(field="login", value="a[/text]", text_tags=True)
@example(field="subject", value="a\\nvoice:x", text_tags=False)
def test_no_other_field_can_add_a_field_a_line_or_a_recipient(
    field: str, value: str, text_tags: bool
) -> None:
    """Each field either is refused (InvalidRequest) or comes back exactly as given, and
    the lines and their recipients stay as they were."""
    given_ = {"login": "alex", "password": "pw", "sender": "", "mail_id": "5"}
    given_["subject"] = given_["voice"] = "S"
    given_[field] = value
    try:
        account = Account(given_["login"], SecretStr(given_["password"]))
        options = MailOptions(
            sender=given_["sender"], subject=given_["subject"], voice=given_["voice"]
        )
        raw = encode_mail(
            Envelope(mail_from="worker@example.com", text_tags=text_tags),
            account,
            given_["mail_id"],
            options,
            [ListLine(("79991234567",), "one"), ListLine(("G1",), "two")],
            date=DATE,
            message_id=MSG_ID,
        )
    except InvalidRequest:
        event("refused")
        return
    event("accepted")
    body = decode_mail(raw).body
    got = {
        "login": body.login,
        "password": body.password,
        "sender": body.sender,
        "mail_id": body.mail_id,
        "subject": body.subject,
        "voice": body.voice,
    }
    assert got == given_
    assert [(line.phones, line.text) for line in body.lines] == [
        (("79991234567",), "one"),
        (("G1",), "two"),
    ]


def semicolon_separated(body: str, case: Case) -> str:
    """`body` with `;` instead of `:` between the phones and the message of each list line,
    the other way the seed allows."""
    rows = body.split("\r\n")
    for n, line in enumerate(case.lines):
        rendered = line.render(case.options)
        phones = ",".join(line.phones)
        assert rendered.startswith(phones + ":")
        # The first list line follows the six colon-separated fields of the first line.
        lead = ":".join(rows[0].split(":", 6)[:6]) + ":" if n == 0 else ""
        assert rows[n] == lead + rendered
        rows[n] = lead + phones + ";" + rendered[len(phones) + 1 :]
    return "\r\n".join(rows)


@ROUND_TRIP
@given(cases("any").filter(lambda case: not case.single))
@example(
    Case(
        Envelope(mail_from="w@example.com"),
        Account("l", SecretStr("p")),
        "1",
        MailOptions(),
        (ListLine(("79991234567",), "Time: 10:00; ok"), ListLine(("G12", "+447911123456"), "")),
        single=False,
    )
)
def test_list_lines_read_the_same_with_semicolons(case: Case) -> None:
    # Where a message begins with something that reads as one more recipient, the `;` form is
    # ambiguous, and the phones win (test_an_ambiguous_semicolon_line_reads_as_phones).
    assume(not any(recipient_shaped(first_item(line.text)) for line in case.lines))
    message = email.message_from_bytes(encode(case), policy=email.policy.compat32)
    body, _ = body_text(message)
    rewritten = decode_body(semicolon_separated(body, case))
    assert rewritten == expected_body(case)
    assert rewritten == decode_body(body)


@pytest.mark.parametrize(
    ("line", "phones", "text"),
    [
        ("79161234567;Time: 10:00", ("79161234567",), "Time: 10:00"),
        ("79161234567;hello; world", ("79161234567",), "hello; world"),
        ("79161234567,79161234568;Привет", ("79161234567", "79161234568"), "Привет"),
        ("79161234567;79161234568:hi", ("79161234567", "79161234568"), "hi"),
        ("G1;#id;a@b.c:x", ("G1", "#id", "a@b.c"), "x"),
        ("+7 (916) 123-45-67;a:b;c", ("+7 (916) 123-45-67",), "a:b;c"),
        ("79161234567;", ("79161234567",), ""),  # an HLR or ping line
        ("79161234567;;x", ("79161234567",), ";x"),
        ("79161234567;:x", ("79161234567",), ":x"),
        ("79161234567;12345", ("79161234567",), "12345"),
        ("79161234567:a;b:c", ("79161234567",), "a;b:c"),
    ],
)
def test_a_list_line_takes_either_separator(line: str, phones: tuple[str, ...], text: str) -> None:
    body = decode_body(f"l:p:1::,0,,1::79990000000:first\r\n{line}")
    assert body.lines[1] == DecodedLine(phones, text)
    first = decode_body(f"l:p:1::,0,,1::{line}")
    assert first.lines == (DecodedLine(phones, text),)


def test_an_ambiguous_semicolon_line_reads_as_phones() -> None:
    # "79161234568:hi" could be the message of one recipient, or a second recipient and
    # "hi": the phones win, so a misreading draws error 7 rather than a changed text.
    body = decode_body("l:p:1::,0,,1::79161234567;79161234568:hi\r\n7916;12;34")
    assert body.lines == (
        DecodedLine(("79161234567", "79161234568"), "hi"),
        DecodedLine(("7916", "12"), "34"),
    )


@settings(max_examples=300, deadline=None)
@given(params=joined(HOSTILE | st.sampled_from("a1,=~"), 6), single=st.booleans())
@example(params="1\n79990000000:evil", single=False)
@example(params="x\\nvoice:y", single=True)
def test_no_call_parameters_can_add_a_line_or_a_recipient(params: str, single: bool) -> None:
    """A voice call's parameters are refused (InvalidRequest) or come back exactly as given,
    after the text and the separator, with the lines and recipients as they were."""
    envelope = Envelope(mail_from="worker@example.com")
    options = MailOptions(format=Format.voice, voice="w")
    lines = [ListLine(("79991234567",), "one", params), ListLine(("G1",), "two")][
        : 1 if single else 2
    ]
    try:
        raw = encode_as_alex(envelope, options, lines, single)
    except InvalidRequest:
        event("refused")
        return
    event("accepted")
    body = decode_mail(raw).body
    assert [(line.phones, line.text) for line in body.lines] == [
        (line.phones, line.message) for line in lines
    ]
    assert body.lines[0].text == "one\n~~~\n" + params
    assert (body.subject, body.voice) == (None, "w")


# --- decode_body / decode_mail on their own -------------------------------------------------


def test_decode_body_reads_the_vendor_examples() -> None:
    body = decode_body("alex:123::::79999999999:message")
    assert (body.login, body.password, body.mail_id, body.time, body.tz) == (
        "alex",
        "123",
        "",
        "",
        None,
    )
    assert body.lines == (DecodedLine(("79999999999",), "message"),)
    assert not body.list_mode
    body = decode_body("alex:psw:::1,1,Alex:79999999999:message")
    assert (body.translit, body.format, body.sender, body.test) == ("1", "1", "Alex", "")
    body = decode_body("alex:psw:::,1,,1:79999999999;79990000000:a:b")
    assert (body.format, body.test) == ("1", "1")
    assert body.lines == (DecodedLine(("79999999999", "79990000000"), "a:b"),)


def test_decode_body_list_mode_with_options() -> None:
    body = decode_body(
        "[TEXT]l:p:7:0112251230,3:,8,,1::a@b.c:one\\ntwo\r\nc@d.e;f@g.h:x\r\n"
        "subj:Hello\r\nvoice:w\r\n[/TEXT]\r\n"
    )
    assert body.list_mode
    assert (body.time, body.tz, body.subject, body.voice) == ("0112251230", "3", "Hello", "w")
    assert body.lines == (
        DecodedLine(("a@b.c",), "one\ntwo"),
        DecodedLine(("c@d.e", "f@g.h"), "x"),
    )


def test_decode_body_finds_the_tags_in_the_text_as_written() -> None:
    # "İ".lower() is two characters: offsets taken from a lowered copy would cut the text.
    body = decode_body("[text]l:p:1::,0,,1:79991234567:İİİ x[/text]")
    assert body.lines[0].text == "İİİ x"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "\r\n\r\n",
        "l:p:1::,0,,1",
        "l:p:1::a,b,c,d,e:7999:x",
        "l:p:1::,0,,1:7999:x\r\nextra line",
        "l:p:1::,0,,1::7999:x\r\nline without colon",
    ],
)
def test_malformed_bodies(text: str) -> None:
    with pytest.raises(MalformedMail):
        decode_body(text)


def test_split_phones_takes_commas_and_semicolons() -> None:
    assert split_phones("7999, 7888;G1;;") == ("7999", "7888", "G1")


def test_decode_mail_reads_a_multipart_mail() -> None:
    raw = (
        b"From: a@b.c\r\nTo: send@send.smscentre.com\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/alternative; boundary="XX"\r\n\r\n'
        b"--XX\r\nContent-Type: text/html\r\n\r\n<p>no</p>\r\n"
        b'--XX\r\nContent-Type: text/plain; charset="utf-8"\r\n\r\n'
        + "l:p:1::,0,,1:79991234567:Привет\r\n".encode()
        + b"--XX--\r\n"
    )
    decoded = decode_mail(raw)
    assert decoded.charset == "utf-8"
    assert decoded.body.lines == (DecodedLine(("79991234567",), "Привет"),)


def test_decode_mail_without_a_charset_uses_koi8r() -> None:
    raw = b"From: a@b.c\r\nTo: x@y.z\r\n\r\n" + "l:p:1::,0,,1:7999:Привет\r\n".encode("koi8-r")
    decoded = decode_mail(raw)
    assert decoded.charset == "koi8-r"
    assert decoded.body.lines[0].text == "Привет"


@pytest.mark.parametrize(
    "raw",
    [
        b"From: a@b.c\r\nContent-Type: text/plain; charset=bogus\r\n\r\nl:p:1::,0,,1:7:x\r\n",
        b"From: a@b.c\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nl:p:1::,0,,1:7:\xff\r\n",
        b"From: a@b.c\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
        b"Content-Type: text/html\r\n\r\nx\r\n--B--\r\n",
    ],
)
def test_decode_mail_refuses_unreadable_mails(raw: bytes) -> None:
    with pytest.raises(MalformedMail):
        decode_mail(raw)
