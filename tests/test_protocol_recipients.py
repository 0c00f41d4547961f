"""Recipients: numbers with `+` as given, without `+` read with a default region, groups,
e-mail addresses for the email format, #ids and @nicknames for Telegram only, everything
else refused."""

from __future__ import annotations

import phonenumbers
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from worker.errors import InvalidRequest
from worker.protocol.fields import Format
from worker.protocol.recipients import RecipientKind, parse_recipient, parse_recipients

FAST = settings(max_examples=200, deadline=None)


@pytest.mark.parametrize(
    "raw", ["+79991234567", "+7 999 123-45-67", "+7 (999) 123.45.67", " +79991234567 "]
)
def test_a_plus_number_is_written_with_plus_and_only_punctuation_removed(raw: str) -> None:
    recipient = parse_recipient(raw)
    assert recipient.kind is RecipientKind.phone
    assert recipient.wire == "+79991234567"
    assert recipient.key == "+79991234567"


@pytest.mark.parametrize(
    ("raw", "suggested"),
    [
        ("+789991234567", "+79991234567"),  # a national prefix 8 after the country code
        ("+7 8 999 123 45 67", "+79991234567"),
        ("+4407911123456", "+447911123456"),  # a national prefix 0 after the country code
    ],
)
def test_a_plus_number_is_never_corrected(raw: str, suggested: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_recipient(raw)
    assert info.value.code == "invalid_phone"
    assert "not corrected" in info.value.message


@pytest.mark.parametrize("raw", ["+7999123456", "+799912345678", "+1", "+0123456789"])
def test_an_invalid_plus_number_is_refused(raw: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_recipient(raw)
    assert info.value.code == "invalid_phone"


@pytest.mark.parametrize(
    ("raw", "region", "wire"),
    [
        ("89991234567", "RU", "79991234567"),
        ("79991234567", "RU", "79991234567"),
        ("9991234567", "RU", "79991234567"),
        ("8 (999) 123-45-67", "RU", "79991234567"),
        ("07911 123456", "GB", "447911123456"),
        ("(201) 555-0123", "US", "12015550123"),
    ],
)
def test_a_number_without_plus_is_read_with_the_default_region(
    raw: str, region: str, wire: str
) -> None:
    recipient = parse_recipient(raw, Format.sms, region)
    assert recipient.wire == wire
    assert recipient.key == "+" + wire


def test_a_number_without_plus_that_is_invalid_in_the_region_is_refused() -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_recipient("07911 123456", Format.sms, "RU")
    assert info.value.code == "invalid_phone"


@FAST
@given(st.from_regex(r"\+[1-9][0-9]{5,15}", fullmatch=True))
@example("+789991234567")
@example("+390612345678")
def test_plus_numbers_are_accepted_only_exactly_as_given(raw: str) -> None:
    try:
        recipient = parse_recipient(raw)
    except InvalidRequest:
        return
    assert recipient.wire == raw
    assert recipient.key == raw


@FAST
@given(st.sampled_from(sorted(phonenumbers.SUPPORTED_REGIONS)))
def test_every_valid_international_number_is_accepted_as_written(region: str) -> None:
    example_number = phonenumbers.example_number_for_type(
        region, phonenumbers.PhoneNumberType.MOBILE
    )
    if example_number is None:
        return
    e164 = phonenumbers.format_number(example_number, phonenumbers.PhoneNumberFormat.E164)
    assert parse_recipient(e164).wire == e164


@pytest.mark.parametrize("raw", ["G1", "G42", "G1234567890"])
def test_group_codes(raw: str) -> None:
    recipient = parse_recipient(raw)
    assert recipient.kind is RecipientKind.group
    assert recipient.wire == raw


def test_email_addresses_for_the_email_format() -> None:
    recipient = parse_recipient("John.Doe+tag@Example.com", Format.email)
    assert recipient.kind is RecipientKind.email
    assert recipient.wire == "John.Doe+tag@Example.com"
    assert recipient.key == "john.doe+tag@example.com"


@pytest.mark.parametrize("raw", ["79991234567", "G1", "not an address", "a@b", "a:b@example.com"])
def test_the_email_format_takes_addresses_only(raw: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_recipient(raw, Format.email)
    assert "e-mail address" in info.value.message


def test_an_email_address_is_not_a_phone_recipient() -> None:
    with pytest.raises(InvalidRequest):
        parse_recipient("john@example.com", Format.sms)


@pytest.mark.parametrize(
    ("raw", "key"),
    [("#42", "#42"), ("#123456789012", "#123456789012"), ("@shop_bot", "@shop_bot"),
     ("@Shop_Bot", "@shop_bot"), (" @abcd ", "@abcd"), ("@" + "a" * 32, "@" + "a" * 32)],
)  # fmt: skip
def test_telegram_takes_ids_and_nicknames(raw: str, key: str) -> None:
    recipient = parse_recipient(raw, telegram=True)
    assert recipient.kind is RecipientKind.telegram
    assert recipient.wire == raw.strip()
    assert recipient.key == key  # a nickname in any case is one user


@pytest.mark.parametrize(
    ("raw", "kind", "key"),
    [("+79991234567", RecipientKind.phone, "+79991234567"),
     ("89991234567", RecipientKind.phone, "+79991234567"), ("G7", RecipientKind.group, "G7")],
)  # fmt: skip
def test_telegram_takes_phone_numbers_and_groups_too(
    raw: str, kind: RecipientKind, key: str
) -> None:
    # A bot's user can be reached by the number they gave the bot (the vendor's Telegram page).
    recipient = parse_recipient(raw, telegram=True)
    assert (recipient.kind, recipient.key) == (kind, key)


@pytest.mark.parametrize(
    "raw",
    ["#", "#-1", "#12a", "#user_42", "#" + "1" * 21, "@", "@abc", "@1abc", "@ab-cd", "@nick.name",
     "@" + "a" * 33, "shop_bot", "a@b.cc"],
)  # fmt: skip
def test_telegram_refuses_what_is_neither_an_id_nor_a_nickname(raw: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_recipient(raw, telegram=True)
    assert info.value.code in ("invalid_recipient", "invalid_phone")


@pytest.mark.parametrize("fmt", [f for f in Format if f is not Format.email])
@pytest.mark.parametrize("raw", ["#42", "@shop_bot", "#user_42"])
def test_ids_and_nicknames_are_refused_on_every_other_channel(fmt: Format, raw: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_recipient(raw, fmt)
    assert info.value.code == "telegram_only_recipient"
    assert "telegram channel only" in info.value.message
    assert f"the {fmt.name} channel takes phone numbers" in info.value.message


def test_ids_are_refused_on_the_email_channel_saying_it_takes_addresses() -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_recipient("#42", Format.email)
    assert info.value.code == "telegram_only_recipient"
    assert "email channel takes e-mail addresses" in info.value.message
    # An address may begin with '#': it is an address, not a Telegram id.
    assert parse_recipient("#team@example.com", Format.email).kind is RecipientKind.email


def test_a_telegram_text_is_never_an_email() -> None:
    with pytest.raises(InvalidRequest):
        parse_recipient("#42", Format.email, telegram=True)


def test_parse_recipients_passes_telegram_on() -> None:
    recipients = parse_recipients(["#42", "@Shop_Bot", "@shop_bot", "+79991234567"], telegram=True)
    assert [r.wire for r in recipients] == ["#42", "@Shop_Bot", "+79991234567"]
    with pytest.raises(InvalidRequest):
        parse_recipients(["#42"])


@pytest.mark.parametrize(
    "raw",
    ["", "   ", "hello", "7999:1234567", "7999,1234567", "+7999;1234567", "79991234567\n7", "G",
     "g12", "G12a", "#", "++79991234567", "7+9991234567", "٧٩٩٩١٢٣٤٥٦٧"],
)  # fmt: skip
def test_anything_else_is_refused_with_a_reason(raw: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_recipient(raw)
    assert info.value.code in ("invalid_recipient", "invalid_phone", "telegram_only_recipient")
    assert info.value.message


def test_the_same_person_named_twice_is_kept_once() -> None:
    recipients = parse_recipients(["+79991234567", "89991234567", "8 999 123 45 67", "G1"])
    assert [r.wire for r in recipients] == ["+79991234567", "G1"]


def test_at_least_one_recipient_is_required() -> None:
    with pytest.raises(InvalidRequest):
        parse_recipients([])


@FAST
@given(st.text(max_size=20))
@example("#42")
@example("@shop_bot")
def test_every_accepted_recipient_is_safe_to_write_in_a_line(raw: str) -> None:
    for fmt, telegram in ((Format.sms, False), (Format.email, False), (Format.sms, True)):
        try:
            recipient = parse_recipient(raw, fmt, telegram=telegram)
        except InvalidRequest:
            continue
        assert recipient.wire
        assert not any(c in recipient.wire for c in ":,;\r\n \t")


# International numbers with the `+` left off (the gateway's document allows it).
INTERNATIONAL_WITHOUT_PLUS = ["380501234567", "375291234567", "998901234567", "447911123456"]


@pytest.mark.parametrize("raw", INTERNATIONAL_WITHOUT_PLUS)
@pytest.mark.parametrize("national_first", [True, False])
def test_an_international_number_without_plus_is_accepted(raw: str, national_first: bool) -> None:
    recipient = parse_recipient(raw, Format.sms, "RU", national_first)
    assert recipient.kind is RecipientKind.phone
    assert recipient.key == "+" + raw
    # Written with `+`, so the gateway's auto-correction cannot read it as a national number.
    assert recipient.wire == "+" + raw


def test_a_number_valid_both_ways_is_national_by_default() -> None:
    recipient = parse_recipient("84951234567")  # Moscow with the trunk 8, or Vietnam +84
    assert recipient.key == "+74951234567"
    assert recipient.wire == "74951234567"


def test_a_number_valid_both_ways_is_international_when_national_first_is_off() -> None:
    recipient = parse_recipient("84951234567", Format.sms, "RU", national_first=False)
    assert recipient.key == "+84951234567"
    assert recipient.wire == "+84951234567"


@pytest.mark.parametrize("national_first", [True, False])
@pytest.mark.parametrize("raw", ["89991234567", "9991234567", "8 (999) 123-45-67"])
def test_a_number_valid_only_nationally_stays_national(raw: str, national_first: bool) -> None:
    recipient = parse_recipient(raw, Format.sms, "RU", national_first)
    assert recipient.key == "+79991234567"
    assert recipient.wire == "79991234567"


def test_the_international_reading_must_be_valid_exactly_as_written() -> None:
    # "+4407911123456" would need a correction (the trunk 0 dropped): no reading fits.
    with pytest.raises(InvalidRequest) as info:
        parse_recipient("4407911123456")
    assert info.value.code == "invalid_phone"


def test_parse_recipients_passes_the_reading_on() -> None:
    national = parse_recipients(["84951234567", "74951234567"])
    assert [r.key for r in national] == ["+74951234567"]
    international = parse_recipients(["84951234567", "+84951234567"], national_first=False)
    assert [r.key for r in international] == ["+84951234567"]


def _mobile_examples() -> list[str]:
    found = []
    for region in sorted(phonenumbers.SUPPORTED_REGIONS):
        number = phonenumbers.example_number_for_type(region, phonenumbers.PhoneNumberType.MOBILE)
        if number is not None:
            found.append(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))
    return found


MOBILE_EXAMPLES = _mobile_examples()


@FAST
@given(st.sampled_from(MOBILE_EXAMPLES), st.sampled_from(["RU", "GB", "US", "UA", "DE"]))
@example("+84951234567", "RU")
@example("+380501234567", "RU")
def test_every_valid_number_without_plus_is_read_one_of_the_two_ways(
    e164: str, region: str
) -> None:
    digits = e164[1:]
    international = parse_recipient(digits, Format.sms, region, national_first=False)
    assert (international.key, international.wire) == (e164, e164)
    national = parse_recipient(digits, Format.sms, region, national_first=True)
    if national.key != e164:
        # Only where the digits are a valid national number of the region as well.
        parsed = phonenumbers.parse(digits, region)
        assert phonenumbers.is_valid_number(parsed)
        assert national.key == phonenumbers.format_number(
            parsed, phonenumbers.PhoneNumberFormat.E164
        )


@FAST
@given(
    st.one_of(
        st.sampled_from(MOBILE_EXAMPLES).map(lambda e164: e164[1:]),
        st.from_regex(r"[1-9][0-9]{9,13}", fullmatch=True),
    ),
    st.booleans(),
)
@example("84951234567", True)
@example("84951234567", False)
def test_what_is_written_reads_back_as_the_same_number(raw: str, national_first: bool) -> None:
    """The gateway (as the emulator reads it, region RU, national first) reads the wire
    form as the number the worker meant, whichever reading the worker chose."""
    try:
        recipient = parse_recipient(raw, Format.sms, "RU", national_first)
    except InvalidRequest:
        return
    assert parse_recipient(recipient.wire).key == recipient.key
    assert parse_recipient(recipient.wire, national_first=not national_first).key == recipient.key
