"""How many SMS parts a message costs the gateway, by its format.

`count_segments` counts a text as the phone receives it: GSM 03.38 7-bit or UCS-2, single
or concatenated. `sms_parts` says what one recipient costs in each gateway format: the
text as the gateway sends it (transliterated, when asked), the bytes of a hex message, or
None where the message is not an SMS or the seed does not say how the gateway counts it.
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum

import gsm0338  # noqa: F401  # registers the "gsm03.38" codec
import iuliia

from worker.protocol.fields import Format, Translit

GSM7_SINGLE, GSM7_PART = 160, 153
UCS2_SINGLE, UCS2_PART = 70, 67
# A binary SMS carries 140 bytes of user data; a part of a split one gives 6 of them to the
# concatenation header (GSM 03.40). The seed gives no figures for binary messages.
BINARY_SINGLE, BINARY_PART = 140, 134

# The seed names the translit mode only by an example ("translit"), not its table; this
# is the Russian Wikipedia scheme (щ -> shch, х -> kh, ц -> ts, ю -> yu; ъ, ь left out),
# longer than the short forms (щ -> sch, х -> h), so a count errs towards more parts.
_TRANSLIT = iuliia.WIKIPEDIA

# The look-alike mode: the seed's one example is "транслит" -> "mpaHc/Ium", so a letter
# with no single Latin twin takes more than one character (л -> /I). Only the length of
# each entry and whether it stays within GSM 03.38 matter to a count; the gateway's exact
# glyphs beyond its example are not documented.
_MPAHC_LOWER = {
    "а": "a", "б": "6", "в": "B", "г": "r", "д": "g", "е": "e", "ё": "e", "ж": ">|<",
    "з": "3", "и": "u", "й": "u", "к": "k", "л": "/I", "м": "M", "н": "H", "о": "o",
    "п": "n", "р": "p", "с": "c", "т": "m", "у": "y", "ф": "qp", "х": "x", "ц": "LL",
    "ч": "4", "ш": "LLI", "щ": "LLL", "ъ": "'b", "ы": "bI", "ь": "b", "э": "3", "ю": "I-O",
    "я": "9I",
}  # fmt: skip
_MPAHC = str.maketrans(_MPAHC_LOWER | {k.upper(): v for k, v in _MPAHC_LOWER.items()})

_HEX_DIGITS = frozenset(string.hexdigits)


class Encoding(StrEnum):
    gsm7 = "gsm7"
    ucs2 = "ucs2"


@dataclass(frozen=True, slots=True)
class SegmentCount:
    encoding: Encoding
    units: int
    parts: int


def _one_septet_characters() -> frozenset[str]:
    """The characters of the GSM 03.38 basic table, as the codec itself reads them."""
    decoded = (bytes([septet]).decode("gsm03.38") for septet in range(128) if septet != 0x1B)
    return frozenset(c for c in decoded if len(c.encode("gsm03.38")) == 1)


# The codec encodes a character at a time in Python; most texts are plain basic-table
# text, which a set check (in C) counts as one septet a character.
_ONE_SEPTET = _one_septet_characters()


def count_segments(text: str) -> SegmentCount:
    """Parts for one recipient. GSM extension characters (such as `€`, `[`) take two septets;
    outside GSM 03.38 the text goes as UCS-2, where characters beyond the BMP take two units."""
    try:
        units = len(text) if _ONE_SEPTET.issuperset(text) else len(text.encode("gsm03.38"))
        encoding, single, per_part = Encoding.gsm7, GSM7_SINGLE, GSM7_PART
    except UnicodeEncodeError:
        units = len(text.encode("utf-16-le")) // 2
        encoding, single, per_part = Encoding.ucs2, UCS2_SINGLE, UCS2_PART
    parts = 1 if units <= single else math.ceil(units / per_part)
    return SegmentCount(encoding, units, parts)


def transliterate(text: str, translit: Translit) -> str:
    """The text as the gateway sends it with `translit` on: Cyrillic written in Latin
    letters, everything else as it was."""
    if translit == Translit.translit:
        return str(_TRANSLIT.translate(text))
    if translit == Translit.mpahc:
        return text.translate(_MPAHC)
    return text


def _text(text: str, translit: Translit) -> int:
    return count_segments(transliterate(text, translit)).parts


def _hex(text: str, translit: Translit) -> int | None:
    """Two hex digits a byte; translit does not touch bytes. A text that is not whole bytes
    of hex has no documented reading: unknown."""
    if len(text) % 2 or not _HEX_DIGITS.issuperset(text):
        return None
    size = len(text) // 2
    return 1 if size <= BINARY_SINGLE else math.ceil(size / BINARY_PART)


def _one(text: str, translit: Translit) -> int:
    return 1


def _unknown(text: str, translit: Translit) -> None:
    return None


# Every format has an entry, so a new one must say how it counts (a test checks). None:
# not an SMS, or the seed does not say what the gateway counts for it.
_PARTS_BY_FORMAT: Mapping[Format, Callable[[str, Translit], int | None]] = {
    Format.sms: _text,
    Format.flash: _text,  # an SMS shown at once: the seed's part sizes apply
    Format.wap_push: _unknown,  # a link and a name in a binary push: no size given
    Format.hlr: _unknown,  # "without sending SMS"; its charge is not in SMS parts
    Format.binary: _unknown,  # raw bytes: no text the worker could count
    Format.binary_hex: _hex,
    Format.ping: _one,  # "a special invisible SMS": one, whatever the text
    Format.mms: _unknown,
    Format.email: _unknown,  # an e-mail, not SMS
    Format.voice: _unknown,  # a call
    Format.viber: _unknown,
    Format.whatsapp: _unknown,
    Format.soc: _unknown,
}


def sms_parts(text: str, fmt: Format, translit: Translit = Translit.off) -> int | None:
    """SMS parts one recipient of `text` costs in format `fmt`, or None when unknown."""
    return _PARTS_BY_FORMAT[fmt](text, translit)
