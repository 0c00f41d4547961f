"""The SMTP server that takes the gateway's reply e-mails.

Each send e-mail goes out From `<local>+<mail id>.<token>@<domain>`: the gateway answers to
that address, so a reply names the e-mail it answers even when its body carries no ID
(errors 1, 2, 4, 5 and 9). The token is a truncated HMAC of the mail id under a key only
the worker holds, and it is never published (events carry the bare mail id): knowing a
gateway id is not enough to answer for its e-mail. A recipient whose token does not verify
is refused at RCPT. The address's (verified) ID decides which e-mail a reply answers. An ID
in the body that differs is read one of two ways: one that names another e-mail this
account still waits on is refused, since the token did not verify that one (one e-mail's
reply capability must not settle another); one that names no known e-mail (the gateway or
a mail system on the way mangled it) is ignored, logged and counted, and the reply applies
to its address's e-mail.

Optionally only some networks may connect (checked on the peer address, before the
greeting) and only some envelope senders may send. Every refusal changes nothing, is
counted (`smsc_replies_refused_total{reason}`) and logged once.

A reply is answered 250 only after its result events are confirmed; otherwise 451, so the
sending mail server tries again later rather than the reply being lost. A reply that cannot
be read is answered 250 only once a copy of it is kept (the raw bytes with the secrets and
the address tokens masked, published as a dead letter), else 451 as well.
"""

from __future__ import annotations

import base64
import email
import email.policy
import hmac
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

from worker.logs import MASK
from worker.protocol.replies import Reply, UnreadableReply, read_reply
from worker.smtp_server import LimitedSMTP

log = logging.getLogger(__name__)

# The dead-letter code of a reply that could not be read.
UNREADABLE_REPLY = "unreadable_reply"

ReplySink = Callable[[str, Reply], Awaitable[None]]
Refused = Callable[[str], None]
# Whether a mail id names an e-mail of this account still waiting for its reply.
KnownMail = Callable[[str], Awaitable[bool]]


@dataclass(frozen=True, slots=True)
class UnreadableCopy:
    """A reply that could not be read, as received, and what to mask in it."""

    raw: bytes
    reason: str
    sender: str
    mail_ids: tuple[str, ...]  # the e-mails its (verified) addresses name
    tokens: tuple[str, ...]  # their address tokens: not to be published


KeepUnreadable = Callable[[UnreadableCopy], Awaitable[None]]

# The charsets a secret may be written in inside a reply (the gateway's, and UTF-8).
_SECRET_CHARSETS = ("utf-8", "koi8-r", "cp1251")


def _secret_bytes(secrets: Iterable[str]) -> list[bytes]:
    found: set[bytes] = set()
    for secret in secrets:
        if len(secret) < 3:  # as worker.logs.Masker: shorter values are ordinary text
            continue
        for charset in _SECRET_CHARSETS:
            try:
                found.add(secret.encode(charset))
            except UnicodeEncodeError:
                continue
    return sorted(found, key=len, reverse=True)


def masked_mail(raw: bytes, secrets: Iterable[str]) -> bytes:
    """`raw` with every secret blanked: where it stands in the bytes (in any charset a
    reply may use, case-exact), and inside base64 or quoted-printable parts, which are then
    written again as base64. A reply may quote the send e-mail, password included."""
    values = _secret_bytes(secrets)
    mask = MASK.encode()

    def blank(data: bytes) -> bytes:
        for value in values:
            data = data.replace(value, mask)
        return data

    if not values:
        return raw
    raw = blank(raw)
    message = email.message_from_bytes(raw, policy=email.policy.compat32)
    changed = False
    for part in message.walk():
        encoding = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
        if part.is_multipart() or encoding not in ("base64", "quoted-printable"):
            continue
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes) or blank(payload) == payload:
            continue
        part.set_payload(base64.encodebytes(blank(payload)).decode("ascii"))
        part.replace_header("Content-Transfer-Encoding", "base64")
        changed = True
    return blank(message.as_bytes()) if changed else raw


# RFC 5321: a local part is at most 64 octets.
LOCAL_PART_MAX = 64
MAIL_ID_LENGTH = 32  # uuid4().hex
# 16 base32 characters: 80 bits of the HMAC, lowercase so that a mail system that
# lowercases local parts does not break it.
TOKEN_LENGTH = 16
TOKEN_SEPARATOR = "."  # noqa: S105 (a separator, not a secret)
# What a reply address adds to the configured local part: "+", the mail id, ".", the token.
ADDRESS_OVERHEAD = 1 + MAIL_ID_LENGTH + len(TOKEN_SEPARATOR) + TOKEN_LENGTH

# The reasons a reply is refused: the label values of smsc_replies_refused_total.
REFUSAL_REASONS = ("peer", "sender", "address", "token", "mail_id_mismatch", "ambiguous")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def local_part_room(base: str) -> int:
    """How many octets a local part of `base` leaves beyond what a reply address adds
    (negative: too long)."""
    local = base.rpartition("@")[0]
    return LOCAL_PART_MAX - len(local.encode()) - ADDRESS_OVERHEAD


