"""The gateway's reply e-mails, `OK - <n> SMS, ID - <id>` or `ERROR = <N> (<text>)[, ID - <id>]`,
and what each error number asks of the client (the table in NOTES.md)."""

from __future__ import annotations

import codecs
import contextlib
import email
import email.policy
import html
import re
import unicodedata
from dataclasses import dataclass
from email.message import Message
from enum import IntEnum, StrEnum


class GatewayError(IntEnum):
    parameters = 1
    credentials = 2
    insufficient_funds = 3
    ip_blocked = 4
    date_format = 5
    message_denied = 6
    phone_format = 7
    undeliverable = 8
    duplicate_request = 9


class Action(StrEnum):
    """What the client must do about an error reply."""

    fail = "fail"  # permanent for the whole e-mail
    stop_account = "stop_account"  # permanent; stop sending for the account and alert
    pause_account = "pause_account"  # out of funds: pause, retry later
    back_off = "back_off"  # the IP is blocked: stop everything, back off, probe
    find_bad_line = "find_bad_line"  # one line is bad: split the e-mail to find it
    retry_after_window = "retry_after_window"  # duplicate: wait out the minute


ERROR_ACTIONS: dict[GatewayError, Action] = {
    # One line can cause 1 and 6 as well as 7 and 8 (an empty text, a denied word).
    GatewayError.parameters: Action.find_bad_line,
    GatewayError.credentials: Action.stop_account,
    GatewayError.insufficient_funds: Action.pause_account,
    GatewayError.ip_blocked: Action.back_off,
    GatewayError.date_format: Action.fail,
    GatewayError.message_denied: Action.find_bad_line,
    GatewayError.phone_format: Action.find_bad_line,
    GatewayError.undeliverable: Action.find_bad_line,
    GatewayError.duplicate_request: Action.retry_after_window,
}

ERRORS_WITH_ID = frozenset(
    {
        GatewayError.insufficient_funds,
        GatewayError.message_denied,
        GatewayError.phone_format,
        GatewayError.undeliverable,
    }
)

DESCRIPTIONS: dict[GatewayError, str] = {
    GatewayError.parameters: "error in parameters",
    GatewayError.credentials: "invalid login or password",
    GatewayError.insufficient_funds: "insufficient funds",
    GatewayError.ip_blocked: "IP address is temporarily blocked",
    GatewayError.date_format: "invalid date format",
    GatewayError.message_denied: "message denied",
    GatewayError.phone_format: "invalid phone number format",
    GatewayError.undeliverable: "message cannot be delivered",
    GatewayError.duplicate_request: "duplicate request",
}


@dataclass(frozen=True, slots=True)
class Accepted:
    sms_count: int
    mail_id: str


@dataclass(frozen=True, slots=True)
class Rejected:
    error: GatewayError | int
    description: str
    mail_id: str | None

    @property
    def action(self) -> Action:
        """Unknown numbers are treated as permanent for the e-mail: never a blind resend."""
        if isinstance(self.error, GatewayError):
            return ERROR_ACTIONS[self.error]
        return Action.fail

    @property
    def retryable(self) -> bool:
        return self.action in (Action.pause_account, Action.back_off, Action.retry_after_window)


Reply = Accepted | Rejected


class UnreadableReply(ValueError):
    """Nothing in the e-mail looks like the gateway's answer."""


# Each pattern must match a whole answer line (after surrounding blanks and quote marks are
# stripped): a search inside a line would read "BOOK - 2 SMS, ID - 5" as an answer. The
# description runs to the last ")" that still leaves a valid ending, so a description that
# itself holds parentheses keeps both its text and the ID after it.
# An id never ends with a full stop: "ID - abc123." is abc123 and a full stop (this worker's
# ids are 32 hex characters; the gateway allows a dot inside an id, as in "abc.1").
_ID = r"((?-i:[A-Za-z0-9._-])*(?-i:[A-Za-z0-9_-]))\.*"  # case-exact: no Kelvin sign for a K
# What may follow the ID: nothing, or a blank, "," or ";" and then anything (extra fields
# such as ", balance - 10").
_AFTER_ID = r"(?:[\s,;.].*)?"
# Numbers of at most 12 digits: int() of thousands of digits raises (and costs).
_OK = re.compile(rf"OK\s*-\s*(\d{{1,12}})\s*SMS\s*,\s*ID\s*-\s*{_ID}{_AFTER_ID}", re.IGNORECASE)
# An error with an ID: the description ends at the first ")" followed by ", ID - <id>", so
# that extra fields after the ID cannot pull it further.
_ERROR_WITH_ID = re.compile(
    rf"ERROR\s*=\s*(\d{{1,12}})\s*(?:\((.*?)\))?\s*,\s*ID\s*-\s*{_ID}{_AFTER_ID}",
    re.IGNORECASE,
)
# An error without one: the description runs to the last ")", anything after a blank, ",",
# ";" or "." (a full stop, extra fields) ignored.
_ERROR = re.compile(rf"ERROR\s*=\s*(\d{{1,12}})\s*(?:\((.*)\))?{_AFTER_ID}", re.IGNORECASE)
# A description goes into logs and result events: whatever a reply holds, at most this
# many characters of it, control characters blanked.
DESCRIPTION_LIMIT = 200
_BLANKED = frozenset({"Cc", "Zl", "Zp"})  # control characters, line breaks


def _description(text: str) -> str:
    text = "".join(" " if unicodedata.category(c) in _BLANKED else c for c in text).strip()
    if len(text) > DESCRIPTION_LIMIT:
        text = text[: DESCRIPTION_LIMIT - 1] + "…"
    return text


_QUOTE_MARKS = "\"'`«»“”„"


