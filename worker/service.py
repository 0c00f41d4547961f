"""The service: one object that owns the lifecycle and wires the parts.

consume -> validate -> limit -> batch -> submit -> publish, and replies -> publish.

A request is acked only when what became of it is recorded elsewhere: its e-mail was
accepted (or its fate is unknown) and the event saying so is confirmed, or it was moved
to the retry or dead-letter queue by a confirmed publish. Until then it stays unacked in
RabbitMQ, which redelivers it if this process dies.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import formatdate
from types import TracebackType
from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from opentelemetry.trace import TracerProvider
from pydantic import ValidationError

from worker.batcher import Batch, Batcher
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
from worker.errors import InvalidRequest
from worker.limits import Limits
from worker.prepare import BatchKey, PreparedRequest, check_not_expired, prepare
from worker.protocol.mail import Account, Envelope, MailBuilder
from worker.protocol.replies import Accepted, Action, Reply
from worker.reply_receiver import ReplyHandler, reply_address
from worker.settings import Settings
from worker.smtp_client import GatewaySmtp, Outcome, SubmitResult
from worker.smtp_server import serve_smtp
from worker.state import CarriedRequest, Claim, MailRecord, MemoryStateStore, StateStore
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


def _int_header(message: AbstractIncomingMessage, name: str, default: int) -> int:
    value = (message.headers or {}).get(name)
    try:
        return int(str(value)) if value is not None else default
    except (TypeError, ValueError):
        return default


def _error(code: str, message: str, retryable: bool, gateway: int | None = None) -> ErrorInfo:
    return ErrorInfo(code=code, message=message, retryable=retryable, gateway_error=gateway)


def _outgoing(event: ResultEvent, copy: RequestCopy) -> Outgoing:
    return Outgoing(event, copy.reply_to, copy.correlation_id, event_headers(copy.headers))


class Service:
    """`async with Service(settings) as service: await service.wait()`; `stop()` (or a
    signal) stops consuming, flushes open batches, waits for in-flight submissions and
    confirms, then closes the connections."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: StateStore | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.settings = settings
        self.telemetry = Telemetry(settings, tracer_provider)
        self.broker = Broker(settings.amqp, published=self.telemetry.published)
        self.store: StateStore = store or MemoryStateStore(settings.limits)
        self.limits = Limits(settings.limits, settings.retry)
        self.telemetry.watch(self.limits.circuit)
        self._account = Account(settings.gateway.login, settings.gateway.password)
        self._acker = Acker()
        self._batcher: Batcher[Pending] = Batcher(
            self._new_builder,
            max_lines=settings.batch.max_lines,
            max_wait=settings.batch.max_wait_ms / 1000,
        )
        self._smtp: GatewaySmtp | None = None
        self._reply_server: asyncio.Server | None = None
        self._consumer_tag: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._submit_slots = asyncio.Semaphore(settings.smtp.connections)
        self._batch_added = asyncio.Event()
        self._submission_done = asyncio.Event()
        self._submitting: dict[str, asyncio.Future[None]] = {}
        # A reply being handled has left the store but not yet published its events.
        self._replies_in_progress = 0
        self._flusher: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self.draining = False
        self.account_stopped = False

    # lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> Service:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.drain()

    async def start(self) -> None:
        s = self.settings
        self._smtp = GatewaySmtp(s.smtp)
        self._reply_server = await serve_smtp(
            ReplyHandler(s.reply.address, self.on_reply), s.reply.host, s.reply.port
        )
        await self.broker.connect()
        self._flusher = asyncio.create_task(self._flush_when_due())
        self._sweeper = asyncio.create_task(self._expire_unanswered())
        self._consumer_tag = await self.broker.consuming_queue().consume(
            self.telemetry.consumer(self._on_message)
        )
        log.info(
            "consuming %s; replies on %s:%d", s.amqp.requests_queue, s.reply.host, self.reply_port
        )

    @property
    def reply_port(self) -> int:
        assert self._reply_server is not None
        port: int = self._reply_server.sockets[0].getsockname()[1]
        return port

    @property
    def ready(self) -> bool:
        return (
            self.broker.is_connected
            and self._consumer_tag is not None
            and not self.draining
            and self.limits.circuit.state == "closed"
        )

    def stop(self) -> None:
        self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()

    async def _stop_consuming(self) -> None:
        if self._consumer_tag is not None:
            tag, self._consumer_tag = self._consumer_tag, None
            try:
                await self.broker.consuming_queue().cancel(tag)
            except Exception as exc:
                log.warning("could not cancel the consumer: %s", exc)

    async def drain(self) -> None:
        """Stop taking requests, send what is batched, wait for it, close."""
        self.draining = True
        if self._flusher is not None:
            self._flusher.cancel()
        await self._stop_consuming()
        timeout = self.settings.observability.drain_timeout_s
        deadline = time.monotonic() + timeout
        # A request whose handling began before the consumer was cancelled may still land
        # in a batch: flush until nothing is batched and nothing is in flight.
        while True:
            for batch in self._batcher.drain():
                self._spawn(self._submit(batch))
            if not self._tasks:
                break
            _, late = await asyncio.wait(
                set(self._tasks), timeout=max(deadline - time.monotonic(), 0)
            )
            if late:
                for task in late:
                    task.cancel()
                log.error("%d submissions still running after %.0f s", len(late), timeout)
                break
        await self._await_replies(deadline)
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._reply_server is not None:
            self._reply_server.close()
        if self._smtp is not None:
            await self._smtp.close()
        await self.broker.close()
        self._stopped.set()
        log.info("stopped")

    async def _expire_unanswered(self) -> None:
        """A reply that never comes must not keep a record forever. An e-mail that was
        accepted stays `submitted`; one whose fate is unknown is reported `failed`, never
        resent, since it may have gone out."""
        timeout = self.settings.reply.timeout_s
        while True:
            await asyncio.sleep(min(timeout / 4, 60))
            for stale in await self.store.unanswered(time.time() - timeout):
                record = await self.store.take_mail(stale.mail_id)
                if record is None:
                    continue
                if not record.outcome_unknown:
                    log.warning("no reply to e-mail %s within %.0f s", record.mail_id, timeout)
                    continue
                message = (
                    f"no reply to e-mail {record.mail_id} within {timeout:.0f} s after its "
                    "SMTP session broke; it may or may not have been sent, and is not resent"
                )
                log.error(message)
                try:
                    await self._reply_events(
                        record, Status.failed, _error("outcome_unknown", message, False)
                    )
                except Exception:
                    log.exception("could not report e-mail %s as failed", record.mail_id)
                    await self.store.remember_mail(record)

    async def _await_replies(self, deadline: float) -> None:
        """Replies to e-mails already sent can only be matched by this process (its state
        is its own): keep the receiver open for them while the drain time lasts."""
        while self._replies_in_progress or await self.store.unanswered(time.time()):
            if time.monotonic() >= deadline:
                waiting = len(await self.store.unanswered(time.time()))
                log.warning("stopping with %d e-mails still unanswered", waiting)
                return
            await asyncio.sleep(0.05)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._submission_finished)

    def _submission_finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._submission_done.set()

    # consume -> validate -> limit -> batch -------------------------------------------

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._acker.received(message)
        if self.draining:
            # Delivered before the consumer was cancelled: open batches are already flushed,
            # so hand it back rather than start work that could outlive the connection.
            await self._requeue([message])
            return
        attempt = _int_header(message, ATTEMPT_HEADER, 1)
        now = time.time()
        first_seen = _int_header(message, FIRST_SEEN_HEADER, int(now))
        group = str((message.headers or {}).get(GROUP_HEADER, ""))
        try:
            request = SendRequest.model_validate_json(message.body)
        except ValidationError as exc:
            await self._reject_unreadable(message, exc)
            return
        self.telemetry.request_known(request.request_id)
        try:
            prepared = prepare(
                request,
                self.settings.gateway,
                self.settings.default_channel,
                datetime.now(UTC),
                group,
            )
        except InvalidRequest as exc:
            await self._reject(message, request, exc.code, exc.message)
            return
        if await self.store.claim(request.request_id) == Claim.duplicate:
            await self._reject(
                message, request, "duplicate", "request_id was already sent", dead_letter=False
            )
            return
        admission = await self.store.admit(
            prepared.content_key, tuple(r.key for r in prepared.recipients)
        )
        if admission.wait > 0:
            if (
                admission.reason == "identical_content"
                and self.settings.limits.identical_policy == "reject"
            ):
                await self.store.release(request.request_id)
                await self._reject(
                    message,
                    request,
                    "duplicate",
                    "identical request already sent twice this minute",
                )
                return
            await self._defer(message, request, attempt, admission.wait, admission.reason)
            return
        pending = Pending(message, prepared, attempt, first_seen, time.monotonic())
        try:
            closed = self._batcher.add(prepared.key, prepared.line, pending, time.monotonic())
        except InvalidRequest as exc:
            await self.store.release(request.request_id)
            await self._reject(message, request, exc.code, exc.message)
            return
        for batch in closed:
            self._spawn(self._submit(batch))
        self._batch_added.set()

    def _new_builder(self, key: BatchKey) -> MailBuilder:
        mail_id = uuid.uuid4().hex
        return MailBuilder(
            Envelope(
                mail_from=reply_address(self.settings.reply.address, mail_id),
                gateway_address=self.settings.gateway.address,
                charset=self.settings.gateway.charset,
                text_tags=self.settings.gateway.text_tags,
            ),
            self._account,
            mail_id,
            key.options,
            charset=key.charset,
            date=formatdate(localtime=False, usegmt=True),
            message_id=f"<{mail_id}@smsc-worker>",
            limit=self.settings.batch.max_bytes,
        )

    async def _flush_when_due(self) -> None:
        while True:
            deadline = self._batcher.next_deadline()
            if deadline is None:
                await self._batch_added.wait()
                self._batch_added.clear()
                continue
            delay = deadline - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            # While every SMTP connection has an e-mail to send, a due batch would only
            # queue for one: let it go on filling (up to its limits) until one is free.
            while len(self._tasks) >= self.settings.smtp.connections:
                self._submission_done.clear()
                await self._submission_done.wait()
            for batch in self._batcher.due(time.monotonic()):
                self._spawn(self._submit(batch))

    # rejections and delays -----------------------------------------------------------

    async def _reject_unreadable(
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
            error=_error(code, problems, False),
        )
        log.warning("rejected unreadable request %s: %s", request_id, problems)
        await self._settle_rejection(message, event, code, problems, dead_letter=True)

    async def _reject(
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
            error=_error(code, reason, False),
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
            await self.broker.publish_events([_outgoing(event, copy)])
            if dead_letter:
                await self.broker.dead_letter([(copy, code, reason)])
        except Exception:
            log.exception("could not record the rejection; returning the request to the queue")
            await self._requeue([message])
            return
        await self._acker.ack([message])

    async def _requeue(self, messages: Iterable[AbstractIncomingMessage]) -> None:
        for message in messages:
            try:
                await message.nack(requeue=True)
            except Exception as exc:
                log.warning("nack failed (%s); the broker will redeliver", exc)
            await self._acker.settled_otherwise(message)

    async def _defer(
        self,
        message: AbstractIncomingMessage,
        request: SendRequest,
        attempt: int,
        wait: float,
        reason: str,
    ) -> None:
        """Hold a request back through the retry queues to stay within a gateway limit."""
        await self.store.release(request.request_id)
        copy = RequestCopy.of(message)
        event = ResultEvent.create(
            request.request_id,
            Status.deferred,
            attempt=attempt,
            source=f"{reason}|{uuid.uuid4().hex}",
            recipients=list(request.to),
            error=_error(
                reason, f"held back {wait:.0f} s to stay within the gateway's limits", True
            ),
            retry_at=datetime.fromtimestamp(time.time() + wait, UTC),
            metadata=dict(request.metadata),
        )
        log.info("deferred %s for %.1f s: %s", request.request_id, wait, reason)
        try:
            await self.broker.delay([(copy, wait, {})])
            await self.broker.publish_events([_outgoing(event, copy)])
        except Exception:
            log.exception("could not defer %s; returning it to the queue", request.request_id)
            await self._requeue([message])
            return
        await self._acker.ack([message])

    # submit -> publish -----------------------------------------------------------------

    async def _submit(self, batch: Batch[Pending]) -> None:
        with self.telemetry.submission([p.message.headers for p in batch.items], batch.opened_at):
            await self._send_batch(batch)

    async def _send_batch(self, batch: Batch[Pending]) -> None:
        async with self._submit_slots:
            now = datetime.now(UTC)
            live: list[Pending] = []
            for pending in batch.items:
                try:
                    check_not_expired(pending.request, now)
                    live.append(pending)
                except InvalidRequest as exc:
                    await self.store.release(pending.request.request_id)
                    await self._reject(pending.message, pending.request, exc.code, exc.message)
            if not live:
                return
            if len(live) < len(batch.items):
                batch = self._rebuild(batch, live)
            await self.limits.circuit.acquire()
            if self.account_stopped:
                # The gateway refused the credentials: every further e-mail would be refused
                # too. The requests wait in the queue for a fixed, restarted worker.
                for pending in live:
                    await self.store.release(pending.request.request_id)
                await self._requeue(p.message for p in live)
                return
            await self.limits.pace(sum(p.prepared.sms_count for p in live))
            assert self._smtp is not None
            mail = batch.builder.build()
            # The gateway may answer before its SMTP server says 250: a reply for this
            # e-mail waits until the outcome of the submission is recorded.
            recorded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._submitting[batch.mail_id] = recorded
            try:
                await self._submit_mail(batch, live, mail)
            finally:
                del self._submitting[batch.mail_id]
                recorded.set_result(None)

    async def _submit_mail(self, batch: Batch[Pending], live: list[Pending], mail: bytes) -> None:
        assert self._smtp is not None
        with self.telemetry.smtp(batch.mail_id, len(live), len(mail)) as smtp_call:
            result = await self._smtp.submit(
                reply_address(self.settings.reply.address, batch.mail_id),
                self.settings.gateway.address,
                mail,
            )
            smtp_call.finished(result)
        log.info(
            "e-mail %s: %s (%d requests, %d bytes)",
            batch.mail_id,
            result.outcome.value,
            len(live),
            len(mail),
        )
        if result.outcome in (Outcome.accepted, Outcome.unknown):
            await self._submitted(batch, live, result)
        elif result.outcome == Outcome.transient:
            await self._retry_later([(p, p.message) for p in live], result.detail)
        else:
            await self._fail_deliveries(live, "smtp_rejected", result.detail)

    def _rebuild(self, batch: Batch[Pending], live: list[Pending]) -> Batch[Pending]:
        rebuilt: Batch[Pending] = Batch(batch.key, self._new_builder(batch.key), batch.opened_at)
        for pending in live:
            rebuilt.builder.try_add(pending.prepared.line)
            rebuilt.items.append(pending)
        return rebuilt

    async def _submitted(
        self, batch: Batch[Pending], live: list[Pending], result: SubmitResult
    ) -> None:
        unknown = result.outcome == Outcome.unknown
        for pending in live:
            await self.store.mark_sent(pending.request.request_id)
        await self.store.remember_mail(
            MailRecord(
                batch.mail_id,
                tuple(p.carried() for p in live),
                time.time(),
                trace=self.telemetry.carrier(),
                outcome_unknown=unknown,
            )
        )
        status = Status.unknown if unknown else Status.submitted
        error = (
            _error(
                "outcome_unknown",
                f"connection lost after the data was sent ({result.detail}); "
                "waiting for the gateway's reply, not resending",
                False,
            )
            if unknown
            else None
        )
        events = [
            _outgoing(
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
            await self.broker.publish_events(events)
        except Exception:
            # The e-mail is out; the redelivered requests will be recognised as duplicates.
            log.exception("e-mail %s sent but its events were not confirmed", batch.mail_id)
            await self._requeue(p.message for p in live)
            return
        self.telemetry.submitted(p.message.headers for p in live)
        await self._acker.ack(p.message for p in live)

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with full jitter, capped."""
        r = self.settings.retry
        return random.uniform(0, min(r.max_delay_s, r.base_delay_s * 2 ** (attempt - 1)))

    async def _retry_later(
        self, items: list[tuple[Pending, AbstractIncomingMessage]], reason: str
    ) -> None:
        """A transient failure: back to the queue through a delay, or give up."""
        r = self.settings.retry
        delays: list[tuple[RequestCopy, float, dict[str, Any]]] = []
        events: list[Outgoing] = []
        give_up: list[Pending] = []
        for pending, message in items:
            await self.store.release(pending.request.request_id)
            await self.store.refund(pending.prepared.content_key)
            next_attempt = pending.attempt + 1
            age = time.time() - pending.first_seen
            if next_attempt > r.max_attempts or age > r.max_age_s:
                give_up.append(pending)
                continue
            delay = max(self._backoff(pending.attempt), 0.5)
            copy = RequestCopy.of(message)
            delays.append(
                (
                    copy,
                    delay,
                    {ATTEMPT_HEADER: next_attempt, FIRST_SEEN_HEADER: int(pending.first_seen)},
                )
            )
            events.append(
                _outgoing(
                    ResultEvent.create(
                        pending.request.request_id,
                        Status.retrying,
                        attempt=pending.attempt,
                        recipients=list(pending.prepared.line.phones),
                        error=_error("smtp_transient", reason, True),
                        retry_at=datetime.fromtimestamp(time.time() + delay, UTC),
                        metadata=dict(pending.request.metadata),
                    ),
                    copy,
                )
            )
        if delays:
            log.warning("retrying %d requests later: %s", len(delays), reason)
            try:
                await self.broker.delay(delays)
                await self.broker.publish_events(events)
            except Exception:
                log.exception("could not schedule retries; returning the requests to the queue")
                await self._requeue(m for p, m in items if p not in give_up)
            else:
                await self._acker.ack(m for p, m in items if p not in give_up)
        if give_up:
            await self._fail_deliveries(give_up, "retries_exhausted", reason)

    async def _fail_deliveries(self, items: list[Pending], code: str, reason: str) -> None:
        copies = [RequestCopy.of(p.message) for p in items]
        events = [
            _outgoing(
                ResultEvent.create(
                    p.request.request_id,
                    Status.failed,
                    attempt=p.attempt,
                    source=code,
                    recipients=list(p.prepared.line.phones),
                    error=_error(code, reason, False),
                    metadata=dict(p.request.metadata),
                ),
                copy,
            )
            for p, copy in zip(items, copies, strict=True)
        ]
        for pending in items:
            await self.store.release(pending.request.request_id)
        log.error("%d requests failed: %s (%s)", len(items), reason, code)
        try:
            await self.broker.publish_events(events)
            await self.broker.dead_letter((c, code, reason) for c in copies)
        except Exception:
            log.exception("could not record the failures; returning the requests to the queue")
            await self._requeue(p.message for p in items)
            return
        await self._acker.ack(p.message for p in items)

    # replies -------------------------------------------------------------------------

    async def on_reply(self, mail_id: str, reply: Reply) -> None:
        """Turn the gateway's answer to one e-mail into events (and retries)."""
        submitting = self._submitting.get(mail_id)
        if submitting is not None:
            await asyncio.shield(submitting)
        record = await self.store.take_mail(mail_id)
        if record is None:
            log.warning("reply for unknown or already answered e-mail %s: %s", mail_id, reply)
            return
        self._replies_in_progress += 1
        try:
            with self.telemetry.reply(record, reply):
                await self._handle_reply(record, reply)
        except Exception:
            await self.store.remember_mail(record)
            raise
        finally:
            self._replies_in_progress -= 1

    async def _handle_reply(self, record: MailRecord, reply: Reply) -> None:
        if isinstance(reply, Accepted):
            if self.limits.circuit.state != "closed":
                self.limits.circuit.close()
            await self._reply_events(record, Status.accepted, None)
            return
        number = int(reply.error)
        code = f"gateway_{number}"
        text = f"gateway error {number}: {reply.description}"
        action = reply.action
        log.warning("e-mail %s: %s -> %s", record.mail_id, text, action.value)
        if action == Action.fail:
            await self._reply_events(record, Status.failed, _error(code, text, False, number))
            await self.broker.dead_letter((r.copy, code, text) for r in record.requests)
        elif action == Action.find_bad_line:
            await self._split(record, code, text, number)
        elif action == Action.retry_after_window:
            await self._resend(
                record, self.settings.limits.identical_window_s, Status.retrying, code, text, number
            )
        elif action == Action.pause_account:
            pause = self.limits.circuit.open(text, self.settings.retry.funds_pause_s)
            await self._resend(record, pause, Status.deferred, code, text, number)
        elif action == Action.back_off:
            pause = self.limits.circuit.open(text)
            await self._resend(record, pause, Status.deferred, code, text, number)
        elif action == Action.stop_account:
            log.error(
                "ALERT: the gateway refused the account's credentials (%s); "
                "sending stopped, requests stay queued until the worker is fixed and restarted",
                text,
            )
            self.account_stopped = True
            await self._stop_consuming()
            await self._resend(record, 0, Status.deferred, "account_stopped", text, number)

    async def _reply_events(
        self, record: MailRecord, status: Status, error: ErrorInfo | None
    ) -> None:
        await self.broker.publish_events(
            _outgoing(
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

    async def _resend(
        self, record: MailRecord, delay: float, status: Status, code: str, text: str, number: int
    ) -> None:
        for carried in record.requests:
            await self.store.release(carried.request_id)
            await self.store.refund(carried.content_key)
        await self.broker.delay((r.copy, delay, {}) for r in record.requests)
        await self._reply_events(record, status, _error(code, text, True, number))

    async def _split(self, record: MailRecord, code: str, text: str, number: int) -> None:
        """One bad line rejected the whole e-mail: send its halves apart, so each round
        halves the suspects and only the bad requests end up failed."""
        requests = record.requests
        if len(requests) == 1:
            await self._reply_events(record, Status.failed, _error(code, text, False, number))
            await self.broker.dead_letter((r.copy, code, text) for r in requests)
            return
        middle = len(requests) // 2
        for carried in requests:
            await self.store.release(carried.request_id)
            await self.store.refund(carried.content_key)
        await self.broker.delay(
            (r.copy, 0, {GROUP_HEADER: f"{record.mail_id}.{0 if i < middle else 1}"})
            for i, r in enumerate(requests)
        )
        await self._reply_events(
            record,
            Status.retrying,
            _error(code, f"{text}; resending in halves to find the bad recipient", True, number),
        )
