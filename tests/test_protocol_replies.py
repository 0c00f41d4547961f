"""The gateway's reply e-mails, read into typed results, each error mapped to its action."""

from __future__ import annotations

import codecs
import html

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.metrics import gateway_error_label
from worker.protocol.replies import (
    DESCRIPTION_LIMIT,
    ERRORS_WITH_ID,
    Accepted,
    Action,
    GatewayError,
    Rejected,
    Reply,
    UnreadableReply,
    parse_reply,
    read_reply,
    render_reply,
)

FAST = settings(max_examples=200, deadline=None)


def test_ok_reply() -> None:
    assert parse_reply("OK - 3 SMS, ID - 1234") == Accepted(sms_count=3, mail_id="1234")


def test_ok_reply_with_a_string_id() -> None:
    assert parse_reply("OK - 12 SMS, ID - batch-7.a_b") == Accepted(12, "batch-7.a_b")


@pytest.mark.parametrize(
    ("body", "error", "description", "mail_id"),
    [
        ("ERROR = 1 (error in parameters)", GatewayError.parameters, "error in parameters", None),
        ("ERROR = 2 (invalid login)", GatewayError.credentials, "invalid login", None),
        ("ERROR = 3 (no money), ID - 77", GatewayError.insufficient_funds, "no money", "77"),
        ("ERROR = 7 (bad phone), ID - abc.1", GatewayError.phone_format, "bad phone", "abc.1"),
        (
            "ERROR = 9 (duplicate request)",
            GatewayError.duplicate_request,
            "duplicate request",
            None,
        ),
        ("ERROR = 1", GatewayError.parameters, "", None),
        ("ERROR=8(cannot deliver),ID-5", GatewayError.undeliverable, "cannot deliver", "5"),
    ],
)
def test_error_replies(
    body: str, error: GatewayError, description: str, mail_id: str | None
) -> None:
    assert parse_reply(body) == Rejected(error, description, mail_id)


def test_an_error_description_with_parentheses_keeps_its_id() -> None:
    reply = parse_reply("ERROR = 6 (message denied (sender not registered)), ID - 42")
    assert reply == Rejected(
        GatewayError.message_denied, "message denied (sender not registered)", "42"
    )


@pytest.mark.parametrize(
    ("number", "action", "retryable"),
    [
        (1, Action.find_bad_line, False),
        (2, Action.stop_account, False),
        (3, Action.pause_account, True),
        (4, Action.back_off, True),
        (5, Action.fail, False),
        (6, Action.find_bad_line, False),
        (7, Action.find_bad_line, False),
        (8, Action.find_bad_line, False),
        (9, Action.retry_after_window, True),
    ],
)
def test_each_error_number_maps_to_the_action_in_the_notes(
    number: int, action: Action, retryable: bool
) -> None:
    reply = parse_reply(f"ERROR = {number} (whatever)")
    assert isinstance(reply, Rejected)
    assert reply.error == number
    assert isinstance(reply.error, GatewayError)
    assert reply.action is action
    assert reply.retryable is retryable


def test_an_unknown_error_number_is_permanent_never_a_blind_resend() -> None:
    reply = parse_reply("ERROR = 42 (something new)")
    assert isinstance(reply, Rejected)
    assert reply.error == 42
    assert reply.action is Action.fail
    assert not reply.retryable


def test_errors_that_carry_an_id_are_3_6_7_8() -> None:
    assert {int(e) for e in ERRORS_WITH_ID} == {3, 6, 7, 8}


@pytest.mark.parametrize(
    "body",
    [
        "  OK - 2 SMS, ID - 9  ",
        "\r\n\r\nOK - 2 SMS, ID - 9\r\n\r\n",
        "\tOK  -  2  SMS ,  ID  -  9",
        '"OK - 2 SMS, ID - 9"',
        "'OK - 2 SMS, ID - 9'",
        "«OK - 2 SMS, ID - 9»",
        ' " OK - 2 SMS, ID - 9 " ',
        "ok - 2 sms, id - 9",
        "> ERROR = 2 (bad password)\n> \nOK - 2 SMS, ID - 9\n",
        "OK - 2 SMS, ID - 9\n-- \nERROR = 1 (signature)",
        "Hello,\n\nOK - 2 SMS, ID - 9\n\n-- \nSMS Centre\nOK - 5 SMS, ID - 1",
        ">> OK - 7 SMS, ID - 1\nOK - 2 SMS, ID - 9",
    ],
)
def test_whitespace_quotes_quoted_lines_and_signatures(body: str) -> None:
    assert parse_reply(body) == Accepted(2, "9")


