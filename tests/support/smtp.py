"""A collecting SMTP server (`SmtpSink`) and a gateway emulator whose replies land in one.

Both run on the test's own event loop (`serve_smtp`), on free ports, with nothing mocked.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from email.message import EmailMessage
from types import TracebackType
from typing import Any

import aiosmtplib
from aiosmtpd.smtp import SMTP, Envelope, Session

from worker.emulator import Emulator, EmulatorConfig
from worker.emulator.waiting import Signal
from worker.smtp_server import bound_port, serve_smtp


@dataclass(frozen=True)
class ReceivedMail:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    content: bytes

    @property
    def message(self) -> EmailMessage:
        parsed = email.message_from_bytes(self.content, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed

    @property
    def text(self) -> str:
        """The plain-text body, without its trailing line break."""
        content = self.message.get_content()
        assert isinstance(content, str)
        return content.rstrip("\r\n")


class SmtpSink:
    """An SMTP server that takes every e-mail and keeps it in `received`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self._requested_port = port
        self.port = port
        self.received: list[ReceivedMail] = []
        self._server: asyncio.Server | None = None
        self._signal = Signal()

    async def start(self) -> None:
        server = await serve_smtp(self, self.host, self._requested_port)
        self.port = bound_port(server)
        self._server = server

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> SmtpSink:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.received.append(
            ReceivedMail(
                mail_from=str(envelope.mail_from),
                rcpt_tos=tuple(envelope.rcpt_tos),
                content=envelope.original_content or b"",
            )
        )
        self._signal.pulse()
        return "250 OK"

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[ReceivedMail]:
        """The e-mails received once there are at least `count`; TimeoutError otherwise."""
        await self._signal.wait_until(
            lambda: len(self.received) >= count,
            timeout,
            lambda: f"{len(self.received)} of {count} e-mails reached the sink",
        )
        return self.received


class ManualClock:
    """A clock for `Emulator(clock=...)` that moves only when told to."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@asynccontextmanager
async def emulator_with_sink(
    clock: ManualClock | None = None, **config: Any
) -> AsyncIterator[tuple[Emulator, SmtpSink]]:
    """A started emulator (config fields as keywords) whose replies go to a started sink."""
    async with SmtpSink() as sink:
        settings = EmulatorConfig(reply_relay=(sink.host, sink.port), **config)
        async with Emulator(settings, clock=clock or time.time) as emulator:
            yield emulator, sink


async def send_mail(
    emulator: Emulator,
    content: bytes,
    *,
    mail_from: str = "client@example.com",
    timeout: float = 5.0,
) -> str:
    """Submit raw e-mail bytes to the emulator's gateway address; the text of its 250."""
    _refused, response = await aiosmtplib.send(
        content,
        hostname=emulator.host,
        port=emulator.port,
        sender=mail_from,
        recipients=[emulator.config.gateway_address],
        start_tls=False,
        timeout=timeout,
    )
    return response


def raw_mail(
    body: str,
    *,
    charset: str | None = "koi8-r",
    mail_from: str = "client@example.com",
    to: str = "send@send.smscentre.com",
    message_id: str = "<request@example.com>",
) -> bytes:
    """A send e-mail written by hand, so a test can give the gateway what no encoder would.
    With `charset=None` the Content-Type names none (the gateway then reads koi8-r)."""
    content_type = "text/plain" + (f'; charset="{charset}"' if charset else "")
    headers = (
        f"From: {mail_from}",
        f"To: {to}",
        "Subject: ",
        f"Message-ID: {message_id}",
        "MIME-Version: 1.0",
        f"Content-Type: {content_type}",
        "Content-Transfer-Encoding: 8bit",
    )
    text = body.replace("\n", "\r\n") + "\r\n"
    return ("\r\n".join(headers) + "\r\n\r\n").encode("ascii") + text.encode(charset or "koi8-r")