def _answer_lines(body: str) -> list[str]:
    """Body lines that could be the answer: quoted text and the signature are skipped."""
    lines = []
    for line in body.replace("\r\n", "\n").split("\n"):
        if line.rstrip() == "--":
            break
        stripped = line.strip().strip(_QUOTE_MARKS).strip()
        if stripped and not stripped.startswith(">"):
            lines.append(stripped)
    return lines


def parse_reply(body: str) -> Reply:
    for line in _answer_lines(body):
        ok = _OK.fullmatch(line)
        if ok:
            return Accepted(sms_count=int(ok.group(1)), mail_id=ok.group(2))
        error = _ERROR_WITH_ID.fullmatch(line) or _ERROR.fullmatch(line)
        if error:
            number = int(error.group(1))
            known: GatewayError | int = (
                GatewayError(number) if number in GatewayError._value2member_map_ else number
            )
            return Rejected(
                error=known,
                description=_description(error.group(2) or ""),
                mail_id=error.group(3) if error.re is _ERROR_WITH_ID else None,
            )
    raise UnreadableReply("no 'OK - n SMS, ID - id' or 'ERROR = N (...)' line in the reply")


def render_reply(reply: Reply) -> str:
    """The reply as the gateway writes it (the emulator's side)."""
    if isinstance(reply, Accepted):
        return f"OK - {reply.sms_count} SMS, ID - {reply.mail_id}"
    text = f"ERROR = {int(reply.error)} ({reply.description})"
    if reply.mail_id is not None and reply.error in ERRORS_WITH_ID:
        text += f", ID - {reply.mail_id}"
    return text


# Reading a whole reply e-mail -------------------------------------------------------------
#
# The answer's structure is ASCII, but the text around it may be Russian in koi8-r or cp1251,
# with no charset declared or a wrong one. So the body is tried in several readings, the
# declared charset first, and the first reading that holds an answer line wins: a body the
# declared charset cannot decode (or decodes into something without an answer) is still read.

_BOMS = (
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
# cp1251 and koi8-r put upper and lower case Cyrillic letters in swapped halves of 0xC0-0xFF:
# of the two readings, the one with more lowercase letters is the likelier (prose is mostly
# lowercase). It only decides how the description reads; the answer is ASCII either way.
_CYRILLIC = ("cp1251", "koi8-r")


def _lowercase_cyrillic(text: str) -> int:
    return sum(1 for c in text if "а" <= c <= "я" or c == "ё")


def _readings(payload: bytes, declared: str | None) -> list[str]:
    """The body's text in each plausible charset, the likeliest first."""
    for bom, codec in _BOMS:
        if payload.startswith(bom):
            payload = payload[len(bom) :]
            try:
                return [payload.decode(codec)]
            except UnicodeDecodeError:
                break  # a BOM and then something else: read it like any other body
    readings: list[str] = []
    for codec in dict.fromkeys(c for c in (declared, "utf-8") if c):
        # Swallowed here: a UnicodeDecodeError holds the whole body, and the body may quote
        # the send e-mail, password included.
        with contextlib.suppress(LookupError, UnicodeDecodeError):
            readings.append(payload.decode(codec))
    cyrillic = [payload.decode(c, errors="replace") for c in _CYRILLIC]
    readings.extend(sorted(cyrillic, key=_lowercase_cyrillic, reverse=True))
    return [r.lstrip("\ufeff") for r in readings]


_HTML_DROPPED = re.compile(
    r"<(head|style|script|blockquote)\b.*?</\1\s*>", re.IGNORECASE | re.DOTALL
)
_HTML_BREAK = re.compile(r"<\s*(br|/?p|/?div|/?tr|/?li|/?h\d)\b[^>]*>", re.IGNORECASE)
_HTML_TAG = re.compile(r"<[^>]*>")


def html_text(markup: str) -> str:
    """The visible text of an HTML reply, a line per block, the quoted original dropped."""
    markup = _HTML_DROPPED.sub("", markup)
    markup = _HTML_BREAK.sub("\n", markup)
    return html.unescape(_HTML_TAG.sub("", markup)).replace("\xa0", " ")


def _leaves(message: Message) -> list[Message]:
    """The e-mail's own parts, not those of an e-mail attached to it (a quoted original or a
    bounce may carry another e-mail whole), nor attachments."""
    if message.get_content_maintype() == "message":
        return []
    if message.is_multipart():
        payload = message.get_payload()
        assert isinstance(payload, list)
        return [leaf for part in payload if isinstance(part, Message) for leaf in _leaves(part)]
    if str(message.get("Content-Disposition", "")).strip().lower().startswith("attachment"):
        return []
    return [message]


def _text_parts(message: Message) -> list[tuple[Message, bool]]:
    """The parts that may hold the answer, each with whether it is HTML: the text/plain
    ones, then the text/html ones (an HTML-only reply)."""
    if not message.is_multipart():  # any other Content-Type (or none) is read as text
        return [(message, message.get_content_type() == "text/html")]
    leaves = _leaves(message)
    return [
        (part, wanted == "text/html")
        for wanted in ("text/plain", "text/html")
        for part in leaves
        if part.get_content_type() == wanted
    ]


def read_reply(raw: bytes) -> Reply:
    """The gateway's answer in a whole reply e-mail (headers and body, as received): the
    first text part, in the first reading, that holds one."""
    message = email.message_from_bytes(raw, policy=email.policy.compat32)
    for part, is_html in _text_parts(message):
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            continue
        for text in _readings(payload, part.get_content_charset()):
            try:
                return parse_reply(html_text(text) if is_html else text)
            except UnreadableReply:
                continue
    raise UnreadableReply("no 'OK - n SMS, ID - id' or 'ERROR = N (...)' line in the reply")
