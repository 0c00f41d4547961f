"""The service: one object that owns the lifecycle and wires the parts (what becomes of
each request is recorded by `worker.outcomes`).

consume -> validate -> limit -> batch -> submit -> publish, and replies -> publish.

A request is acked only when what became of it is recorded elsewhere: its e-mail was
accepted (or its fate is unknown) and the event saying so is confirmed, or it was moved
to the retry or dead-letter queue by a confirmed publish. Until then it stays unacked in
RabbitMQ, which redelivers it if this process dies.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
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
)
from worker.contract import SendRequest, Status
from worker.errors import InvalidRequest
from worker.limits import Limits
from worker.outcomes import Outcomes, Pending, error_info
from worker.prepare import BatchKey, check_not_expired, prepare
from worker.protocol.mail import Account, Envelope, MailBuilder
from worker.protocol.replies import Accepted, Action, Reply
from worker.reply_receiver import ReplyHandler, reply_address
from worker.settings import Settings
from worker.smtp_client import GatewaySmtp, Outcome
from worker.smtp_server import bound_port, serve_smtp
from worker.state import Claim, MailRecord, MemoryStateStore, StateStore
from worker.telemetry import Telemetry

log = logging.getLogger(__name__)


def _int_header(message: AbstractIncomingMessage, name: str, default: int) -> int:
    value = (message.headers or {}).get(name)
    try:
        return int(str(value)) if value is not None else default
    except (TypeError, ValueError):
        return default


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
        self.outcomes = Outcomes(settings, self.broker, self.store, self._acker, self.telemetry)
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
        return bound_port(self._reply_server)

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
                    await self.outcomes.record_events(
                        record, Status.failed, error_info("outcome_unknown", message, False)
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
            await self.outcomes.requeue([message])
            return
        attempt = _int_header(message, ATTEMPT_HEADER, 1)
        now = time.time()
        first_seen = _int_header(message, FIRST_SEEN_HEADER, int(now))
        group = str((message.headers or {}).get(GROUP_HEADER, ""))
        try:
            request = SendRequest.model_validate_json(message.body)
        except ValidationError as exc:
            await self.outcomes.reject_unreadable(message, exc)
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
            await self.outcomes.reject(message, request, exc.code, exc.message)
            return
        if await self.store.claim(request.request_id) == Claim.duplicate:
            await self.outcomes.reject(
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
                await self.outcomes.reject(
                    message,
                    request,
                    "duplicate",
                    "identical request already sent twice this minute",
                )
                return
            await self.outcomes.defer(message, request, attempt, admission.wait, admission.reason)
            return
        pending = Pending(message, prepared, attempt, first_seen, time.monotonic())
        try:
            closed = self._batcher.add(prepared.key, prepared.line, pending, time.monotonic())
        except InvalidRequest as exc:
            await self.store.release(request.request_id)
            await self.outcomes.reject(message, request, exc.code, exc.message)
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
                    await self.outcomes.reject(
                        pending.message, pending.request, exc.code, exc.message
                    )
            if not live:
                return
            if len(live) < len(batch.items):
                batch = self._rebuild(batch, live)
            try:
                # Unacked requests must not wait out pause after pause: past the longest
                # single pause they go back to RabbitMQ (its consumer timeout is 30 min).
                async with asyncio.timeout(self.settings.retry.circuit_max_s):
                    await self.limits.circuit.acquire()
            except TimeoutError:
                wait = max(self.limits.circuit.remaining(), self.settings.retry.circuit_base_s)
                for pending in live:
                    await self.store.refund(pending.prepared.content_key)
                    await self.outcomes.defer(
                        pending.message, pending.request, pending.attempt, wait, "circuit_open"
                    )
                return
            if self.account_stopped:
                # The gateway refused the credentials: every further e-mail would be refused
                # too. The requests wait in the queue for a fixed, restarted worker.
                for pending in live:
                    await self.store.release(pending.request.request_id)
                await self.outcomes.requeue(p.message for p in live)
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
            await self.outcomes.submitted(batch, live, result)
        elif result.outcome == Outcome.transient:
            await self.outcomes.retry_later(live, result.detail)
        else:
            await self.outcomes.fail(live, "smtp_rejected", result.detail)

    def _rebuild(self, batch: Batch[Pending], live: list[Pending]) -> Batch[Pending]:
        rebuilt: Batch[Pending] = Batch(batch.key, self._new_builder(batch.key), batch.opened_at)
        for pending in live:
            rebuilt.builder.try_add(pending.prepared.line)
            rebuilt.items.append(pending)
        return rebuilt

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
            await self.outcomes.record_events(record, Status.accepted, None)
            return
        number = int(reply.error)
        code = f"gateway_{number}"
        text = f"gateway error {number}: {reply.description}"
        action = reply.action
        log.warning("e-mail %s: %s -> %s", record.mail_id, text, action.value)
        if action == Action.fail:
            await self.outcomes.fail_record(record, code, text, number)
        elif action == Action.find_bad_line:
            await self.outcomes.split(record, code, text, number)
        elif action == Action.retry_after_window:
            await self.outcomes.resend(
                record, self.settings.limits.identical_window_s, Status.retrying, code, text, number
            )
        elif action == Action.pause_account:
            pause = self.limits.circuit.open(text, self.settings.retry.funds_pause_s)
            await self.outcomes.resend(record, pause, Status.deferred, code, text, number)
        elif action == Action.back_off:
            pause = self.limits.circuit.open(text)
            await self.outcomes.resend(record, pause, Status.deferred, code, text, number)
        elif action == Action.stop_account:
            log.error(
                "ALERT: the gateway refused the account's credentials (%s); "
                "sending stopped, requests stay queued until the worker is fixed and restarted",
                text,
            )
            self.account_stopped = True
            await self._stop_consuming()
            await self.outcomes.resend(record, 0, Status.deferred, "account_stopped", text, number)
