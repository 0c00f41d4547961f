"""Recording what became of requests.

Every outcome is made durable elsewhere before the delivery that brought the request is
settled: a result event (confirmed), a copy in the dead-letter queue, or a copy on its way
back through a retry queue. Only then is the delivery acked; when recording fails, the
delivery goes back to the queue instead, so a request is never lost between the two.
"""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from worker.batcher import Batch
from worker.broker import (
    ATTEMPT_HEADER,
    FIRST_SEEN_HEADER,
    GROUP_HEADER,
    Acker,
    Broker,
    Outgoing,
    RequestCopy,
)
from worker.contract import ErrorInfo, ResultEvent, SendRequest, Status
from worker.prepare import PreparedRequest
from worker.settings import Settings
from worker.smtp_client import Outcome, SubmitResult
from worker.state import CarriedRequest, MailRecord, StateStore
from worker.telemetry import Telemetry, event_headers

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Pending:
    """A request waiting in a batch, with the delivery that brought it."""

    message: AbstractIncomingMessage
    prepared: PreparedRequest
    attempt: int
    first_seen: float
    received_at: float

    @property
    def request(self) -> SendRequest:
        return self.prepared.request

    def carried(self) -> CarriedRequest:
        return CarriedRequest(
            request_id=self.request.request_id,
            recipients=self.prepared.line.phones,
            sms_parts=self.prepared.sms_parts,
            attempt=self.attempt,
            metadata=dict(self.request.metadata),
            copy=RequestCopy.of(self.message),
            content_key=self.prepared.content_key,
        )


def error_info(code: str, message: str, retryable: bool, gateway: int | None = None) -> ErrorInfo:
    return ErrorInfo(code=code, message=message, retryable=retryable, gateway_error=gateway)


def outgoing(event: ResultEvent, copy: RequestCopy) -> Outgoing:
    return Outgoing(event, copy.reply_to, copy.correlation_id, event_headers(copy.headers))


