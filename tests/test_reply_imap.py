"""Replies read from a mailbox over IMAP, against the real Dovecots of `scripts/ensure-dovecot`:
the full one (IMAP on 10143, implicit TLS on 10993, LMTP on 10024) and the basic one on the
same mail (IMAP on 10144, implicit TLS on 10994), which offers no IDLE, MOVE or UIDPLUS, so
the worker polls and moves with COPY, \\Deleted and EXPUNGE there. The tests where those paths
matter run against both. Mail reaches the mailbox the way an MTA delivers it, over LMTP: from
the emulator itself, or from the test. Each test has a mailbox user of its own, deleted
afterwards."""

from __future__ import annotations

import asyncio
import imaplib
import shutil
import signal
import smtplib
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from pydantic import SecretStr, ValidationError

from tests.conftest import Broker, Results, collecting, free_port, make_settings, phone
from tests.test_faults import TcpProxy, WorkerProcess, worker_env
from worker.contract import Status
from worker.emulator.config import EmulatorConfig
from worker.emulator.server import Emulator
from worker.reply_imap import Mailbox as WorkerMailbox
from worker.reply_imap import authenticated_domains
from worker.service import Service
from worker.settings import (
    AmqpSettings,
    BatchSettings,
    ImapSettings,
    ReplySettings,
    Settings,
    StateSettings,
)
from worker.smtp_server import bound_port, serve_smtp

DOVECOT_DIR = Path("/var/lib/smsc-dovecot")
IMAP_PORT = 10143
IMAPS_PORT = 10993
LMTP_PORT = 10024
BASIC_IMAP_PORT = 10144
BASIC_IMAPS_PORT = 10994
PASSWORD = "smsc-test"  # the local test server's, for every user
GATEWAY = "send@send.smscentre.com"
PROCESSED = "done"
NOT_REPLIES = "not-replies"
# Where the server has no IDLE the worker reads the folder this often.
POLL_S = 2


@dataclass(frozen=True)
class Server:
    """One of the two Dovecots, both over the same mail."""

    name: str
    imap_port: int
    imaps_port: int


FULL = Server("full", IMAP_PORT, IMAPS_PORT)
BASIC = Server("basic", BASIC_IMAP_PORT, BASIC_IMAPS_PORT)  # no IDLE, MOVE, UIDPLUS
BOTH_SERVERS = pytest.mark.parametrize("server", [FULL, BASIC], ids=lambda s: s.name)


class Mailbox:
    """A mailbox user of the test's own on the local Dovecot: delivery over LMTP, and a look
    at its folders over IMAP (the standard library's client, in a thread)."""

    def __init__(self) -> None:
        self.user = f"t{uuid.uuid4().hex[:12]}"
        self.address = f"{self.user}@worker.test"

    def imap(self, port: int = IMAP_PORT, **overrides: Any) -> ImapSettings:
        values: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": port,
            "security": "none",
            "user": self.user,
            "password": SecretStr(PASSWORD),
            "processed_folder": PROCESSED,
            "not_reply_folder": NOT_REPLIES,
            "poll_interval_s": POLL_S,
            "timeout_s": 5,
            "reconnect_max_s": 1,
        }
        values.update(overrides)
        return ImapSettings(**values)

    def reply_settings(self, port: int = IMAP_PORT, **overrides: Any) -> ReplySettings:
        return ReplySettings(source="imap", address=self.address, imap=self.imap(port, **overrides))

    async def deliver(self, raw: bytes, to: str, sender: str = GATEWAY) -> None:
        def send() -> None:
            with smtplib.LMTP("127.0.0.1", LMTP_PORT) as client:
                client.sendmail(sender, [to], raw)

        await asyncio.to_thread(send)

    async def folder(self, name: str) -> list[bytes]:
        """The messages of a folder, oldest first ([] when it does not exist yet)."""

        def read() -> list[bytes]:
            with imaplib.IMAP4("127.0.0.1", IMAP_PORT) as client:
                client.login(self.user, PASSWORD)
                status, _ = client.select(f'"{name}"', readonly=True)
                if status != "OK":
                    return []
                _, found = client.uid("search", "ALL")
                messages = []
                for uid in found[0].split():
                    _, data = client.uid("fetch", uid, "(BODY.PEEK[])")
                    part = data[0]
                    # The worker may move a message away between SEARCH and FETCH: it is
                    # no longer in this folder.
                    if isinstance(part, tuple):
                        messages.append(part[1])
                return messages

        return await asyncio.to_thread(read)

    async def wait_for(self, counts: dict[str, int], timeout: float = 30) -> None:
        """Until each folder holds exactly so many messages."""
        got: dict[str, int] = {}
        try:
            async with asyncio.timeout(timeout):
                while got != counts:
                    await asyncio.sleep(0.1)
                    got = {name: len(await self.folder(name)) for name in counts}
        except TimeoutError:
            raise AssertionError(f"folders hold {got}, not {counts}") from None

    def delete(self) -> None:
        shutil.rmtree(DOVECOT_DIR / "mail" / self.user, ignore_errors=True)


