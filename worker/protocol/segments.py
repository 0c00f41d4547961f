"""How many SMS parts a text costs: GSM 03.38 7-bit or UCS-2, single or concatenated."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import gsm0338  # noqa: F401  # registers the "gsm03.38" codec

GSM7_SINGLE, GSM7_PART = 160, 153
UCS2_SINGLE, UCS2_PART = 70, 67


class Encoding(StrEnum):
    gsm7 = "gsm7"
    ucs2 = "ucs2"


@dataclass(frozen=True, slots=True)
class SegmentCount:
    encoding: Encoding
    units: int
    parts: int


def count_segments(text: str) -> SegmentCount:
    """Parts for one recipient. GSM extension characters (such as `€`, `[`) take two septets;
    outside GSM 03.38 the text goes as UCS-2, where characters beyond the BMP take two units."""
    try:
        units = len(text.encode("gsm03.38"))
        encoding, single, per_part = Encoding.gsm7, GSM7_SINGLE, GSM7_PART
    except UnicodeEncodeError:
        units = len(text.encode("utf-16-le")) // 2
        encoding, single, per_part = Encoding.ucs2, UCS2_SINGLE, UCS2_PART
    parts = 1 if units <= single else math.ceil(units / per_part)
    return SegmentCount(encoding, units, parts)
