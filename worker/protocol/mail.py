"""Encoding send e-mails for the gateway: the body record, list mode, and the RFC 5322 bytes.

Body (NOTES.md):
    <login>:<psw>:<id>:<time>,<tz>:<translit>,<format>,<sender>,<test>:<phones>:<mes>
or, in list mode, `...,<test>::<phones1>:<mes1>` followed by one `phones:mes` per line,
then `subj:` / `voice:` lines where the format needs them. The encoder writes two things
into a `mes` itself, never taken from a caller's text: the `__BOT__:` prefix of a Telegram
e-mail's every line, and a voice call's parameters after `\\n~~~\\n`.

The e-mail is written by hand rather than with `email.message` so that its exact size
is known before it is built: `MailBuilder.cost()` tells a batcher what one more line
would add, and the batcher never has to build an e-mail twice.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from pydantic import SecretStr

from worker.errors import InvalidRequest
from worker.protocol.fields import (
    BOT_PREFIX,
    TEXT_TAGS,
    VOICE_PARAMS_SEPARATOR,
    Format,
    SendTime,
    Translit,
    check_login,
    check_mail_id,
    check_option_line,
    check_password,
    check_sender,
    check_voice_params,
    check_voice_text,
    escape_text,
    is_email_sender,
)

# The gateway's limit, read as 100 KiB (the seed says "100 KB"): no e-mail ever passes it.
MAX_MAIL_BYTES = 102_400
# What the worker fills an e-mail to by default (SMSC_BATCH__MAX_BYTES): 96 KiB, a margin
# under 100,000 bytes for the other reading of "100 KB" and for the headers a mail server
# between the worker and the gateway (and the gateway's own) adds on the way.
DEFAULT_MAIL_BYTES = 98_304
MAX_LINE_OCTETS = 998  # RFC 5321 4.5.3.1.6, without the CRLF
FALLBACK_CHARSET = "utf-8"
DEFAULT_CHARSET = "koi8-r"
_B64_LINE = 76
_ADDRESS = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9.-]+")
_HEADER_SAFE = re.compile(r"[\x21-\x7e][\x20-\x7e]*")
_CHARSET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]*")
# The record's structure is ASCII; a charset must write it byte for byte as ASCII does.
_ASCII_PROBE = "".join(chr(c) for c in range(0x20, 0x7F)) + "\r\n"
# Recipients are written as they are; none of the recipient forms needs these.
_WIRE_RECIPIENT = re.compile(r"[!-~]+")
_RESERVED_RECIPIENTS = frozenset({"subj", "voice"})


@dataclass(frozen=True, slots=True)
class Account:
    """Who the gateway bills. An empty login makes the password an API key."""

    login: str
    password: SecretStr

    def __post_init__(self) -> None:
        check_login(self.login)
        check_password(self.password.get_secret_value())


@dataclass(frozen=True, slots=True)
class MailOptions:
    """First-line options: they apply to every line, so only requests that agree on all
    of them can share an e-mail. Hashable, so it can key a batch. `telegram` is not a
    first-line field but applies to every line alike: each text is written behind
    `__BOT__:` (Telegram has no format number; such an e-mail's first line names 0)."""

    send_time: SendTime = field(default_factory=SendTime)
    translit: Translit | None = None
    format: Format = Format.sms
    sender: str = ""
    test: bool = True
    subject: str | None = None
    voice: str | None = None
    telegram: bool = False

    def __post_init__(self) -> None:
        check_sender(self.sender, fmt=self.format)
        if self.subject is not None:
            check_option_line("subject", self.subject)
        if self.voice is not None:
            check_option_line("voice", self.voice)
        if self.format == Format.email and not self.subject:
            raise InvalidRequest("the email format needs a subject", code="missing_subject")
        if self.format == Format.email and not is_email_sender(self.sender):
            # The gateway refuses the whole e-mail (error 1) without it.
            raise InvalidRequest(
                "the email format needs the sender's e-mail address as its sender",
                code="email_sender_required",
            )
        if self.telegram and self.format != Format.sms:
            raise InvalidRequest(
                "a Telegram e-mail's first line names format 0 (sms)", code="invalid_format"
            )


_PLAIN = MailOptions()


@dataclass(frozen=True, slots=True)
class ListLine:
    """Recipients (as written on the wire) and the text they all get; on the voice format,
    the call's parameters too."""

    phones: tuple[str, ...]
    text: str
    voice_params: str | None = None

    @property
    def message(self) -> str:
        """The message as the gateway reads it (before escaping; a Telegram prefix aside):
        the text, then the call's parameters after `\\n~~~\\n`."""
        if self.voice_params is None:
            return self.text
        return self.text + VOICE_PARAMS_SEPARATOR + self.voice_params

    def render(self, options: MailOptions = _PLAIN) -> str:
        """The line as it stands in an e-mail with these options."""
        if not self.phones:
            raise InvalidRequest("a line needs at least one recipient", code="invalid_recipient")
        for phone in self.phones:
            check_wire_recipient(phone)
        if options.format == Format.voice:
            check_voice_text(self.text)
            if self.voice_params is not None:
                check_voice_params(self.voice_params)
        elif self.voice_params is not None:
            raise InvalidRequest(
                "call parameters go on the voice format only", code="invalid_voice_params"
            )
        prefix = BOT_PREFIX if options.telegram else ""
        return ",".join(self.phones) + ":" + prefix + escape_text(self.message)


def check_wire_recipient(phone: str) -> str:
    """A recipient as written in a line: never empty (an empty one in the single-message
    form would turn `:<phones>:` into the list-mode `::`), never able to end its field or
    line, and never one that would read as a `subj:` / `voice:` option line."""
    if not _WIRE_RECIPIENT.fullmatch(phone) or any(c in ":,;" for c in phone):
        raise InvalidRequest(
            "a recipient must be non-empty printable ASCII without spaces, ':', ',' or ';'",
            code="invalid_recipient",
        )
    lowered = phone.lower()
    if lowered in _RESERVED_RECIPIENTS or any(tag in lowered for tag in TEXT_TAGS):
        raise InvalidRequest(
            f"{phone!r} cannot be a recipient: the gateway would read it as an option or tag",
            code="invalid_recipient",
        )
    return phone


@dataclass(frozen=True, slots=True)
class Envelope:
    """Everything about the e-mail that is not the body record."""

    mail_from: str
    gateway_address: str = "send@send.smscentre.com"
    charset: str = DEFAULT_CHARSET
    text_tags: bool = False

    def __post_init__(self) -> None:
        for name, address in (("from", self.mail_from), ("gateway", self.gateway_address)):
            if not _ADDRESS.fullmatch(address):
                raise InvalidRequest(f"{name} address {address!r} is not a plain e-mail address")
        check_charset(self.charset)  # an unknown charset fails here, not mid-batch


def check_charset(charset: str) -> str:
    """A charset the e-mail can declare and the gateway can read the record in: a plain
    name (it goes into the Content-Type header) of a text codec that writes ASCII as ASCII."""
    if not _CHARSET_NAME.fullmatch(charset):
        raise InvalidRequest(f"charset {charset!r} is not a charset name", code="charset")
    try:
        ascii_compatible = _ASCII_PROBE.encode(charset) == _ASCII_PROBE.encode("ascii")
    except (LookupError, UnicodeError, ValueError):
        ascii_compatible = False
    if not ascii_compatible:
        raise InvalidRequest(
            f"charset {charset!r} is unknown or does not write ASCII as ASCII", code="charset"
        )
    return charset


def header_record(account: Account, mail_id: str, options: MailOptions) -> str:
    """The colon-separated fields before the recipients, without the trailing `:`."""
    check_mail_id(mail_id)
    translit = "" if options.translit is None else str(int(options.translit))
    settings = f"{translit},{int(options.format)},{options.sender},{int(options.test)}"
    return ":".join(
        (
            account.login,
            account.password.get_secret_value(),
            mail_id,
            options.send_time.render(),
            settings,
        )
    )


def trailing_lines(options: MailOptions) -> list[str]:
    lines = []
    if options.subject is not None:
        lines.append(f"subj:{options.subject}")
    if options.voice is not None:
        lines.append(f"voice:{options.voice}")
    return lines


def pick_charset(preferred: str, texts: Iterable[str]) -> str:
    """The configured charset if it can carry every text, otherwise UTF-8: never a lossy
    substitution. Pass every text that goes into the body: the texts, sender, subject and
    voice, and the login and password too when they may be non-ASCII."""
    try:
        for text in texts:
            text.encode(preferred)
    except UnicodeEncodeError:
        return FALLBACK_CHARSET
    return preferred


def _encode_or_none(text: str, charset: str) -> bytes | None:
    """`text` in `charset`, or None. The UnicodeEncodeError is not kept: its `object` is
    the whole record, password included, and must not ride along as an exception's
    __cause__ or __context__ into logs."""
    try:
        return text.encode(charset)
    except UnicodeEncodeError:
        return None


def _headers(envelope: Envelope, charset: str, cte: str, date: str, message_id: str) -> bytes:
    for value in (date, message_id):
        if not _HEADER_SAFE.fullmatch(value):
            raise InvalidRequest(f"header value {value!r} is not printable ASCII")
    lines = (
        f"From: {envelope.mail_from}",
        f"To: {envelope.gateway_address}",
        "Subject: ",
        f"Date: {date}",
        f"Message-ID: {message_id}",
        "MIME-Version: 1.0",
        f'Content-Type: text/plain; charset="{charset}"',
        f"Content-Transfer-Encoding: {cte}",
    )
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def _base64_size(raw: int) -> int:
    encoded = 4 * math.ceil(raw / 3)
    return encoded + 2 * math.ceil(encoded / _B64_LINE)


class MailBuilder:
    """Fills one list-mode e-mail line by line, knowing its exact size all along.

    The body goes as 8bit while every line fits SMTP's 998 octets; a longer line (a long
    text in a multi-byte charset) makes the whole body base64.
    """

    def __init__(
        self,
        envelope: Envelope,
        account: Account,
        mail_id: str,
        options: MailOptions,
        *,
        charset: str,
        date: str,
        message_id: str,
        limit: int = MAX_MAIL_BYTES,
    ) -> None:
        self._envelope = envelope
        self._charset = check_charset(charset)
        # The gateway's own limit cannot be raised by the caller; it can only be lowered.
        self._limit = min(limit, MAX_MAIL_BYTES)
        self._lead = header_record(account, mail_id, options) + "::"
        if envelope.text_tags:
            self._lead = "[text]" + self._lead
        self._tail = trailing_lines(options)
        self._options = options
        self._lines: list[bytes] = []
        self._date = date
        self._message_id = message_id
        self._header_8bit = _headers(envelope, charset, "8bit", date, message_id)
        self._header_b64 = _headers(envelope, charset, "base64", date, message_id)
        self._lead_bytes = self._encode(self._lead)
        self._tail_bytes = [self._encode(t) for t in self._tail]
        if envelope.text_tags:
            self._tail_bytes.append(b"[/text]")
        self._raw = len(self._lead_bytes) + sum(len(t) + 2 for t in self._tail_bytes)
        self._longest = max([len(t) for t in self._tail_bytes], default=0)
        self.mail_id = mail_id

    def _encode(self, text: str) -> bytes:
        encoded = _encode_or_none(text, self._charset)
        if encoded is None:
            raise InvalidRequest(
                f"text cannot be written in {self._charset}; batch it with pick_charset()",
                code="charset",
            )
        return encoded

    def __len__(self) -> int:
        return len(self._lines)

    def _size(self, raw: int, longest: int) -> int:
        # The CRLF after the last body line is already counted in `raw`.
        if longest <= MAX_LINE_OCTETS:
            return len(self._header_8bit) + raw
        return len(self._header_b64) + _base64_size(raw)

    def _with(self, encoded: bytes) -> tuple[int, int]:
        if self._lines:
            return self._raw + len(encoded) + 2, max(self._longest, len(encoded))
        first = len(self._lead_bytes) + len(encoded)
        return self._raw + len(encoded) + 2, max(self._longest, first)

    @property
    def size(self) -> int:
        """Bytes of the e-mail as it stands (with no line, it is not yet sendable)."""
        if self._lines:
            return self._size(self._raw, self._longest)
        return self._size(self._raw + 2, max(self._longest, len(self._lead_bytes)))

    def cost(self, line: ListLine) -> int:
        """How many bytes adding `line` would add to the e-mail."""
        return self._size(*self._with(self._encode(line.render(self._options)))) - self.size

    def try_add(self, line: ListLine) -> bool:
        """Add the line if the e-mail stays within the limit; say whether it did."""
        encoded = self._encode(line.render(self._options))
        raw, longest = self._with(encoded)
        if self._size(raw, longest) > self._limit:
            if not self._lines:
                raise InvalidRequest(
                    f"one line alone would make the e-mail larger than {self._limit} bytes",
                    code="mail_too_large",
                )
            return False
        self._longest = longest
        self._raw = raw
        self._lines.append(encoded)
        return True

    def build(self) -> bytes:
        if not self._lines:
            raise InvalidRequest("an e-mail needs at least one line", code="empty_mail")
        body_lines = [self._lead_bytes + self._lines[0], *self._lines[1:], *self._tail_bytes]
        body = b"\r\n".join(body_lines) + b"\r\n"
        if self._longest <= MAX_LINE_OCTETS:
            return self._header_8bit + body
        encoded = base64.encodebytes(body).replace(b"\n", b"\r\n")
        return self._header_b64 + encoded


def encode_mail(
    envelope: Envelope,
    account: Account,
    mail_id: str,
    options: MailOptions,
    lines: Iterable[ListLine],
    *,
    date: str,
    message_id: str,
    limit: int = MAX_MAIL_BYTES,
) -> bytes:
    """A complete list-mode e-mail carrying every line, or InvalidRequest if it cannot."""
    lines = list(lines)
    charset = pick_charset(
        envelope.charset,
        [
            header_record(account, mail_id, options),
            *(line.message for line in lines),
            *trailing_lines(options),
        ],
    )
    builder = MailBuilder(
        envelope,
        account,
        mail_id,
        options,
        charset=charset,
        date=date,
        message_id=message_id,
        limit=limit,
    )
    for line in lines:
        if not builder.try_add(line):
            raise InvalidRequest(
                f"the lines do not fit in one e-mail of {min(limit, MAX_MAIL_BYTES)} bytes",
                code="mail_too_large",
            )
    return builder.build()


def encode_single(
    envelope: Envelope,
    account: Account,
    mail_id: str,
    options: MailOptions,
    line: ListLine,
    *,
    date: str,
    message_id: str,
) -> bytes:
    """The single-message form `...:<phones>:<mes>`, as the vendor's own libraries send it."""
    body = ":".join((header_record(account, mail_id, options), line.render(options)))
    texts = [body, *trailing_lines(options)]
    charset = pick_charset(envelope.charset, texts)
    if envelope.text_tags:
        texts[0] = "[text]" + texts[0]
        texts[-1] += "[/text]"
    encoded_lines = [_encode_or_none(t, charset) for t in texts]
    if None in encoded_lines:  # only a lone surrogate could get past pick_charset
        raise InvalidRequest(f"the e-mail cannot be written in {charset}", code="charset")
    raw = b"\r\n".join(e for e in encoded_lines if e is not None) + b"\r\n"
    longest = max(len(e) for e in encoded_lines if e is not None)
    if longest <= MAX_LINE_OCTETS:
        mail = _headers(envelope, charset, "8bit", date, message_id) + raw
    else:
        encoded = base64.encodebytes(raw).replace(b"\n", b"\r\n")
        mail = _headers(envelope, charset, "base64", date, message_id) + encoded
    if len(mail) > MAX_MAIL_BYTES:
        raise InvalidRequest("the e-mail is larger than 100 KB", code="mail_too_large")
    return mail