@pytest.fixture
def mailbox() -> Iterable[Mailbox]:
    box = Mailbox()
    yield box
    box.delete()


class HeldReplies:
    """An MTA in front of the mailbox that keeps what it is given until told to deliver it
    (over LMTP): replies that arrive while no worker runs."""

    def __init__(self, mailbox: Mailbox) -> None:
        self.mailbox = mailbox
        self.held: list[tuple[str, list[str], bytes]] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        self.held.append((str(envelope.mail_from), list(envelope.rcpt_tos), content))
        return "250 OK held"

    async def deliver(self) -> None:
        for sender, recipients, content in self.held:
            for to in recipients:
                await self.mailbox.deliver(content, to, sender)
        self.held.clear()

    async def __aenter__(self) -> HeldReplies:
        self._server = await serve_smtp(self, "127.0.0.1", 0)
        self.port = bound_port(self._server)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()


def to_mailbox(**config: Any) -> EmulatorConfig:
    """A gateway whose replies are delivered into the local Dovecot over LMTP."""
    return EmulatorConfig(reply_relay=("127.0.0.1", LMTP_PORT), reply_lmtp=True, **config)


def imap_settings(
    amqp: AmqpSettings, smtp_port: int, reply: ReplySettings, **groups: Any
) -> Settings:
    return make_settings(amqp, 0, smtp_port, **groups).model_copy(update={"reply": reply})


async def until(condition: Callable[[], bool], timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.05)


def final_events(results: Results, ids: Iterable[str]) -> Counter[tuple[str, Status]]:
    return Counter(
        (e.request_id or "", e.status)
        for e in results.events
        if e.request_id in set(ids) and e.status in (Status.accepted, Status.failed)
    )


def gateway_reply(to: str, body: str, *headers: str) -> bytes:
    message = EmailMessage()
    message["From"] = GATEWAY
    message["To"] = to
    message["Subject"] = "Re: SMS"
    for header in headers:
        name, _, value = header.partition(": ")
        message[name] = value
    message.set_content(body)
    return message.as_bytes()


def bounce(to: str, original_to: str) -> bytes:
    message = EmailMessage()
    message["From"] = "MAILER-DAEMON@mx.worker.test"
    message["To"] = to
    message["Subject"] = "Undelivered Mail Returned to Sender"
    message.set_content(f"This is the mail system. Your message to <{original_to}> bounced.")
    message.add_attachment(
        f"Reporting-MTA: dns; mx.worker.test\n\nFinal-Recipient: rfc822; {original_to}\n"
        "Action: failed\nStatus: 5.1.1\n",
        subtype="delivery-status",
    )
    message.replace_header("Content-Type", 'multipart/report; report-type="delivery-status"')
    return message.as_bytes()


async def ready(service: Service) -> None:
    await until(lambda: service.ready)


async def reading_worker(
    stack: AsyncExitStack, amqp: AmqpSettings, gateway: EmulatorConfig, reply: ReplySettings
) -> tuple[Emulator, Broker, Results, Service]:
    """On `stack`: the emulator, a results collector, and a worker reading its replies as
    `reply` says, ready."""
    emulator = await stack.enter_async_context(Emulator(gateway))
    broker, results = await stack.enter_async_context(collecting(amqp))
    service = await stack.enter_async_context(Service(imap_settings(amqp, emulator.port, reply)))
    await ready(service)
    return emulator, broker, results, service


