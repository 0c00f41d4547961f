"""Recipients as the gateway reads them: phone numbers, groups, e-mail addresses, and for
Telegram #ids and @nicknames.

Telegram (a `__BOT__:` text) reaches the chat-bot's users by ID (`#<digits>`), by
nickname (`@name`) or by phone number where the user gave the bot theirs: the seed names
"the subscriber's nickname or ID ... in the form of #ID" for Telegram only, and the
vendor's page on its Telegram bots writes the three as `#uid`, `@username` and a number.
Every other channel refuses a `#` or `@` recipient up front (`telegram_only_recipient`):
the gateway would answer error 7 for the whole e-mail.

A number given with `+` is validated as it is and never corrected (the gateway's own
rule: `+` turns its auto-correction off). A number without `+` may be national (read with
a default region) or international with the `+` left off (the gateway's document allows
that: `380501234567` is a Ukrainian number). When a digit string is valid both ways and
the two name different numbers (`84951234567`: Moscow with the trunk prefix 8, or Vietnam
+84), the national reading wins unless `national_first` is off. Either way the number is
written so that the gateway cannot read it otherwise: a national reading as the digits of
its E.164 form without `+` (as the gateway's auto-correction reads them), an
international one with `+` (so no auto-correction can turn it into a national number).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

import phonenumbers

from worker.errors import InvalidRequest
from worker.protocol.fields import Format

_GROUP = re.compile(r"G(\d{1,10})")
# A Telegram user ID is a positive integer (64 bits at most).
_TELEGRAM_ID = re.compile(r"#[0-9]{1,20}", re.ASCII)
# A Telegram username: a letter, then letters, digits and underscores, 4 to 32 in all
# (5 for most; 4-character names exist too).
_TELEGRAM_NICKNAME = re.compile(r"@[A-Za-z][A-Za-z0-9_]{3,31}", re.ASCII)
_EMAIL = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+")
_PHONE_PUNCTUATION = re.compile(r"[\s()\-.]")


class RecipientKind(StrEnum):
    phone = "phone"
    group = "group"
    email = "email"
    telegram = "telegram"  # a #id or an @nickname


@dataclass(frozen=True, slots=True)
class Recipient:
    """One recipient: `wire` is how it is written in the e-mail, `key` who it really is."""

    kind: RecipientKind
    wire: str
    key: str


def _looks_telegram(value: str) -> bool:
    """Written as a Telegram #id or @nickname (an address such as `#a@b.cc` is not)."""
    return value[:1] in ("#", "@") and "@" not in value[1:]


def parse_recipient(
    raw: str,
    fmt: Format = Format.sms,
    default_region: str = "RU",
    national_first: bool = True,
    *,
    telegram: bool = False,
) -> Recipient:
    """Validate one recipient for a message format, or say why it cannot be one.
    `telegram`: the text goes to Telegram (behind `__BOT__:`), where #ids and @nicknames
    are taken besides phone numbers and groups."""
    value = raw.strip()
    if not value:
        raise InvalidRequest("empty recipient", code="invalid_recipient")
    if telegram and fmt == Format.email:
        raise InvalidRequest("a Telegram text is not an e-mail", code="invalid_recipient")
    if _looks_telegram(value):
        return _parse_telegram(raw, value, fmt, telegram)
    if fmt == Format.email:
        if _EMAIL.fullmatch(value) and len(value) <= 254:
            return Recipient(RecipientKind.email, value, value.lower())
        raise InvalidRequest(
            f"{raw!r} is not an e-mail address (the email format sends to addresses only)",
            code="invalid_recipient",
        )
    if _GROUP.fullmatch(value):
        return Recipient(RecipientKind.group, value, value)
    return _parse_phone(raw, value, default_region, national_first)


def _parse_telegram(raw: str, value: str, fmt: Format, telegram: bool) -> Recipient:
    if not telegram:
        raise InvalidRequest(
            f"{raw!r}: #id and @nickname recipients are Telegram's, for the telegram channel "
            f"only; the {fmt.name} channel takes "
            + ("e-mail addresses" if fmt == Format.email else "phone numbers and G<n> groups"),
            code="telegram_only_recipient",
        )
    if _TELEGRAM_ID.fullmatch(value):
        return Recipient(RecipientKind.telegram, value, value)
    if _TELEGRAM_NICKNAME.fullmatch(value):
        # Telegram usernames are case-insensitive: @Shop_Bot and @shop_bot are one user.
        return Recipient(RecipientKind.telegram, value, value.lower())
    raise InvalidRequest(
        f"{raw!r} is not a Telegram recipient: #<digits> (an ID) or @<nickname> (a letter, "
        "then letters, digits or _, 4 to 32 in all)",
        code="invalid_recipient",
    )


def _international(digits: str) -> str | None:
    """The E.164 number `digits` is with the `+` put back, if it is valid exactly as written."""
    try:
        number = phonenumbers.parse("+" + digits, None)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return e164 if e164 == "+" + digits else None


def _parse_phone(raw: str, value: str, default_region: str, national_first: bool) -> Recipient:
    compact = _PHONE_PUNCTUATION.sub("", value)
    explicit = compact.startswith("+")
    digits = compact[1:] if explicit else compact
    if not digits.isdecimal() or not digits.isascii():
        raise InvalidRequest(
            f"{raw!r} is not a phone number or group (G<n>)",
            code="invalid_recipient",
        )
    international = None if explicit else _international(digits)
    if international is not None and not national_first:
        return Recipient(RecipientKind.phone, international, international)
    try:
        number = phonenumbers.parse(compact, None if explicit else default_region)
    except phonenumbers.NumberParseException as exc:
        if international is not None:
            return Recipient(RecipientKind.phone, international, international)
        raise InvalidRequest(f"{raw!r} is not a phone number: {exc}", code="invalid_phone") from exc
    if not phonenumbers.is_valid_number(number):
        if international is not None:
            return Recipient(RecipientKind.phone, international, international)
        hint = " (numbers with + are not corrected)" if explicit else ""
        raise InvalidRequest(f"{raw!r} is not a valid phone number{hint}", code="invalid_phone")
    e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    if explicit and e164 != compact:
        # phonenumbers quietly drops a national prefix after the country code
        # ("+7 8 999..." becomes +7 999...): that is a correction, and `+` forbids it.
        raise InvalidRequest(
            f"{raw!r} is not a valid phone number as written (numbers with + are not "
            f"corrected; did you mean {e164}?)",
            code="invalid_phone",
        )
    return Recipient(RecipientKind.phone, e164 if explicit else e164[1:], e164)


def parse_recipients(
    raws: list[str] | tuple[str, ...],
    fmt: Format = Format.sms,
    default_region: str = "RU",
    national_first: bool = True,
    *,
    telegram: bool = False,
) -> tuple[Recipient, ...]:
    """Each recipient validated; the same person named twice is kept once."""
    seen: dict[str, Recipient] = {}
    for raw in raws:
        recipient = parse_recipient(raw, fmt, default_region, national_first, telegram=telegram)
        seen.setdefault(recipient.key, recipient)
    if not seen:
        raise InvalidRequest("at least one recipient is required", code="invalid_recipient")
    return tuple(seen.values())


def sms_count(sms_parts: int | None, wires: Iterable[str]) -> int | None:
    """Parts times recipients for recipients as written in the e-mail, or None when unknown:
    the parts are unknown, or a `G<n>` group is among them, whose size only the gateway
    knows (counting it as one would understate the cost)."""
    wires = tuple(wires)
    if sms_parts is None or any(_GROUP.fullmatch(w) for w in wires):
        return None
    return sms_parts * len(wires)