def parse_networks(value: str) -> tuple[Network, ...]:
    """Comma-separated CIDRs (or single addresses); ValueError names a bad one."""
    return tuple(ipaddress.ip_network(part.strip()) for part in value.split(",") if part.strip())


def parse_senders(value: str) -> tuple[str, ...]:
    """Comma-separated addresses or `@domain`s, lowercased; ValueError names a bad one."""
    senders = tuple(part.strip().lower() for part in value.split(",") if part.strip())
    for sender in senders:
        local, at, domain = sender.rpartition("@")
        if not at or not domain or "@" in local or " " in sender:
            raise ValueError(f"{sender!r} is neither an e-mail address nor an @domain")
    return senders


class ReplyAddresses:
    """Reply addresses with their tokens: made with the current key, verified with it or
    any of the old ones (so replies to e-mails sent before a key rotation still count)."""

    def __init__(self, base: str, key: bytes, old_keys: Sequence[bytes] = ()) -> None:
        if not key:
            raise ValueError("the reply token key is empty")
        local, _, domain = base.rpartition("@")
        self._local = local.lower()
        self._domain = domain.lower()
        self._base = base
        self._keys = (key, *[k for k in old_keys if k])

    @staticmethod
    def _token(key: bytes, mail_id: str) -> str:
        digest = hmac.digest(key, b"smsc-worker reply address\0" + mail_id.encode(), "sha256")
        return base64.b32encode(digest).decode().lower()[:TOKEN_LENGTH]

    def address(self, mail_id: str) -> str:
        """The From (and envelope sender) of e-mail `mail_id`."""
        mail_id = mail_id.lower()
        local, _, domain = self._base.rpartition("@")
        token = self._token(self._keys[0], mail_id)
        return f"{local}+{mail_id}{TOKEN_SEPARATOR}{token}@{domain}"

    def read(self, address: str) -> tuple[str | None, str | None]:
        """(mail id, None) for a reply address that verifies; (None, reason) otherwise:
        `address` when it is not a reply address of this worker, `token` when its token
        does not verify (or it has none)."""
        got_local, _, got_domain = address.lower().rpartition("@")
        prefix = self._local + "+"
        if got_domain != self._domain or not got_local.startswith(prefix):
            return None, "address"
        mail_id, separator, token = got_local[len(prefix) :].rpartition(TOKEN_SEPARATOR)
        if not separator or not mail_id or len(token) != TOKEN_LENGTH:
            return None, "token"
        for key in self._keys:
            if hmac.compare_digest(self._token(key, mail_id), token):
                return mail_id, None
        return None, "token"


def sender_allowed(allowed: Sequence[str], address: str) -> bool:
    """Whether an envelope sender is one of `allowed` (lowercased addresses or `@domain`s;
    none: any sender)."""
    if not allowed:
        return True
    address = address.lower()
    domain = "@" + address.rpartition("@")[2]
    return "@" in address and (address in allowed or domain in allowed)


def verified_recipients(
    addresses: ReplyAddresses, recipients: Iterable[str]
) -> tuple[set[str], set[str]]:
    """(the e-mails, the tokens) of those `recipients` that are reply addresses whose token
    verifies: the e-mails a reply to them may answer."""
    mail_ids: set[str] = set()
    tokens: set[str] = set()
    for address in recipients:
        mail_id, _ = addresses.read(address)
        if mail_id is not None:
            mail_ids.add(mail_id)
            tokens.add(address.rpartition("@")[0].rpartition(TOKEN_SEPARATOR)[2])
    return mail_ids, tokens


class BodyId(Enum):
    """How the ID in a reply's body stands to the e-mail its (verified) address names."""

    agrees = "agrees"  # none, or the address's own
    other_mail = "other_mail"  # another e-mail still waiting: refused, its token never verified
    ignored = "ignored"  # no known e-mail (mangled on the way): the address's e-mail decides


async def read_body_id(reply: Reply, mail_id: str, known_mail: KnownMail) -> BodyId:
    """Which of `BodyId` the reply's body ID is, beside `mail_id` (the e-mail its address
    verified); an ignored one is logged here. Raises what `known_mail` raises: the reply
    can then be neither refused nor applied, only taken again later."""
    named = reply.mail_id
    if named is None or named.lower() == mail_id:
        return BodyId.agrees
    if await known_mail(named.lower()):
        return BodyId.other_mail
    log.warning(
        "reply to e-mail %s names %r in its body, no known e-mail: that ID is "
        "ignored and the reply applies to its address's e-mail",
        mail_id,
        named,
    )
    return BodyId.ignored