@pytest.mark.parametrize(
    "body",
    [
        "",
        "\n\n",
        "> OK - 2 SMS, ID - 9",
        "-- \nOK - 2 SMS, ID - 9",
        "BOOK - 2 SMS, ID - 9",
        "NOT OK - 2 SMS, ID - 9",
        "TERROR = 1 (x)",
        "Thank you",
    ],
)
def test_no_answer_line_is_unreadable(body: str) -> None:
    with pytest.raises(UnreadableReply):
        parse_reply(body)


def test_render_writes_the_gateway_forms() -> None:
    assert render_reply(Accepted(4, "17")) == "OK - 4 SMS, ID - 17"
    assert render_reply(Rejected(GatewayError.credentials, "bad", None)) == "ERROR = 2 (bad)"
    assert render_reply(Rejected(GatewayError.undeliverable, "no", "5")) == "ERROR = 8 (no), ID - 5"
    # 1, 2, 4, 5, 9 never carry an ID
    assert render_reply(Rejected(GatewayError.ip_blocked, "blocked", "5")) == "ERROR = 4 (blocked)"


# The gateway allows a dot inside an id; a trailing one is read as a full stop.
mail_ids = st.from_regex(r"[A-Za-z0-9._-]{0,39}[A-Za-z0-9_-]", fullmatch=True)
descriptions = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), max_size=60
).map(str.strip)


@FAST
@given(st.integers(min_value=0, max_value=10**9), mail_ids)
def test_accepted_round_trips(count: int, mail_id: str) -> None:
    reply = Accepted(count, mail_id)
    assert parse_reply(render_reply(reply)) == reply


@FAST
@given(st.integers(min_value=1, max_value=99), descriptions, st.one_of(st.none(), mail_ids))
def test_rejected_round_trips(number: int, description: str, mail_id: str | None) -> None:
    error: GatewayError | int = (
        GatewayError(number) if number in {int(e) for e in GatewayError} else number
    )
    if error not in ERRORS_WITH_ID:
        mail_id = None  # the gateway's form for these errors has no ID
    reply = Rejected(error, description, mail_id)
    parsed = parse_reply(render_reply(reply))
    assert parsed == reply
    assert isinstance(parsed, Rejected)
    assert parsed.action is reply.action


@FAST
@given(
    st.integers(min_value=0, max_value=10**6),
    mail_ids,
    st.sampled_from(["", "> quoted\n", "> OK - 1 SMS, ID - x\n", "Re: your mail\n\n"]),
    st.sampled_from(["", "\n", "\n-- \nsupport@smscentre.com\nOK - 0 SMS, ID - 0"]),
    st.sampled_from(["{}", '"{}"', "  {}  ", "'{}'"]),
)
def test_rendered_replies_parse_inside_a_real_mail(
    count: int, mail_id: str, before: str, after: str, wrap: str
) -> None:
    reply = Accepted(count, mail_id)
    body = before + wrap.format(render_reply(reply)) + after
    assert parse_reply(body) == reply


def test_a_long_description_is_cut_and_control_characters_blanked() -> None:
    reply = parse_reply(f"ERROR = 6 ({'spam ' * 10_000}\x1b[31mred), ID - 9")
    assert isinstance(reply, Rejected)
    assert len(reply.description) == DESCRIPTION_LIMIT == 200
    assert reply.description.endswith("…")
    assert reply.mail_id == "9"
    coloured = parse_reply("ERROR = 6 (\x1b[31mred\x07), ID - 9")
    assert isinstance(coloured, Rejected)
    assert coloured.description == "[31mred"


