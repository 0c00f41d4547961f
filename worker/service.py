"""The service: one object that owns the lifecycle and wires the parts.

consume -> read -> judge (ledger, limits) -> batch -> gate (account, circuit, pace) ->
submit -> settle, and replies -> settle.

Every delivery ends in `Settler.settle` exactly once: the consumer callback only reads it
and hands it to the intake, which judges a burst with one store call; each request is then
settled where its journey ends (rejected or deferred at intake, or with its e-mail). Each
of these steps has a last-resort `finally` that hands back to the queue whatever it did not
settle, so no exception leaves a delivery unsettled.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from email.utils import formatdate
from functools import partial
from types import TracebackType

from aio_pika.abc import AbstractIncomingMessage
from opentelemetry.trace import TracerProvider

from worker.accounts import GatewayAccount, accounts_of
from worker.batcher import Batch, Batcher, LineRefused
from worker.broker import Broker
from worker.contract import SendRequest
from worker.delivery import (
    GATEWAY_ID_HEADER,
    Delivery,
    ForgedHeaders,
    HeaderSigner,
    Provenance,
    RequestCopy,
    fingerprint,
)
from worker.errors import InvalidRequest
from worker.fate import (
    NO_REPLY,
    Accepted,
    Fail,
    Fate,
    Later,
    Reject,
    Requeue,
    Split,
    Subject,
    Unknown,
    after_error,
    after_submission,
    from_verdict,
    give_up_or_later,
    in_flight,
    read_request,
    request_id_of,
)
from worker.lanes import Lane, LaneSlots
from worker.ledger import (
    CarriedRequest,
    CircuitView,
    GateKind,
    Intake,
    MailBusy,
    MailRecord,
    SplitNotes,
    StateStore,
    StateUnavailable,
)
from worker.ledger.factory import open_store
from worker.ledger.memory import MemoryStateStore
from worker.prepare import BatchKey, PreparedRequest, check_not_expired, prepare
from worker.protocol.fields import new_mail_id
from worker.protocol.mail import Envelope, MailBuilder
from worker.protocol.recipients import sms_count
from worker.protocol.replies import Accepted as AcceptedReply
from worker.protocol.replies import Action, Rejected, Reply
from worker.reply_imap import ImapReplies, MailJudge, ReplyOutcome
from worker.reply_receiver import (
    UNREADABLE_REPLY,
    ReplyAddresses,
    ReplyHandler,
    ReplySMTP,
    UnreadableCopy,
    masked_mail,
    parse_networks,
    parse_senders,
)
from worker.settings import DEFAULT_ACCOUNT, Settings
from worker.settle import Acker, Settler
from worker.smtp_client import GatewaySmtp, SubmitResult
from worker.smtp_server import ListenerLimits, bound_port, serve_smtp, server_tls_context
from worker.telemetry import Telemetry

log = logging.getLogger(__name__)

INTAKE_BURST = 200
INTAKE_GATHER_S = 0.002
INTAKE_GATHER_STEPS = 5


def header_key(settings: Settings) -> bytes:
    """The key that signs the worker's own headers: its own setting, or one derived from
    the gateway password, which every replica of an account shares."""
    own = settings.state.header_key.get_secret_value()
    if own:
        return own.encode()
    password = settings.gateway.password.get_secret_value().encode()
    return hmac.new(password, b"smsc-worker header key", hashlib.sha256).digest()


def reply_token_keys(settings: Settings) -> tuple[bytes, list[bytes]]:
    """The key that makes the tokens of reply addresses (its own setting, or one derived
    from the gateway password, which every replica of an account shares), and the old keys
    still accepted on replies."""
    own = settings.reply.token_key.get_secret_value()
    if own:
        key = own.encode()
    else:
        password = settings.gateway.password.get_secret_value().encode()
        key = hmac.new(password, b"smsc-worker reply token key", hashlib.sha256).digest()
    old = settings.reply.token_keys_old.get_secret_value().split(",")
    return key, [k.strip().encode() for k in old if k.strip()]


@dataclass(slots=True)
class Pending:
    """A request in hand: judged `new`, claimed, waiting in a batch or being submitted."""

    delivery: Delivery
    prepared: PreparedRequest
    provenance: Provenance
    first_seen: float
    # Its e-mail reached DATA: from then on it is never released without knowing more.
    sending: bool = False

    @property
    def request(self) -> SendRequest:
        return self.prepared.request

    @property
    def account(self) -> str:
        return self.delivery.account

    def subject(self, *, claimed: bool = True) -> Subject:
        return Subject(
            delivery=self.delivery,
            request_id=self.request.request_id,
            copy=self.delivery.copy,
            recipients=self.prepared.line.phones,
            metadata=self.request.metadata,
            attempt=self.provenance.attempt,
            first_seen=self.first_seen,
            content_key=self.prepared.content_key,
            subscribers=self.prepared.subscribers,
            sms_parts=self.prepared.sms_parts,
            group=self.provenance.group,
            lane=self.delivery.lane,
            account=self.delivery.account,
            claimed=claimed,
        )

    def carried(self) -> CarriedRequest:
        return CarriedRequest(
            request_id=self.request.request_id,
            recipients=self.prepared.line.phones,
            sms_parts=self.prepared.sms_parts,
            attempt=self.provenance.attempt,
            first_seen=self.first_seen,
            metadata=dict(self.request.metadata),
            copy=self.delivery.copy,
            content_key=self.prepared.content_key,
            lane=self.delivery.lane,
            account=self.delivery.account,
            subscribers=self.prepared.subscribers,
        )


@dataclass(slots=True)
class Arrival:
    """A delivery once read: either its fate is already known, or it awaits the ledger."""

    delivery: Delivery
    subject: Subject
    fate: Fate | None = None
    pending: Pending | None = None


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
        self.accounts: dict[str, GatewayAccount] = accounts_of(settings)
        self.broker = Broker(
            settings.amqp,
            published=self.telemetry.published,
            dead_lettered=self.telemetry.metrics.dead_lettered,
            accounts=list(self.accounts),
        )
        # One store per account: its ledger, limits, pace, circuit and stopped flag, under
        # keys that carry its tag. `store` is the default account's.
        self.stores: dict[str, StateStore] = {
            name: open_store(settings, account) for name, account in self.accounts.items()
        }
        if store is not None:
            self.stores[DEFAULT_ACCOUNT] = store
        self.signer = HeaderSigner(header_key(settings))
        self.reply_addresses = ReplyAddresses(settings.reply.address, *reply_token_keys(settings))
        self._acker = Acker(self.telemetry)
        self.settler = Settler(
            self.broker,
            self.stores,
            self._acker,
            self.telemetry,
            self.signer,
            settings.amqp.delivery_limit,
        )
        # Each account's e-mails carry its credentials: its requests are batched apart.
        self._batchers: dict[str, Batcher[Pending]] = {
            name: Batcher(
                partial(self._new_builder, name),
                max_lines=settings.batch.max_lines,
                max_wait=settings.batch.max_wait_ms / 1000,
                high_max_wait=settings.batch.high_max_wait_ms / 1000,
            )
            for name in self.accounts
        }
        self.circuits = dict.fromkeys(self.accounts, CircuitView.closed)
        for name in self.accounts:
            self.telemetry.watch(name, partial(self.circuits.__getitem__, name))
        # High-priority e-mails have SMTP connections of their own: one never waits for a
        # connection busy with bulk.
        self._smtp: dict[bool, GatewaySmtp] = {}
        self._reply_server: asyncio.Server | None = None
        self.imap_replies: ImapReplies | None = None
        self._consumer_tags: dict[tuple[str, Lane], str] = {}
        # Start and stop come from the intake, the submissions, replies and the state
        # watcher: one at a time, or two consumers could be started.
        self._consuming = asyncio.Lock()
        self._inbox: list[Arrival] = []
        self._inbox_ready = asyncio.Event()
        self._intake_idle = asyncio.Event()
        self._intake_idle.set()
        # Request ids in hand, so that a second copy arriving meanwhile is not sent too.
        self._held: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._background: list[asyncio.Task[None]] = []
        self._submit_slots = {
            False: LaneSlots(settings.smtp.connections),
            True: LaneSlots(settings.smtp.high_connections),
        }
        # Submissions under way, by lane.
        self._busy: Counter[Lane] = Counter()
        # Set when a batch was added or a submission ended: the flusher looks again.
        self._flush_wake = asyncio.Event()
        self._submitting: dict[str, asyncio.Future[None]] = {}
        # E-mails whose reply is being handled here: one reply per e-mail at a time.
        self._replies: set[str] = set()
        self._stopped = asyncio.Event()
        self.draining = False
        # Accounts whose credentials the gateway refused (error 2): not consumed.
        self.stopped_accounts: set[str] = set()
        self.state_ok = True

    @property
    def store(self) -> StateStore:
        return self.stores[DEFAULT_ACCOUNT]

    @property
    def account_stopped(self) -> bool:
        """The default account was stopped."""
        return DEFAULT_ACCOUNT in self.stopped_accounts

    @property
    def batched(self) -> int:
        """Requests waiting in open batches, of every account."""
        return sum(len(b) for b in self._batchers.values())

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
        for store in self.stores.values():
            await store.start()
        self.telemetry.metrics.state_up.set(1)
        self._smtp = {
            False: GatewaySmtp(s.smtp),
            True: GatewaySmtp(s.smtp.model_copy(update={"connections": s.smtp.high_connections})),
        }
        if not s.reply.token_key.get_secret_value():
            log.warning(
                "SMSC_REPLY__TOKEN_KEY is empty: the key of the reply address tokens is "
                "derived from the gateway password (set a key of its own to rotate it apart)"
            )
        if s.reply.source == "imap":
            self._start_imap()
        else:
            await self._start_listener()
        await self.broker.connect()
        for loop in (
            self._intake_loop,
            self._flush_when_due,
            self._expire_unanswered,
            self._watch_state,
        ):
            self._background.append(asyncio.create_task(self._keep_running(loop)))
        if self.imap_replies is not None:
            self._background.append(asyncio.create_task(self._keep_running(self.imap_replies.run)))
        for name, store in self.stores.items():
            if await store.account_stopped() is not None:
                self._note_account_stopped(name)
        await self._start_consuming()
        if self.imap_replies is not None:
            where = f"from imap://{s.reply.imap.host}:{s.reply.imap.port}/{s.reply.imap.folder}"
        else:
            where = f"on {s.reply.host}:{self.reply_port}"
        log.info(
            "consuming %s; replies %s",
            ", ".join(s.amqp.queue(lane, name) for name in self.accounts for lane in Lane),
            where,
        )

    def _start_imap(self) -> None:
        s = self.settings
        if s.reply.imap.security == "none":
            log.warning("SMSC_REPLY__IMAP__SECURITY=none: the mailbox password travels in clear")
        if not s.reply.imap.plus_addressing and not s.reply.imap.authserv_id:
            log.warning(
                "SMSC_REPLY__IMAP__INSECURE_BODY_ID_ONLY=true: any message naming a gateway "
                "id in its body is taken for its reply (anyone who knows one can answer)"
            )
        self.imap_replies = ImapReplies(
            s.reply,
            MailJudge(self.reply_addresses, s.reply, s.gateway.address),
            self.apply_reply,
            self._knows_mail,
            self.keep_unreadable_reply,
            self.telemetry.metrics,
        )

    async def _start_listener(self) -> None:
        s = self.settings
        handler = ReplyHandler(
            self.reply_addresses,
            self.on_reply,
            self._knows_mail,
            allowed_networks=parse_networks(s.reply.allowed_networks),
            allowed_senders=parse_senders(s.reply.allowed_senders),
            refused=self.telemetry.metrics.reply_refused,
            body_id_ignored=self.telemetry.metrics.reply_body_id_ignored.inc,
            keep_unreadable=self.keep_unreadable_reply,
        )
        self._reply_server = await serve_smtp(
            handler,
            s.reply.host,
            s.reply.port,
            smtp_class=ReplySMTP,
            limits=ListenerLimits(
                max_message_bytes=s.reply.max_message_bytes,
                max_recipients=s.reply.max_recipients,
                max_sessions=s.reply.max_sessions,
                max_sessions_per_peer=s.reply.max_sessions_per_peer,
                command_timeout_s=s.reply.command_timeout_s,
                session_timeout_s=s.reply.session_timeout_s,
            ),
            tls_context=(
                server_tls_context(s.reply.tls_cert_file, s.reply.tls_key_file)
                if s.reply.tls_cert_file
                else None
            ),
            require_starttls=False,
        )

    @property
    def reply_port(self) -> int:
        assert self._reply_server is not None
        return bound_port(self._reply_server)

    @property
    def ready(self) -> bool:
        """Taking requests for at least one account whose circuit is closed: one stopped
        or paused account does not make the worker unready while others are served."""
        consuming = {name for name, _ in self._consumer_tags}
        return (
            self.broker.is_connected
            and not self.draining
            and self.state_ok
            and any(self.circuits[name] == CircuitView.closed for name in consuming)
            and (self.imap_replies is None or self.imap_replies.healthy(time.time()))
        )

    def stop(self) -> None:
        self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()

    async def _start_consuming(self) -> None:
        """Consume every account that is not stopped and not consumed yet."""
        async with self._consuming:
            if self.draining or not self.state_ok:
                return
            for name in self.accounts:
                if name in self.stopped_accounts:
                    continue
                for lane in Lane:
                    if (name, lane) in self._consumer_tags:
                        continue
                    queue = self.broker.consuming_queue(lane, name)
                    self._consumer_tags[name, lane] = await queue.consume(
                        self.telemetry.consumer(partial(self._on_message, lane, name), queue.name)
                    )

    async def _stop_consuming(self, account: str | None = None) -> None:
        """Stop consuming one account (its requests wait in its queues), or every one."""
        async with self._consuming:
            for name, lane in list(self._consumer_tags):
                if account is not None and name != account:
                    continue
                tag = self._consumer_tags.pop((name, lane))
                try:
                    await self.broker.consuming_queue(lane, name).cancel(tag)
                except Exception as exc:
                    log.warning("could not cancel the %s consumer of %s: %s", lane, name, exc)

    async def drain(self) -> None:
        """Stop taking requests, send what is batched, wait for it, close."""
        self.draining = True
        await self._stop_consuming()
        timeout = self.settings.observability.drain_timeout_s
        deadline = time.monotonic() + timeout
        # Deliveries that arrived before the consumer was cancelled go back to the queue.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(deadline - time.monotonic(), 0)):
                while self._inbox or not self._intake_idle.is_set():
                    self._inbox_ready.set()
                    await asyncio.sleep(0.01)
        while True:
            for batcher in self._batchers.values():
                for batch in batcher.drain():
                    self._launch(batch)
            if not self._tasks:
                break
            _, late = await asyncio.wait(
                set(self._tasks), timeout=max(deadline - time.monotonic(), 0)
            )
            if late:
                for task in late:
                    task.cancel()
                log.error("%d submissions still running after %.0f s", len(late), timeout)
                await asyncio.wait(late, timeout=5)
                break
        await self._await_replies(deadline)
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._reply_server is not None:
            self._reply_server.close()
        for smtp in self._smtp.values():
            await smtp.close()
        await self.broker.close()
        for store in self.stores.values():
            await store.close()
        self._stopped.set()
        log.info("stopped")

    async def _await_replies(self, deadline: float) -> None:
        """A store of this process alone: replies to its e-mails can only be matched here,
        so the receiver stays open for them while the drain time lasts. A shared store lets
        any replica match them."""
        local = [s for s in self.stores.values() if isinstance(s, MemoryStateStore)]
        while self._replies or any([await s.unanswered(time.time()) for s in local]):
            if time.monotonic() >= deadline:
                log.warning("stopping with e-mails still unanswered")
                return
            await asyncio.sleep(0.05)

    @staticmethod
    async def _keep_running(loop: Callable[[], Awaitable[None]]) -> None:
        """A background loop that fails (a bug, a broker call during a reconnect) is logged
        and started again: the intake, the flusher, the sweeper and the state watcher must
        outlive any one error, or the worker would go on looking alive and do nothing."""
        while True:
            try:
                await loop()
                return
            except Exception:
                log.exception("%s failed; starting it again", loop.__name__)
                await asyncio.sleep(1)

    def _launch(self, batch: Batch[Pending]) -> None:
        self._busy[batch.key.lane] += 1
        task = asyncio.create_task(self._submit(batch))
        self._tasks.add(task)
        task.add_done_callback(partial(self._submission_finished, batch.key.lane))

    def _submission_finished(self, lane: Lane, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._busy[lane] -= 1
        self._flush_wake.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("submission failed", exc_info=task.exception())

    # the shared state ------------------------------------------------------------------

    async def _watch_state(self) -> None:
        """Keep this process's claims alive; notice the store going away and coming back,
        the circuit and the account's state as other replicas set them."""
        interval = self.settings.state.owner_ttl_s / 3
        while True:
            try:
                stopped: dict[str, bool] = {}
                for name, store in self.stores.items():
                    await store.heartbeat()
                    self.circuits[name] = await store.circuit()
                    stopped[name] = await store.account_stopped() is not None
                await self.settler.apply_backlog()
            except StateUnavailable as exc:
                self.telemetry.metrics.state_unavailable.labels("heartbeat").inc()
                await self._state_lost(exc)
                await asyncio.sleep(min(interval, 1.0))
                continue
            if not self.state_ok:
                log.warning("the state store answers again: consuming")
                self.state_ok = True
                self.telemetry.metrics.state_up.set(1)
            for name, is_stopped in stopped.items():
                if is_stopped:
                    self._note_account_stopped(name)
                    await self._stop_consuming(name)
                elif name in self.stopped_accounts:
                    # The operator cleared the flag (the credentials were fixed).
                    log.warning("account %s is no longer stopped: consuming it again", name)
                    self.stopped_accounts.discard(name)
            await self._start_consuming()
            await asyncio.sleep(interval)

    async def _state_lost(self, exc: Exception) -> None:
        if self.state_ok:
            log.error("the state store does not answer (%s): consuming paused", exc)
            self.state_ok = False
            self.telemetry.metrics.state_up.set(0)
        await self._stop_consuming()

    def _note_account_stopped(self, account: str) -> None:
        if account not in self.stopped_accounts:
            log.error(
                "ALERT: the gateway refused the credentials of account %s; its sending "
                "stopped, its requests stay queued until the account is fixed and the flag "
                "cleared (other accounts go on)",
                account,
            )
        self.stopped_accounts.add(account)

    # consume -> read -------------------------------------------------------------------

    async def _on_message(self, lane: Lane, account: str, message: AbstractIncomingMessage) -> None:
        try:
            delivery = Delivery.capture(message, lane, account)
        except Exception as exc:
            # Its channel is gone: the broker has requeued it already.
            log.warning("delivery from a closed channel skipped: %s", exc)
            self.telemetry.metrics.settle_skipped.inc()
            return
        self._acker.received(delivery)
        arrival = self._read(delivery)
        if isinstance(arrival.fate, Reject):
            # Logged here, in the request's span and log context; settled with its burst.
            log.warning(
                "rejected request %s: %s (%s)",
                arrival.subject.request_id,
                arrival.fate.reason,
                arrival.fate.code,
            )
        self._inbox.append(arrival)
        self._inbox_ready.set()

    def _read(self, delivery: Delivery) -> Arrival:
        """Everything about a delivery that needs no I/O: its headers, its request, and
        what the gateway needs. Any failure is a rejection with a reason, never an
        exception (one escaping here would leave the delivery unsettled)."""
        try:
            return self._read_delivery(delivery)
        except Exception as exc:
            log.exception("a delivery could not be read")
            return Arrival(
                delivery,
                Subject(delivery, None, delivery.copy, account=delivery.account),
                Reject("unprocessable", f"could not be read: {type(exc).__name__}"),
            )

    def _read_delivery(self, delivery: Delivery) -> Arrival:
        plain = Subject(delivery, None, delivery.copy, account=delivery.account)
        limit = self.settings.amqp.max_body_bytes
        if len(delivery.body) > limit:
            # Not parsed at all, not even for its request id: the size alone decides.
            return Arrival(
                delivery,
                plain,
                Reject(
                    "too_large",
                    f"body is {len(delivery.body)} bytes; a request takes at most {limit} "
                    "(SMSC_AMQP__MAX_BODY_BYTES)",
                ),
            )
        try:
            provenance = self.signer.read(delivery.body, delivery.headers)
        except ForgedHeaders as exc:
            rid = request_id_of(delivery.body)
            return Arrival(
                delivery, replace(plain, request_id=rid), Reject("forged_header", str(exc))
            )
        parsed = read_request(delivery.body)
        if isinstance(parsed, Reject):
            return Arrival(
                delivery, replace(plain, request_id=request_id_of(delivery.body)), parsed
            )
        request = parsed
        self.telemetry.request_known(request.request_id)
        subject = Subject(
            delivery,
            request.request_id,
            delivery.copy,
            recipients=tuple(request.to),
            metadata=request.metadata,
            attempt=provenance.attempt,
            account=delivery.account,
        )
        if request.account is not None and request.account != delivery.account:
            known = request.account in self.accounts
            return Arrival(
                delivery,
                subject,
                Reject(
                    "account_not_allowed" if known else "unknown_account",
                    f"the request names account {request.account!r}, but came from the queue "
                    f"of account {delivery.account!r}: a producer may bill only the account "
                    "whose queue it may publish to"
                    if known
                    else f"the request names account {request.account!r}, which this worker "
                    "does not have",
                ),
            )
        try:
            prepared = prepare(
                request,
                self.accounts[delivery.account].gateway,
                self.settings.default_channel,
                datetime.now(UTC),
                provenance.group,
                delivery.lane,
            )
        except InvalidRequest as exc:
            return Arrival(delivery, subject, Reject(exc.code, exc.message))
        except Exception as exc:
            log.exception("request %s could not be prepared", request.request_id)
            return Arrival(delivery, subject, Reject("unprocessable", type(exc).__name__))
        first_seen = provenance.first_seen or time.time()
        return Arrival(
            delivery, subject, pending=Pending(delivery, prepared, provenance, first_seen)
        )

    # judge -> batch --------------------------------------------------------------------

    async def _intake_loop(self) -> None:
        while True:
            await self._inbox_ready.wait()
            # Moments (small beside the batch window) let the deliveries arriving right
            # behind this one join its burst, for as long as they keep coming: fewer,
            # larger store calls under load, and a wait of one moment when traffic is thin.
            for _ in range(INTAKE_GATHER_STEPS):
                waiting = len(self._inbox)
                if waiting >= INTAKE_BURST:
                    break
                await asyncio.sleep(INTAKE_GATHER_S)
                if len(self._inbox) == waiting:
                    break
            self._inbox_ready.clear()
            if not self._inbox:
                continue
            burst, self._inbox = self._inbox, []
            self._intake_idle.clear()
            try:
                await self._judge(burst)
            finally:
                self._intake_idle.set()

    async def _judge(self, burst: list[Arrival]) -> None:
        """One store call for the burst; then each arrival is settled here or batched."""
        decided: list[tuple[Subject, Fate]] = []
        batched: set[int] = set()
        try:
            waiting: list[Pending] = []
            for arrival in burst:
                pending = arrival.pending
                if arrival.fate is not None:
                    decided.append((arrival.subject, arrival.fate))
                elif self.draining or not self.state_ok:
                    decided.append((arrival.subject, Requeue("not taking requests now")))
                elif pending is not None and pending.request.request_id in self._held:
                    decided.append(
                        (
                            arrival.subject,
                            in_flight(),
                        )
                    )
                elif pending is not None:
                    self._held.add(pending.request.request_id)
                    waiting.append(pending)
            by_account: dict[str, list[Pending]] = {}
            for pending in waiting:
                by_account.setdefault(pending.account, []).append(pending)
            # One store call per account in the burst (each account has its own ledger).
            for account, group in by_account.items():
                await self._judge_account(account, group, decided, batched)
            self._flush_wake.set()
        finally:
            settled = {id(s.delivery) for s, _ in decided} | batched
            for arrival in burst:
                if id(arrival.delivery) not in settled:
                    decided.append((arrival.subject, Requeue("intake interrupted")))
            if decided:
                await asyncio.shield(self.settler.settle(decided))

    async def _judge_account(
        self,
        account: str,
        waiting: list[Pending],
        decided: list[tuple[Subject, Fate]],
        batched: set[int],
    ) -> None:
        try:
            verdicts = await self.stores[account].intake(
                [
                    Intake(
                        p.request.request_id,
                        fingerprint(p.delivery.body),
                        p.prepared.content_key,
                        p.prepared.subscribers,
                        p.delivery.redelivered or p.provenance.in_doubt,
                    )
                    for p in waiting
                ]
            )
        except StateUnavailable as exc:
            self.telemetry.metrics.state_unavailable.labels("intake").inc()
            await self._state_lost(exc)
            for p in waiting:
                self._held.discard(p.request.request_id)
                decided.append((p.subject(claimed=False), Requeue("state unavailable")))
            return
        policy = self.settings.limits.identical_policy
        for pending, verdict in zip(waiting, verdicts, strict=True):
            fate = from_verdict(verdict, policy)
            if fate is not None:
                self._held.discard(pending.request.request_id)
                decided.append((pending.subject(claimed=False), fate))
                continue
            self._batch(pending, decided)
            batched.add(id(pending.delivery))

    def _batch(self, pending: Pending, decided: list[tuple[Subject, Fate]]) -> None:
        try:
            closed = self._batchers[pending.account].add(
                pending.prepared.key, pending.prepared.line, pending, time.monotonic()
            )
        except LineRefused as exc:
            self._held.discard(pending.request.request_id)
            decided.append((pending.subject(), Reject(exc.code, exc.message)))
            closed = exc.closed
        for batch in closed:
            self._launch(batch)

    def _new_builder(self, account: str, key: BatchKey) -> MailBuilder:
        mail_id = new_mail_id()
        return MailBuilder(
            Envelope(
                mail_from=self.reply_from(mail_id),
                gateway_address=self.settings.gateway.address,
                charset=self.settings.gateway.charset,
                text_tags=self.settings.gateway.text_tags,
            ),
            self.accounts[account].credentials,
            mail_id,
            key.options,
            charset=key.charset,
            date=formatdate(localtime=False, usegmt=True),
            message_id=f"<{mail_id}@smsc-worker>",
            limit=self.settings.batch.max_bytes,
        )

    def _may_go(self, key: BatchKey) -> bool:
        """While every SMTP connection of its kind has an e-mail of its lane or a more
        urgent one to send, a due batch would only queue for one: it goes on filling (up to
        its limits) until one is free. E-mails of less urgent lanes do not hold it back:
        it goes before them (`LaneSlots`)."""
        if key.lane == Lane.high:
            return self._busy[Lane.high] < self.settings.smtp.high_connections
        ahead = self._busy[Lane.normal] + (self._busy[Lane.bulk] if key.lane == Lane.bulk else 0)
        return ahead < self.settings.smtp.connections

    async def _flush_when_due(self) -> None:
        while True:
            self._flush_wake.clear()
            deadline = min(
                (
                    d
                    for b in self._batchers.values()
                    if (d := b.next_deadline(self._may_go)) is not None
                ),
                default=None,
            )
            delay = None if deadline is None else deadline - time.monotonic()
            if delay is None or delay > 0:
                # A new batch may be due sooner (a high-priority one), or a connection free.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._flush_wake.wait()
                continue
            for batcher in self._batchers.values():
                for batch in batcher.due(time.monotonic(), self._may_go):
                    self._launch(batch)

    # gate -> submit -> settle ----------------------------------------------------------

    async def _submit(self, batch: Batch[Pending]) -> None:
        live = list(batch.items)
        try:
            with self.telemetry.submission([p.delivery.headers for p in live], batch.opened_at):
                async with self._submit_slots[batch.key.lane == Lane.high].hold(batch.key.lane):
                    await self._send_batch(batch, live)
        finally:
            # Whatever was not settled goes back to the queue: a request whose e-mail may
            # have gone out keeps its ledger state, and its redelivery is answered from it.
            left = [p for p in live if p.request.request_id in self._held]
            if left:
                await asyncio.shield(
                    self._settle(
                        [
                            (
                                p.subject(claimed=not p.sending),
                                Requeue("submission interrupted", may_have_gone=p.sending),
                            )
                            for p in left
                        ]
                    )
                )

    async def _settle(
        self,
        items: Sequence[tuple[Subject, Fate]],
        mails_done: Sequence[str] = (),
        *,
        account: str = DEFAULT_ACCOUNT,
    ) -> None:
        try:
            await self.settler.settle(items, mails_done=mails_done, account=account)
        finally:
            for subject, _ in items:
                if subject.request_id is not None:
                    self._held.discard(subject.request_id)

    async def _send_batch(self, batch: Batch[Pending], live: list[Pending]) -> None:
        now = datetime.now(UTC)
        expired: list[tuple[Subject, Fate]] = []
        for pending in list(live):
            try:
                check_not_expired(pending.request, now)
            except InvalidRequest as exc:
                live.remove(pending)
                expired.append((pending.subject(), Reject(exc.code, exc.message)))
        if expired:
            await self._settle(expired)
        if not live:
            return
        if len(live) < len(batch.items):
            batch = self._rebuild(batch, live)
        gone = await self._pass_gate(batch, live)
        if gone:
            return
        for pending in live:
            pending.sending = True
        mail = batch.builder.build()
        # The gateway may answer before its SMTP server says 250: a reply for this e-mail
        # handled here waits until the outcome of the submission is settled.
        recorded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._submitting[batch.mail_id] = recorded
        try:
            await self._submit_mail(batch, live, mail)
        finally:
            del self._submitting[batch.mail_id]
            recorded.set_result(None)

    async def _pass_gate(self, batch: Batch[Pending], live: list[Pending]) -> bool:
        """Wait for the account, the circuit and the pace, then write the e-mail's record
        and mark its requests `sending`. True when the requests were settled instead."""
        account = live[0].account
        store = self.stores[account]
        waited = 0.0
        limit = self.settings.retry.circuit_max_s
        while True:
            record = MailRecord(
                batch.mail_id,
                tuple(p.carried() for p in live),
                time.time(),
                sms_parts=sum(p.prepared.pace_parts for p in live),
                trace=self.telemetry.carrier(),
                group=live[0].provenance.group,
            )
            try:
                gate = await store.begin_sending(record)
            except StateUnavailable as exc:
                self.telemetry.metrics.state_unavailable.labels("begin_sending").inc()
                await self._state_lost(exc)
                await self._settle([(p.subject(), Requeue("state unavailable")) for p in live])
                return True
            if gate.kind == GateKind.go:
                if gate.probe:
                    self.circuits[account] = CircuitView.half_open
                    log.info(
                        "circuit of %s half-open: e-mail %s is the probe", account, batch.mail_id
                    )
                return False
            if gate.kind == GateKind.stopped:
                self._note_account_stopped(account)
                await self._stop_consuming(account)
                await self._settle([(p.subject(), Requeue("account stopped")) for p in live])
                return True
            if gate.kind == GateKind.lost:
                lost = set(gate.lost)
                gone = [p for p in live if p.request.request_id in lost]
                await self._settle(
                    [
                        (
                            p.subject(claimed=False),
                            in_flight(),
                        )
                        for p in gone
                    ]
                )
                live[:] = [p for p in live if p.request.request_id not in lost]
                if not live:
                    return True
                batch = self._rebuild(batch, live)
                continue
            if gate.reason == "circuit_open":
                self.circuits[account] = CircuitView.open
            # Unacked requests must not wait out pause after pause: past the longest single
            # pause they go back to RabbitMQ (its consumer timeout is 30 min).
            if waited + gate.wait > limit:
                wait = max(gate.wait, self.settings.retry.circuit_base_s)
                await self._settle(
                    [
                        (
                            p.subject(),
                            Later(
                                wait,
                                gate.reason,
                                f"held back {wait:.0f} s: {gate.reason}",
                                refund=True,
                            ),
                        )
                        for p in live
                    ]
                )
                return True
            await asyncio.sleep(gate.wait)
            waited += gate.wait

    async def _submit_mail(self, batch: Batch[Pending], live: list[Pending], mail: bytes) -> None:
        with self.telemetry.smtp(batch.mail_id, len(live), len(mail), live[0].account) as smtp_call:
            result = await self._smtp[batch.key.lane == Lane.high].submit(
                self.reply_from(batch.mail_id),
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
        items, mails_done = self._after_smtp(result, batch.mail_id, live)
        await self._settle(items, mails_done, account=live[0].account)

    def reply_from(self, mail_id: str) -> str:
        """The From of e-mail `mail_id`: its reply address with its token, or the bare
        address for a mailbox without plus-addressing (its replies matched by body ID)."""
        reply = self.settings.reply
        if reply.source == "imap" and not reply.imap.plus_addressing:
            return reply.address
        return self.reply_addresses.address(mail_id)

    def _after_smtp(
        self, result: SubmitResult, mail_id: str, live: list[Pending]
    ) -> tuple[list[tuple[Subject, Fate]], list[str]]:
        fate = after_submission(result, mail_id)
        if fate is not None and not isinstance(fate, Fail):
            return [(p.subject(), fate) for p in live], []
        now = time.time()
        items: list[tuple[Subject, Fate]] = []
        for pending in live:
            subject = pending.subject()
            items.append(
                (
                    subject,
                    fate
                    or give_up_or_later(
                        subject, pending.request.expires_at, self.settings.retry, now, result.detail
                    ),
                )
            )
        # Certainly not sent: the e-mail's record goes.
        return items, [mail_id]

    def _rebuild(self, batch: Batch[Pending], live: list[Pending]) -> Batch[Pending]:
        rebuilt: Batch[Pending] = Batch(
            batch.key, self._new_builder(live[0].account, batch.key), batch.opened_at
        )
        for pending in live:
            rebuilt.builder.try_add(pending.prepared.line)
            rebuilt.items.append(pending)
        return rebuilt

    # replies -------------------------------------------------------------------------

    async def on_reply(self, mail_id: str, reply: Reply) -> None:
        """Turn the gateway's answer to one e-mail into fates, and settle them. Raises when
        they could not be settled, so that the reply is sent again. Only the reply receiver
        calls it, for an e-mail whose reply address verified (its token): that is what lets
        errors 2 and 4 stop or pause the whole account."""
        await self.apply_reply(mail_id, reply)

    async def apply_reply(self, mail_id: str, reply: Reply) -> ReplyOutcome:
        """`on_reply`, saying what became of the reply: a mailbox files it by that."""
        if mail_id in self._replies:
            raise MailBusy(f"a reply to e-mail {mail_id} is being handled")
        self._replies.add(mail_id)
        try:
            submitting = self._submitting.get(mail_id)
            if submitting is not None:
                await asyncio.shield(submitting)
            found = await self._take_mail(mail_id)
            if found is None:
                if await self._mail_replied(mail_id):
                    log.info("reply to e-mail %s applied already: nothing to change", mail_id)
                    return ReplyOutcome.applied_before
                log.warning("reply for unknown or already answered e-mail %s: %s", mail_id, reply)
                return ReplyOutcome.unknown_mail
            account, record = found
            try:
                with self.telemetry.reply(record, reply, account):
                    await self._apply_reply(account, record, reply)
            except Exception:
                with contextlib.suppress(StateUnavailable):
                    await self.stores[account].give_back_mail(mail_id)
                raise
            return ReplyOutcome.applied
        finally:
            self._replies.discard(mail_id)

    async def _take_mail(self, mail_id: str) -> tuple[str, MailRecord] | None:
        """An e-mail's record and its account. The reply address names the e-mail, not its
        account: each account's store is asked (a mail id is random, so at most one holds
        it), which works whichever replica sent the e-mail and whichever gets the reply."""
        for account, store in self.stores.items():
            record = await store.take_mail(mail_id)
            if record is not None:
                return account, record
        return None

    async def _any_store(self, ask: Callable[[StateStore], Awaitable[bool]]) -> bool:
        """Whether some account's store says yes (an e-mail is in exactly one of them)."""
        for store in self.stores.values():
            if await ask(store):
                return True
        return False

    async def _knows_mail(self, mail_id: str) -> bool:
        return await self._any_store(lambda store: store.knows_mail(mail_id))

    async def _mail_replied(self, mail_id: str) -> bool:
        """Whether some account's ledger has the reply to this e-mail applied already."""
        return await self._any_store(lambda store: store.mail_replied(mail_id))

    async def keep_unreadable_reply(self, copy: UnreadableCopy) -> None:
        """A reply with no answer that can be read: its raw bytes, the secrets and address
        tokens masked, go to the dead letters (`x-smsc-error-code: unreadable_reply`),
        counted and logged once. Its e-mail keeps its record: with no readable reply, it
        ends `unknown` (`no_reply`) when the reply timeout passes. Raises when the copy was
        not confirmed, so that the reply is sent again."""
        tokens = [t for token in copy.tokens for t in (token, token.upper())]
        raw = masked_mail(copy.raw, [*self.telemetry.mask.secrets, *tokens])
        kept = RequestCopy(
            body=raw,
            headers={GATEWAY_ID_HEADER: ",".join(copy.mail_ids)},
            message_id=uuid.uuid4().hex,
            content_type="message/rfc822",
        )
        reason = f"unreadable gateway reply from {copy.sender}: {copy.reason}"
        await self.broker.publish(dead_letters=[(kept, UNREADABLE_REPLY, reason)])
        self.telemetry.metrics.replies_unreadable.inc()
        log.error(
            "%s (to e-mail %s); a copy, secrets masked, is in the dead letters",
            reason,
            ", ".join(copy.mail_ids) or "?",
        )

    async def _apply_reply(self, account: str, record: MailRecord, reply: Reply) -> None:
        store = self.stores[account]
        subjects = [Subject.of_carried(c, record.group) for c in record.requests]
        if isinstance(reply, AcceptedReply):
            await store.close_circuit()
            if self.circuits[account] != CircuitView.closed:
                log.info("circuit of %s closed", account)
            self.circuits[account] = CircuitView.closed
            self._compare_parts(record, reply)
            await self._note_split(store, record, reply)
            fates: Iterable[Fate] = [Accepted(record.mail_id)] * len(subjects)
        else:
            split, notes = await self._note_split(store, record, reply)
            plan = after_error(
                reply,
                record.mail_id,
                len(subjects),
                self.settings.limits.identical_window_s,
                split,
                notes,
            )
            log.warning(
                "e-mail %s: gateway error %s -> %s",
                record.mail_id,
                int(reply.error),
                reply.action.value,
            )
            fates = plan.fates
            if plan.circuit:
                funds = self.settings.retry.funds_pause_s if plan.circuit == "funds" else None
                text = f"gateway error {int(reply.error)}: {reply.description}"
                # Funds are the account's own; a blocked IP is every account's that sends
                # from it, and every account of this worker does.
                paused = [account] if funds is not None else list(self.stores)
                pause = 0.0
                for name in paused:
                    chosen = await self.stores[name].open_circuit(text, funds)
                    self.circuits[name] = CircuitView.open
                    log.warning("circuit of %s open for %.0f s: %s", name, chosen, text)
                    if name == account:
                        pause = chosen
                fates = [replace(f, wait=pause) if isinstance(f, Later) else f for f in fates]
            if plan.stop_account:
                await store.stop_account(reply.description or "credentials refused")
                self._note_account_stopped(account)
                await self._stop_consuming(account)
        await self.settler.settle(
            list(zip(subjects, fates, strict=True)),
            mails_done=[record.mail_id],
            account=account,
            replied=True,
        )

    async def _note_split(
        self, store: StateStore, record: MailRecord, reply: Reply
    ) -> tuple[Split | None, SplitNotes | None]:
        """For an e-mail of a split, or one refused for an error one line can cause: count
        its answer in the split (any replica may have sent its other e-mails) and, for a
        failure, whether it may be halved."""
        failed = isinstance(reply, Rejected)
        if isinstance(reply, Rejected) and (
            reply.action != Action.find_bad_line or len(record.requests) == 1
        ):
            return None, None
        split = Split.of(record.group, record.mail_id, len(record.requests))
        if not failed and not split.path:
            return None, None
        notes = await store.note_split(
            split.root,
            failed=failed,
            allowance=split.allowance,
            ttl=self.settings.limits.dedup_ttl_s,
        )
        return split, notes

    def _compare_parts(self, record: MailRecord, reply: AcceptedReply) -> None:
        """`OK - n SMS` against the parts the worker counted for the e-mail (parts times
        recipients, summed): a difference is logged and counted, and the requests are still
        accepted (the gateway has taken them; its count is what it charges). An e-mail with
        a request whose count is unknown (not an SMS, or a `G<n>` group) is not compared:
        any n could be right."""
        counts = [sms_count(r.sms_parts, r.recipients) for r in record.requests]
        expected = None if None in counts else sum(c or 0 for c in counts)
        if expected is not None and reply.sms_count != expected:
            self.telemetry.metrics.reply_parts_mismatch.inc()
            log.warning(
                "e-mail %s: the gateway counted %d SMS, the worker expected %d",
                record.mail_id,
                reply.sms_count,
                expected,
            )

    async def _expire_unanswered(self) -> None:
        """A reply that never comes must not keep a record forever, nor its requests
        `submitted`: an e-mail the gateway took (SMTP 250) ends `unknown` (`no_reply`); one
        whose SMTP session broke is reported `failed` (`outcome_unknown`). Neither is
        resent, since it may have gone out."""
        timeout = self.settings.reply.timeout_s
        while True:
            await asyncio.sleep(min(timeout / 4, 60))
            try:
                for account, store in self.stores.items():
                    stale = await store.unanswered(time.time() - timeout)
                    for mail_id in stale:
                        await self._expire(account, mail_id, waited_s=timeout)
            except StateUnavailable:
                self.telemetry.metrics.state_unavailable.labels("sweep").inc()
            except Exception:
                log.exception("sweeping unanswered e-mails failed")

    async def _expire(self, account: str, mail_id: str, waited_s: float) -> None:
        store = self.stores[account]
        try:
            record = await store.take_mail(mail_id)
        except MailBusy:
            return
        if record is None:
            return
        fate: Fate
        if not record.outcome_unknown:
            # The gateway took the e-mail (SMTP 250) and never answered: whether it sent
            # the messages nobody can tell, so the requests end `unknown`, never resent.
            message = (
                f"the gateway did not answer within {waited_s:.0f} s; the message may or "
                "may not have been delivered"
            )
            log.warning("no reply to e-mail %s: %s", mail_id, message)
            fate = Unknown(NO_REPLY, message, mail_id=mail_id, final=True)
        else:
            message = (
                f"no reply to e-mail {mail_id} within {waited_s:.0f} s after its SMTP "
                "session broke; it may or may not have been sent, and is not resent"
            )
            log.error(message)
            fate = Fail("outcome_unknown", message, mail_id=mail_id)
        try:
            await self.settler.settle(
                [(Subject.of_carried(c), fate) for c in record.requests],
                mails_done=[mail_id],
                account=account,
            )
        except Exception:
            log.exception("could not report the end of e-mail %s", mail_id)
            await store.give_back_mail(mail_id)
