"""The reply receiver's SMTP listener against hostile clients, over real sockets: message
size, recipients, sessions overall and per address, idle and long sessions, and STARTTLS."""

from __future__ import annotations

import asyncio
import ssl
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import trustme
from pydantic import SecretStr, ValidationError

from tests.conftest import free_port, gateway_and_worker
from worker.ledger.redis import RedisStateStore
from worker.protocol.replies import Rejected, Reply
from worker.reply_receiver import KnownMail, ReplyAddresses, ReplyHandler
from worker.settings import AmqpSettings, ReplySettings, Settings, StateSettings
from worker.smtp_server import ListenerLimits, bound_port, serve_smtp, server_tls_context

BASE = "replies@worker.test"
ADDRESSES = ReplyAddresses(BASE, b"test reply token key")


LIMITS = ListenerLimits(
    max_message_bytes=256 * 1024,
    max_recipients=5,
    max_sessions=100,
    max_sessions_per_peer=20,
    command_timeout_s=10,
    session_timeout_s=60,
)


def reply_mail(body: str, mail_id: str = "m1") -> bytes:
    headers = (
        "From: send@send.smscentre.com",
        f"To: {ADDRESSES.address(mail_id)}",
        "Subject: Re: ",
        "Content-Type: text/plain; charset=utf-8",
    )
    return ("\r\n".join(headers) + "\r\n\r\n" + body.replace("\n", "\r\n") + "\r\n").encode()


class Replies:
    """The replies taken, for the e-mails in `waiting` (all that are known)."""

    def __init__(self, waiting: tuple[str, ...] = ("m1",)) -> None:
        self.got: list[tuple[str, Reply]] = []
        self.waiting = set(waiting)

    async def __call__(self, mail_id: str, reply: Reply) -> None:
        self.got.append((mail_id, reply))

    async def known(self, mail_id: str) -> bool:
        return mail_id in self.waiting


@asynccontextmanager
async def listener(
    replies: Replies,
    limits: ListenerLimits = LIMITS,
    known: KnownMail | None = None,
    **kwargs: Any,
) -> AsyncIterator[int]:
    handler = ReplyHandler(ADDRESSES, replies, known or replies.known)
    server = await serve_smtp(handler, "127.0.0.1", 0, limits=limits, **kwargs)
    try:
        yield bound_port(server)
    finally:
        server.close()


