"""The fields of a gateway send e-mail, and the rules that keep each one inside its slot.

The body is a colon-separated record whose last field, the message text, may itself
hold colons; everything before it may not. A raw line break always starts a new list
line at the gateway, so nothing a caller writes may carry one.
"""

from __future__ import annotations

import re
import unicodedata
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum, StrEnum

from worker.errors import InvalidRequest

MAX_TEXT_CHARS = 1000
MAX_NUMERIC_ID = 2_147_483_647
MAX_SENDER_NAME = 11
MAX_SENDER_DIGITS = 15

# A text behind this prefix goes to Telegram chat-bot users: the only channel with no format
# number of its own, so the encoder writes the prefix itself (MailOptions.telegram).
BOT_PREFIX = "__BOT__:"
RESERVED_PREFIXES = ("__CALL__:", "__VIBER__:", "__SOC__:", "__MAIL__:", BOT_PREFIX)
RESERVED_TEXTS = ("__PING__", "__HLR__")
TEXT_TAGS = ("[text]", "[/text]")
ESCAPED_NEWLINE = "\\n"
# A voice text's call parameters follow a line feed, three tildes and a line feed (the seed:
# "\n~~~\n"). The gateway offers no escape, so a voice text may not hold three tildes at all.
VOICE_PARAMS_MARK = "~~~"
VOICE_PARAMS_SEPARATOR = f"\n{VOICE_PARAMS_MARK}\n"
MAX_VOICE_PARAMS = 64
VOICE_PARAMS_PATTERN = r"[A-Za-z0-9,.=_+-]+"
_VOICE_PARAMS = re.compile(VOICE_PARAMS_PATTERN)