class ImapProxy(TcpProxy):
    """A proxy to a Dovecot that watches what its client sends. It goes down (every
    connection cut, new ones refused) the moment the client sends `cut_at`; and it can hold
    what the client sends (`hold`, or the moment the client sends `hold_at`) until `release`,
    keeping what the client sent from then on in `sent_since_hold`."""

    def __init__(self, port: int, cut_at: bytes = b"", hold_at: bytes = b"") -> None:
        super().__init__(port)
        self.cut_at = cut_at
        self.hold_at = hold_at
        self.cut = asyncio.Event()
        self.held = asyncio.Event()
        self.sent_since_hold = bytearray()
        self._open = asyncio.Event()
        self._open.set()

    def hold(self) -> None:
        self._open.clear()
        self.held.set()
        self.sent_since_hold.clear()

    def release(self) -> None:
        self.hold_at = b""
        self._open.set()

    def down(self) -> None:
        self.release()  # what is held goes with its connection
        super().down()

    async def _passing(self, data: bytes, from_client: bool) -> bool:
        if not from_client:
            return True
        if self.cut_at and self.cut_at in data.upper():
            self.cut.set()
            self.down()
            return False
        if self.hold_at and self.hold_at in data.upper():
            self.hold()
        await self._open.wait()
        self.sent_since_hold += data
        return True


# 1. the two servers --------------------------------------------------------------------------


@BOTH_SERVERS
async def test_the_worker_finds_idle_move_and_uidplus_on_the_full_server_only(
    mailbox: Mailbox, server: Server
) -> None:
    """So the basic server's tests take the fallbacks: what the worker reads after login."""
    reader = WorkerMailbox(mailbox.imap(server.imap_port))
    try:
        await reader.open()
        offered = {name: reader.client.has_capability(name) for name in ("IDLE", "MOVE", "UIDPLUS")}
    finally:
        reader.close()
    assert offered == dict.fromkeys(("IDLE", "MOVE", "UIDPLUS"), server == FULL)


# 2. replies, over TLS ------------------------------------------------------------------------


@BOTH_SERVERS
async def test_replies_in_the_mailbox_become_accepted_and_failed_events(
    amqp: AmqpSettings, mailbox: Mailbox, server: Server
) -> None:
    # On the basic server the second reply arrives while the worker waits: only a poll finds it.
    reply = mailbox.reply_settings(
        server.imaps_port, security="tls", ca_file=str(DOVECOT_DIR / "tls" / "cert.pem")
    )
    async with AsyncExitStack() as stack:
        _, broker, results, service = await reading_worker(
            stack, amqp, to_mailbox(denied_words=frozenset({"casino"})), reply
        )
        await broker.publish({"request_id": "good", "to": phone(1), "text": "hello"})
        await results.wait_until(lambda: Status.accepted in results.statuses("good"))
        await broker.publish({"request_id": "bad", "to": phone(2), "text": "casino tonight"})
        await results.wait_until(lambda: Status.failed in results.statuses("bad"))
        await mailbox.wait_for({"INBOX": 0, PROCESSED: 2, NOT_REPLIES: 0})
        metrics = service.telemetry.metrics
        assert metrics.imap_replies._value.get() == 2
        assert metrics.imap_connected._value.get() == 1
        assert metrics.imap_last_poll._value.get() > 0
        assert service.ready

    assert final_events(results, ["good", "bad"]) == {
        ("good", Status.accepted): 1,
        ("bad", Status.failed): 1,
    }
    failed = results.with_status(Status.failed)[0]
    assert failed.error is not None and failed.error.gateway_error == 6


# 3. a reply that arrives while the worker waits, or while it reads ---------------------------


