"""Encoding send e-mails: the body record, list mode, charsets, tags and the size limits."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from tests.support.texts import sendable
from worker.errors import InvalidRequest
from worker.protocol.decode import decode_mail
from worker.protocol.fields import Format, SendTime, Translit
from worker.protocol.mail import (
    MAX_LINE_OCTETS,
    MAX_MAIL_BYTES,
    Account,
    Envelope,
    ListLine,
    MailBuilder,
    MailOptions,
    encode_mail,
    encode_single,
    pick_charset,
)

DATE = "Tue, 25 Nov 2025 18:00:00 +0000"
MSG_ID = "<m1@worker.example>"
ENVELOPE = Envelope(mail_from="worker@example.com")
ACCOUNT = Account("alex", SecretStr("123"))
PHONE = "79991234567"
OTHER = "+79997654321"


def single(
    text: str = "message",
    *,
    envelope: Envelope = ENVELOPE,
    account: Account = ACCOUNT,
    options: MailOptions | None = None,
    phones: tuple[str, ...] = (PHONE,),
    mail_id: str = "1",
    voice_params: str | None = None,
) -> bytes:
    return encode_single(
        envelope,
        account,
        mail_id,
        options or MailOptions(),
        ListLine(phones, text, voice_params),
        date=DATE,
        message_id=MSG_ID,
    )


def listed(
    lines: list[ListLine],
    *,
    envelope: Envelope = ENVELOPE,
    account: Account = ACCOUNT,
    options: MailOptions | None = None,
    mail_id: str = "1",
    limit: int = MAX_MAIL_BYTES,
) -> bytes:
    return encode_mail(
        envelope,
        account,
        mail_id,
        options or MailOptions(),
        lines,
        date=DATE,
        message_id=MSG_ID,
        limit=limit,
    )


def parsed(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def body_of(raw: bytes) -> str:
    content = parsed(raw).get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")


def assert_wellformed(raw: bytes, charset: str) -> EmailMessage:
    """What an MTA and the gateway's mail reader rely on."""
    assert len(raw) <= MAX_MAIL_BYTES
    head, sep, _ = raw.partition(b"\r\n\r\n")
    assert sep, "headers must end with an empty line"
    head.decode("ascii")
    assert b"\n" not in raw.replace(b"\r\n", b""), "every line ends with CRLF"
    assert b"\r" not in raw.replace(b"\r\n", b"")
    assert all(len(line) <= MAX_LINE_OCTETS for line in raw.split(b"\r\n"))
    message = parsed(raw)
    assert not message.defects
    assert message["From"] == "worker@example.com"
    assert message["To"] == "send@send.smscentre.com"
    assert message["Subject"] == ""
    assert message["Date"] == DATE
    assert message["Message-ID"] == MSG_ID
    assert message["MIME-Version"] == "1.0"
    assert message.get_content_type() == "text/plain"
    assert message.get_content_charset() == charset
    assert message["Content-Transfer-Encoding"] in ("8bit", "base64")
    return message


# --- the record ----------------------------------------------------------------------------


def test_single_message_form_as_the_vendor_libraries_write_it() -> None:
    raw = single("message")
    assert_wellformed(raw, "koi8-r")
    assert body_of(raw) == "alex:123:1::,0,,1:79991234567:message\n"


def test_every_field_of_the_first_line() -> None:
    options = MailOptions(
        send_time=SendTime.window(9, 21, tz=-1),
        translit=Translit.mpahc,
        format=Format.flash,
        sender="Shop",
        test=False,
    )
    raw = single("hi", options=options, mail_id="order-7", phones=(PHONE, OTHER))
    assert body_of(raw) == "alex:123:order-7:9-21,-1:2,1,Shop,0:79991234567,+79997654321:hi\n"


def test_an_empty_login_makes_the_password_an_api_key() -> None:
    raw = single("hi", account=Account("", SecretStr("API-KEY-123")))
    assert body_of(raw).startswith(":API-KEY-123:1:")


def test_list_mode_puts_the_first_line_after_the_double_colon() -> None:
    lines = [
        ListLine((PHONE,), "first"),
        ListLine((OTHER, "G5"), "second: with colon"),
        ListLine(("79990000001",), "third\nline"),
    ]
    raw = listed(lines)
    assert_wellformed(raw, "koi8-r")
    assert body_of(raw) == (
        "alex:123:1::,0,,1::79991234567:first\n"
        "+79997654321,G5:second: with colon\n"
        "79990000001:third\\nline\n"
    )


