"""Submitting e-mails to the gateway over a small pool of reused SMTP connections.

Every submission ends in one of four outcomes, and the distinction matters: only an
outcome that is known to be "not sent" may be retried blindly. A connection that breaks
after the message data went out leaves the e-mail's fate unknown (RFC 1047); that is
reported as such, never as a failure to resend.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType

import aiosmtplib

from worker.settings import SmtpSettings

log = logging.getLogger(__name__)


class Outcome(StrEnum):
    accepted = "accepted"  # the server said 250 to the data
    transient = "transient"  # certainly not taken; may succeed later
    permanent = "permanent"  # certainly not taken; will not succeed as it is
    unknown = "unknown"  # the data went out, the answer never came


@dataclass(frozen=True, slots=True)
class SubmitResult:
    outcome: Outcome
    detail: str
    code: int | None = None


class CleartextAuthRefused(aiosmtplib.SMTPException):
    """A username is set, but the session is not encrypted: the password stays home."""


def _tls_context(settings: SmtpSettings) -> ssl.SSLContext | None:
    """Verified for `starttls` and `tls` (the CA file or the system's); not for
    `opportunistic`, which, like MTAs between themselves, encrypts against passive
    eavesdropping but cannot tell the gateway from an impostor; none for `none`."""
    if settings.security == "none":
        return None
    if settings.security == "opportunistic":
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=settings.ca_file or None)


def _classify(exc: BaseException, data_sent: bool) -> SubmitResult:
    if isinstance(exc, CleartextAuthRefused):
        return SubmitResult(Outcome.permanent, str(exc))
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        outcome = Outcome.transient if 400 <= exc.code < 500 else Outcome.permanent
        return SubmitResult(outcome, f"{exc.code} {exc.message}".strip(), exc.code)
    kind = type(exc).__name__
    detail = f"{kind}: {exc}" if str(exc) else kind
    return SubmitResult(Outcome.unknown if data_sent else Outcome.transient, detail)


class GatewaySmtp:
    """`connections` SMTP sessions used in turn; SMTP is sequential per connection."""

    def __init__(self, settings: SmtpSettings) -> None:
        self._settings = settings
        self._idle: asyncio.Queue[aiosmtplib.SMTP] = asyncio.Queue()
        self._warned_cleartext = False
        for _ in range(settings.connections):
            self._idle.put_nowait(self._new_client())

    def _new_client(self) -> aiosmtplib.SMTP:
        s = self._settings
        # The password is not given to aiosmtplib: it would log in whatever the transport.
        # `_connect` does, after checking that the session is encrypted.
        return aiosmtplib.SMTP(
            hostname=s.host,
            port=s.port,
            timeout=s.timeout_s,
            use_tls=s.security == "tls",
            # None: STARTTLS when the server offers it (aiosmtplib's opportunistic mode).
            start_tls={"opportunistic": None, "starttls": True}.get(s.security, False),
            tls_context=_tls_context(s),
        )

    async def _connect(self, client: aiosmtplib.SMTP) -> None:
        await client.connect()
        encrypted = client.get_transport_info("sslcontext") is not None
        if not encrypted and not self._warned_cleartext:
            self._warned_cleartext = True
            log.warning(
                "%s:%d did not offer STARTTLS: e-mails (and the account password in them) "
                "go in clear",
                self._settings.host,
                self._settings.port,
            )
        username = self._settings.username
        if username:
            if not encrypted:
                client.close()
                raise CleartextAuthRefused(
                    f"SMTP AUTH refused: {self._settings.host}:{self._settings.port} did not "
                    "offer STARTTLS, and the SMTP password is never sent in clear (set "
                    "SMSC_SMTP__SECURITY=starttls or tls to require TLS)"
                )
            await client.login(username, self._settings.password.get_secret_value())

    async def __aenter__(self) -> GatewaySmtp:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        while not self._idle.empty():
            client = self._idle.get_nowait()
            if client.is_connected:
                try:
                    await asyncio.wait_for(client.quit(), timeout=2)
                except (aiosmtplib.SMTPException, OSError, TimeoutError):
                    client.close()

    @staticmethod
    def _mail_options(client: aiosmtplib.SMTP) -> list[str]:
        return ["BODY=8BITMIME"] if client.supports_extension("8bitmime") else []

    async def submit(self, mail_from: str, recipient: str, message: bytes) -> SubmitResult:
        """Send one e-mail within the overall deadline and say what became of it."""
        client = await self._idle.get()
        data_sent = False
        try:
            async with asyncio.timeout(self._settings.submit_deadline_s):
                for fresh in (not client.is_connected, True):
                    try:
                        if not client.is_connected:
                            await self._connect(client)
                        await client.mail(mail_from, options=self._mail_options(client))
                        await client.rcpt(recipient)
                        data_sent = True
                        await client.data(message)
                        break
                    except (aiosmtplib.SMTPServerDisconnected, ConnectionError):
                        # A connection the server closed while idle fails at its first
                        # command: one fresh connection tells whether the server is gone.
                        if fresh or data_sent:
                            raise
                        client.close()
                        client = self._new_client()
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            result = _classify(exc, data_sent)
            # A half-dead client can hang in connect(): drop it for a fresh one.
            client.close()
            client = self._new_client()
            log.warning("smtp submission %s: %s", result.outcome.value, result.detail)
            return result
        finally:
            self._idle.put_nowait(client)
        return SubmitResult(Outcome.accepted, "250")