def _peer_ip(peer: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(peer[0])
    except (TypeError, ValueError, IndexError):
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class ReplyHandler:
    """aiosmtpd handler: accepts mail only for reply addresses whose token verifies, from
    allowed peers and senders."""

    def __init__(
        self,
        addresses: ReplyAddresses,
        sink: ReplySink,
        known_mail: KnownMail,
        *,
        allowed_networks: Iterable[Network] = (),
        allowed_senders: Iterable[str] = (),
        refused: Refused | None = None,
        body_id_ignored: Callable[[], None] | None = None,
        keep_unreadable: KeepUnreadable | None = None,
    ) -> None:
        self._keep_unreadable = keep_unreadable
        self._addresses = addresses
        self._sink = sink
        self._known_mail = known_mail
        self._body_id_ignored = body_id_ignored or (lambda: None)
        self._networks = tuple(allowed_networks)
        self._senders = tuple(s.lower() for s in allowed_senders)
        self._refused = refused or (lambda reason: None)

    def _refuse(self, reason: str, what: str, *args: object) -> None:
        self._refused(reason)
        log.warning("reply refused (%s): " + what, reason, *args)

    def peer_allowed(self, peer: Any) -> bool:
        """Whether `peer` (a socket's peername) may talk to the receiver; counted and logged
        when it may not."""
        if not self._networks:
            return True
        ip = _peer_ip(peer)
        if ip is not None and any(ip in network for network in self._networks):
            return True
        self._refuse("peer", "connection from %s, outside the allowed networks", peer)
        return False

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, mail_options: list[str]
    ) -> str:
        if not sender_allowed(self._senders, address):
            self._refuse("sender", "envelope sender %r from %s", address, session.peer)
            return "550 5.7.1 sender not allowed"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        mail_id, reason = self._addresses.read(address)
        if mail_id is None:
            assert reason is not None
            self._refuse(reason, "recipient %r from %s", address, session.peer)
            return "550 5.1.1 not a reply address of this worker"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        raw = envelope.original_content or envelope.content
        try:
            reply = read_reply(raw)
        except UnreadableReply as exc:
            return await self._unreadable(raw, str(exc), envelope)
        # Every recipient verified at RCPT: these are the e-mails the reply may answer.
        addressed, _ = verified_recipients(self._addresses, envelope.rcpt_tos)
        if len(addressed) != 1:
            self._refuse("ambiguous", "one reply addressed to e-mails %s", sorted(addressed))
            return "550 5.7.1 one reply answers one e-mail"
        (mail_id,) = addressed
        try:
            body_id = await read_body_id(reply, mail_id, self._known_mail)
        except Exception:
            log.exception(
                "could not look up e-mail %r named by a reply to %s", reply.mail_id, mail_id
            )
            return "451 4.3.0 reply not recorded, try again later"
        if body_id == BodyId.other_mail:
            self._refuse(
                "mail_id_mismatch",
                "reply to e-mail %s names e-mail %r in its body, from %s",
                mail_id,
                reply.mail_id,
                session.peer,
            )
            return "550 5.7.1 the reply names another e-mail than its address"
        if body_id == BodyId.ignored:
            self._body_id_ignored()
        if reply.mail_id is not None:
            # What is handed on names the e-mail the token verified, as that one decides.
            reply = replace(reply, mail_id=mail_id)
        try:
            await self._sink(mail_id, reply)
        except Exception:
            log.exception("could not record the reply for e-mail %s", mail_id)
            return "451 4.3.0 reply not recorded, try again later"
        return "250 OK"

    async def _unreadable(self, raw: bytes, reason: str, envelope: Any) -> str:
        """Keep a copy of a reply that could not be read, then answer 250; 451 when the
        copy could not be kept, so that the reply comes again rather than be lost."""
        mail_ids, tokens = verified_recipients(self._addresses, envelope.rcpt_tos)
        if self._keep_unreadable is None:
            log.error("unreadable gateway reply from %s: %s", envelope.mail_from, reason)
            return "250 OK (unreadable reply logged)"
        copy = UnreadableCopy(
            raw, reason, str(envelope.mail_from), tuple(sorted(mail_ids)), tuple(sorted(tokens))
        )
        try:
            await self._keep_unreadable(copy)
        except Exception:
            log.exception("could not keep a copy of an unreadable reply to %s", sorted(mail_ids))
            return "451 4.3.0 reply not recorded, try again later"
        return "250 OK (unreadable reply kept)"


class ReplySMTP(LimitedSMTP):
    """The listener's SMTP (with its limits) and the peer checked at connect: a peer
    outside the allowed networks gets a 554 greeting and the connection is closed, before
    any command."""

    event_handler: ReplyHandler

    async def _handle_client(self) -> None:
        assert self.session is not None
        if not self.event_handler.peer_allowed(self.session.peer):
            await self.push("554 5.7.1 not allowed to connect")
            if self.transport is not None:
                self.transport.close()
            return
        await super()._handle_client()
