"""Replies read from a mailbox over IMAP: the other reply source beside the SMTP listener.

The gateway answers each e-mail at its From address. In this mode that address belongs to
a mailbox the operator already runs (a provider, a Dovecot, an Exchange), and the worker
reads it: every message of `folder` is judged with the listener's own checks (the address
token, the sender, the size), then

- a reply is settled through `Service.apply_reply` (the ledger's claim on its e-mail makes
  one replica take it; its events are confirmed and its requests `answered`), and only
  then moved to `processed_folder`. A crash in between leaves it in `folder`: it is read
  again, the ledger knows it as applied, and it is moved without a second state change;
- anything else (a bounce, spam, a forged reply, a reply whose body names another e-mail
  still waiting, a reply to an e-mail unknown or expired) is moved to `not_reply_folder`,
  counted and logged once, never applied and never read again. A body ID that names no
  known e-mail is ignored, as the listener ignores it: the address's e-mail decides.

A message whose reply cannot be settled now (another replica holds its e-mail, the broker
or the state store does not answer) stays where it is and is read again at the next poll.

Servers without IDLE, MOVE or UIDPLUS are read too: the folder is polled (a NOOP, then a
read), and a message is moved by UID COPY, \\Deleted and EXPUNGE (UID EXPUNGE with UIDPLUS).
A message found flagged \\Deleted is one such move that stopped after its copy: it is read as
any other (the ledger knows it as applied) and expunged, not copied a second time.

The client is aioimaplib: asyncio-native, so the mailbox is read on the worker's own loop
like everything else (no thread, no blocking imaplib), with IDLE, UID MOVE and UIDPLUS; kept
up to date (2.x, typed, Python 3.12/3.13). It has known hangs when the server closes the
connection mid-command (an IDLE that never returns, aioimaplib #110), so every call here has
a deadline and is abandoned as soon as the connection is lost.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from email.message import Message
from email.utils import getaddresses, parseaddr
from enum import StrEnum
from typing import TYPE_CHECKING, Any, TypeVar

import aioimaplib

from worker.ledger import MailBusy
from worker.protocol.replies import Reply, UnreadableReply, read_reply
from worker.reply_receiver import (
    BodyId,
    KeepUnreadable,
    KnownMail,
    ReplyAddresses,
    UnreadableCopy,
    parse_senders,
    read_body_id,
    sender_allowed,
    verified_recipients,
)
from worker.settings import ImapSettings, ReplySettings

if TYPE_CHECKING:
    from worker.metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")


class ReplyOutcome(StrEnum):
    """What became of a reply handed to the service."""

    applied = "applied"  # its fates were settled now
    applied_before = "applied_before"  # the ledger knows it as applied: nothing changed
    unknown_mail = "unknown_mail"  # no such e-mail (expired, answered otherwise, or never)


ApplyReply = Callable[[str, Reply], Awaitable[ReplyOutcome]]

# The label values of smsc_imap_not_replies_total.
NOT_REPLY_REASONS = (
    "bounce",
    "too_large",
    "sender",
    "address",
    "token",
    "authentication",
    "mail_id_mismatch",
    "ambiguous",
    "unknown_mail",
    "unreadable",
)
# The reasons that are refusals of a would-be reply, counted in smsc_replies_refused_total
# as the listener counts its own.
_REFUSALS = frozenset(
    {"sender", "address", "token", "authentication", "mail_id_mismatch", "ambiguous"}
)
# Where a mail system writes who a message was delivered to, and where the gateway does.
_RECIPIENT_HEADERS = ("Delivered-To", "X-Original-To", "Envelope-To", "To", "Cc")
_BOUNCE_SENDERS = frozenset({"mailer-daemon", "postmaster"})


@dataclass(frozen=True, slots=True)
class Judged:
    """One message of the mailbox, read: a reply to e-mail `mail_id`, or not a reply
    (`reason`), or a reply that could not be read (`unreadable`, to be kept)."""

    mail_id: str | None = None
    reply: Reply | None = None
    reason: str | None = None
    unreadable: UnreadableCopy | None = None


def _header_addresses(message: Message, names: tuple[str, ...]) -> list[str]:
    values = [str(v) for name in names for v in message.get_all(name, [])]
    return [address for _, address in getaddresses(values) if address]


def _envelope_sender(message: Message) -> str:
    """The envelope sender as the final delivery wrote it (Return-Path), else From."""
    return_path = message.get("Return-Path")
    if return_path is not None:
        return parseaddr(str(return_path))[1]
    return parseaddr(str(message.get("From", "")))[1]


def is_bounce(message: Message) -> bool:
    """A delivery status notification: a report, or mail from a mailer daemon. It may be
    addressed to a reply address with a valid token (it bounces an e-mail sent From one)."""
    if message.get_content_type() == "multipart/report":
        return True
    sender = parseaddr(str(message.get("From", "")))[1].lower()
    return sender.partition("@")[0] in _BOUNCE_SENDERS


_COMMENT = re.compile(r"\([^()]*\)")
_PROPERTY = re.compile(r'([\w.-]+)\s*=\s*("[^"]*"|[^\s;]+)')


def authenticated_domains(message: Message, authserv_id: str) -> set[str]:
    """The domains that passed SPF or DKIM by the `Authentication-Results` headers of
    `authserv_id` (RFC 8601; the mail provider removes headers claiming its id from mail it
    receives, so those are its own). Headers of any other id are not believed."""
    domains: set[str] = set()
    for value in message.get_all("Authentication-Results", []):
        text = _COMMENT.sub(" ", str(value))
        head, *results = text.split(";")
        if (
            head.split()[:1] != [authserv_id.lower()]
            and head.strip().lower() != authserv_id.lower()
        ):
            continue
        for result in results:
            method, _, rest = result.strip().partition("=")
            method = method.strip().lower()
            verdict, _, props_text = rest.strip().partition(" ")
            if method not in ("spf", "dkim") or verdict.lower() != "pass":
                continue
            props = {k.lower(): v.strip('"') for k, v in _PROPERTY.findall(props_text)}
            names = ("smtp.mailfrom", "smtp.helo") if method == "spf" else ("header.d", "header.i")
            for name in names:
                if name in props:
                    domains.add(props[name].rpartition("@")[2].lower().rstrip("."))
                    break
    return domains


class MailJudge:
    """The listener's checks, on a message read from a mailbox (pure: no I/O)."""

    def __init__(
        self, addresses: ReplyAddresses, reply: ReplySettings, gateway_address: str
    ) -> None:
        self._addresses = addresses
        self._imap = reply.imap
        self._senders = parse_senders(reply.allowed_senders)
        domain = reply.imap.gateway_domain or gateway_address.rpartition("@")[2]
        self._gateway_domain = domain.lower().rstrip(".")

    def judge(self, raw: bytes) -> Judged:
        message = email.message_from_bytes(raw, policy=email.policy.compat32)
        if is_bounce(message):
            return Judged(reason="bounce")
        sender = _envelope_sender(message)
        if not sender_allowed(self._senders, sender):
            return Judged(reason="sender")
        if self._imap.plus_addressing:
            return self._by_address(raw, message, sender)
        return self._by_body(raw, message, sender)

    def _by_address(self, raw: bytes, message: Message, sender: str) -> Judged:
        recipients = _header_addresses(message, _RECIPIENT_HEADERS)
        mail_ids, tokens = verified_recipients(self._addresses, recipients)
        if not mail_ids:
            reasons = {self._addresses.read(address)[1] for address in recipients}
            return Judged(reason="token" if "token" in reasons else "address")
        if len(mail_ids) > 1:
            return Judged(reason="ambiguous")
        (mail_id,) = mail_ids
        try:
            reply = read_reply(raw)
        except UnreadableReply as exc:
            copy = UnreadableCopy(raw, str(exc), sender, (mail_id,), tuple(sorted(tokens)))
            return Judged(mail_id=mail_id, unreadable=copy)
        return Judged(mail_id=mail_id, reply=reply)

    def _by_body(self, raw: bytes, message: Message, sender: str) -> Judged:
        # Without plus-addressing the body's ID is all there is, and every producer sees
        # gateway ids: only the provider's word that the gateway's domain sent it counts.
        if self._imap.authserv_id:
            domains = authenticated_domains(message, self._imap.authserv_id)
            gateway = self._gateway_domain
            if not any(d == gateway or d.endswith("." + gateway) for d in domains):
                return Judged(reason="authentication")
        try:
            reply = read_reply(raw)
        except UnreadableReply as exc:
            return Judged(unreadable=UnreadableCopy(raw, str(exc), sender, (), ()))
        if reply.mail_id is None:
            return Judged(reason="address")
        return Judged(mail_id=reply.mail_id.lower(), reply=reply)


