"""The batcher on its own: what closes a batch, and that no closed batch is ever dropped."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from worker.batcher import Batcher, LineRefused
from worker.prepare import BatchKey
from worker.protocol.mail import Account, Envelope, ListLine, MailBuilder, MailOptions

LIMIT = 2048
KEY = BatchKey(MailOptions(), "koi8-r")


def builder(key: BatchKey) -> MailBuilder:
    return MailBuilder(
        Envelope(mail_from="replies@worker.test"),
        Account("", SecretStr("demo")),
        "m1",
        key.options,
        charset=key.charset,
        date="Mon, 30 Nov 2026 12:00:00 GMT",
        message_id="<m1@smsc-worker>",
        limit=LIMIT,
    )


def line(n: int, text: str = "hello") -> ListLine:
    return ListLine((f"7916{n:07d}",), text)


def test_a_batch_closes_at_its_line_limit_or_when_the_next_line_does_not_fit() -> None:
    batcher: Batcher[int] = Batcher(builder, max_lines=3, max_wait=1.0)
    assert batcher.add(KEY, line(1), 1, 0.0) == []
    assert batcher.add(KEY, line(2), 2, 0.0) == []
    [full] = batcher.add(KEY, line(3), 3, 0.0)
    assert full.items == [1, 2, 3] and len(batcher) == 0

    long_text = "x" * 600
    closed: list[int] = []
    for n in range(10):
        for batch in batcher.add(KEY, line(n, long_text), n, 0.0):
            closed += batch.items
    assert closed and closed == list(range(len(closed))), "closed in order, none lost"
    assert [b.items for b in batcher.drain()] == [list(range(len(closed), 10))]


def test_a_line_too_large_for_any_email_hands_back_the_batch_it_closed() -> None:
    batcher: Batcher[str] = Batcher(builder, max_lines=500, max_wait=1.0)
    batcher.add(KEY, line(1), "waiting", 0.0)
    many = ListLine(tuple(f"7916{n:07d}" for n in range(300)), "to all of them")
    with pytest.raises(LineRefused) as refused:
        batcher.add(KEY, many, "too large", 0.0)
    # The open batch was closed to make room; it must come back to be sent, not vanish.
    assert [b.items for b in refused.value.closed] == [["waiting"]]
    assert refused.value.code == "mail_too_large"
    assert len(batcher) == 0 and batcher.drain() == []
