"""The SMTP server that takes the gateway's reply e-mails.

Each send e-mail goes out From `<local>+<mail id>@<domain>`, so a reply names the e-mail
it answers even when its body carries no ID (errors 1, 2, 4, 5 and 9). The reply is
answered 250 only after its result events are confirmed; otherwise 451, so the sending
mail server tries again later rather than the reply being lost.
"""

from __future__ import annotations

import email
import email.policy
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from worker.protocol.decode import MalformedMail, body_text
from worker.protocol.replies import Reply, UnreadableReply, parse_reply

log = logging.getLogger(__name__)

ReplySink = Callable[[str, Reply], Awaitable[None]]


def reply_address(base: str, mail_id: str) -> str:
    local, _, domain = base.partition("@")
    return f"{local}+{mail_id}@{domain}"


def mail_id_of(address: str, base: str) -> str | None:
    """The mail id from a reply address, or None when the address is not ours."""
    local, _, domain = base.partition("@")
    got_local, _, got_domain = address.partition("@")
    prefix = local + "+"
    if got_domain.lower() != domain.lower() or not got_local.startswith(prefix):
        return None
    return got_local[len(prefix) :] or None


class ReplyHandler:
    """aiosmtpd handler: accepts mail for our reply addresses only."""

    def __init__(self, base_address: str, sink: ReplySink) -> None:
        self._base = base_address
        self._sink = sink

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        if mail_id_of(address, self._base) is None:
            return "550 5.1.1 not a reply address of this worker"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        raw = envelope.original_content or envelope.content
        message = email.message_from_bytes(raw, policy=email.policy.compat32)
        try:
            text, _ = body_text(message, "utf-8")
            reply = parse_reply(text)
        except (MalformedMail, UnreadableReply) as exc:
            log.error("unreadable gateway reply from %s: %s", envelope.mail_from, exc)
            return "250 OK (unreadable reply logged)"
        addressed = [mail_id_of(a, self._base) for a in envelope.rcpt_tos]
        mail_id = reply.mail_id or next((m for m in addressed if m), None)
        if mail_id is None:
            log.error("gateway reply names no e-mail: %r", text[:200])
            return "250 OK (reply for no known e-mail logged)"
        try:
            await self._sink(mail_id, reply)
        except Exception:
            log.exception("could not record the reply for e-mail %s", mail_id)
            return "451 4.3.0 reply not recorded, try again later"
        return "250 OK"