@BOTH_SERVERS
async def test_a_reply_delivered_while_the_worker_waits_is_read_at_its_next_look(
    amqp: AmqpSettings, mailbox: Mailbox, server: Server
) -> None:
    """With IDLE the server tells at once; without, the next poll reads it, not the one after."""
    async with AsyncExitStack() as stack:
        proxy = await stack.enter_async_context(ImapProxy(server.imap_port))
        _, broker, results, service = await reading_worker(
            stack, amqp, EmulatorConfig(), mailbox.reply_settings(proxy.port)
        )
        await broker.publish({"request_id": "next", "to": phone(8), "text": "hi"})
        await results.wait_until(lambda: Status.submitted in results.statuses("next"))
        mail_id = results.of("next")[0].gateway_id
        assert mail_id is not None
        address = service.reply_from(mail_id)
        metrics = service.telemetry.metrics

        def last_read() -> float:
            return float(metrics.imap_last_poll._value.get())

        before = last_read()
        await until(lambda: last_read() > before)
        # A read has just ended and the worker waits (this check runs on its loop, long before
        # its poll is due): whatever it sends next reaches the server after the reply.
        proxy.hold()
        before = last_read()
        await mailbox.deliver(gateway_reply(address, f"OK - 1 SMS, ID - {mail_id}"), address)
        proxy.release()
        await until(lambda: last_read() > before)
        # The reply is applied before the read that found it ends: that is the first one.
        assert metrics.imap_replies._value.get() == 1
        await results.wait_until(lambda: Status.accepted in results.statuses("next"))
        await mailbox.wait_for({"INBOX": 0, PROCESSED: 1, NOT_REPLIES: 0})


@BOTH_SERVERS
async def test_a_reply_delivered_while_the_folder_is_read_is_read_before_the_worker_waits(
    amqp: AmqpSettings, mailbox: Mailbox, server: Server
) -> None:
    """The server reports mail that arrives during a read in that read's answers, so an IDLE
    after it does not report it again: the worker reads the folder again before waiting."""
    async with AsyncExitStack() as stack:
        proxy = await stack.enter_async_context(ImapProxy(server.imap_port))
        # Far longer than the test waits: only a read before the wait finds the second reply.
        # A long deadline too, so the worker held below does not give up and connect again.
        reply = mailbox.reply_settings(proxy.port, poll_interval_s=600, timeout_s=30)
        _, broker, results, service = await reading_worker(stack, amqp, EmulatorConfig(), reply)
        addresses = []
        for n, request_id in enumerate(("first", "second"), 1):
            await broker.publish({"request_id": request_id, "to": phone(n), "text": "hi"})
            await results.wait_until(lambda r=request_id: Status.submitted in results.statuses(r))
            mail_id = results.of(request_id)[0].gateway_id
            assert mail_id is not None
            addresses.append((service.reply_from(mail_id), mail_id))
        metrics = service.telemetry.metrics
        # The worker reads the folder as it connects again; it is held fetching the first reply.
        proxy.down()
        await until(lambda: metrics.imap_connected._value.get() == 0)
        for address, mail_id in addresses[:1]:
            await mailbox.deliver(gateway_reply(address, f"OK - 1 SMS, ID - {mail_id}"), address)
        proxy.hold_at = b"BODY.PEEK"
        proxy.restore()
        await asyncio.wait_for(proxy.held.wait(), 30)
        for address, mail_id in addresses[1:]:
            await mailbox.deliver(gateway_reply(address, f"OK - 1 SMS, ID - {mail_id}"), address)
        proxy.release()
        await results.wait_until(
            lambda: all(Status.accepted in results.statuses(r) for r in ("first", "second"))
        )
        await mailbox.wait_for({"INBOX": 0, PROCESSED: 2, NOT_REPLIES: 0})
        assert metrics.imap_replies._value.get() == 2
        # The second was read before the worker waited or connected again, not after a wait
        # that ended for another reason: Dovecot's "* OK Still here" ends an IDLE as news would.
        fetches = bytes(proxy.sent_since_hold).split(b"BODY.PEEK")
        between = fetches[1] if len(fetches) > 2 else b""
        assert between, fetches
        assert not any(c in between for c in (b"IDLE", b"NOOP", b"SELECT")), fetches


# 4. a reply that arrives while no worker runs ---------------------------------------------


