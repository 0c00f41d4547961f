"""Grouping requests into list-mode e-mails. Pure bookkeeping: the caller owns the clock
and decides what to do with a batch once it is closed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from worker.errors import InvalidRequest
from worker.lanes import Lane
from worker.prepare import BatchKey
from worker.protocol.mail import ListLine, MailBuilder

T = TypeVar("T")


def _always(key: BatchKey) -> bool:
    return True


class LineRefused(InvalidRequest, Generic[T]):
    """A line too large for an e-mail of its own. `closed`: the batch that trying to fit it
    closed first, which is full and must still be sent."""

    def __init__(self, refused: InvalidRequest, closed: list[Batch[T]]) -> None:
        super().__init__(refused.message, code=refused.code)
        self.closed = closed


@dataclass(eq=False)
class Batch(Generic[T]):
    """One e-mail in the making and what it carries."""

    key: BatchKey
    builder: MailBuilder
    opened_at: float
    items: list[T] = field(default_factory=list)

    @property
    def mail_id(self) -> str:
        return self.builder.mail_id


class Batcher(Generic[T]):
    """Open batches by key. A batch closes when the next line would pass the byte limit,
    when it reaches `max_lines`, or when its oldest item has waited `max_wait` seconds
    (`high_max_wait` in the high-priority lane)."""

    def __init__(
        self,
        new_builder: Callable[[BatchKey], MailBuilder],
        *,
        max_lines: int,
        max_wait: float,
        high_max_wait: float | None = None,
    ) -> None:
        self._new_builder = new_builder
        self._max_lines = max_lines
        self._max_wait = max_wait
        self._high_max_wait = max_wait if high_max_wait is None else high_max_wait
        self._open: dict[BatchKey, Batch[T]] = {}

    def __len__(self) -> int:
        return sum(len(b.items) for b in self._open.values())

    def add(self, key: BatchKey, line: ListLine, item: T, now: float) -> list[Batch[T]]:
        """Put one item in its batch; return the batches this closed (zero, one or two).
        A line too large for an e-mail of its own raises LineRefused, with the batch it
        closed on the way: the caller rejects just that request and sends the batch."""
        closed: list[Batch[T]] = []
        batch = self._open.get(key)
        if batch is not None and not batch.builder.try_add(line):
            closed.append(self._open.pop(key))
            batch = None
        if batch is None:
            batch = Batch(key, self._new_builder(key), now)
            try:
                batch.builder.try_add(line)
            except InvalidRequest as exc:
                raise LineRefused(exc, closed) from exc
            self._open[key] = batch
        batch.items.append(item)
        if len(batch.items) >= self._max_lines:
            closed.append(self._open.pop(key))
        return closed

    def _deadline(self, batch: Batch[T]) -> float:
        wait = self._high_max_wait if batch.key.lane == Lane.high else self._max_wait
        return batch.opened_at + wait

    def due(self, now: float, may_go: Callable[[BatchKey], bool] = _always) -> list[Batch[T]]:
        """Close and return the batches whose oldest item has waited long enough, of those
        whose key `may_go`."""
        ready = [k for k, b in self._open.items() if may_go(k) and self._deadline(b) <= now]
        return [self._open.pop(k) for k in ready]

    def next_deadline(self, may_go: Callable[[BatchKey], bool] = _always) -> float | None:
        """When the next batch whose key `may_go` is due; None when there is none."""
        return min((self._deadline(b) for k, b in self._open.items() if may_go(k)), default=None)

    def drain(self) -> list[Batch[T]]:
        batches = list(self._open.values())
        self._open.clear()
        return batches