@pytest.mark.parametrize(
    "body", ["ERROR = " + "9" * 5000 + " (x)", "OK - " + "1" * 5000 + " SMS, ID - 5"]
)
def test_a_number_of_thousands_of_digits_is_unreadable_not_a_crash(body: str) -> None:
    with pytest.raises(UnreadableReply):
        parse_reply(body)


def test_only_documented_error_numbers_are_metric_labels() -> None:
    assert [gateway_error_label(n) for n in (1, 8, 9)] == ["1", "8", "9"]
    assert {gateway_error_label(n) for n in (0, 10, 42, 10**11)} == {"other"}


# Whole reply e-mails, as the gateway and the mail systems in between may send them -------

HEX_IDS = st.from_regex(r"[0-9a-f]{32}", fullmatch=True)
RUSSIAN = st.sampled_from(
    ["ошибка в параметрах", "сообщение запрещено (по тексту)", "недостаточно средств", ""]
)


def reply_mail(
    body: str,
    *,
    encoding: str,
    declared: str | None,
    transfer: str = "8bit",
    container: str = "plain",
    bom: bool = False,
) -> bytes:
    """A reply e-mail: `body` written in `encoding`, `declared` in its header (or none)."""
    import base64
    import quopri

    def part(content_type: str, text: str) -> bytes:
        data = (codecs.BOM_UTF8 if bom else b"") + text.encode(encoding, errors="replace")
        charset = f'; charset="{declared}"' if declared else ""
        if transfer == "base64":
            data = base64.encodebytes(data)
        elif transfer == "quoted-printable":
            data = quopri.encodestring(data)
        head = f"Content-Type: {content_type}{charset}\r\nContent-Transfer-Encoding: {transfer}"
        return head.encode() + b"\r\n\r\n" + data + b"\r\n"

    markup = (
        "<html><head><style>p {}</style></head><body><p>"
        + html.escape(body).replace("\n", "<br>")
        + "</p><blockquote>OK - 99 SMS, ID - quoted</blockquote></body></html>"
    )
    top = b"From: gateway@send.smscentre.com\r\nSubject: Re:\r\nMIME-Version: 1.0\r\n"
    if container == "plain":
        return top + part("text/plain", body)
    if container == "html":
        return top + part("text/html", markup)
    boundary = b"==b0und=="
    return (
        top
        + b'Content-Type: multipart/alternative; boundary="==b0und=="\r\n\r\n'
        + b"--"
        + boundary
        + b"\r\n"
        + part("text/plain", body)
        + b"--"
        + boundary
        + b"\r\n"
        + part("text/html", markup)
        + b"--"
        + boundary
        + b"--\r\n"
    )


@st.composite
def gateway_replies(draw: st.DrawFn) -> tuple[Reply, str]:
    """A reply and the text the gateway writes for it, with a full stop or extra fields."""
    mail_id = draw(HEX_IDS)
    if draw(st.booleans()):
        reply: Reply = Accepted(draw(st.integers(0, 10_000)), mail_id)
    else:
        error = draw(st.sampled_from(sorted(ERRORS_WITH_ID)))
        reply = Rejected(error, draw(RUSSIAN), mail_id)
    tail = draw(st.sampled_from(["", ".", ", balance - 10", ", balance - 10.5 руб.", " ."]))
    return reply, render_reply(reply) + tail