class Session:
    """A raw SMTP client: one command, one (possibly multi-line) reply."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, source: str = "127.0.0.1") -> tuple[Session, str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        session = cls(reader, writer)
        return session, await session.reply()

    async def reply(self, timeout: float = 5) -> str:
        lines = []
        async with asyncio.timeout(timeout):
            while True:
                line = (await self.reader.readline()).decode()
                lines.append(line.rstrip("\r\n"))
                if len(line) < 4 or line[3] != "-":
                    return "\n".join(lines)

    async def command(self, line: str) -> str:
        self.writer.write(line.encode() + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def closed(self, timeout: float) -> bool:
        """True when the server closes the connection within `timeout`."""
        try:
            async with asyncio.timeout(timeout):
                return await self.reader.read() == b""
        except TimeoutError:
            return False
        except ConnectionError:
            return True

    def close(self) -> None:
        self.writer.close()


async def test_a_reply_quoting_a_full_email_is_taken() -> None:
    quoted = "\n".join("> " + "x" * 98 for _ in range(1024))  # 100 KiB of quoted e-mail
    body = f"ERROR = 8 (message cannot be delivered), ID - m1\n\n{quoted}"
    replies = Replies()
    async with listener(replies) as port:
        await aiosmtplib.send(
            reply_mail(body),
            hostname="127.0.0.1",
            port=port,
            sender="send@send.smscentre.com",
            recipients=[ADDRESSES.address("m1")],
            start_tls=False,
        )
    assert [(m, r.error) for m, r in replies.got if isinstance(r, Rejected)] == [("m1", 8)]


async def deliver(port: int, body: str, mail_id: str = "m1") -> None:
    await aiosmtplib.send(
        reply_mail(body, mail_id),
        hostname="127.0.0.1",
        port=port,
        sender="send@send.smscentre.com",
        recipients=[ADDRESSES.address(mail_id)],
        start_tls=False,
    )


async def test_the_address_decides_over_a_body_id_that_names_no_known_e_mail() -> None:
    replies = Replies(waiting=("m1", "m2"))
    async with listener(replies) as port:
        # Mangled on the way (cut short, another case, a suffix): no e-mail has that ID.
        for named in ("m", "M1", "m1-x"):
            await deliver(port, f"ERROR = 8 (message cannot be delivered), ID - {named}")
        # Another e-mail still waiting: the token of m1 does not answer for it.
        with pytest.raises(aiosmtplib.SMTPDataError) as caught:
            await deliver(port, "OK - 1 SMS, ID - m2")
        assert caught.value.code == 550
    assert [(m, r.mail_id) for m, r in replies.got] == [("m1", "m1")] * 3


async def test_a_body_id_that_cannot_be_looked_up_is_asked_again(amqp: AmqpSettings) -> None:
    # A real Redis store whose server is gone: the lookup fails as it would in production.
    down = Settings(
        amqp=amqp,
        state=StateSettings(url=SecretStr(f"redis://127.0.0.1:{free_port()}"), timeout_s=0.5),
    )
    store = RedisStateStore(down)
    replies = Replies()
    try:
        async with listener(replies, known=store.knows_mail) as port:
            with pytest.raises(aiosmtplib.SMTPDataError) as caught:
                await deliver(port, "OK - 1 SMS, ID - m2")
            assert caught.value.code == 451
            # A body that agrees with its address needs no lookup.
            await deliver(port, "OK - 1 SMS, ID - m1")
    finally:
        await store.close()
    assert [m for m, _ in replies.got] == ["m1"]


async def test_an_oversized_message_is_refused_before_its_body_is_read() -> None:
    replies = Replies()
    async with listener(replies) as port:
        session, greeting = await Session.open(port)
        assert greeting.startswith("220")
        ehlo = await session.command("EHLO client.test")
        assert f"SIZE {LIMITS.max_message_bytes}" in ehlo
        # A client that declares the size is refused before DATA.
        declared = await session.command("MAIL FROM:<send@send.smscentre.com> SIZE=20000000")
        assert declared.startswith("552")
        assert (await session.command("MAIL FROM:<send@send.smscentre.com>")).startswith("250")
        rcpt = await session.command(f"RCPT TO:<{ADDRESSES.address('m1')}>")
        assert rcpt.startswith("250")
        assert (await session.command("DATA")).startswith("354")

        # 20 MB of body in 64 KiB chunks (one chunk object, so the client holds no more),
        # reading the server's answer meanwhile: it comes before the body is through.
        chunk = (b"y" * 126 + b"\r\n") * 512
        total, sent = 20_000_000, 0
        answer = asyncio.create_task(session.reply(timeout=30))
        tracemalloc.start()
        try:
            while sent < total and not answer.done():
                session.writer.write(chunk)
                await session.writer.drain()
                sent += len(chunk)
        except ConnectionError:
            pass
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        assert (await answer).startswith("552")
        assert await session.closed(5)
        session.close()

    # The server closed the connection long before the client was done (socket buffers
    # hold a few MB at most)...
    assert sent < total // 2, f"{sent} bytes went out before the server closed"
    # ... and nothing on this loop (the listener included) held the body.
    assert peak < 4 * 1024 * 1024, f"{peak} bytes allocated at the peak"
    assert replies.got == []


async def test_too_many_recipients_are_refused() -> None:
    async with listener(Replies()) as port:
        session, _ = await Session.open(port)
        await session.command("EHLO client.test")
        await session.command("MAIL FROM:<send@send.smscentre.com>")
        answers = [
            await session.command(f"RCPT TO:<{ADDRESSES.address(f'm{n}')}>") for n in range(7)
        ]
        # Refused addresses are not counted: the limit is on recipients taken.
        refused = await session.command("RCPT TO:<someone@elsewhere.test>")
        session.close()
    assert [a[:3] for a in answers] == ["250"] * 5 + ["452"] * 2
    assert refused[:3] == "452"


async def test_sessions_are_limited_overall_and_per_address() -> None:
    limits = replace(LIMITS, max_sessions=3, max_sessions_per_peer=2)
    async with listener(Replies(), limits) as port:
        first, a = await Session.open(port)
        second, b = await Session.open(port)
        third, c = await Session.open(port)  # a third from 127.0.0.1
        other, d = await Session.open(port, source="127.0.0.2")
        fourth, e = await Session.open(port, source="127.0.0.3")  # a fourth in all
        assert [x[:3] for x in (a, b, c, d, e)] == ["220", "220", "421", "220", "421"]
        assert await third.closed(2) and await fourth.closed(2)
        # The admitted ones work, and a closed session frees its place.
        assert (await first.command("NOOP")).startswith("250")
        first.close()
        assert await first.closed(2)
        await asyncio.sleep(0.1)
        again, f = await Session.open(port)
        assert f.startswith("220")
        for session in (second, third, other, fourth, again):
            session.close()


async def test_idle_and_overlong_sessions_are_dropped() -> None:
    limits = replace(LIMITS, command_timeout_s=0.5, session_timeout_s=1.5)
    loop = asyncio.get_running_loop()
    answers: list[str] = []

    async def keep_talking(session: Session) -> float:
        """Until the server ends the session: then how long it lasted."""
        try:
            while True:
                answers.append(await session.command("NOOP"))
                await asyncio.sleep(0.2)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        return loop.time() - started

    async with listener(Replies(), limits) as port:
        idle, _ = await Session.open(port)
        busy, _ = await Session.open(port)
        started = loop.time()
        talking = asyncio.create_task(keep_talking(busy))
        assert await idle.closed(3)
        idle_for = loop.time() - started
        # A session that keeps talking is cut at its deadline, with a 421.
        busy_for = await asyncio.wait_for(talking, 5)
        idle.close()
        busy.close()
    assert 0.4 < idle_for < 1.4
    assert 1.3 < busy_for < 2.5
    assert answers[0].startswith("250")
    assert answers[-1].startswith("421"), answers


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_files(ca: trustme.CA, tmp_path: Path) -> tuple[str, str, str]:
    """The listener's certificate and key, and the CA that signed them, as files."""
    cert = ca.issue_cert("127.0.0.1")
    paths = [tmp_path / name for name in ("reply.crt", "reply.key", "ca.pem")]
    cert.cert_chain_pems[0].write_to_path(str(paths[0]))
    cert.private_key_pem.write_to_path(str(paths[1]))
    ca.cert_pem.write_to_path(str(paths[2]))
    return str(paths[0]), str(paths[1]), str(paths[2])