class MailboxGone(ConnectionError):
    """The IMAP connection is lost, timed out or refused what it must do: start again."""


def _quoted(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _ok(response: Any, what: str) -> Any:
    if response.result != "OK":
        detail = b" ".join(bytes(line) for line in response.lines[-1:]).decode(errors="replace")
        raise MailboxGone(f"{what}: {response.result} {detail}")
    return response


_FETCH_UID = re.compile(rb"\bUID (\d+)")
_FETCH_SIZE = re.compile(rb"\bRFC822\.SIZE (\d+)")
_FETCH_FLAGS = re.compile(rb"\bFLAGS \(([^)]*)\)")


@dataclass(frozen=True, slots=True)
class Listed:
    """One message of the folder as listed: its UID, its size, and whether it is flagged
    \\Deleted, which the worker takes as a move by copy cut short after its copy."""

    uid: int
    size: int
    copied: bool


class Mailbox:
    """One IMAP connection with the folder of replies selected. Every call has a deadline
    and fails at once (MailboxGone) when the connection is lost."""

    def __init__(self, settings: ImapSettings) -> None:
        self._settings = settings
        self._lost = asyncio.Event()
        self._client: aioimaplib.IMAP4 | None = None

    async def _call(self, aw: Awaitable[T], deadline: float | None = None) -> T:
        task = asyncio.ensure_future(aw)
        lost = asyncio.ensure_future(self._lost.wait())
        try:
            done, _ = await asyncio.wait(
                {task, lost},
                timeout=self._settings.timeout_s if deadline is None else deadline,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            lost.cancel()
        if task in done:
            return task.result()
        task.cancel()
        raise MailboxGone("connection lost" if lost in done else "no answer in time")

    @property
    def client(self) -> aioimaplib.IMAP4:
        assert self._client is not None
        return self._client

    async def open(self) -> None:
        s = self._settings
        context = None
        if s.security == "tls":
            context = ssl.create_default_context(cafile=s.ca_file or None)
        self._client = aioimaplib.IMAP4(
            s.host,
            s.port,
            timeout=s.timeout_s,
            conn_lost_cb=lambda exc: self._lost.set(),
            ssl_context=context,
        )
        try:
            await self._call(self.client.wait_hello_from_server())
        except (OSError, ssl.SSLError) as exc:
            raise MailboxGone(f"cannot connect to {s.host}:{s.port}: {exc}") from None
        # The response of a refused login never holds the password; it is not logged here.
        response = await self._call(self.client.login(s.user, s.password.get_secret_value()))
        if response.result != "OK":
            raise MailboxGone(f"login as {s.user!r} refused")
        # Servers announce more (MOVE, UIDPLUS) once logged in.
        await self._call(self.client.protocol.capability())
        for folder in (s.processed_folder, s.not_reply_folder):
            created = await self._call(self.client.create(_quoted(folder)))
            if created.result != "OK" and b"ALREADYEXISTS" not in b" ".join(
                bytes(line) for line in created.lines
            ):
                _ok(created, f"create folder {folder!r}")
        _ok(await self._call(self.client.select(_quoted(s.folder))), f"select {s.folder!r}")

    def close(self) -> None:
        if self._client is not None and self._client.protocol.transport is not None:
            self._client.protocol.transport.close()

    async def listing(self, after: int = 0) -> list[Listed]:
        """Every message of the folder with a UID above `after`, oldest first."""
        found = _ok(await self._call(self.client.uid_search("ALL", charset=None)), "search")
        uids = [
            p
            for line in found.lines[:1]
            for p in bytes(line).split()
            if p.isdigit() and int(p) > after
        ]
        if not uids:
            return []
        fetched = await self._call(
            self.client.uid("fetch", b",".join(uids).decode(), "(UID RFC822.SIZE FLAGS)")
        )
        listed: dict[int, Listed] = {}
        for line in _ok(fetched, "fetch sizes").lines:
            text = bytes(line)
            uid, size = _FETCH_UID.search(text), _FETCH_SIZE.search(text)
            if uid is None or size is None:
                continue  # not an answer to this FETCH (the server may add others)
            flags = _FETCH_FLAGS.search(text)
            copied = flags is not None and b"\\deleted" in flags.group(1).lower().split()
            listed[int(uid.group(1))] = Listed(int(uid.group(1)), int(size.group(1)), copied)
        return sorted(listed.values(), key=lambda m: m.uid)

    async def fetch(self, uid: int) -> bytes | None:
        """The message's bytes (unread flags left as they are); None when it is gone."""
        fetched = _ok(await self._call(self.client.uid("fetch", str(uid), "BODY.PEEK[]")), "fetch")
        for line in fetched.lines:
            if isinstance(line, bytearray):
                return bytes(line)
        return None

    async def move(self, message: Listed, folder: str) -> None:
        """Move one message (UID MOVE, or COPY, \\Deleted and EXPUNGE where the server has
        no MOVE). A message gone already (another replica moved it) is no error."""
        uid, target = str(message.uid), _quoted(folder)
        if message.copied:
            # Copied already by a move that stopped before its expunge (a worker killed, a
            # connection lost, or another replica's move under way): a second copy would
            # leave the message twice in `folder`.
            await self._expunge(uid)
            return
        if self.client.has_capability("MOVE"):
            _ok(await self._call(self.client.uid("move", uid, target)), f"move to {folder!r}")
            return
        _ok(await self._call(self.client.uid("copy", uid, target)), f"copy to {folder!r}")
        _ok(
            await self._call(self.client.uid("store", uid, "+FLAGS.SILENT", r"(\Deleted)")),
            "flag as deleted",
        )
        await self._expunge(uid)

    async def _expunge(self, uid: str) -> None:
        if self.client.has_capability("UIDPLUS"):
            _ok(await self._call(self.client.uid("expunge", uid)), "expunge")
        else:
            # Every message flagged \\Deleted goes: each was copied before it was flagged.
            _ok(await self._call(self.client.expunge()), "expunge")

    async def wait_for_news(self, longest_s: float) -> None:
        """Until the server tells of a change in the folder (IDLE), or `longest_s` passed
        (always, where the server has no IDLE)."""
        if not self.client.has_capability("IDLE"):
            try:
                await asyncio.wait_for(self._lost.wait(), longest_s)
            except TimeoutError:
                # The poll itself. A server reports new mail at the end of a command and
                # answers a SEARCH from what it had reported before (Dovecot does): without
                # this the next read would find it only at the poll after.
                _ok(await self._call(self.client.noop()), "noop")
                return
            raise MailboxGone("connection lost")
        idle = await self._call(self.client.idle_start(timeout=longest_s))
        await self._call(
            self.client.wait_server_push(), deadline=longest_s + self._settings.timeout_s
        )
        self.client.idle_done()
        _ok(await self._call(idle), "idle")


class ImapReplies:
    """Reads the reply mailbox for as long as the service runs: connect (again, with a
    doubling backoff), read the folder to its end, wait for news, read it again."""

    def __init__(
        self,
        reply: ReplySettings,
        judge: MailJudge,
        apply: ApplyReply,
        known_mail: KnownMail,
        keep_unreadable: KeepUnreadable,
        metrics: Metrics,
    ) -> None:
        self._settings = reply.imap
        self._max_bytes = reply.max_message_bytes
        self._judge = judge
        self._apply = apply
        self._known_mail = known_mail
        self._keep_unreadable = keep_unreadable
        self._metrics = metrics
        self.connected = False
        self.last_poll = 0.0
        # Messages of this connection found applied already, left for one poll: the replica
        # that applied one moves it a moment later, and two moves of one message at once
        # can leave two copies (a Maildir MOVE is a copy and an expunge).
        self._applied_elsewhere: set[int] = set()

    def healthy(self, now: float) -> bool:
        """Connected, and the folder was read to its end recently (a connection that hangs
        stops that too)."""
        stale_after = 2 * self._settings.poll_interval_s + 2 * self._settings.timeout_s
        return self.connected and now - self.last_poll < stale_after

    async def run(self) -> None:
        s = self._settings
        delay = 1.0
        while True:
            mailbox = Mailbox(s)
            self._applied_elsewhere.clear()
            try:
                await mailbox.open()
                self._set_connected(True)
                log.info(
                    "reading replies from %s@%s:%d, folder %r", s.user, s.host, s.port, s.folder
                )
                while True:
                    await self._read_folder(mailbox)
                    delay = 1.0
                    await mailbox.wait_for_news(s.poll_interval_s)
            except (MailboxGone, aioimaplib.AioImapException, OSError) as exc:
                log.warning("reply mailbox: %s; connecting again in %.0f s", exc, delay)
            finally:
                self._set_connected(False)
                mailbox.close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, s.reconnect_max_s)

    def _set_connected(self, connected: bool) -> None:
        self.connected = connected
        self._metrics.imap_connected.set(1 if connected else 0)

    async def _read_folder(self, mailbox: Mailbox) -> None:
        # Mail that arrives during a read is reported in the answers to its commands, and an
        # IDLE after them does not report it again: list the folder again until nothing is
        # new. Only what is new is read again (a message left for the next poll waits for it).
        newest = 0
        while True:
            listed = await mailbox.listing(after=newest)
            for message in listed:
                await self._read_message(mailbox, message)
            # Each pass reads the folder to its end: under a steady stream of replies the
            # passes may go on, and the worker is healthy meanwhile.
            self.last_poll = time.time()
            self._metrics.imap_last_poll.set(self.last_poll)
            if not listed:
                return
            newest = listed[-1].uid

    async def _read_message(self, mailbox: Mailbox, message: Listed) -> None:
        uid = message.uid
        if message.size > self._max_bytes:
            await self._not_a_reply(mailbox, message, "too_large", f"{message.size} bytes")
            return
        raw = await mailbox.fetch(uid)
        if raw is None:
            return
        judged = self._judge.judge(raw)
        if judged.unreadable is not None:
            try:
                await self._keep_unreadable(judged.unreadable)
            except Exception:
                log.exception(
                    "could not keep a copy of unreadable message %d; read again later", uid
                )
                return
            await self._not_a_reply(mailbox, message, "unreadable", judged.unreadable.reason)
            return
        if judged.reason is not None or judged.mail_id is None or judged.reply is None:
            await self._not_a_reply(mailbox, message, judged.reason or "address", "")
            return
        mail_id, reply = judged.mail_id, judged.reply
        try:
            body_id = await read_body_id(reply, mail_id, self._known_mail)
        except Exception:
            log.exception(
                "e-mail %r named by a reply to %s not looked up; read again later",
                reply.mail_id,
                mail_id,
            )
            return
        if body_id == BodyId.other_mail:
            detail = f"to e-mail {mail_id}, names e-mail {reply.mail_id!r} in its body"
            await self._not_a_reply(mailbox, message, "mail_id_mismatch", detail)
            return
        if reply.mail_id is not None:
            # As the listener: what is handed on names the e-mail the token verified.
            reply = replace(reply, mail_id=mail_id)
        try:
            outcome = await self._apply(mail_id, reply)
        except MailBusy:
            return  # another replica settles it, and moves it
        except Exception:
            log.exception("reply to e-mail %s not settled; read again later", mail_id)
            return
        if outcome == ReplyOutcome.unknown_mail:
            await self._not_a_reply(mailbox, message, "unknown_mail", f"e-mail {mail_id}")
            return
        if outcome == ReplyOutcome.applied_before and uid not in self._applied_elsewhere:
            self._applied_elsewhere.add(uid)
            return
        await mailbox.move(message, self._settings.processed_folder)
        self._applied_elsewhere.discard(uid)
        if outcome == ReplyOutcome.applied:
            self._metrics.imap_replies.inc()
            # Counted once, by the replica that applied it: a message read again is not.
            if body_id == BodyId.ignored:
                self._metrics.reply_body_id_ignored.inc()

    async def _not_a_reply(
        self, mailbox: Mailbox, message: Listed, reason: str, detail: str
    ) -> None:
        await mailbox.move(message, self._settings.not_reply_folder)
        self._metrics.imap_not_replies.labels(reason).inc()
        if reason in _REFUSALS:
            self._metrics.reply_refused(reason)
        log.warning(
            "message %d of the reply mailbox is not a reply (%s%s): moved to %r",
            message.uid,
            reason,
            f": {detail}" if detail else "",
            self._settings.not_reply_folder,
        )
