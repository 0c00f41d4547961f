"""Reply e-mails from the emulated gateway, sent through an SMTP relay in the background.

A reply must never hold up the SMTP session that caused it (the real gateway answers by
a separate e-mail, later), so each one is a task on the emulator's loop. A relay that is
down or answering 4xx is retried a few times; after that, or at once when it refuses the
reply for good (5xx), the reply is logged and dropped, as mail is.
"""

from __future__ import annotations

import asyncio
import logging
import smtplib
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

import aiosmtplib

log = logging.getLogger(__name__)

RETRY_DELAYS_S = (0.1, 0.3, 1.0, 2.0)
SEND_TIMEOUT_S = 10.0


def build_reply(
    reply_from: str, to: str, body: str, in_reply_to: str | None, charset: str = "utf-8"
) -> EmailMessage:
    """A reply e-mail; in any charset but utf-8 the body is 8bit bytes under a bare
    `text/plain`, no charset named, as some gateways send them."""
    message = EmailMessage()
    message["From"] = reply_from
    message["To"] = to
    message["Subject"] = "Re: SMS"
    message["Date"] = formatdate(localtime=True)
    # make_msgid() would otherwise look up this host's FQDN, a DNS query per reply.
    message["Message-ID"] = make_msgid(domain=reply_from.rpartition("@")[2])
    if in_reply_to:
        message["In-Reply-To"] = in_reply_to
        message["References"] = in_reply_to
    if charset == "utf-8":
        message.set_content(body, charset="utf-8")
    else:
        message.set_content(body.encode(charset), "text", "plain", cte="8bit")
    return message


def _refusal_code(exc: Exception) -> int | None:
    """The relay's reply code when it answered the message with a refusal (the lowest, where
    it refused recipients one by one); None when it did not answer (down, cut off)."""
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return exc.code
    if isinstance(exc, smtplib.SMTPResponseException):
        return exc.smtp_code
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused) and exc.recipients:
        return min(refused.code for refused in exc.recipients)
    if isinstance(exc, smtplib.SMTPRecipientsRefused) and exc.recipients:
        return min(code for code, _ in exc.recipients.values())
    return None


def _lmtp_send(host: str, port: int, sender: str, to: str, message: EmailMessage) -> None:
    with smtplib.LMTP(host, port, timeout=SEND_TIMEOUT_S) as client:
        client.send_message(message, sender, [to])


class ReplyRelay:
    def __init__(
        self, host: str, port: int, reply_from: str, charset: str = "utf-8", *, lmtp: bool = False
    ) -> None:
        self._lmtp = lmtp
        self._host = host
        self._port = port
        self._reply_from = reply_from
        self._charset = charset
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def send(self, to: str, body: str, in_reply_to: str | None) -> None:
        message = build_reply(self._reply_from, to, body, in_reply_to, self._charset)
        task = asyncio.get_running_loop().create_task(self._deliver(message, to))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def pending(self) -> int:
        return len(self._tasks)

    async def _deliver(self, message: EmailMessage, to: str) -> None:
        for delay in (*RETRY_DELAYS_S, None):
            try:
                if self._lmtp:
                    # The standard library's client, in a thread: aiosmtplib has no LHLO.
                    await asyncio.to_thread(
                        _lmtp_send, self._host, self._port, self._reply_from, to, message
                    )
                    return
                await aiosmtplib.send(
                    message,
                    hostname=self._host,
                    port=self._port,
                    sender=self._reply_from,
                    recipients=[to],
                    start_tls=False,
                    timeout=SEND_TIMEOUT_S,
                )
                return
            except (aiosmtplib.SMTPException, smtplib.SMTPException, OSError) as exc:
                code = _refusal_code(exc)
                # A permanent refusal stays one: trying again only repeats it.
                if code is not None and (code >= 500 or delay is None):
                    log.warning("reply to %s dropped: relay said %s (%s)", to, code, exc)
                    return
                if delay is None:
                    log.warning("reply to %s dropped: relay unreachable (%s)", to, exc)
                    return
                failure = str(exc)
            if self._closed:
                # Python 3.11's wait_for() can swallow a cancellation (gh-86296), which
                # would otherwise leave this task retrying after close().
                return
            log.info("reply to %s not sent (%s); retrying in %g s", to, failure, delay)
            await asyncio.sleep(delay)

    async def close(self) -> None:
        """Cancel replies still in flight: a stopped gateway sends nothing more."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
