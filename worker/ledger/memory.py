"""The state store in this process's memory: for `make run`, unit tests and a single
replica that may forget everything on restart. Not shared; lost on exit."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from copy import copy
from dataclasses import dataclass, replace

from worker.ledger import (
    CircuitView,
    Finish,
    Gate,
    GateKind,
    Intake,
    MailRecord,
    SplitNotes,
    Verdict,
    VerdictKind,
    high_rate_share,
    pace_depth,
)
from worker.limits import CircuitRule, ContentWindow, Pace, SubscriberStreaks
from worker.settings import LimitSettings, RetrySettings


@dataclass(slots=True)
class _Entry:
    state: str
    fingerprint: str
    at: float
    mail_id: str | None = None
    event: str | None = None


@dataclass(slots=True)
class _Split:
    failed: int = 0
    succeeded: int = 0
    mails: int = 0
    until: float = 0.0


class MemoryStateStore:
    def __init__(
        self,
        limits: LimitSettings,
        retry: RetrySettings,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.owner = uuid.uuid4().hex
        self._ttl = limits.dedup_ttl_s
        self._clock = clock
        self._identical = ContentWindow(limits.identical_per_window, limits.identical_window_s)
        self._streaks = SubscriberStreaks(limits.subscriber_streak, limits.subscriber_gap_s)
        self._mails_pace = Pace(limits.mails_per_second)
        self._parts_pace = Pace(limits.parts_per_second)
        self._limits = limits
        self._high_mails_pace = Pace(limits.mails_per_second * high_rate_share(limits))
        self._high_parts_pace = Pace(limits.parts_per_second * high_rate_share(limits))
        self._circuit = CircuitRule(retry.circuit_base_s, retry.circuit_max_s)
        self._stopped: str | None = None
        self._admitted = 0
        self._ledger: dict[str, _Entry] = {}
        self._mails: dict[str, MailRecord] = {}
        self._taken: set[str] = set()
        self._replied: dict[str, float] = {}
        self._splits: dict[str, _Split] = {}

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def heartbeat(self) -> None:
        self._expire()

    def _expire(self) -> None:
        horizon = self._clock() - self._ttl
        # Insertion order is nearly time order: stop at the first entry still young.
        while self._ledger:
            oldest = next(iter(self._ledger))
            if self._ledger[oldest].at > horizon:
                break
            del self._ledger[oldest]
        while self._replied:
            oldest = next(iter(self._replied))
            if self._replied[oldest] > horizon:
                break
            del self._replied[oldest]

    def _set(self, request_id: str, entry: _Entry) -> None:
        # Re-inserted so that insertion order stays time order for `_expire`.
        self._ledger.pop(request_id, None)
        self._ledger[request_id] = entry

    async def intake(self, items: Sequence[Intake]) -> list[Verdict]:
        now = self._clock()
        return [self._judge(item, now) for item in items]

    def _judge(self, item: Intake, now: float) -> Verdict:
        entry = self._ledger.get(item.request_id)
        if entry is not None and entry.state != "released":
            if entry.fingerprint != item.fingerprint:
                return Verdict(VerdictKind.duplicate)
            if entry.state in ("sent", "answered"):
                return Verdict(VerdictKind.replay, mail_id=entry.mail_id, event=entry.event)
            if entry.state == "sending":
                # One process only: a request `sending` that it no longer holds was being
                # submitted when its settling failed.
                return Verdict(VerdictKind.unknown, mail_id=entry.mail_id)
        wait = self._identical.wait(item.content_key, now)
        if wait > 0:
            return Verdict(VerdictKind.wait, wait, "identical_content")
        streak_wait = max((self._streaks.wait(s, now) for s in item.subscribers), default=0.0)
        if streak_wait > 0:
            return Verdict(VerdictKind.wait, streak_wait, "subscriber_flood")
        self._identical.record(item.content_key, now)
        for subscriber in item.subscribers:
            self._streaks.record(subscriber, now)
        self._admitted += 1
        if self._admitted % 10_000 == 0:
            self._identical.prune(now)
            self._streaks.prune(now)
            self._expire()
        self._set(item.request_id, _Entry("claimed", item.fingerprint, now))
        return Verdict(VerdictKind.new)

    async def begin_sending(self, record: MailRecord) -> Gate:
        now = self._clock()
        if self._stopped is not None:
            return Gate(GateKind.stopped, reason=self._stopped)
        # The rules are tried on copies, kept only if the e-mail goes: a probe or a pace
        # that an e-mail did not use is not spent.
        circuit = copy(self._circuit)
        wait, probe = circuit.gate(now)
        if wait > 0:
            return Gate(GateKind.wait, wait, "circuit_open")
        lost = tuple(
            r.request_id
            for r in record.requests
            if (e := self._ledger.get(r.request_id)) is None or e.state != "claimed"
        )
        if lost:
            return Gate(GateKind.lost, lost=lost)
        depth = pace_depth(self._limits, record.urgent)
        mails_pace, parts_pace = copy(self._mails_pace), copy(self._parts_pace)
        high_mails, high_parts = copy(self._high_mails_pace), copy(self._high_parts_pace)
        waits = [
            mails_pace.take(1, now, depth),
            parts_pace.take(record.sms_parts, now, depth),
        ]
        if record.urgent:
            waits += [high_mails.take(1, now), high_parts.take(record.sms_parts, now)]
        wait = max(waits)
        if wait > 0:
            return Gate(GateKind.wait, wait, "pace")
        self._circuit, self._mails_pace, self._parts_pace = circuit, mails_pace, parts_pace
        self._high_mails_pace, self._high_parts_pace = high_mails, high_parts
        for carried in record.requests:
            entry = self._ledger[carried.request_id]
            self._set(carried.request_id, replace(entry, state="sending", mail_id=record.mail_id))
        self._mails[record.mail_id] = record
        return Gate(GateKind.go, probe=probe)

    async def finish(self, finish: Finish) -> None:
        now = self._clock()
        for request_id, (mail_id, event, fp) in finish.sent.items():
            entry = self._ledger.get(request_id)
            if entry is None or entry.state != "answered":
                self._set(request_id, _Entry("sent", fp, now, mail_id, event))
        for request_id, (event, fp) in finish.answered.items():
            entry = self._ledger.get(request_id)
            kept_mail = entry.mail_id if entry is not None else None
            self._set(request_id, _Entry("answered", fp, now, kept_mail, event))
        for request_id in finish.released:
            entry = self._ledger.get(request_id)
            if entry is not None:
                self._set(request_id, replace(entry, state="released", mail_id=None, at=now))
        for refund in finish.refunds:
            self._identical.forget_latest(refund.content_key)
            for subscriber in refund.subscribers:
                self._streaks.forget_latest(subscriber)
        for mail_id in (*finish.mails_done, *finish.replied):
            self._mails.pop(mail_id, None)
            self._taken.discard(mail_id)
        for mail_id in finish.replied:
            self._replied[mail_id] = now

    async def take_mail(self, mail_id: str) -> MailRecord | None:
        record = self._mails.get(mail_id)
        if record is not None:
            self._taken.add(mail_id)
        return record

    async def knows_mail(self, mail_id: str) -> bool:
        return mail_id in self._mails

    async def give_back_mail(self, mail_id: str) -> None:
        self._taken.discard(mail_id)

    async def mail_replied(self, mail_id: str) -> bool:
        self._expire()
        return mail_id in self._replied

    async def mark_unknown(self, mail_id: str) -> MailRecord | None:
        record = self._mails.get(mail_id)
        if record is None:
            return None
        record = replace(record, outcome_unknown=True)
        self._mails[mail_id] = record
        return record

    async def unanswered(self, older_than: float) -> list[str]:
        return [
            r.mail_id
            for r in self._mails.values()
            if r.submitted_at < older_than and r.mail_id not in self._taken
        ]

    async def note_split(
        self, root: str, *, failed: bool, allowance: int, ttl: float
    ) -> SplitNotes:
        now = self._clock()
        for stale in [r for r, s in self._splits.items() if s.until <= now]:
            del self._splits[stale]
        split = self._splits.setdefault(root, _Split())
        split.until = now + ttl
        if not failed:
            split.succeeded += 1
            return SplitNotes(split.failed, split.succeeded, False)
        split.failed += 1
        granted = split.succeeded > 0 or split.mails + 2 <= allowance
        split.mails += 2 if granted else 0
        return SplitNotes(split.failed, split.succeeded, granted)

    async def open_circuit(self, reason: str, pause: float | None) -> float:
        return self._circuit.open(reason, pause, self._clock())

    async def close_circuit(self) -> None:
        self._circuit.close()

    async def circuit(self) -> CircuitView:
        return CircuitView(self._circuit.view(self._clock()))

    async def stop_account(self, reason: str) -> None:
        self._stopped = reason

    async def account_stopped(self) -> str | None:
        return self._stopped