async def test_a_reply_that_arrives_while_the_worker_is_down_is_applied_after_it_starts(
    amqp: AmqpSettings, shared_state: StateSettings, mailbox: Mailbox
) -> None:
    async with AsyncExitStack() as stack:
        mta = await stack.enter_async_context(HeldReplies(mailbox))
        emulator = await stack.enter_async_context(
            Emulator(EmulatorConfig(reply_relay=("127.0.0.1", mta.port)))
        )
        broker, results = await stack.enter_async_context(collecting(amqp))
        settings = imap_settings(amqp, emulator.port, mailbox.reply_settings(), state=shared_state)
        async with Service(settings) as first:
            await ready(first)
            await broker.publish({"request_id": "late", "to": phone(3), "text": "later"})
            await results.wait_until(lambda: Status.submitted in results.statuses("late"))
            await until(lambda: len(mta.held) == 1)
        # No worker runs: the reply reaches the mailbox now.
        await mta.deliver()
        await mailbox.wait_for({"INBOX": 1})
        assert Status.accepted not in results.statuses("late")

        async with Service(settings) as second:
            await results.wait_until(lambda: Status.accepted in results.statuses("late"))
            await mailbox.wait_for({"INBOX": 0, PROCESSED: 1})
            assert second.telemetry.metrics.imap_replies._value.get() == 1

    assert final_events(results, ["late"]) == {("late", Status.accepted): 1}


# 5. killed between settling and moving ----------------------------------------------------


@pytest.mark.parametrize(
    ("server", "cut_at", "left"),
    [
        # The full server moves in one command: cut there, the reply is in the folder still.
        (FULL, b"UID MOVE", {"INBOX": 1, PROCESSED: 0}),
        # The basic one copies, flags \Deleted, expunges: cut before the copy, and before the
        # expunge (copied already, flagged, still in the folder: it must not be copied again).
        (BASIC, b"UID COPY", {"INBOX": 1, PROCESSED: 0}),
        (BASIC, b"EXPUNGE", {"INBOX": 1, PROCESSED: 1}),
    ],
    ids=["full-move", "basic-copy", "basic-expunge"],
)
@pytest.mark.timeout(120)
async def test_a_worker_killed_between_settling_and_moving_does_not_apply_the_reply_twice(
    amqp: AmqpSettings,
    shared_state: StateSettings,
    mailbox: Mailbox,
    server: Server,
    cut_at: bytes,
    left: dict[str, int],
) -> None:
    ids = [f"k{n}" for n in range(3)]
    async with AsyncExitStack() as stack:
        proxy = await stack.enter_async_context(ImapProxy(server.imap_port, cut_at=cut_at))
        emulator = await stack.enter_async_context(Emulator(to_mailbox()))
        broker, results = await stack.enter_async_context(collecting(amqp))
        env = worker_env(amqp, shared_state, emulator.port, free_port(), "imap-kill")
        env.update(
            SMSC_REPLY__SOURCE="imap",
            SMSC_REPLY__ADDRESS=mailbox.address,
            SMSC_REPLY__IMAP__HOST="127.0.0.1",
            SMSC_REPLY__IMAP__PORT=str(proxy.port),
            SMSC_REPLY__IMAP__SECURITY="none",
            SMSC_REPLY__IMAP__USER=mailbox.user,
            SMSC_REPLY__IMAP__PASSWORD=PASSWORD,
            SMSC_REPLY__IMAP__PROCESSED_FOLDER=PROCESSED,
            SMSC_REPLY__IMAP__NOT_REPLY_FOLDER=NOT_REPLIES,
            SMSC_REPLY__IMAP__POLL_INTERVAL_S=str(POLL_S),
            SMSC_BATCH__MAX_WAIT_MS="200",
        )
        worker = WorkerProcess(env)
        stack.push_async_callback(worker.kill_if_running)
        await worker.start()
        for n, request_id in enumerate(ids):
            await broker.publish({"request_id": request_id, "to": phone(10 + n), "text": "once"})
        await results.wait_until(
            lambda: all(Status.accepted in results.statuses(r) for r in ids), 60
        )
        await asyncio.wait_for(proxy.cut.wait(), 30)
        assert worker.process is not None
        worker.process.send_signal(signal.SIGKILL)
        await worker.process.wait()
        # Settled (events confirmed, requests answered), never moved, or moved only in part.
        await mailbox.wait_for(left)

        settings = imap_settings(
            amqp, emulator.port, mailbox.reply_settings(server.imap_port), state=shared_state
        )
        async with Service(settings) as restarted:
            await mailbox.wait_for({"INBOX": 0, PROCESSED: 1, NOT_REPLIES: 0})
            assert restarted.telemetry.metrics.imap_replies._value.get() == 0

    assert final_events(results, ids) == {(r, Status.accepted): 1 for r in ids}
    accepted = [e.event_id for e in results.with_status(Status.accepted)]
    assert len(accepted) == len(set(accepted)) == len(ids)


