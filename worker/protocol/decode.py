"""Reading a send e-mail back into its fields, as the gateway does (the emulator uses it).

Fields come back as the raw strings that stood in the e-mail, so that the reader can
decide which documented error each bad one deserves.
"""

from __future__ import annotations

import email
import email.policy
import re
from dataclasses import dataclass
from email.message import Message

from worker.errors import InvalidRequest
from worker.protocol.fields import unescape_text
from worker.protocol.mail import DEFAULT_CHARSET

_OPTION_LINES = ("subj:", "voice:")
_OPEN_TAG = re.compile(re.escape("[text]"), re.IGNORECASE)
_CLOSE_TAG = re.compile(re.escape("[/text]"), re.IGNORECASE)


class MalformedMail(InvalidRequest):
    """The e-mail is not a send record at all (the gateway's error 1)."""

    code = "malformed_mail"


@dataclass(frozen=True, slots=True)
class DecodedLine:
    phones: tuple[str, ...]
    text: str


@dataclass(frozen=True, slots=True)
class DecodedBody:
    login: str
    password: str
    mail_id: str
    time: str
    tz: str | None
    translit: str
    format: str
    sender: str
    test: str
    list_mode: bool
    lines: tuple[DecodedLine, ...]
    subject: str | None = None
    voice: str | None = None


@dataclass(frozen=True, slots=True)
class DecodedMail:
    mail_from: str
    to: tuple[str, ...]
    charset: str
    message_id: str | None
    body: DecodedBody


def split_phones(raw: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in raw.replace(";", ",").split(",") if p.strip())


def _split_line(raw: str) -> DecodedLine:
    phones, sep, text = raw.partition(":")
    if not sep:
        raise MalformedMail(f"list line without ':' between recipients and text: {raw[:40]!r}")
    return DecodedLine(split_phones(phones), unescape_text(text))


def decode_body(text: str) -> DecodedBody:
    """Parse the body text (already decoded from its charset) into its fields."""
    # Searched in the text itself: offsets found in text.lower() can be off, since lowering
    # changes the length of some characters (such as "İ").
    opening = _OPEN_TAG.search(text)
    if opening:
        closing = _CLOSE_TAG.search(text, opening.end())
        text = text[opening.end() : closing.start() if closing else len(text)]
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise MalformedMail("empty body")
    subject = voice = None
    while len(lines) > 1 and lines[-1].startswith(_OPTION_LINES):
        key, _, value = lines.pop().partition(":")
        if key == "subj":
            subject = value
        else:
            voice = value
    fields = lines[0].split(":", 6)
    if len(fields) < 7:
        raise MalformedMail(f"the first line has {len(fields)} of the 7 colon-separated fields")
    login, password, mail_id, when, settings, phones, rest = fields
    time, _, tz = when.partition(",")
    options = settings.split(",")
    if len(options) > 4:
        raise MalformedMail("translit,format,sender,test has more than four sub-fields")
    translit, fmt, sender, test = [*options, "", "", "", ""][:4]
    list_mode = phones == ""
    if list_mode:
        body_lines = tuple(_split_line(line) for line in [rest, *lines[1:]])
    else:
        if len(lines) > 1:
            raise MalformedMail("a single-message e-mail has extra lines")
        body_lines = (DecodedLine(split_phones(phones), unescape_text(rest)),)
    return DecodedBody(
        login=login,
        password=password,
        mail_id=mail_id,
        time=time,
        tz=tz if "," in when else None,
        translit=translit,
        format=fmt,
        sender=sender,
        test=test,
        list_mode=list_mode,
        lines=body_lines,
        subject=subject,
        voice=voice,
    )


def body_text(message: Message, default_charset: str = DEFAULT_CHARSET) -> tuple[str, str]:
    """The text/plain body of a parsed e-mail and the charset it was read with."""
    part = message
    if message.is_multipart():
        found = next((p for p in message.walk() if p.get_content_type() == "text/plain"), None)
        if found is None:
            raise MalformedMail("no text/plain part")
        part = found
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        raise MalformedMail("no body")
    charset = part.get_content_charset() or default_charset
    try:
        return payload.decode(charset), charset
    except (LookupError, UnicodeDecodeError):
        pass
    # Raised outside the handler: a UnicodeDecodeError holds the whole body, password
    # included, and must not ride along as __context__ into logs.
    raise MalformedMail(f"body is not valid {charset}")


def decode_mail(raw: bytes, default_charset: str = DEFAULT_CHARSET) -> DecodedMail:
    message = email.message_from_bytes(raw, policy=email.policy.compat32)
    text, charset = body_text(message, default_charset)
    to = tuple(a.strip() for a in str(message.get("To", "")).split(",") if a.strip())
    return DecodedMail(
        mail_from=str(message.get("From", "")),
        to=to,
        charset=charset,
        message_id=message.get("Message-ID"),
        body=decode_body(text),
    )
