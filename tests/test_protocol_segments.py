"""SMS part counting: GSM 03.38 7-bit (extension characters take two septets) or UCS-2
(characters beyond the BMP take two units); 160 / 70 in one part, 153 / 67 per part."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.protocol.segments import Encoding, count_segments

FAST = settings(max_examples=200, deadline=None)

GSM_BASIC = (
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡"
    "ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM_EXTENSION = "\x0c^{}\\[~]|€"


@pytest.mark.parametrize(
    ("text", "encoding", "units", "parts"),
    [
        ("", Encoding.gsm7, 0, 1),
        ("a" * 160, Encoding.gsm7, 160, 1),
        ("a" * 161, Encoding.gsm7, 161, 2),
        ("a" * 306, Encoding.gsm7, 306, 2),
        ("a" * 307, Encoding.gsm7, 307, 3),
        ("€" * 80, Encoding.gsm7, 160, 1),
        ("€" * 80 + "a", Encoding.gsm7, 161, 2),
        ("a" * 159 + "[", Encoding.gsm7, 161, 2),
        ("я" * 70, Encoding.ucs2, 70, 1),
        ("я" * 71, Encoding.ucs2, 71, 2),
        ("я" * 134, Encoding.ucs2, 134, 2),
        ("я" * 135, Encoding.ucs2, 135, 3),
        ("😀" * 35, Encoding.ucs2, 70, 1),
        ("😀" * 36, Encoding.ucs2, 72, 2),
        ("a" * 159 + "я", Encoding.ucs2, 160, 3),
        ("ç", Encoding.ucs2, 1, 1),  # not in GSM 03.38 (only Ç is)
        ("a" * 1000, Encoding.gsm7, 1000, 7),
        ("я" * 1000, Encoding.ucs2, 1000, 15),
    ],
)
def test_part_boundaries(text: str, encoding: Encoding, units: int, parts: int) -> None:
    count = count_segments(text)
    assert (count.encoding, count.units, count.parts) == (encoding, units, parts)


@pytest.mark.parametrize("char", list(GSM_EXTENSION))
def test_each_extension_character_counts_twice(char: str) -> None:
    assert count_segments(char).units == 2
    assert count_segments(char * 80).parts == 1
    assert count_segments(char * 81).parts == 2


def expected_parts(units: int, single: int, per_part: int) -> int:
    return 1 if units <= single else math.ceil(units / per_part)


@FAST
@given(st.text(alphabet=st.sampled_from(list(GSM_BASIC + GSM_EXTENSION)), max_size=700))
def test_gsm_texts(text: str) -> None:
    units = len(text) + sum(1 for c in text if c in GSM_EXTENSION)
    count = count_segments(text)
    assert count.encoding is Encoding.gsm7
    assert count.units == units
    assert count.parts == expected_parts(units, 160, 153)


@FAST
@given(st.text(min_size=1, max_size=400), st.sampled_from(["я", "ç", "😀", "中", "🎉"]))
def test_any_character_outside_gsm_makes_the_text_ucs2(text: str, foreign: str) -> None:
    text = text + foreign
    units = sum(2 if ord(c) > 0xFFFF else 1 for c in text)
    count = count_segments(text)
    assert count.encoding is Encoding.ucs2
    assert count.units == units
    assert count.parts == expected_parts(units, 70, 67)