# 6. two replicas on one mailbox ------------------------------------------------------------


@BOTH_SERVERS
@pytest.mark.timeout(120)
async def test_two_replicas_reading_one_mailbox_apply_each_reply_once(
    amqp: AmqpSettings, shared_state: StateSettings, mailbox: Mailbox, server: Server
) -> None:
    ids = [f"two-{n}" for n in range(24)]
    async with AsyncExitStack() as stack:
        emulator = await stack.enter_async_context(Emulator(to_mailbox()))
        broker, results = await stack.enter_async_context(collecting(amqp))
        services = [
            await stack.enter_async_context(
                Service(
                    imap_settings(
                        amqp,
                        emulator.port,
                        mailbox.reply_settings(server.imap_port),
                        state=shared_state,
                        batch=BatchSettings(max_lines=2, max_wait_ms=30),
                    )
                )
            )
            for _ in range(2)
        ]
        for service in services:
            await ready(service)
        for n, request_id in enumerate(ids):
            await broker.publish({"request_id": request_id, "to": phone(100 + n), "text": "x"})
        await results.wait_until(
            lambda: all(Status.accepted in results.statuses(r) for r in ids), 60
        )
        sent = len(emulator.mails)
        await mailbox.wait_for({"INBOX": 0, PROCESSED: sent, NOT_REPLIES: 0})
        applied = [s.telemetry.metrics.imap_replies._value.get() for s in services]

    assert sum(applied) == sent
    assert final_events(results, ids) == {(r, Status.accepted): 1 for r in ids}


# 7. bounces and forged replies -------------------------------------------------------------


@BOTH_SERVERS
async def test_a_bounce_and_a_forged_reply_go_to_the_not_a_reply_folder_and_change_nothing(
    amqp: AmqpSettings, mailbox: Mailbox, server: Server
) -> None:
    async with AsyncExitStack() as stack:
        # No replies from this gateway: the test writes them.
        _, broker, results, service = await reading_worker(
            stack, amqp, EmulatorConfig(), mailbox.reply_settings(server.imap_port)
        )
        await broker.publish({"request_id": "target", "to": phone(5), "text": "hi"})
        await results.wait_until(lambda: Status.submitted in results.statuses("target"))
        mail_id = results.of("target")[0].gateway_id
        assert mail_id is not None
        genuine = service.reply_from(mail_id)
        local, _, domain = mailbox.address.partition("@")
        forged_to = f"{local}+{mail_id}.{'a' * 16}@{domain}"

        await mailbox.deliver(bounce(genuine, "send@send.smscentre.com"), genuine, "")
        await mailbox.deliver(
            gateway_reply(forged_to, f"ERROR = 2 (bad login), ID - {mail_id}"), forged_to
        )
        await mailbox.deliver(
            gateway_reply(mailbox.address, "ERROR = 2 (bad login)"), mailbox.address
        )
        await mailbox.wait_for({"INBOX": 0, NOT_REPLIES: 3, PROCESSED: 0})
        metrics = service.telemetry.metrics
        polled = metrics.imap_last_poll._value.get()
        # Read again at the next poll? No: they are out of the folder, counted once.
        await until(lambda: metrics.imap_last_poll._value.get() > polled)
        assert metrics.imap_not_replies.labels("bounce")._value.get() == 1
        assert metrics.imap_not_replies.labels("token")._value.get() == 1
        assert metrics.imap_not_replies.labels("address")._value.get() == 1
        assert metrics.replies_refused.labels("token")._value.get() == 1
        assert not service.account_stopped
        assert results.statuses("target") == [Status.submitted]

        # The genuine reply still counts.
        await mailbox.deliver(gateway_reply(genuine, f"OK - 1 SMS, ID - {mail_id}"), genuine)
        await results.wait_until(lambda: Status.accepted in results.statuses("target"))
        await mailbox.wait_for({"INBOX": 0, NOT_REPLIES: 3, PROCESSED: 1})


