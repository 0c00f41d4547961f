"""State the worker keeps between a request's arrival and the gateway's reply.

One small interface, `StateStore`, so that a shared implementation (surviving restarts,
serving several replicas) can replace the in-memory one without touching the pipeline.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from worker.broker import RequestCopy
from worker.contract import MetadataValue
from worker.limits import Admission, ContentWindow, SubscriberStreaks
from worker.settings import LimitSettings


class Claim(StrEnum):
    new = "new"
    duplicate = "duplicate"


@dataclass(frozen=True, slots=True)
class CarriedRequest:
    """What a reply needs to know about one request of a submitted e-mail."""

    request_id: str
    recipients: tuple[str, ...]
    sms_parts: int
    attempt: int
    metadata: dict[str, MetadataValue]
    copy: RequestCopy
    content_key: str = ""


@dataclass(frozen=True, slots=True)
class MailRecord:
    mail_id: str
    requests: tuple[CarriedRequest, ...]
    submitted_at: float
    # The submission span's context as W3C trace headers, for the reply's span to link to;
    # plain strings, so that a shared store can keep them as well.
    trace: Mapping[str, str] = field(default_factory=dict)
    # The SMTP session broke after the data went out: only a reply can tell what happened.
    outcome_unknown: bool = False


class StateStore(Protocol):
    async def claim(self, request_id: str) -> Claim:
        """Mark a request as being sent, unless it was sent (or is being sent) already."""

    async def release(self, request_id: str) -> None:
        """The request was not sent after all: a later copy may be sent."""

    async def mark_sent(self, request_id: str) -> None:
        """The request's e-mail went out: copies within the dedup window are duplicates."""

    async def admit(self, content_key: str, subscribers: tuple[str, ...]) -> Admission:
        """Whether a request may be sent now within the gateway's identical-request and
        per-subscriber rules; if so, it is counted as sent."""

    async def refund(self, content_key: str) -> None:
        """An admitted request's e-mail was refused as a whole: it was no copy after all."""

    async def remember_mail(self, record: MailRecord) -> None: ...

    async def take_mail(self, mail_id: str) -> MailRecord | None:
        """The record of a submitted e-mail, once: a second reply for it finds nothing."""

    async def unanswered(self, older_than: float) -> list[MailRecord]:
        """Records of e-mails submitted before `older_than` that never got a reply."""


class MemoryStateStore:
    """Per-process state: lost on restart, not shared between replicas."""

    def __init__(self, limits: LimitSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = limits.dedup_ttl_s
        self._clock = clock
        self._identical = ContentWindow(limits.identical_per_window, limits.identical_window_s)
        self._streaks = SubscriberStreaks(limits.subscriber_streak, limits.subscriber_gap_s)
        self._admitted = 0
        self._in_flight: set[str] = set()
        self._sent: dict[str, float] = {}
        self._mails: dict[str, MailRecord] = {}

    def _expire(self) -> None:
        horizon = self._clock() - self._ttl
        # Insertion order is time order, so expired entries are at the front.
        while self._sent:
            oldest = next(iter(self._sent))
            if self._sent[oldest] > horizon:
                break
            del self._sent[oldest]

    async def claim(self, request_id: str) -> Claim:
        self._expire()
        if request_id in self._sent or request_id in self._in_flight:
            return Claim.duplicate
        self._in_flight.add(request_id)
        return Claim.new

    async def release(self, request_id: str) -> None:
        self._in_flight.discard(request_id)
        self._sent.pop(request_id, None)

    async def mark_sent(self, request_id: str) -> None:
        self._in_flight.discard(request_id)
        self._sent.pop(request_id, None)
        self._sent[request_id] = self._clock()

    async def admit(self, content_key: str, subscribers: tuple[str, ...]) -> Admission:
        now = self._clock()
        wait = self._identical.wait(content_key, now)
        if wait > 0:
            return Admission(wait, "identical_content")
        streak_wait = max((self._streaks.wait(s, now) for s in subscribers), default=0.0)
        if streak_wait > 0:
            return Admission(streak_wait, "subscriber_flood")
        self._identical.record(content_key, now)
        for subscriber in subscribers:
            self._streaks.record(subscriber, now)
        self._admitted += 1
        if self._admitted % 10_000 == 0:
            self._identical.prune(now)
            self._streaks.prune(now)
        return Admission(0.0)

    async def refund(self, content_key: str) -> None:
        # Streaks are left as they are, which errs on the safe side.
        self._identical.forget_latest(content_key)

    async def remember_mail(self, record: MailRecord) -> None:
        self._mails[record.mail_id] = record

    async def take_mail(self, mail_id: str) -> MailRecord | None:
        return self._mails.pop(mail_id, None)

    async def unanswered(self, older_than: float) -> list[MailRecord]:
        return [r for r in self._mails.values() if r.submitted_at < older_than]