@FAST
@given(
    gateway_replies(),
    st.sampled_from(["koi8-r", "cp1251", "utf-8"]),
    st.sampled_from(["none", "right", "wrong"]),
    st.sampled_from(["8bit", "base64", "quoted-printable"]),
    st.sampled_from(["plain", "html", "multipart"]),
    st.booleans(),
    st.sampled_from(["", "\r\n\r\n> 1:secret:abc::0,0,,1::79991234567:привет\r\n"]),
)
def test_every_reply_the_gateway_can_send_is_read(
    written: tuple[Reply, str],
    encoding: str,
    declared: str,
    transfer: str,
    container: str,
    bom: bool,
    quoted: str,
) -> None:
    reply, text = written
    wrong = {"koi8-r": "cp1251", "cp1251": "utf-8", "utf-8": "koi8-r"}[encoding]
    charset = {"none": None, "right": encoding, "wrong": wrong}[declared]
    raw = reply_mail(
        "Ответ шлюза:\n" + text + quoted,
        encoding=encoding,
        declared=charset,
        transfer=transfer,
        container=container,
        bom=bom and encoding == "utf-8",
    )
    parsed = read_reply(raw)
    assert type(parsed) is type(reply)
    assert parsed.mail_id == reply.mail_id
    if isinstance(reply, Accepted):
        assert parsed == reply
    else:
        assert isinstance(parsed, Rejected)
        assert parsed.error == reply.error
        if declared != "wrong":
            assert parsed.description == reply.description


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("OK - 1 SMS, ID - abc123.", Accepted(1, "abc123")),
        ("OK - 1 SMS, ID - abc, balance - 10", Accepted(1, "abc")),
        ("OK - 1 SMS, ID - abc; cost - 1.5", Accepted(1, "abc")),
        ("ERROR = 6 (denied), ID - abc.", Rejected(GatewayError.message_denied, "denied", "abc")),
        (
            "ERROR = 6 (denied (sender)), ID - abc, balance - 3",
            Rejected(GatewayError.message_denied, "denied (sender)", "abc"),
        ),
        ("ERROR = 2 (bad login).", Rejected(GatewayError.credentials, "bad login", None)),
        ("\ufeffOK - 2 SMS, ID - 9", Accepted(2, "9")),
    ],
)
def test_full_stops_extra_fields_and_a_byte_order_mark(text: str, expected: Reply) -> None:
    assert read_reply(reply_mail(text, encoding="utf-8", declared="utf-8")) == expected


@pytest.mark.parametrize("encoding", ["koi8-r", "cp1251"])
def test_a_russian_description_without_a_charset_reads_as_russian(encoding: str) -> None:
    raw = reply_mail("ERROR = 6 (сообщение запрещено), ID - 5", encoding=encoding, declared=None)
    assert read_reply(raw) == Rejected(GatewayError.message_denied, "сообщение запрещено", "5")


@pytest.mark.parametrize(
    "raw",
    [
        b"Subject: x\r\n\r\nThank you for your message",
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
        b"Content-Type: image/png\r\n\r\nxx\r\n--b--\r\n",
        reply_mail("<p>nothing here</p>", encoding="utf-8", declared=None, container="html"),
    ],
)
def test_a_mail_with_no_answer_is_unreadable(raw: bytes) -> None:
    with pytest.raises(UnreadableReply):
        read_reply(raw)


def test_an_answer_only_in_the_html_alternative_is_read() -> None:
    raw = (
        b'Content-Type: multipart/alternative; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n\r\n\r\n"
        b"--b\r\nContent-Type: text/html\r\n\r\n<div>OK&nbsp;- 2 SMS, ID - ab12.</div>\r\n"
        b"--b--\r\n"
    )
    assert read_reply(raw) == Accepted(2, "ab12")


def test_an_attached_e_mail_or_attachment_is_not_the_answer() -> None:
    raw = (
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n\r\nERROR = 1 (error in parameters)\r\n"
        b"--b\r\nContent-Type: message/rfc822\r\n\r\n"
        b"Subject: old\r\n\r\nOK - 5 SMS, ID - old\r\n"
        b"--b--\r\n"
    )
    assert read_reply(raw) == Rejected(GatewayError.parameters, "error in parameters", None)
    attached_only = (
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n\r\nSee the attachment\r\n"
        b"--b\r\nContent-Type: text/plain\r\nContent-Disposition: attachment\r\n\r\n"
        b"OK - 5 SMS, ID - old\r\n"
        b"--b\r\nContent-Type: message/rfc822\r\n\r\nSubject: old\r\n\r\nOK - 5 SMS, ID - x\r\n"
        b"--b--\r\n"
    )
    with pytest.raises(UnreadableReply):
        read_reply(attached_only)


def test_a_body_of_an_odd_content_type_is_read_as_text() -> None:
    raw = b"Content-Type: application/octet-stream\r\n\r\nOK - 1 SMS, ID - 7\r\n"
    assert read_reply(raw) == Accepted(1, "7")