async def test_the_address_decides_over_the_body_as_with_the_listener(
    amqp: AmqpSettings, mailbox: Mailbox
) -> None:
    """A body naming another e-mail still waiting is refused; one naming no known e-mail is
    ignored and the reply applies to its address's e-mail."""
    async with AsyncExitStack() as stack:
        _, broker, results, service = await reading_worker(
            stack, amqp, EmulatorConfig(), mailbox.reply_settings()
        )
        mail_ids = []
        for n, request_id in enumerate(("first", "second"), 1):
            await broker.publish({"request_id": request_id, "to": phone(n), "text": "hi"})
            await results.wait_until(lambda r=request_id: Status.submitted in results.statuses(r))
            mail_ids.append(results.of(request_id)[0].gateway_id)
        first, second = mail_ids
        assert first is not None and second is not None and first != second
        address = service.reply_from(first)
        metrics = service.telemetry.metrics

        await mailbox.deliver(gateway_reply(address, f"ERROR = 6 (denied), ID - {second}"), address)
        await mailbox.wait_for({"INBOX": 0, NOT_REPLIES: 1, PROCESSED: 0})
        assert metrics.imap_not_replies.labels("mail_id_mismatch")._value.get() == 1
        assert metrics.replies_refused.labels("mail_id_mismatch")._value.get() == 1
        assert results.statuses("first") == [Status.submitted]
        assert results.statuses("second") == [Status.submitted]

        await mailbox.deliver(gateway_reply(address, f"OK - 1 SMS, ID - {first[:20]}"), address)
        await results.wait_until(lambda: Status.accepted in results.statuses("first"))
        await mailbox.wait_for({"INBOX": 0, NOT_REPLIES: 1, PROCESSED: 1})
        assert metrics.reply_body_id_ignored._value.get() == 1
        assert results.statuses("second") == [Status.submitted]

        # The second e-mail's own reply still counts (and the worker stops at once).
        address = service.reply_from(second)
        await mailbox.deliver(gateway_reply(address, f"OK - 1 SMS, ID - {second}"), address)
        await results.wait_until(lambda: Status.accepted in results.statuses("second"))
    assert final_events(results, ["first", "second"]) == {
        ("first", Status.accepted): 1,
        ("second", Status.accepted): 1,
    }
    assert {e.request_id: e.gateway_id for e in results.with_status(Status.accepted)} == {
        "first": first,
        "second": second,
    }


# 8. the IMAP server going away -------------------------------------------------------------


@BOTH_SERVERS
@pytest.mark.timeout(120)
async def test_the_mailbox_going_away_and_coming_back_is_survived(
    amqp: AmqpSettings, mailbox: Mailbox, server: Server
) -> None:
    async with AsyncExitStack() as stack:
        proxy = await stack.enter_async_context(TcpProxy(server.imap_port))
        _, broker, results, service = await reading_worker(
            stack, amqp, to_mailbox(), mailbox.reply_settings(proxy.port)
        )
        metrics = service.telemetry.metrics
        proxy.down()
        await until(lambda: metrics.imap_connected._value.get() == 0)
        assert not service.ready
        await broker.publish({"request_id": "gone", "to": phone(6), "text": "meanwhile"})
        await results.wait_until(lambda: Status.submitted in results.statuses("gone"))
        await mailbox.wait_for({"INBOX": 1})
        assert Status.accepted not in results.statuses("gone")
        proxy.restore()
        await results.wait_until(lambda: Status.accepted in results.statuses("gone"))
        await mailbox.wait_for({"INBOX": 0, PROCESSED: 1})
        await ready(service)


# 9. without plus-addressing ----------------------------------------------------------------


