"""The one place where fates are applied: the ledger step, one confirmed publish of every
event, dead letter and retry copy of the set, then the acks.

Order matters. The ledger goes first: once it says `sent`, a redelivery of the request is
answered from the ledger, never sent again; when it says `released`, a redelivery may be
sent. Publishing comes before acking: a delivery whose events (or copies) were not confirmed
goes back to the queue and is judged again, from the ledger. A ledger step that fails for a
set with deliveries is kept and applied again once the store answers (the states it leaves
behind, `claimed` and `sending`, never lead to a second send); a set without deliveries (a
reply) has nothing to fall back on, so the caller hears of it.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiormq.abc

from worker.broker import Broker, Outgoing
from worker.contract import ErrorInfo, ResultEvent, Status
from worker.delivery import Delivery, HeaderSigner, Provenance, RequestCopy, fingerprint
from worker.fate import (
    Accepted,
    Fail,
    Fate,
    Later,
    Reject,
    Replay,
    Requeue,
    Subject,
    Submitted,
    Unknown,
)
from worker.lanes import Lane
from worker.ledger import Finish, Refund, StateStore, StateUnavailable
from worker.protocol.recipients import sms_count
from worker.settings import DEFAULT_ACCOUNT
from worker.telemetry import Telemetry, event_headers

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Book:
    channel: aiormq.abc.AbstractChannel
    outstanding: deque[int] = field(default_factory=deque)
    settled: dict[int, bool] = field(default_factory=dict)


class Acker:
    """Acks with `multiple=True` whenever a run of settled deliveries starts at the oldest
    unsettled one, so a batch of a thousand requests costs a few frames, not a thousand.

    Tags belong to one channel. A delivery whose channel has closed (a reconnect) cannot be
    settled, and need not be: the broker has requeued it already. It is dropped from the
    books and counted, never raised."""

    def __init__(self, telemetry: Telemetry) -> None:
        self._books: dict[int, _Book] = {}
        self._telemetry = telemetry

    def received(self, delivery: Delivery) -> None:
        key = id(delivery.channel)
        book = self._books.get(key)
        if book is None:
            book = self._books[key] = _Book(delivery.channel)
        book.outstanding.append(delivery.tag)

    @property
    def unacked(self) -> int:
        return sum(len(b.outstanding) for b in self._books.values())

    async def settle(self, acks: Iterable[Delivery], requeues: Iterable[Delivery]) -> None:
        touched: dict[int, _Book] = {}
        for delivery in requeues:
            book = self._book_of(delivery)
            if book is None:
                continue
            book.settled[delivery.tag] = False
            touched[id(book.channel)] = book
            try:
                await book.channel.basic_nack(delivery.tag, multiple=False, requeue=True)
            except Exception as exc:
                self._give_up(book, exc)
        for delivery in acks:
            book = self._book_of(delivery)
            if book is not None:
                book.settled[delivery.tag] = True
                touched[id(book.channel)] = book
        for book in touched.values():
            await self._flush(book)

    def _book_of(self, delivery: Delivery) -> _Book | None:
        book = self._books.get(id(delivery.channel))
        if book is None or book.channel is not delivery.channel:
            self._telemetry.metrics.settle_skipped.inc()
            return None
        if book.channel.is_closed:
            self._give_up(book, None)
            self._telemetry.metrics.settle_skipped.inc()
            return None
        return book

    def _give_up(self, book: _Book, exc: BaseException | None) -> None:
        if self._books.get(id(book.channel)) is book:
            del self._books[id(book.channel)]
            log.warning(
                "channel closed%s: %d deliveries left to the broker to redeliver",
                f" ({exc})" if exc else "",
                len(book.outstanding),
            )

    async def _flush(self, book: _Book) -> None:
        last_ack: int | None = None
        while book.outstanding and book.outstanding[0] in book.settled:
            tag = book.outstanding.popleft()
            if book.settled.pop(tag):
                last_ack = tag
        if last_ack is None or self._books.get(id(book.channel)) is not book:
            return
        try:
            await book.channel.basic_ack(last_ack, multiple=True)
        except Exception as exc:
            self._give_up(book, exc)


def error_info(code: str, message: str, retryable: bool, gateway: int | None = None) -> ErrorInfo:
    return ErrorInfo(code=code, message=message, retryable=retryable, gateway_error=gateway)


@dataclass(slots=True)
class _Steps:
    """The ledger side of a set, for one account (each account has a store of its own)."""

    finish_sent: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    finish_answered: dict[str, tuple[str, str]] = field(default_factory=dict)
    released: list[str] = field(default_factory=list)
    refunds: list[Refund] = field(default_factory=list)
    unknown_mails: set[str] = field(default_factory=set)


@dataclass(slots=True)
class _Plan:
    steps: dict[str, _Steps] = field(default_factory=dict)
    events: list[Outgoing] = field(default_factory=list)
    dead: list[tuple[RequestCopy, str, str]] = field(default_factory=list)
    delays: list[tuple[RequestCopy, float, dict[str, Any], Lane, str]] = field(default_factory=list)
    acks: list[Delivery] = field(default_factory=list)
    requeues: list[Delivery] = field(default_factory=list)
    submitted: list[Subject] = field(default_factory=list)

    def of(self, account: str) -> _Steps:
        found = self.steps.get(account)
        if found is None:
            found = self.steps[account] = _Steps()
        return found


class Settler:
    def __init__(
        self,
        broker: Broker,
        stores: Mapping[str, StateStore],
        acker: Acker,
        telemetry: Telemetry,
        signer: HeaderSigner,
        delivery_limit: int,
    ) -> None:
        self._delivery_limit = delivery_limit
        self._broker = broker
        self._stores = stores
        self._acker = acker
        self._telemetry = telemetry
        self._signer = signer
        # Ledger steps that could not be written, by account; applied again when the store
        # answers.
        self.backlog: list[tuple[str, Finish]] = []

    async def settle(
        self,
        items: Sequence[tuple[Subject, Fate]],
        *,
        mails_done: Sequence[str] = (),
        account: str = DEFAULT_ACCOUNT,
        replied: bool = False,
    ) -> None:
        """Apply a set of fates. Never raises for a set with deliveries (what cannot be
        recorded goes back to the queue); raises for one without, so that its source (a
        reply) is asked again. `mails_done`: e-mails of `account` whose records go with the
        set; `replied`: they go because their reply was applied (the ledger marks them so).
        The ledger steps are written per account, to its own store."""
        plan = _Plan()
        now = time.time()
        for subject, fate in items:
            self._plan(plan, subject, fate, now)
        with_deliveries = bool(plan.acks or plan.requeues)
        if mails_done:
            plan.of(account)
        for name, steps in plan.steps.items():
            # Without deliveries (a reply) the e-mail's record is dropped only once the
            # events are out: a reply whose events were not confirmed is asked again, and
            # must find it.
            finish = Finish(
                sent=steps.finish_sent,
                answered=steps.finish_answered,
                released=steps.released,
                refunds=steps.refunds,
                mails_done=mails_done if with_deliveries and name == account else (),
            )
            if not (_has_steps(finish) or steps.unknown_mails):
                continue
            store = self._stores[name]
            try:
                for mail_id in steps.unknown_mails:
                    await store.mark_unknown(mail_id)
                if _has_steps(finish):
                    await store.finish(finish)
            except StateUnavailable as exc:
                self._telemetry.metrics.state_unavailable.labels("finish").inc()
                if not with_deliveries:
                    raise
                log.warning("ledger step not written (%s); kept to apply again", exc)
                self.backlog.append((name, finish))
        try:
            await self._broker.publish(plan.events, plan.dead, plan.delays)
        except Exception:
            if not with_deliveries:
                raise
            log.exception(
                "%d events and copies not confirmed; returning %d requests to the queue",
                len(plan.events) + len(plan.dead) + len(plan.delays),
                len(plan.acks) + len(plan.requeues),
            )
            await self._acker.settle((), [*plan.acks, *plan.requeues])
            return
        if not with_deliveries and mails_done:
            await self._stores[account].finish(
                Finish(replied=mails_done) if replied else Finish(mails_done=mails_done)
            )
        if plan.submitted:
            self._telemetry.submitted((s.copy.headers, s.lane) for s in plan.submitted)
        await self._acker.settle(plan.acks, plan.requeues)

    async def apply_backlog(self) -> None:
        """Write the ledger steps that failed, oldest first; raise StateUnavailable if the
        store still does not answer."""
        while self.backlog:
            account, finish = self.backlog[0]
            await self._stores[account].finish(finish)
            self.backlog.pop(0)

    def _plan(self, plan: _Plan, subject: Subject, fate: Fate, now: float) -> None:
        delivery = subject.delivery
        if isinstance(fate, Requeue) and delivery is not None:
            fate = self._last_chance(delivery, fate)
        steps = plan.of(subject.account)
        if isinstance(fate, Requeue):
            if subject.claimed and subject.request_id is not None:
                steps.released.append(subject.request_id)
            if delivery is not None:
                plan.requeues.append(delivery)
            return
        if delivery is not None:
            plan.acks.append(delivery)
        rid = subject.request_id
        if isinstance(fate, Replay):
            replayed, raw = ResultEvent.from_stored(fate.event)
            plan.events.append(_outgoing(replayed, subject.copy, raw))
            return
        event = self._event(subject, fate, now)
        body = event.model_dump_json() if event is not None else ""
        if event is not None:
            plan.events.append(_outgoing(event, subject.copy, body.encode()))
        if _dead_lettered(fate):
            assert isinstance(fate, Reject | Fail | Unknown)
            plan.dead.append((subject.copy, fate.code, fate.reason))
        if isinstance(fate, Later):
            attempt = subject.attempt + 1 if fate.next_attempt else subject.attempt
            provenance = Provenance(
                attempt, subject.first_seen or now, fate.group or subject.group, fate.in_doubt
            )
            headers = self._signer.headers(subject.copy.body, provenance)
            plan.delays.append((subject.copy, fate.wait, headers, subject.lane, subject.account))
        if isinstance(fate, Unknown) and fate.mail_id is not None and not fate.final:
            steps.unknown_mails.add(fate.mail_id)
        if isinstance(fate, Submitted) and fate.unknown:
            steps.unknown_mails.add(fate.mail_id)
        if not subject.claimed or rid is None:
            return
        if isinstance(fate, Submitted):
            assert event is not None
            steps.finish_sent[rid] = (fate.mail_id, body, fingerprint(subject.copy.body))
            plan.submitted.append(subject)
        elif (
            isinstance(fate, Accepted)
            or (isinstance(fate, Fail) and fate.mail_id)
            or (isinstance(fate, Unknown) and fate.final)
        ):
            assert event is not None
            steps.finish_answered[rid] = (body, fingerprint(subject.copy.body))
        elif isinstance(fate, Reject | Later | Fail):
            steps.released.append(rid)
        if isinstance(fate, Later | Fail) and fate.refund and subject.content_key:
            steps.refunds.append(Refund(subject.content_key, subject.subscribers))

    def _last_chance(self, delivery: Delivery, fate: Requeue) -> Fate:
        """The broker dead-letters a delivery returned once more than its limit, and no
        event would say so: on its last delivery, end it here instead."""
        if delivery.returned < self._delivery_limit:
            return fate
        reason = f"returned to the queue {delivery.returned} times, last: {fate.reason}"
        if fate.may_have_gone:
            return Unknown("delivery_limit", f"{reason}; it may have been sent")
        return Fail("delivery_limit", reason)

    @staticmethod
    def _event(subject: Subject, fate: Fate, now: float) -> ResultEvent | None:
        recipients = list(subject.recipients)
        metadata = dict(subject.metadata)
        rid = subject.request_id
        if isinstance(fate, Reject):
            # An unreadable request is told apart by its delivery (message id or body).
            source = fate.code
            if rid is None and subject.delivery is not None:
                source = f"{fate.code}|{subject.delivery.source()}"
            return ResultEvent.create(
                rid,
                Status.rejected,
                source=source,
                error=error_info(fate.code, fate.reason, False),
                recipients=recipients,
                metadata=metadata,
                account=subject.account,
            )
        if isinstance(fate, Later):
            if fate.status is None:
                return None
            # Each deferral is news of its own; a retry is one per attempt.
            source = f"{fate.code}|{uuid.uuid4().hex}" if fate.status == Status.deferred else ""
            return ResultEvent.create(
                rid,
                fate.status,
                attempt=subject.attempt,
                source=source,
                gateway_id=fate.mail_id,
                error=error_info(fate.code, fate.reason, True, fate.gateway_error),
                retry_at=datetime.fromtimestamp(now + fate.wait, UTC),
                recipients=recipients,
                metadata=metadata,
                account=subject.account,
            )
        if isinstance(fate, Fail):
            return ResultEvent.create(
                rid,
                Status.failed,
                attempt=subject.attempt,
                source=fate.code,
                gateway_id=fate.mail_id,
                error=error_info(fate.code, fate.reason, False, fate.gateway_error),
                recipients=recipients,
                metadata=metadata,
                account=subject.account,
            )
        if isinstance(fate, Submitted | Accepted):
            status, error = Status.accepted, None
            if isinstance(fate, Submitted):
                status = Status.unknown if fate.unknown else Status.submitted
                if fate.unknown:
                    error = error_info(
                        "outcome_unknown",
                        f"connection lost after the data was sent ({fate.detail}); "
                        "waiting for the gateway's reply, not resending",
                        False,
                    )
            return ResultEvent.create(
                rid,
                status,
                attempt=subject.attempt,
                gateway_id=fate.mail_id,
                sms_parts=subject.sms_parts,
                sms_count=sms_count(subject.sms_parts, subject.recipients),
                error=error,
                recipients=recipients,
                metadata=metadata,
                account=subject.account,
            )
        if isinstance(fate, Unknown):
            return ResultEvent.create(
                rid,
                Status.unknown,
                attempt=subject.attempt,
                source=fate.code,
                gateway_id=fate.mail_id,
                error=error_info(fate.code, fate.reason, False),
                recipients=recipients,
                metadata=metadata,
                account=subject.account,
            )
        return None


def _dead_lettered(fate: Fate) -> bool:
    if isinstance(fate, Reject):
        return fate.dead_letter
    return isinstance(fate, Fail) or (isinstance(fate, Unknown) and fate.code == "delivery_limit")


def _has_steps(finish: Finish) -> bool:
    return bool(
        finish.sent
        or finish.answered
        or finish.released
        or finish.refunds
        or finish.mails_done
        or finish.replied
    )


def _outgoing(event: ResultEvent, copy: RequestCopy, body: bytes | None = None) -> Outgoing:
    return Outgoing(event, copy.reply_to, copy.correlation_id, event_headers(copy.headers), body)