def test_subj_and_voice_lines_come_last() -> None:
    options = MailOptions(
        format=Format.email, sender="me@shop.example", subject="Invoice", voice="m"
    )
    raw = listed([ListLine(("a@example.com",), "body")], options=options)
    assert body_of(raw).endswith("a@example.com:body\nsubj:Invoice\nvoice:m\n")
    raw = single("body", options=options, phones=("a@example.com",))
    assert body_of(raw).endswith(":a@example.com:body\nsubj:Invoice\nvoice:m\n")


def test_the_email_format_carries_the_senders_address() -> None:
    options = MailOptions(format=Format.email, sender="noreply@shop.example.com", subject="S")
    raw = single("body", options=options, phones=("a@example.com",))
    assert body_of(raw) == (
        "alex:123:1::,8,noreply@shop.example.com,1:a@example.com:body\nsubj:S\n"
    )
    with pytest.raises(InvalidRequest):
        MailOptions(format=Format.sms, sender="noreply@shop.example.com")


def test_voice_format_with_a_voice_and_call_parameters() -> None:
    options = MailOptions(format=Format.voice, voice="w3")
    raw = single("Hello\nthere", options=options, voice_params="10,20,3")
    assert body_of(raw) == (
        "alex:123:1::,9,,1:79991234567:Hello\\nthere\\n~~~\\n10,20,3\nvoice:w3\n"
    )
    raw = listed(
        [ListLine((PHONE,), "one", "p=1"), ListLine((OTHER,), "two"), ListLine(("G1",), "3", "x")],
        options=options,
    )
    assert body_of(raw) == (
        "alex:123:1::,9,,1::79991234567:one\\n~~~\\np=1\n+79997654321:two\nG1:3\\n~~~\\nx\n"
        "voice:w3\n"
    )
    assert [line.text for line in decode_mail(raw).body.lines] == [
        "one\n~~~\np=1",
        "two",
        "3\n~~~\nx",
    ]


@pytest.mark.parametrize("text", ["a~~~b", "Hello\n~~~\nparam", "~~~", "end\n~~~"])
def test_a_voice_text_holding_the_parameters_mark_is_refused_by_both_encoders(
    text: str,
) -> None:
    voice = MailOptions(format=Format.voice)
    for params in (None, "10"):
        with pytest.raises(InvalidRequest) as info:
            single(text, options=voice, voice_params=params)
        assert info.value.code == "unsendable_text"
        assert "voice_params" in info.value.message
        with pytest.raises(InvalidRequest):
            listed([ListLine((PHONE,), text, params)], options=voice)
    # Other formats carry tildes as text.
    assert "~~~" in body_of(single(text))


