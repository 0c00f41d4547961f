"""Recipients as the gateway reads them: phone numbers, groups, e-mail addresses, #ids.

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
_MESSENGER_ID = re.compile(r"#([A-Za-z0-9_.@-]{1,64})")
_EMAIL = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+")
_PHONE_PUNCTUATION = re.compile(r"[\s()\-.]")
_MESSENGER_FORMATS = frozenset({Format.viber, Format.whatsapp, Format.soc})


class RecipientKind(StrEnum):
    phone = "phone"
    group = "group"
    email = "email"
    messenger = "messenger"


@dataclass(frozen=True, slots=True)
class Recipient:
    """One recipient: `wire` is how it is written in the e-mail, `key` who it really is."""

    kind: RecipientKind
    wire: str
    key: str


def parse_recipient(
    raw: str, fmt: Format = Format.sms, default_region: str = "RU", national_first: bool = True
) -> Recipient:
    """Validate one recipient for a message format, or say why it cannot be one."""
    value = raw.strip()
    if not value:
        raise InvalidRequest("empty recipient", code="invalid_recipient")
    if fmt == Format.email:
        if _EMAIL.fullmatch(value) and len(value) <= 254:
            return Recipient(RecipientKind.email, value, value.lower())
        raise InvalidRequest(
            f"{raw!r} is not an e-mail address (the email format sends to addresses only)",
            code="invalid_recipient",
        )
    if _GROUP.fullmatch(value):
        return Recipient(RecipientKind.group, value, value)
    messenger = _MESSENGER_ID.fullmatch(value)
    if messenger:
        if fmt not in _MESSENGER_FORMATS:
            raise InvalidRequest(
                f"{raw!r}: #id recipients need a messenger channel (viber, whatsapp, soc)",
                code="invalid_recipient",
            )
        return Recipient(RecipientKind.messenger, value, value)
    return _parse_phone(raw, value, default_region, national_first)


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
            f"{raw!r} is not a phone number, group (G<n>), e-mail address or #id",
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
) -> tuple[Recipient, ...]:
    """Each recipient validated; the same person named twice is kept once."""
    seen: dict[str, Recipient] = {}
    for raw in raws:
        recipient = parse_recipient(raw, fmt, default_region, national_first)
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