def test_without_plus_addressing_the_worker_will_not_start_unless_told_how_to_trust(
    mailbox: Mailbox,
) -> None:
    with pytest.raises(ValidationError, match="AUTHSERV_ID"):
        mailbox.reply_settings(plus_addressing=False)
    with pytest.raises(ValidationError, match="AUTHSERV_ID"):
        ReplySettings(
            source="imap",
            imap=ImapSettings(host="imap.test", user="u", plus_addressing=False),
        )
    ReplySettings(
        source="imap",
        imap=ImapSettings(
            host="imap.test", user="u", plus_addressing=False, insecure_body_id_only=True
        ),
    )


async def test_without_plus_addressing_only_replies_the_provider_authenticated_count(
    amqp: AmqpSettings, mailbox: Mailbox
) -> None:
    reply = ReplySettings(
        source="imap",
        address=mailbox.address,
        imap=mailbox.imap(plus_addressing=False, authserv_id="mx.worker.test"),
    )
    async with AsyncExitStack() as stack:
        emulator, broker, results, service = await reading_worker(
            stack, amqp, EmulatorConfig(), reply
        )
        await broker.publish({"request_id": "bare", "to": phone(7), "text": "hi"})
        await results.wait_until(lambda: Status.submitted in results.statuses("bare"))
        mail_id = results.of("bare")[0].gateway_id
        assert emulator.mails[0].envelope_from == mailbox.address
        body = f"OK - 1 SMS, ID - {mail_id}"
        # Anyone's claim under another id, and a failed check, are not believed.
        forged = gateway_reply(
            mailbox.address,
            body,
            "Authentication-Results: mx.evil.test; spf=pass smtp.mailfrom=send.smscentre.com",
            "Authentication-Results: mx.worker.test; spf=fail smtp.mailfrom=send.smscentre.com",
        )
        await mailbox.deliver(forged, mailbox.address)
        await mailbox.wait_for({"INBOX": 0, NOT_REPLIES: 1})
        assert results.statuses("bare") == [Status.submitted]
        genuine = gateway_reply(
            mailbox.address,
            body,
            "Authentication-Results: mx.worker.test; spf=pass (sender ok) "
            "smtp.mailfrom=send@send.smscentre.com; dkim=none",
        )
        await mailbox.deliver(genuine, mailbox.address)
        await results.wait_until(lambda: Status.accepted in results.statuses("bare"))
        await mailbox.wait_for({"INBOX": 0, NOT_REPLIES: 1, PROCESSED: 1})
        assert service.telemetry.metrics.imap_not_replies.labels("authentication")._value.get() == 1


def test_authentication_results_of_other_servers_and_other_domains_do_not_count() -> None:
    import email

    def domains(*values: str) -> set[str]:
        raw = "".join(f"Authentication-Results: {v}\r\n" for v in values) + "\r\nbody"
        return authenticated_domains(email.message_from_string(raw), "mx.example")

    assert domains("mx.example; dkim=pass header.d=smscentre.com header.s=s1") == {"smscentre.com"}
    assert domains("mx.example 1; spf=pass smtp.mailfrom=a@send.smsc.ru") == {"send.smsc.ru"}
    assert domains("mx.other; spf=pass smtp.mailfrom=a@send.smsc.ru") == set()
    assert domains("mx.example; spf=softfail smtp.mailfrom=a@send.smsc.ru") == set()
    assert domains("mx.example; dkim=pass (good) header.i=@smscentre.com") == {"smscentre.com"}


def test_the_mailbox_password_comes_from_the_secrets_directory_and_is_never_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "SMSC_REPLY__IMAP__PASSWORD").write_text("s3cret-mailbox-pw")
    monkeypatch.setenv("SMSC_SECRETS_DIR", str(tmp_path))
    monkeypatch.setenv("SMSC_REPLY__SOURCE", "imap")
    monkeypatch.setenv("SMSC_REPLY__IMAP__HOST", "imap.example.com")
    monkeypatch.setenv("SMSC_REPLY__IMAP__USER", "replies")
    settings = Settings()
    assert settings.reply.imap.password.get_secret_value() == "s3cret-mailbox-pw"
    assert "s3cret-mailbox-pw" not in repr(settings)
    assert "s3cret-mailbox-pw" not in str(settings.masked())
