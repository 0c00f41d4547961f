"""The gateway emulator: an SMTP server on the running loop that judges each send e-mail
like the SMS Center gateway (see `rules`), answers by reply e-mail, and records what it
delivered, with failure injection (`faults`) for tests.

At SMTP level a well-formed e-mail to the gateway address gets `250` even when its body
earns a gateway error: errors come back as reply e-mails, as the real gateway sends them.
SMTP itself refuses only what the gateway's mail server would: another RCPT address
(`550`) and an e-mail over 100 KB (`552`).

A taken e-mail is judged and recorded first, then the answer waits for the configured
latency: a client that gives up meanwhile leaves the e-mail delivered, an unknown outcome
on its side, as with a slow real gateway.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import time
from collections import Counter
from email.utils import parseaddr
from types import TracebackType

from aiosmtpd.smtp import SMTP, Envelope, Session

from worker.protocol.decode import DecodedBody, MalformedMail, decode_mail
from worker.protocol.mail import MAX_MAIL_BYTES
from worker.protocol.replies import Accepted, Rejected, render_reply
from worker.smtp_server import bound_port, serve_smtp

from .config import EmulatorConfig
from .faults import Faults
from .records import DeliveryLog, MailRecord
from .relay import ReplyRelay
from .rules import ACCEPTED_RU, Clock, Delivery, Flood, Gateway, recipient_key
from .waiting import Signal

log = logging.getLogger(__name__)


async def _until_cancelled() -> None:
    # After closing a transport, aiosmtpd's connection_lost() cancels the session task.
    # Waiting for that here keeps aiosmtpd from writing a reply to the dead connection.
    await asyncio.get_running_loop().create_future()


def _peer_ip(session: Session) -> str:
    # Typed as str by aiosmtpd, but asyncio gives TCP peers as (host, port, ...).
    peer: object = session.peer
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)


class _GatewaySMTP(SMTP):
    """aiosmtpd's SMTP with the emulator's hooks where the handler API has none: tracking
    open sessions, and cutting a connection in the middle of DATA."""

    event_handler: _Handler

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.event_handler.sessions.add(self)

    def connection_lost(self, error: Exception | None) -> None:
        self.event_handler.sessions.discard(self)
        super().connection_lost(error)

    async def smtp_DATA(self, arg: str | None) -> None:
        envelope, transport = self.envelope, self.transport
        if (
            envelope is not None
            and envelope.rcpt_tos
            and transport is not None
            and self.event_handler.faults.take_mid_data_drop()
        ):
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            transport.close()
            await _until_cancelled()
        await super().smtp_DATA(arg)


class _Handler:
    """The aiosmtpd handler: RCPT filtering here, the rest in the emulator."""

    def __init__(self, emulator: Emulator) -> None:
        self._emulator = emulator
        self.faults = emulator.faults
        self.sessions: set[_GatewaySMTP] = set()

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        gateway = self._emulator.config.gateway_address
        if address.lower() != gateway.lower():
            return f"550 5.1.1 <{address}>: no such mailbox (the gateway is <{gateway}>)"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        failure = self.faults.take_data_failure()
        if failure is not None:
            return failure
        record = self._emulator.take(_peer_ip(session), envelope)
        if server.transport is not None and self.faults.take_after_dot_drop():
            server.transport.close()
            await _until_cancelled()
        if self.faults.latency_s > 0:
            await asyncio.sleep(self.faults.latency_s)
        return f"250 OK, mail {record.mail_id or '-'} taken"


class Emulator:
    """`async with Emulator(EmulatorConfig(...)) as emu:`, or `start()` / `stop()`.

    `clock` (seconds, monotonic or not) drives every time window, so tests can move time
    by hand; delivery timestamps come from it too.
    """

    def __init__(self, config: EmulatorConfig | None = None, *, clock: Clock = time.time) -> None:
        self.config = config or EmulatorConfig()
        self.faults = Faults(self, latency_s=self.config.latency_s)
        self.deliveries: list[Delivery] = []
        self.floods: list[Flood] = []
        self.errors: Counter[int] = Counter()
        self.mails: list[MailRecord] = []
        self._clock = clock
        self._gateway = Gateway(self.config, clock)
        self._handler = _Handler(self)
        self._relay = (
            ReplyRelay(
                *self.config.reply_relay,
                self.config.reply_from,
                self.config.reply_charset,
                lmtp=self.config.reply_lmtp,
            )
            if self.config.reply_relay
            else None
        )
        self._log = DeliveryLog(self.config.record_path) if self.config.record_path else None
        self._server: asyncio.Server | None = None
        self._port: int | None = None
        self._signal = Signal()

    @property
    def host(self) -> str:
        return self.config.host

    @property
    def port(self) -> int:
        """The bound port (the configured one, or the free one picked for port 0)."""
        if self._port is None:
            raise RuntimeError("the emulator has not been started")
        return self._port

    @property
    def balance(self) -> int | None:
        """SMS parts left on the account balance (None: unlimited)."""
        return self._gateway.balance

    async def start(self) -> None:
        if self._port is not None:
            raise RuntimeError("the emulator is already started")
        if self._log is not None:
            self._log.open()
        await self._listen(self.config.port)

    async def stop(self) -> None:
        await self.stop_listening(drop_open=True)
        if self._relay is not None:
            await self._relay.close()
        if self._log is not None:
            self._log.close()
        self._port = None

    async def __aenter__(self) -> Emulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _listen(self, port: int) -> None:
        self._server = await serve_smtp(
            self._handler,
            self.config.host,
            port,
            smtp_class=_GatewaySMTP,
            data_size_limit=MAX_MAIL_BYTES,
        )
        self._port = bound_port(self._server)

    async def stop_listening(self, *, drop_open: bool) -> None:
        """Close the listening socket (connects are refused); with `drop_open`, also abort
        the sessions in progress."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if drop_open:
            for session in list(self._handler.sessions):
                if isinstance(session.transport, asyncio.Transport):
                    session.transport.abort()
            # connection_lost() runs on the next loop iterations; let it clean up.
            await asyncio.sleep(0)

    async def resume_listening(self) -> None:
        if self._server is None:
            await self._listen(self.port)

    def take(self, peer: str, envelope: Envelope) -> MailRecord:
        """Judge, record and answer one e-mail that came in over SMTP."""
        content = envelope.original_content or b""
        decoded = None
        body: DecodedBody | MalformedMail
        try:
            decoded = decode_mail(content)
        except MalformedMail as exc:
            body = exc
            headers = email.message_from_bytes(content, policy=email.policy.compat32)
            from_header, message_id = str(headers.get("From", "")), headers.get("Message-ID")
        else:
            body, from_header, message_id = decoded.body, decoded.mail_from, decoded.message_id
        verdict = self._gateway.judge(body, peer)
        answer = render_reply(verdict.reply)
        if self.config.reply_charset != "utf-8" and isinstance(verdict.reply, Accepted):
            answer += "\n" + ACCEPTED_RU
        reply_to = parseaddr(from_header)[1] or str(envelope.mail_from or "")
        reply_text = None
        if verdict.reply_wanted and self._relay is not None and "@" in reply_to:
            self._relay.send(reply_to, answer, message_id)
            reply_text = answer
        record = MailRecord(
            received_at=self._clock(),
            peer=peer,
            envelope_from=str(envelope.mail_from),
            content=content,
            decoded=decoded,
            reply=verdict.reply,
            reason=verdict.reason,
            reply_text=reply_text,
            deliveries=verdict.deliveries,
            floods=verdict.floods,
        )
        if isinstance(verdict.reply, Rejected):
            self.errors[int(verdict.reply.error)] += 1
        self.deliveries.extend(verdict.deliveries)
        self.floods.extend(verdict.floods)
        if self._log is not None:
            self._log.write(verdict.deliveries)
        self.mails.append(record)
        self._signal.pulse()
        log.info("mail %s from %s: %s (%s)", record.mail_id, from_header, answer, verdict.reason)
        return record

    def set_password(self, login: str, password: str) -> None:
        """From now on, the account `login` takes `password` (error 2 for any other)."""
        self._gateway.set_password(login, password)

    def delivery_counts(self) -> Counter[tuple[str, str]]:
        """Deliveries per (recipient, text), the recipient as a key (E.164 for phones)."""
        return Counter((d.recipient, d.text) for d in self.deliveries)

    def delivered(self, phone: str, text: str) -> int:
        """How many times `text` reached `phone` (written any way the gateway accepts)."""
        return self.delivery_counts()[(recipient_key(phone), text)]

    async def wait_for_deliveries(self, count: int, timeout_s: float = 5.0) -> list[Delivery]:
        await self._signal.wait_until(
            lambda: len(self.deliveries) >= count,
            timeout_s,
            lambda: f"{len(self.deliveries)} of {count} deliveries",
        )
        return self.deliveries

    async def wait_for_mails(self, count: int, timeout_s: float = 5.0) -> list[MailRecord]:
        await self._signal.wait_until(
            lambda: len(self.mails) >= count,
            timeout_s,
            lambda: f"{len(self.mails)} of {count} e-mails",
        )
        return self.mails
