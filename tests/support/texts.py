"""Which texts the protocol accepts, for tests that filter or sort generated texts."""

from __future__ import annotations

from worker.errors import InvalidRequest
from worker.protocol.fields import check_text


def sendable(text: str) -> bool:
    try:
        check_text(text)
    except InvalidRequest:
        return False
    return True