# Characters that str.splitlines() and mail software treat as line ends. Only "\n" has an
# escape the gateway understands; the others cannot be carried and are refused.
_UNCARRIABLE_BREAKS = frozenset("\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
_STRING_ID = re.compile(r"[A-Za-z0-9._-]{1,40}")
_SENDER = re.compile(r"[A-Za-z0-9 .\-_!&'+@#]+")
# The email format's sender is the sender's e-mail address (the seed: "subject, text and
# e-mail of the sender"); the same plain form the recipients module takes.
_EMAIL_SENDER = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+")
MAX_EMAIL_SENDER = 254
_FIELD_BREAKERS = frozenset(":,;\n") | _UNCARRIABLE_BREAKS
_SURROGATE = re.compile("[\ud800-\udfff]")
MIN_TZ, MAX_TZ = -24, 24
# A moment written as `0<unix seconds>` with fewer than 10 digits would be 10 characters or
# fewer and could read as `DDMMYYhhmm`; every such moment (before 2001-09-09) is long past,
# and the gateway sends a past time immediately, exactly like `0`.
_MIN_UNIX_TIME = 1_000_000_000


def _has_surrogate(value: str) -> bool:
    """Lone surrogates cannot be written in any charset, so the e-mail could not carry them."""
    return _SURROGATE.search(value) is not None


def hides_reserved_prefix(text: str) -> bool:
    """Whether the gateway could read the text as starting with a channel prefix: in any
    case, after leading blanks, control characters and format characters.

    Format characters (category Cf: BOM U+FEFF, zero-width space U+200B, bidi marks, ...)
    are left out before looking, wherever they stand, as are control characters (which
    the contract refuses anyway): software on the way may drop them, so a BOM in front of
    `__VIBER__:` must not let it pass for plain text. Cf characters are not refused
    everywhere: ZWJ/ZWNJ and the bidi marks belong to ordinary texts (emoji sequences,
    Persian, Arabic, Hebrew), and anywhere but around a prefix they are harmless."""
    probe = text
    if not probe.isascii() or not probe.isprintable():
        probe = "".join(c for c in text if unicodedata.category(c) not in ("Cf", "Cc"))
    return probe.lstrip().upper().startswith(RESERVED_PREFIXES + RESERVED_TEXTS)


def _has_text_tag(value: str) -> bool:
    lowered = value.lower()
    return any(tag in lowered for tag in TEXT_TAGS)


class Format(IntEnum):
    """The gateway's message formats, by the name this project uses for them."""

    sms = 0
    flash = 1
    wap_push = 2
    hlr = 3
    binary = 4
    binary_hex = 5
    ping = 6
    mms = 7
    email = 8
    voice = 9
    viber = 10
    whatsapp = 11
    soc = 12


class Channel(StrEnum):
    """The channels this project offers, by name: each is a gateway format, and `telegram`,
    which has no format number, is format 0 with every text behind `__BOT__:`. Formats 4
    (binary: raw bytes) and 7 (MMS: attachments) are not offered: a plain-text e-mail as
    this project builds it cannot carry them."""

    sms = "sms"
    flash = "flash"
    wap_push = "wap_push"
    hlr = "hlr"
    binary_hex = "binary_hex"
    ping = "ping"
    email = "email"
    voice = "voice"
    viber = "viber"
    whatsapp = "whatsapp"
    soc = "soc"
    telegram = "telegram"

    @property
    def gateway_format(self) -> Format:
        """The format number the e-mail's first line names for this channel."""
        return Format.sms if self is Channel.telegram else Format[self.value]


# Gateway formats this project does not offer as channels, and why (a request or setting
# naming one is refused with this reason).
NOT_OFFERED = {
    Format.binary.name: "raw bytes cannot travel in a text e-mail (binary_hex carries hex)",
    Format.mms.name: "a text e-mail as this project builds it has no way to attach media",
}


class Translit(IntEnum):
    off = 0
    translit = 1
    mpahc = 2


def check_plain_field(name: str, value: str, *, allow_comma: bool = False) -> str:
    """Refuse a value that could end its field early or start a new one."""
    forbidden = _FIELD_BREAKERS - {","} if allow_comma else _FIELD_BREAKERS
    bad = sorted({c for c in value if c in forbidden})
    if bad:
        shown = ", ".join(repr(c) for c in bad)
        raise InvalidRequest(f"{name} must not contain {shown}", code=f"invalid_{name}")
    if _has_text_tag(value):
        raise InvalidRequest(
            f"{name} must not contain [text] or [/text], which the gateway reads as body markers",
            code=f"invalid_{name}",
        )
    if _has_surrogate(value):
        raise InvalidRequest(
            f"{name} contains a lone surrogate, which no charset can carry",
            code=f"invalid_{name}",
        )
    return value


def check_login(login: str) -> str:
    return check_plain_field("login", login)


def check_password(password: str) -> str:
    if not password:
        raise InvalidRequest("a password or API key is required", code="invalid_password")
    # The value itself is a secret: name the problem, never the characters.
    if any(c in _FIELD_BREAKERS for c in password):
        raise InvalidRequest(
            "password/API key must not contain ':', ',', ';' or a line break",
            code="invalid_password",
        )
    if _has_text_tag(password):
        raise InvalidRequest(
            "password/API key must not contain [text] or [/text]", code="invalid_password"
        )
    if _has_surrogate(password):
        raise InvalidRequest(
            "password/API key contains a lone surrogate, which no charset can carry",
            code="invalid_password",
        )
    return password


def new_mail_id(draw: Callable[[], str] = lambda: uuid.uuid4().hex) -> str:
    """A fresh e-mail id: 32 hex digits, never digits alone, which the gateway would read
    as a number and refuse past 2147483647 (about one uuid4 in 2.7 million)."""
    while True:
        mail_id = draw()
        if not mail_id.isdecimal():
            return mail_id


def check_mail_id(mail_id: str) -> str:
    """The id is either 1..2147483647 or up to 40 of [A-Za-z0-9._-]."""
    if mail_id.isdecimal() and mail_id.isascii():
        if not 1 <= int(mail_id) <= MAX_NUMERIC_ID:
            raise InvalidRequest(
                f"numeric id must be within 1..{MAX_NUMERIC_ID}", code="invalid_id"
            )
        return mail_id
    if not _STRING_ID.fullmatch(mail_id):
        raise InvalidRequest(
            "id must be 1..2147483647 or 1-40 characters of A-Z a-z 0-9 . - _",
            code="invalid_id",
        )
    return mail_id


def check_sender(sender: str, *, fmt: Format | None = None) -> str:
    """A registered sender name: up to 11 characters, or up to 15 digits; for the email
    format (when `fmt` says so), the sender's e-mail address as well."""
    if not sender:
        return sender
    check_plain_field("sender", sender)
    if fmt == Format.email and "@" in sender:
        if len(sender) > MAX_EMAIL_SENDER or not _EMAIL_SENDER.fullmatch(sender):
            raise InvalidRequest(
                "the email format's sender must be a plain e-mail address", code="invalid_sender"
            )
        return sender
    if sender.isdecimal() and sender.isascii():
        if len(sender) > MAX_SENDER_DIGITS:
            raise InvalidRequest(
                f"a numeric sender has at most {MAX_SENDER_DIGITS} digits", code="invalid_sender"
            )
        return sender
    if len(sender) > MAX_SENDER_NAME or not _SENDER.fullmatch(sender):
        raise InvalidRequest(
            f"sender must be at most {MAX_SENDER_NAME} Latin letters, digits, spaces or "
            ".-_!&'+@# (or at most 15 digits)",
            code="invalid_sender",
        )
    return sender


def is_email_sender(sender: str) -> bool:
    """Whether `sender` is written as an e-mail address: the email format's sender, which
    no other channel can show as a sender name."""
    return len(sender) <= MAX_EMAIL_SENDER and _EMAIL_SENDER.fullmatch(sender) is not None


def check_option_line(name: str, value: str) -> str:
    """subj: and voice: sit on lines of their own; a line break would forge another."""
    if any(c == "\n" or c in _UNCARRIABLE_BREAKS for c in value):
        raise InvalidRequest(f"{name} must not contain a line break", code=f"invalid_{name}")
    if ESCAPED_NEWLINE in value:
        raise InvalidRequest(
            f"{name} contains a backslash followed by 'n', which the gateway reads as a line break",
            code=f"invalid_{name}",
        )
    if _has_text_tag(value):
        raise InvalidRequest(
            f"{name} must not contain [text] or [/text], which the gateway reads as body markers",
            code=f"invalid_{name}",
        )
    if _has_surrogate(value):
        raise InvalidRequest(
            f"{name} contains a lone surrogate, which no charset can carry",
            code=f"invalid_{name}",
        )
    return value


def check_voice_params(params: str) -> str:
    """A voice call's parameters, written after `\\n~~~\\n` at the end of its text: 1 to 64
    of A-Z a-z 0-9 and `,.=_+-`, so they can neither end the line (nor lose a trailing
    blank on the way) nor hold the separator or an escape the gateway would read."""
    if len(params) > MAX_VOICE_PARAMS or not _VOICE_PARAMS.fullmatch(params):
        raise InvalidRequest(
            f"voice_params must be 1 to {MAX_VOICE_PARAMS} of A-Z a-z 0-9 and ,.=_+-",
            code="invalid_voice_params",
        )
    return params


def check_voice_text(text: str) -> str:
    """A voice text must not hold `~~~`: the gateway would take what follows the separator
    for the call's parameters, and it has no escape for it."""
    if VOICE_PARAMS_MARK in text:
        raise InvalidRequest(
            "text holds '~~~', which on the voice channel starts the call's parameters "
            "(give them in voice_params)",
            code="unsendable_text",
        )
    return text


def check_text(text: str) -> str:
    """Refuse a text the gateway would not deliver exactly as written."""
    if len(text) > MAX_TEXT_CHARS:
        raise InvalidRequest(
            f"text is {len(text)} characters; the gateway takes at most {MAX_TEXT_CHARS}",
            code="text_too_long",
        )
    # Read as widely as the gateway might: any case, after leading blanks and format
    # characters, and __PING__ / __HLR__ followed by anything. Rejecting a few odd texts is
    # cheaper than a wrong channel.
    if hides_reserved_prefix(text):
        raise InvalidRequest(
            "text begins with a prefix the gateway reserves for switching channels "
            "(__CALL__:, __VIBER__:, __SOC__:, __MAIL__:, __BOT__:, __PING__, __HLR__)",
            code="reserved_prefix",
        )
    if ESCAPED_NEWLINE in text:
        raise InvalidRequest(
            "text contains a backslash followed by 'n', which the gateway reads as a line break",
            code="unsendable_text",
        )
    if _has_text_tag(text):
        raise InvalidRequest(
            "text contains [text] or [/text], which the gateway reads as body markers",
            code="unsendable_text",
        )
    if _has_surrogate(text):
        raise InvalidRequest(
            "text contains a lone surrogate (broken UTF-16), which no charset can carry",
            code="unsendable_text",
        )
    breaks = sorted({c for c in text if c in _UNCARRIABLE_BREAKS})
    if breaks:
        shown = ", ".join(f"U+{ord(c):04X}" for c in breaks)
        raise InvalidRequest(
            f"text contains line separators the gateway cannot carry ({shown}); use \\n",
            code="unsendable_text",
        )
    return text


def escape_text(text: str) -> str:
    """The text as it stands in a list line: checked, its newlines written as `\\n`."""
    return check_text(text).replace("\n", ESCAPED_NEWLINE)


def unescape_text(escaped: str) -> str:
    return escaped.replace(ESCAPED_NEWLINE, "\n")


@dataclass(frozen=True, slots=True)
class SendTime:
    """The `time` and `tz` sub-fields: when the gateway should send."""

    time: str = ""
    tz: int | None = None

    def __post_init__(self) -> None:
        # `time` and `tz` share one colon-separated field: a stray `:` or `,` would shift
        # every field after it, so only the documented forms are let through.
        if not isinstance(self.time, str) or not is_valid_time(self.time):
            raise InvalidRequest(
                "time must be DDMMYYhhmm, DD.MM.YY hh.mm, h1-h2, 0<unix seconds> or +<minutes>",
                code="invalid_send_at",
            )
        if self.tz is not None and (
            isinstance(self.tz, bool)
            or not isinstance(self.tz, int)
            or not MIN_TZ <= self.tz <= MAX_TZ
        ):
            raise InvalidRequest(
                f"tz must be whole hours from Moscow time within {MIN_TZ}..{MAX_TZ}",
                code="invalid_tz",
            )

    @classmethod
    def at(cls, moment: datetime) -> SendTime:
        """An absolute moment, written as `0<unix seconds>` so no time zone is involved."""
        if moment.tzinfo is None:
            raise InvalidRequest("send_at must carry a time zone", code="invalid_send_at")
        seconds = int(moment.timestamp())
        if seconds < _MIN_UNIX_TIME:
            return cls(time="0")  # long past: the gateway sends it now either way
        return cls(time=f"0{seconds}")

    @classmethod
    def window(cls, start_hour: int, end_hour: int, tz: int | None = None) -> SendTime:
        """Send only between two hours of the day (in Moscow time shifted by `tz`)."""
        if not (0 <= start_hour <= 24 and 0 <= end_hour <= 24):
            raise InvalidRequest("hour window bounds must be 0..24", code="invalid_window")
        return cls(time=f"{start_hour}-{end_hour}", tz=tz)

    @classmethod
    def after_minutes(cls, minutes: int) -> SendTime:
        if minutes < 0:
            raise InvalidRequest("a delay cannot be negative", code="invalid_send_at")
        return cls(time=f"+{minutes}")

    def render(self) -> str:
        return self.time if self.tz is None else f"{self.time},{self.tz}"


# re.ASCII: `\d` alone would also take other scripts' digits, which the gateway does not.
_TIME_FORMS = (
    re.compile(r"(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})", re.ASCII),
    re.compile(r"(\d{2})\.(\d{2})\.(\d{2}) (\d{2})\.(\d{2})", re.ASCII),
)
_HOUR_WINDOW = re.compile(r"(\d{1,2})-(\d{1,2})", re.ASCII)
_UNIX_TIME = re.compile(r"0\d+", re.ASCII)
_RELATIVE = re.compile(r"\+\d+", re.ASCII)


def is_valid_time(value: str) -> bool:
    """Whether `value` is one of the gateway's documented time forms (or empty / `0`)."""
    if value in ("", "0"):
        return True
    if _UNIX_TIME.fullmatch(value) or _RELATIVE.fullmatch(value):
        return True
    window = _HOUR_WINDOW.fullmatch(value)
    if window:
        return all(0 <= int(h) <= 24 for h in window.groups())
    for form in _TIME_FORMS:
        match = form.fullmatch(value)
        if match:
            day, month, _year, hour, minute = (int(g) for g in match.groups())
            return 1 <= day <= 31 and 1 <= month <= 12 and hour <= 23 and minute <= 59
    return False