class Outcomes:
    """Events, dead letters, retries and the acks that follow them."""

    def __init__(
        self,
        settings: Settings,
        broker: Broker,
        store: StateStore,
        acker: Acker,
        telemetry: Telemetry,
    ) -> None:
        self._settings = settings
        self._broker = broker
        self._store = store
        self._acker = acker
        self._telemetry = telemetry

    async def reject_unreadable(
        self, message: AbstractIncomingMessage, exc: ValidationError
    ) -> None:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()
        )[:1000]
        request_id = None
        try:
            raw = json.loads(message.body)
            if isinstance(raw, dict) and isinstance(raw.get("request_id"), str):
                request_id = raw["request_id"][:128]
            code = "invalid_schema"
        except ValueError:
            code = "not_json"
        event = ResultEvent.create(
            request_id,
            Status.rejected,
            source=message.message_id or str(message.delivery_tag),
            error=error_info(code, problems, False),
        )
        log.warning("rejected unreadable request %s: %s", request_id, problems)
        await self._settle_rejection(message, event, code, problems, dead_letter=True)

    async def reject(
        self,
        message: AbstractIncomingMessage,
        request: SendRequest,
        code: str,
        reason: str,
        *,
        dead_letter: bool = True,
    ) -> None:
        event = ResultEvent.create(
            request.request_id,
            Status.rejected,
            source=code,
            recipients=list(request.to),
            error=error_info(code, reason, False),
            metadata=dict(request.metadata),
        )
        log.warning("rejected request %s: %s (%s)", request.request_id, reason, code)
        await self._settle_rejection(message, event, code, reason, dead_letter=dead_letter)

    async def _settle_rejection(
        self,
        message: AbstractIncomingMessage,
        event: ResultEvent,
        code: str,
        reason: str,
        *,
        dead_letter: bool,
    ) -> None:
        copy = RequestCopy.of(message)
        try:
            await self._broker.publish_events([outgoing(event, copy)])
            if dead_letter:
                await self._broker.dead_letter([(copy, code, reason)])
        except Exception:
            log.exception("could not record the rejection; returning the request to the queue")
            await self.requeue([message])
            return
        await self._acker.ack([message])

    async def requeue(self, messages: Iterable[AbstractIncomingMessage]) -> None:
        for message in messages:
            try:
                await message.nack(requeue=True)
            except Exception as exc:
                log.warning("nack failed (%s); the broker will redeliver", exc)
            await self._acker.settled_otherwise(message)

    async def defer(
        self,
        message: AbstractIncomingMessage,
        request: SendRequest,
        attempt: int,
        wait: float,
        reason: str,
    ) -> None:
        """Hold a request back through the retry queues to stay within a gateway limit."""
        await self._store.release(request.request_id)
        copy = RequestCopy.of(message)
        event = ResultEvent.create(
            request.request_id,
            Status.deferred,
            attempt=attempt,
            source=f"{reason}|{uuid.uuid4().hex}",
            recipients=list(request.to),
            error=error_info(
                reason, f"held back {wait:.0f} s to stay within the gateway's limits", True
            ),
            retry_at=datetime.fromtimestamp(time.time() + wait, UTC),
            metadata=dict(request.metadata),
        )
        log.info("deferred %s for %.1f s: %s", request.request_id, wait, reason)
        try:
            await self._broker.delay([(copy, wait, {})])
            await self._broker.publish_events([outgoing(event, copy)])
        except Exception:
            log.exception("could not defer %s; returning it to the queue", request.request_id)
            await self.requeue([message])
            return
        await self._acker.ack([message])

    async def submitted(
        self, batch: Batch[Pending], live: list[Pending], result: SubmitResult
    ) -> None:
        unknown = result.outcome == Outcome.unknown
        for pending in live:
            await self._store.mark_sent(pending.request.request_id)
        await self._store.remember_mail(
            MailRecord(
                batch.mail_id,
                tuple(p.carried() for p in live),
                time.time(),
                trace=self._telemetry.carrier(),
                outcome_unknown=unknown,
            )
        )
        status = Status.unknown if unknown else Status.submitted
        error = (
            error_info(
                "outcome_unknown",
                f"connection lost after the data was sent ({result.detail}); "
                "waiting for the gateway's reply, not resending",
                False,
            )
            if unknown
            else None
        )
        events = [
            outgoing(
                ResultEvent.create(
                    p.request.request_id,
                    status,
                    attempt=p.attempt,
                    gateway_id=batch.mail_id,
                    recipients=list(p.prepared.line.phones),
                    sms_parts=p.prepared.sms_parts,
                    sms_count=p.prepared.sms_count,
                    error=error,
                    metadata=dict(p.request.metadata),
                ),
                RequestCopy.of(p.message),
            )
            for p in live
        ]
        try:
            await self._broker.publish_events(events)
        except Exception:
            # The e-mail is out; the redelivered requests will be recognised as duplicates.
            log.exception("e-mail %s sent but its events were not confirmed", batch.mail_id)
            await self.requeue(p.message for p in live)
            return
        self._telemetry.submitted(p.message.headers for p in live)
        await self._acker.ack(p.message for p in live)

    async def _not_sent(self, request_id: str, content_key: str) -> None:
        """Nothing of the request reached a recipient: a later copy of it may be sent, and
        it counts as no copy against the identical-request limit."""
        await self._store.release(request_id)
        await self._store.refund(content_key)

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with full jitter, capped."""
        r = self._settings.retry
        return random.uniform(0, min(r.max_delay_s, r.base_delay_s * 2 ** (attempt - 1)))

    async def retry_later(self, items: list[Pending], reason: str) -> None:
        """A transient failure: back to the queue through a delay, or give up."""
        r = self._settings.retry
        delays: list[tuple[RequestCopy, float, dict[str, Any]]] = []
        events: list[Outgoing] = []
        give_up: list[Pending] = []
        retried: list[Pending] = []
        for pending in items:
            await self._not_sent(pending.request.request_id, pending.prepared.content_key)
            next_attempt = pending.attempt + 1
            age = time.time() - pending.first_seen
            if next_attempt > r.max_attempts or age > r.max_age_s:
                give_up.append(pending)
                continue
            retried.append(pending)
            delay = max(self._backoff(pending.attempt), 0.5)
            copy = RequestCopy.of(pending.message)
            delays.append(
                (
                    copy,
                    delay,
                    {ATTEMPT_HEADER: next_attempt, FIRST_SEEN_HEADER: int(pending.first_seen)},
                )
            )
            events.append(
                outgoing(
                    ResultEvent.create(
                        pending.request.request_id,
                        Status.retrying,
                        attempt=pending.attempt,
                        recipients=list(pending.prepared.line.phones),
                        error=error_info("smtp_transient", reason, True),
                        retry_at=datetime.fromtimestamp(time.time() + delay, UTC),
                        metadata=dict(pending.request.metadata),
                    ),
                    copy,
                )
            )
        if delays:
            log.warning("retrying %d requests later: %s", len(delays), reason)
            try:
                await self._broker.delay(delays)
                await self._broker.publish_events(events)
            except Exception:
                log.exception("could not schedule retries; returning the requests to the queue")
                await self.requeue(p.message for p in retried)
            else:
                await self._acker.ack(p.message for p in retried)
        if give_up:
            await self.fail(give_up, "retries_exhausted", reason)

    async def fail(self, items: list[Pending], code: str, reason: str) -> None:
        copies = [RequestCopy.of(p.message) for p in items]
        events = [
            outgoing(
                ResultEvent.create(
                    p.request.request_id,
                    Status.failed,
                    attempt=p.attempt,
                    source=code,
                    recipients=list(p.prepared.line.phones),
                    error=error_info(code, reason, False),
                    metadata=dict(p.request.metadata),
                ),
                copy,
            )
            for p, copy in zip(items, copies, strict=True)
        ]
        for pending in items:
            await self._store.release(pending.request.request_id)
        log.error("%d requests failed: %s (%s)", len(items), reason, code)
        try:
            await self._broker.publish_events(events)
            await self._broker.dead_letter((c, code, reason) for c in copies)
        except Exception:
            log.exception("could not record the failures; returning the requests to the queue")
            await self.requeue(p.message for p in items)
            return
        await self._acker.ack(p.message for p in items)

    async def record_events(
        self, record: MailRecord, status: Status, error: ErrorInfo | None
    ) -> None:
        await self._broker.publish_events(
            outgoing(
                ResultEvent.create(
                    r.request_id,
                    status,
                    attempt=r.attempt,
                    gateway_id=record.mail_id,
                    recipients=list(r.recipients),
                    sms_parts=r.sms_parts,
                    sms_count=r.sms_parts * len(r.recipients),
                    error=error,
                    metadata=r.metadata,
                ),
                r.copy,
            )
            for r in record.requests
        )

    async def resend(
        self, record: MailRecord, delay: float, status: Status, code: str, text: str, number: int
    ) -> None:
        for carried in record.requests:
            await self._not_sent(carried.request_id, carried.content_key)
        await self._broker.delay((r.copy, delay, {}) for r in record.requests)
        await self.record_events(record, status, error_info(code, text, True, number))

    async def fail_record(self, record: MailRecord, code: str, text: str, number: int) -> None:
        """The gateway refused the e-mail for good: its requests fail and are dead-lettered."""
        await self.record_events(record, Status.failed, error_info(code, text, False, number))
        await self._broker.dead_letter((r.copy, code, text) for r in record.requests)

    async def split(self, record: MailRecord, code: str, text: str, number: int) -> None:
        """One bad line rejected the whole e-mail: send its halves apart, so each round
        halves the suspects and only the bad requests end up failed."""
        requests = record.requests
        if len(requests) == 1:
            await self.fail_record(record, code, text, number)
            return
        middle = len(requests) // 2
        for carried in requests:
            await self._not_sent(carried.request_id, carried.content_key)
        await self._broker.delay(
            (r.copy, 0, {GROUP_HEADER: f"{record.mail_id}.{0 if i < middle else 1}"})
            for i, r in enumerate(requests)
        )
        await self.record_events(
            record,
            Status.retrying,
            error_info(
                code, f"{text}; resending in halves to find the bad recipient", True, number
            ),
        )
