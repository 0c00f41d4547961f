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


# One item of a phones field by its shape alone (whether it is valid for its line is the
# reader's business): a phone number (an optional `+`, then digits with blanks, dashes,
# dots, brackets), a group, a `#id`, an e-mail address. No two parts of the pattern can
# take the same character, so a long hostile item is matched in linear time.
_RECIPIENT_SHAPE = re.compile(
    r"\+?[\s().-]*\d[\d\s().-]*|G\d+|#[A-Za-z0-9_.@-]+|[^\s@,;:]+@[^\s@,;:]+"
)
_ITEM_END = re.compile(r"[,;:]")


def recipient_shaped(item: str) -> bool:
    """Whether `item` (text up to a `,`, `;` or `:`) can stand in a phones field."""
    return _RECIPIENT_SHAPE.fullmatch(item.strip()) is not None


def first_item(text: str, start: int = 0) -> str:
    """The text from `start` up to its next `,`, `;` or `:`."""
    end = _ITEM_END.search(text, start)
    return text[start : len(text) if end is None else end.start()]


def _separator(raw: str) -> int:
    """Where a list line's phones end: the index of the `:` or `;` between them and the
    message, or -1 when there is none.

    NOTES.md: the seed allows `;` as well as `:` there, and `;` also separates phones. The
    phones never hold `:`, so the separator is at or before the first `:`; the message may
    hold anything. Read left to right, the phones run on as long as what follows each `;`
    looks like a recipient:
    - the first `;` followed by something that cannot be a recipient (text, or nothing:
      `79161234567;Time: 10:00`, `79161234567;` for an empty HLR text) is the separator;
    - otherwise the first `:` is (`79161234567;79161234568:hi` has two recipients);
    - with no `:` and every item recipient-shaped, the last `;` is (`7916...;12345` sends
      "12345"), since a message is never empty of its own accord and phones come first.
    Where both readings are possible (a message that begins with a number and a `:`, sent
    with `;`), the phones win: a wrong number draws error 7 for the e-mail, which the
    sender sees, where a misread text would be delivered changed without a word.
    """
    colon = raw.find(":")
    head = raw if colon < 0 else raw[:colon]
    semicolons = [i for i, c in enumerate(head) if c == ";"]
    for i in semicolons:
        if not recipient_shaped(first_item(raw, i + 1)):
            return i
    if colon >= 0:
        return colon
    return semicolons[-1] if semicolons else -1


def _split_line(raw: str) -> DecodedLine:
    at = _separator(raw)
    if at < 0:
        raise MalformedMail(
            f"list line without ':' or ';' between recipients and text: {raw[:40]!r}"
        )
    return DecodedLine(split_phones(raw[:at]), unescape_text(raw[at + 1 :]))


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