async def test_a_client_can_starttls_and_deliver_a_reply(tls_files: tuple[str, str, str]) -> None:
    cert, key, ca_file = tls_files
    replies = Replies()
    context = server_tls_context(cert, key)
    async with listener(replies, tls_context=context, require_starttls=False) as port:
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1",
            port=port,
            start_tls=True,
            tls_context=ssl.create_default_context(cafile=ca_file),
        )
        async with client:
            assert client.get_transport_info("sslcontext") is not None
            await client.sendmail(
                "send@send.smscentre.com",
                [ADDRESSES.address("m7")],
                reply_mail("OK - 1 SMS, ID - m7", "m7"),
            )
        # STARTTLS is offered, not required: a cleartext delivery still goes through.
        await aiosmtplib.send(
            reply_mail("OK - 2 SMS, ID - m8", "m8"),
            hostname="127.0.0.1",
            port=port,
            sender="send@send.smscentre.com",
            recipients=[ADDRESSES.address("m8")],
            start_tls=False,
        )
    assert [m for m, _ in replies.got] == ["m7", "m8"]


def test_tls_files_are_checked_at_start_up(tls_files: tuple[str, str, str]) -> None:
    cert, key, _ = tls_files
    ReplySettings(tls_cert_file=cert, tls_key_file=key)
    with pytest.raises(ValidationError, match="SMSC_REPLY__TLS_KEY_FILE"):
        ReplySettings(tls_cert_file=cert)
    with pytest.raises(ValidationError, match="SMSC_REPLY__TLS_CERT_FILE"):
        ReplySettings(tls_cert_file=cert + ".missing", tls_key_file=key)


async def test_the_worker_listens_with_its_settings(
    amqp: AmqpSettings, tls_files: tuple[str, str, str]
) -> None:
    cert, key, ca_file = tls_files
    reply = {"tls_cert_file": cert, "tls_key_file": key, "max_message_bytes": 300_000}
    async with gateway_and_worker(amqp, reply=reply) as (_, service):
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1",
            port=service.reply_port,
            start_tls=True,
            tls_context=ssl.create_default_context(cafile=ca_file),
        )
        async with client:
            await client.ehlo()
            assert client.supports_extension("size")
            assert client.esmtp_extensions["size"] == "300000"
