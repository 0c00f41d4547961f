"""The SMTP client against real servers: plain, STARTTLS and implicit TLS, with and without
AUTH, and what it makes of failures."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.smtp import AuthResult, LoginPassword
from pydantic import SecretStr, ValidationError

from worker.emulator.config import EmulatorConfig
from worker.emulator.server import Emulator
from worker.settings import SmtpSettings
from worker.smtp_client import GatewaySmtp, Outcome
from worker.smtp_server import bound_port, serve_smtp

MAIL = b"From: a@example.org\r\nTo: b@example.org\r\nSubject: \r\n\r\nhello\r\n"
USER, PASSWORD = "worker", "smtp-pass-123"


class Inbox:
    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.encrypted: list[bool] = []  # per message: did it arrive over TLS
        self.logins: list[bool] = []  # per AUTH attempt: was the session encrypted

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(envelope.original_content)
        self.encrypted.append(session.ssl is not None)
        return "250 OK"


def authenticate(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
    inbox = server.event_handler
    if isinstance(inbox, Inbox):
        inbox.logins.append(session.ssl is not None)
    ok = isinstance(data, LoginPassword) and (data.login, data.password) == (
        USER.encode(),
        PASSWORD.encode(),
    )
    return AuthResult(success=ok)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


@asynccontextmanager
async def smtp_server(inbox: Inbox, **kwargs: Any) -> AsyncIterator[int]:
    server = await serve_smtp(inbox, "127.0.0.1", 0, **kwargs)
    try:
        yield bound_port(server)
    finally:
        server.close()


def client(port: int, **settings: Any) -> GatewaySmtp:
    return GatewaySmtp(
        SmtpSettings(**{"host": "127.0.0.1", "port": port, "timeout_s": 5, **settings})
    )


async def test_starttls_with_auth_delivers(ca: trustme.CA, ca_file: str) -> None:
    inbox = Inbox()
    async with smtp_server(
        inbox,
        tls_context=server_context(ca),
        require_starttls=True,
        authenticator=authenticate,
        auth_required=True,
    ) as port:
        settings = {"security": "starttls", "ca_file": ca_file, "username": USER}
        async with client(port, password=SecretStr(PASSWORD), **settings) as smtp:
            first = await smtp.submit("a@example.org", "b@example.org", MAIL)
            second = await smtp.submit("a@example.org", "b@example.org", MAIL)
        async with client(port, password=SecretStr("wrong"), **settings) as smtp:
            refused = await smtp.submit("a@example.org", "b@example.org", MAIL)

    assert (first.outcome, second.outcome) == (Outcome.accepted, Outcome.accepted)
    assert len(inbox.messages) == 2
    assert refused.outcome != Outcome.accepted
    assert "wrong" not in refused.detail


async def test_implicit_tls_delivers_and_an_unknown_ca_is_refused(
    ca: trustme.CA, ca_file: str
) -> None:
    inbox = Inbox()
    async with smtp_server(inbox, ssl=server_context(ca)) as port:
        async with client(port, security="tls", ca_file=ca_file) as smtp:
            trusted = await smtp.submit("a@example.org", "b@example.org", MAIL)
        async with client(port, security="tls") as smtp:
            untrusted = await smtp.submit("a@example.org", "b@example.org", MAIL)

    assert trusted.outcome == Outcome.accepted
    assert untrusted.outcome == Outcome.transient
    assert len(inbox.messages) == 1


async def test_plain_client_against_a_server_that_requires_starttls_is_refused(
    ca: trustme.CA,
) -> None:
    inbox = Inbox()
    async with (
        smtp_server(inbox, tls_context=server_context(ca), require_starttls=True) as port,
        client(port, security="none") as smtp,
    ):
        result = await smtp.submit("a@example.org", "b@example.org", MAIL)
    assert result.outcome == Outcome.permanent
    assert inbox.messages == []


async def test_a_connection_the_server_dropped_is_replaced_without_a_failure() -> None:
    async with Emulator(EmulatorConfig()) as emulator, client(emulator.port) as smtp:
        first = await smtp.submit("a@example.org", "send@send.smscentre.com", MAIL)
        await emulator.faults.refuse_connections(drop_open=True)
        await emulator.faults.accept_connections()
        second = await smtp.submit("a@example.org", "send@send.smscentre.com", MAIL)
    # Not gateway mail, so the emulator answers with a reply error, but SMTP took both.
    assert (first.outcome, second.outcome) == (Outcome.accepted, Outcome.accepted)
    assert len(emulator.mails) == 2


async def test_failures_are_classified_by_what_is_known_about_the_mail() -> None:
    async with Emulator(EmulatorConfig()) as emulator, client(emulator.port) as smtp:
        emulator.faults.fail_data(451)
        temporary = await smtp.submit("a@example.org", "send@send.smscentre.com", MAIL)
        emulator.faults.fail_data(554)
        permanent = await smtp.submit("a@example.org", "send@send.smscentre.com", MAIL)
        emulator.faults.drop_mid_data()
        dropped_mid_data = await smtp.submit("a@example.org", "send@send.smscentre.com", MAIL)
        emulator.faults.drop_after_dot()
        dropped_after_dot = await smtp.submit("a@example.org", "send@send.smscentre.com", MAIL)
        await emulator.faults.refuse_connections()
        refused = await smtp.submit("a@example.org", "send@send.smscentre.com", MAIL)

    assert temporary.outcome == Outcome.transient and temporary.code == 451
    assert permanent.outcome == Outcome.permanent and permanent.code == 554
    # Once the data has started, a broken connection leaves the mail's fate unknown.
    assert dropped_mid_data.outcome == Outcome.unknown
    assert dropped_after_dot.outcome == Outcome.unknown
    assert refused.outcome == Outcome.transient


async def test_an_overall_deadline_bounds_a_slow_server() -> None:
    async with (
        Emulator(EmulatorConfig(latency_s=3.0)) as emulator,
        client(emulator.port, timeout_s=30, submit_deadline_s=0.5) as smtp,
    ):
        loop = asyncio.get_running_loop()
        started = loop.time()
        result = await smtp.submit("a@example.org", "send@send.smscentre.com", MAIL)
        elapsed = loop.time() - started
    # The data went out before the server stalled: the mail may have been taken.
    assert result.outcome == Outcome.unknown
    assert elapsed < 2.5, "the per-operation timeout, not the deadline, ended the wait"


async def test_the_default_uses_starttls_whenever_the_server_offers_it(ca: trustme.CA) -> None:
    """Opportunistic (the default): the server offers STARTTLS without requiring it, and its
    certificate is one the client has no CA for; the e-mail goes encrypted all the same."""
    inbox = Inbox()
    async with smtp_server(inbox, tls_context=server_context(ca)) as port:
        assert SmtpSettings().security == "opportunistic"
        async with client(port) as smtp:
            result = await smtp.submit("a@example.org", "b@example.org", MAIL)
    assert result.outcome == Outcome.accepted
    assert inbox.encrypted == [True]


async def test_opportunistic_without_starttls_sends_in_clear_but_never_a_password() -> None:
    inbox = Inbox()
    # A server that offers AUTH over a cleartext session (and no STARTTLS).
    async with smtp_server(inbox, authenticator=authenticate, auth_require_tls=False) as port:
        async with client(port) as smtp:
            plain = await smtp.submit("a@example.org", "b@example.org", MAIL)
        async with client(port, username=USER, password=SecretStr(PASSWORD)) as smtp:
            refused = await smtp.submit("a@example.org", "b@example.org", MAIL)

    assert plain.outcome == Outcome.accepted
    assert inbox.encrypted == [False]
    assert refused.outcome == Outcome.permanent
    assert "STARTTLS" in refused.detail and PASSWORD not in refused.detail
    assert inbox.logins == [], "AUTH was attempted over a cleartext session"
    assert len(inbox.messages) == 1


async def test_opportunistic_logs_in_once_the_session_is_encrypted(ca: trustme.CA) -> None:
    inbox = Inbox()
    async with (
        smtp_server(
            inbox, tls_context=server_context(ca), authenticator=authenticate, auth_required=True
        ) as port,
        client(port, username=USER, password=SecretStr(PASSWORD)) as smtp,
    ):
        result = await smtp.submit("a@example.org", "b@example.org", MAIL)
    assert result.outcome == Outcome.accepted
    assert inbox.logins == [True]
    assert inbox.encrypted == [True]


async def test_starttls_verifies_the_server_against_the_ca_file(
    ca: trustme.CA, ca_file: str
) -> None:
    inbox = Inbox()
    async with smtp_server(inbox, tls_context=server_context(ca)) as port:
        async with client(port, security="starttls", ca_file=ca_file) as smtp:
            trusted = await smtp.submit("a@example.org", "b@example.org", MAIL)
        async with client(port, security="starttls") as smtp:
            untrusted = await smtp.submit("a@example.org", "b@example.org", MAIL)
        other_ca = trustme.CA()
        other_file = Path(ca_file).with_name("other-ca.pem")
        other_ca.cert_pem.write_to_path(str(other_file))
        async with client(port, security="starttls", ca_file=str(other_file)) as smtp:
            wrong_ca = await smtp.submit("a@example.org", "b@example.org", MAIL)

    assert trusted.outcome == Outcome.accepted
    assert untrusted.outcome == Outcome.transient
    assert wrong_ca.outcome == Outcome.transient
    assert "CERTIFICATE_VERIFY_FAILED" in wrong_ca.detail
    assert inbox.encrypted == [True]


async def test_starttls_required_but_not_offered_is_not_sent_in_clear() -> None:
    inbox = Inbox()
    async with smtp_server(inbox) as port, client(port, security="starttls") as smtp:
        result = await smtp.submit("a@example.org", "b@example.org", MAIL)
    assert result.outcome != Outcome.accepted
    assert inbox.messages == []


def test_a_username_with_cleartext_security_stops_start_up() -> None:
    with pytest.raises(ValidationError) as raised:
        SmtpSettings(security="none", username=USER)
    message = str(raised.value)
    assert "SMSC_SMTP__USERNAME" in message and "SMSC_SMTP__SECURITY" in message