@pytest.mark.parametrize(
    "params", ["", " ", "10 20", "a\nb", "a\\nb", "~~~", "a:b", "a;b", "[text]", "ж", "x" * 65]
)
def test_call_parameters_that_could_break_the_line_are_refused(params: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        single("hi", options=MailOptions(format=Format.voice), voice_params=params)
    assert info.value.code == "invalid_voice_params"


def test_call_parameters_go_on_the_voice_format_only() -> None:
    with pytest.raises(InvalidRequest) as info:
        single("hi", voice_params="10")
    assert info.value.code == "invalid_voice_params"
    with pytest.raises(InvalidRequest):
        listed([ListLine((PHONE,), "hi", "10")])


def test_a_telegram_mail_writes_the_bot_prefix_on_every_line() -> None:
    options = MailOptions(telegram=True, sender="Shop")
    raw = single("hi: there", options=options, phones=("#42", "@shop_bot"))
    assert body_of(raw) == "alex:123:1::,0,Shop,1:#42,@shop_bot:__BOT__:hi: there\n"
    raw = listed([ListLine(("#42",), "one\ntwo"), ListLine((PHONE,), "three")], options=options)
    assert body_of(raw) == (
        "alex:123:1::,0,Shop,1::#42:__BOT__:one\\ntwo\n79991234567:__BOT__:three\n"
    )


def test_a_telegram_text_still_cannot_bring_a_prefix_of_its_own() -> None:
    for text in ("__BOT__:again", "__VIBER__:x", "__PING__"):
        with pytest.raises(InvalidRequest) as info:
            single(text, options=MailOptions(telegram=True))
        assert info.value.code == "reserved_prefix"


@pytest.mark.parametrize("fmt", [f for f in Format if f is not Format.sms])
def test_a_telegram_mail_names_format_0(fmt: Format) -> None:
    with pytest.raises(InvalidRequest) as info:
        MailOptions(
            format=fmt, telegram=True, sender="a@b.cc" if fmt is Format.email else "", subject="S"
        )
    assert info.value.code == "invalid_format"


def test_the_email_format_requires_a_subject() -> None:
    with pytest.raises(InvalidRequest) as info:
        MailOptions(format=Format.email, sender="me@shop.example")
    assert info.value.code == "missing_subject"


@pytest.mark.parametrize("sender", ["", "Shop", "123456"])
def test_the_email_format_requires_the_senders_address(sender: str) -> None:
    # The gateway refuses the whole e-mail (error 1) without it.
    with pytest.raises(InvalidRequest) as info:
        MailOptions(format=Format.email, sender=sender, subject="S")
    assert info.value.code == "email_sender_required"


def test_a_message_newline_never_becomes_a_list_line() -> None:
    raw = listed([ListLine((PHONE,), "a\n79990000000:evil\nsubj:x")])
    text = body_of(raw)
    assert text.count("\n") == 1
    decoded = decode_mail(raw).body
    assert len(decoded.lines) == 1
    assert decoded.lines[0].phones == (PHONE,)
    assert decoded.subject is None


@pytest.mark.parametrize(
    "text",
    ["__CALL__:hi", "__PING__", "a\\nb", "[text]x", "x[/text]", "a\rb", "a" * 1001],
)
def test_texts_the_gateway_would_change_are_refused_by_both_encoders(text: str) -> None:
    with pytest.raises(InvalidRequest):
        single(text)
    with pytest.raises(InvalidRequest):
        listed([ListLine((PHONE,), "fine"), ListLine((PHONE,), text)])


@pytest.mark.parametrize(
    "phones",
    [(), ("",), (" ",), ("7999:1",), ("7999,1",), ("7999;1",), ("7999\n1",), ("subj",), ("voice",),
     ("[text]",), ("7999 1",)],
)  # fmt: skip
def test_recipients_that_could_reshape_the_record_are_refused(phones: tuple[str, ...]) -> None:
    # An empty recipient in the single form would turn ":<phones>:" into list mode's "::",
    # and the text would name the recipients.
    with pytest.raises(InvalidRequest) as info:
        single("79990000000:injected", phones=phones)
    assert info.value.code == "invalid_recipient"
    with pytest.raises(InvalidRequest):
        listed([ListLine(phones, "x")])


@pytest.mark.parametrize(
    ("login", "password"),
    [("a:b", "p"), ("a,b", "p"), ("a\nb", "p"), ("a", "p:q"), ("a", "p,q"), ("a", "p\nq")],
)
def test_credentials_that_could_add_a_field_are_refused_before_sending(
    login: str, password: str
) -> None:
    with pytest.raises(InvalidRequest):
        Account(login, SecretStr(password))


def test_a_bad_password_is_never_shown() -> None:
    with pytest.raises(InvalidRequest) as info:
        Account("alex", SecretStr("Sup3rS3cret:x"))
    assert "Sup3rS3cret" not in str(info.value)
    assert "Sup3rS3cret" not in repr(Account("alex", SecretStr("Sup3rS3cret")))


def exception_chain_text(exc: BaseException | None) -> str:
    """Everything a logger could print about an exception and what it was raised from."""
    shown = []
    while exc is not None:
        shown.append(f"{exc!r} {exc} {exc.args!r}")
        exc = exc.__cause__ or exc.__context__
    return " ".join(shown)


def test_an_encoding_failure_never_carries_the_password_along() -> None:
    account = Account("用户", SecretStr("TopSecret"))
    with pytest.raises(InvalidRequest) as info:
        builder_for(account)
    assert info.value.code == "charset"
    assert "TopSecret" not in exception_chain_text(info.value)


def test_a_decoding_failure_never_carries_the_password_along() -> None:
    raw = (
        b"From: a@b.c\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        b"alex:TopSecret:1::,0,,1:79991234567:\xff\r\n"
    )
    with pytest.raises(InvalidRequest) as info:
        decode_mail(raw)
    assert "TopSecret" not in exception_chain_text(info.value)


def builder_for(account: Account) -> MailBuilder:
    return MailBuilder(
        ENVELOPE, account, "1", MailOptions(), charset="koi8-r", date=DATE, message_id=MSG_ID
    )


@pytest.mark.parametrize("mail_id", ["0", "2147483648", "a" * 41, "a:b", "a,b", "a\nb", ""])
def test_a_bad_id_is_refused_before_sending(mail_id: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        single("x", mail_id=mail_id)
    assert info.value.code == "invalid_id"
    with pytest.raises(InvalidRequest):
        listed([ListLine((PHONE,), "x")], mail_id=mail_id)


@pytest.mark.parametrize("sender", ["Al:ex", "Al,ex", "Al\nex", "TooLongSender"])
def test_a_bad_sender_is_refused_before_sending(sender: str) -> None:
    with pytest.raises(InvalidRequest):
        MailOptions(sender=sender)


@pytest.mark.parametrize("field", ["subject", "voice"])
@pytest.mark.parametrize("value", ["a\nb", "a\r\nvoice:x", "a\\nb", "[/text]"])
def test_a_subject_or_voice_cannot_forge_a_line(field: str, value: str) -> None:
    with pytest.raises(InvalidRequest):
        MailOptions(**{field: value})  # type: ignore[arg-type]


# --- envelope and charset ------------------------------------------------------------------


def test_cyrillic_goes_in_koi8r_by_default() -> None:
    raw = single("Привет, мир")
    message = assert_wellformed(raw, "koi8-r")
    assert message["Content-Transfer-Encoding"] == "8bit"
    assert "Привет, мир".encode("koi8-r") in raw
    assert body_of(raw).endswith(":Привет, мир\n")


def test_the_charset_is_configurable() -> None:
    envelope = Envelope(mail_from="worker@example.com", charset="windows-1251")
    raw = single("Привет", envelope=envelope)
    assert_wellformed(raw, "windows-1251")
    assert "Привет".encode("cp1251") in raw


@pytest.mark.parametrize("text", ["Hi 😀", "Ђорђе", "中文", "Привет 👋", "€ and ü"])
def test_a_text_the_charset_cannot_carry_makes_the_mail_utf8_and_is_never_mangled(
    text: str,
) -> None:
    for raw in (single(text), listed([ListLine((PHONE,), "ок"), ListLine((PHONE,), text)])):
        assert_wellformed(raw, "utf-8")
        assert text.encode("utf-8") in raw
        assert decode_mail(raw).body.lines[-1].text == text


def test_a_login_the_charset_cannot_carry_also_makes_the_mail_utf8() -> None:
    account = Account("用户", SecretStr("пароль"))
    for raw in (single("x", account=account), listed([ListLine((PHONE,), "x")], account=account)):
        assert_wellformed(raw, "utf-8")
        body = decode_mail(raw).body
        assert (body.login, body.password) == ("用户", "пароль")


def test_pick_charset() -> None:
    assert pick_charset("koi8-r", ["Привет", "hello"]) == "koi8-r"
    assert pick_charset("koi8-r", ["Привет", "😀"]) == "utf-8"
    assert pick_charset("utf-8", ["😀"]) == "utf-8"


@pytest.mark.parametrize(
    "charset", ["no-such-charset", "utf-16", "utf-7", "base64", 'koi8-r"; x="']
)
def test_a_charset_that_cannot_carry_the_record_is_refused_up_front(charset: str) -> None:
    with pytest.raises(InvalidRequest):
        Envelope(mail_from="worker@example.com", charset=charset)


@pytest.mark.parametrize("address", ["", "not an address", "a@b\r\nBcc: x@y", "a@b>, c@d"])
def test_envelope_addresses_must_be_plain(address: str) -> None:
    with pytest.raises(InvalidRequest):
        Envelope(mail_from=address)


def test_the_gateway_address_is_configurable() -> None:
    envelope = Envelope(mail_from="worker@example.com", gateway_address="send@send.smsc.ru")
    assert parsed(single("x", envelope=envelope))["To"] == "send@send.smsc.ru"


def test_header_values_must_be_printable_ascii() -> None:
    with pytest.raises(InvalidRequest):
        encode_single(
            ENVELOPE, ACCOUNT, "1", MailOptions(), ListLine((PHONE,), "x"),
            date=DATE, message_id="<a@b>\r\nBcc: x@y",
        )  # fmt: skip


def test_text_tags_wrap_the_whole_body() -> None:
    envelope = Envelope(mail_from="worker@example.com", text_tags=True)
    options = MailOptions(format=Format.email, sender="me@shop.example", subject="S")
    raw = single("hi", envelope=envelope, options=options, phones=("a@example.com",))
    assert body_of(raw) == (
        "[text]alex:123:1::,8,me@shop.example,1:a@example.com:hi\nsubj:S[/text]\n"
    )
    raw = listed([ListLine((PHONE,), "a"), ListLine((OTHER,), "b")], envelope=envelope)
    assert body_of(raw) == "[text]alex:123:1::,0,,1::79991234567:a\n+79997654321:b\n[/text]\n"


# --- sizes ----------------------------------------------------------------------------------


def test_a_1000_character_text_fits_and_a_long_line_switches_to_base64() -> None:
    raw = single("я" * 1000)  # 1000 octets in koi8-r plus the record: over 998
    message = assert_wellformed(raw, "koi8-r")
    assert message["Content-Transfer-Encoding"] == "base64"
    assert decode_mail(raw).body.lines[0].text == "я" * 1000
    raw = single("a" * 900)
    assert assert_wellformed(raw, "koi8-r")["Content-Transfer-Encoding"] == "8bit"


def test_1000_emoji_in_utf8() -> None:
    raw = listed([ListLine((PHONE,), "😀" * 1000), ListLine((OTHER,), "short")])
    message = assert_wellformed(raw, "utf-8")
    assert message["Content-Transfer-Encoding"] == "base64"
    lines = decode_mail(raw).body.lines
    assert [line.text for line in lines] == ["😀" * 1000, "short"]


def test_lines_that_do_not_fit_100_kb_are_refused() -> None:
    lines = [ListLine((PHONE,), "ж" * 1000) for _ in range(120)]
    with pytest.raises(InvalidRequest) as info:
        listed(lines)
    assert info.value.code == "mail_too_large"
    assert len(listed(lines[:70])) <= MAX_MAIL_BYTES


def test_a_single_mail_over_100_kb_is_refused() -> None:
    with pytest.raises(InvalidRequest) as info:
        single("x", options=MailOptions(subject="s" * MAX_MAIL_BYTES))
    assert info.value.code == "mail_too_large"


def test_the_100_kb_limit_cannot_be_raised() -> None:
    lines = [ListLine((PHONE,), "ж" * 1000) for _ in range(120)]
    with pytest.raises(InvalidRequest):
        listed(lines, limit=10 * MAX_MAIL_BYTES)


def builder(
    *,
    charset: str = "koi8-r",
    limit: int = MAX_MAIL_BYTES,
    envelope: Envelope = ENVELOPE,
    options: MailOptions | None = None,
) -> MailBuilder:
    return MailBuilder(
        envelope,
        ACCOUNT,
        "77",
        options or MailOptions(),
        charset=charset,
        date=DATE,
        message_id=MSG_ID,
        limit=limit,
    )


def fill(mail: MailBuilder, line: ListLine) -> int:
    count = 0
    while mail.try_add(line):
        count += 1
        assert len(mail.build()) <= MAX_MAIL_BYTES
    return count


@pytest.mark.parametrize(
    ("charset", "text", "cte"),
    [("koi8-r", "a" * 900, "8bit"), ("utf-8", "ж" * 1000, "base64"), ("koi8-r", "x", "8bit")],
)
def test_a_builder_fills_up_to_100_kb_and_no_further(charset: str, text: str, cte: str) -> None:
    mail = builder(charset=charset)
    line = ListLine((PHONE,), text)
    count = fill(mail, line)
    raw = mail.build()
    assert len(mail) == count
    assert len(raw) + mail.cost(line) > MAX_MAIL_BYTES
    assert len(raw) > MAX_MAIL_BYTES - 2 * mail.cost(line)
    assert assert_wellformed(raw, charset)["Content-Transfer-Encoding"] == cte
    assert len(decode_mail(raw).body.lines) == count


def test_a_builder_refuses_a_text_its_charset_cannot_carry() -> None:
    with pytest.raises(InvalidRequest) as info:
        builder().try_add(ListLine((PHONE,), "😀"))
    assert info.value.code == "charset"


def test_a_line_too_large_for_an_empty_mail_raises() -> None:
    mail = builder(limit=400)
    with pytest.raises(InvalidRequest) as info:
        mail.try_add(ListLine((PHONE,), "x" * 500))
    assert info.value.code == "mail_too_large"
    with pytest.raises(InvalidRequest):
        mail.build()


# --- the builder's arithmetic, property-tested ------------------------------------------------


builder_texts = st.one_of(
    st.text(alphabet=st.sampled_from(list("ab: ,\\\nжЯё€")), max_size=40),
    st.builds(
        lambda char, n: char * n,
        st.sampled_from(["a", "ж", "😀", "€", "\n"]),
        st.integers(min_value=300, max_value=1000),
    ),
).filter(sendable)
builder_lines = st.builds(
    ListLine,
    st.lists(st.sampled_from([PHONE, OTHER, "G12", "79990000001"]), min_size=1, max_size=3).map(
        tuple
    ),
    builder_texts,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    charset=st.sampled_from(["koi8-r", "utf-8"]),
    text_tags=st.booleans(),
    limit=st.one_of(st.integers(min_value=350, max_value=12_000), st.just(MAX_MAIL_BYTES)),
    subject=st.one_of(st.none(), st.text(alphabet="abc жя", max_size=1200)),
    lines=st.lists(builder_lines, min_size=1, max_size=40),
)
def test_cost_is_exactly_the_growth_and_try_add_never_passes_the_limit(
    charset: str,
    text_tags: bool,
    limit: int,
    subject: str | None,
    lines: list[ListLine],
) -> None:
    envelope = Envelope(mail_from="worker@example.com", charset=charset, text_tags=text_tags)
    try:
        mail = builder(
            charset=charset, limit=limit, envelope=envelope, options=MailOptions(subject=subject)
        )
    except InvalidRequest:
        return
    added: list[ListLine] = []
    for line in lines:
        if not can_encode(line, charset):
            with pytest.raises(InvalidRequest, match="cannot be written"):
                mail.cost(line)
            continue
        cost = mail.cost(line)
        before = len(mail.build()) if added else mail.size
        assert before == mail.size
        if not added and before + cost > limit:
            # Alone too large: the builder says so instead of returning False forever.
            with pytest.raises(InvalidRequest, match="larger than"):
                mail.try_add(line)
            event("first line too large")
            return
        if mail.try_add(line):
            added.append(line)
            after = len(mail.build())
            assert after - before == cost
            assert after == mail.size
            assert after <= limit
        else:
            event("refused")
            assert before + cost > limit
            assert len(mail.build()) == before
    if added:
        raw = mail.build()
        body = decode_mail(raw).body
        assert [(d.phones, d.text) for d in body.lines] == [(x.phones, x.text) for x in added]
        assert body.subject == subject
        longest = max(len(x) for x in raw.split(b"\r\n"))
        assert longest <= MAX_LINE_OCTETS
        event(f"transfer encoding: {decode_cte(raw)}")


def can_encode(line: ListLine, charset: str) -> bool:
    try:
        line.text.encode(charset)
    except UnicodeEncodeError:
        return False
    return True


def decode_cte(raw: bytes) -> str:
    return str(parsed(raw)["Content-Transfer-Encoding"])


def test_a_full_e_mail_at_the_default_limit_stays_under_100_000_bytes() -> None:
    from worker.settings import BatchSettings

    limit = BatchSettings().max_bytes
    mail = builder(limit=limit)
    line = ListLine((PHONE,), "a" * 900)
    while mail.try_add(line):
        pass
    raw = mail.build()
    assert limit - mail.cost(line) < len(raw) <= limit < 100_000
