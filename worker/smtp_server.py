"""An aiosmtpd SMTP server served on the running event loop.

aiosmtpd's `Controller` runs the server in a thread with an event loop of its own, so a
handler touching this loop's objects (aio-pika channels, futures, queues) would fail with
"bound to a different event loop" or race. Serving through `loop.create_server` keeps
every SMTP session on the caller's loop.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl as ssl_module
from collections import Counter
from dataclasses import dataclass
from ssl import SSLContext
from typing import Any

from aiosmtpd.smtp import SMTP

log = logging.getLogger(__name__)

# DATA bytes past the size limit before the connection is cut: a message within them is
# still read to its end and refused 552 by aiosmtpd, as RFC 5321 has it.
_DATA_SLACK = 1024


@dataclass(frozen=True, slots=True)
class ListenerLimits:
    """What one listener grants its clients; see ReplySettings for each field."""

    max_message_bytes: int
    max_recipients: int
    max_sessions: int
    max_sessions_per_peer: int
    command_timeout_s: float
    session_timeout_s: float


def server_tls_context(cert_file: str, key_file: str) -> SSLContext:
    """A context to offer STARTTLS with (clients are not asked for certificates)."""
    context = ssl_module.create_default_context(ssl_module.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context


class _Sessions:
    """Open sessions of one listener, overall and per peer address."""

    def __init__(self, limits: ListenerLimits) -> None:
        self._limits = limits
        self.total = 0
        self.per_peer: Counter[str] = Counter()

    def admit(self, peer: str) -> str | None:
        """None when a session from `peer` may open (and counts it); else why not."""
        if self.total >= self._limits.max_sessions:
            return "too many connections"
        if self.per_peer[peer] >= self._limits.max_sessions_per_peer:
            return "too many connections from your address"
        self.total += 1
        self.per_peer[peer] += 1
        return None

    def release(self, peer: str) -> None:
        self.total -= 1
        self.per_peer[peer] -= 1
        if self.per_peer[peer] <= 0:
            del self.per_peer[peer]


class LimitedSMTP(SMTP):
    """aiosmtpd's SMTP with limits for a listener open to the world.

    - size: SIZE is advertised (a declared size over the limit is refused 552 at MAIL);
      DATA that passes the limit is answered 552 and the connection closed at once, so a
      huge body is neither buffered nor read to its end;
    - recipients: past `max_recipients` accepted ones, RCPT is answered 452 (RFC 5321);
    - sessions: past `max_sessions` overall or `max_sessions_per_peer` from one address,
      a new connection gets 421 and is closed before any command is read;
    - time: a session silent for `command_timeout_s` (aiosmtpd's `timeout`; it runs from the
      DATA command to the end of the data, too) is closed, and any session after
      `session_timeout_s` (421)."""

    def __init__(
        self, handler: Any, *, limits: ListenerLimits, sessions: _Sessions, **kwargs: Any
    ) -> None:
        kwargs.setdefault("data_size_limit", limits.max_message_bytes)
        kwargs.setdefault("timeout", limits.command_timeout_s)
        super().__init__(handler, **kwargs)
        self._limits = limits
        self._sessions = sessions
        self._peer_host: str | None = None
        self._refused = False
        self._deadline: asyncio.TimerHandle | None = None
        self._data_budget: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Called again by aiosmtpd's STARTTLS with the TLS transport: admitted already.
        if self._peer_host is None and not self._refused:
            peer = transport.get_extra_info("peername")
            host = str(peer[0]) if peer else "?"
            refusal = self._sessions.admit(host)
            if refusal is not None:
                self._refused = True
                log.warning("smtp connection from %s refused: %s", host, refusal)
                assert isinstance(transport, asyncio.WriteTransport)
                transport.write(f"421 4.7.0 {refusal}, try again later\r\n".encode())
                transport.close()
                return
            self._peer_host = host
            self._deadline = self.loop.call_later(
                self._limits.session_timeout_s, self._session_expired
            )
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._peer_host is None:  # refused at connection_made, or released already
            return
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._sessions.release(self._peer_host)
        self._peer_host = None
        super().connection_lost(error)

    def data_received(self, data: bytes) -> None:
        if self._data_budget is not None:
            self._data_budget -= len(data)
            if self._data_budget < 0:
                self._data_budget = None
                log.warning(
                    "smtp message from %s passed %d bytes: refused, connection closed",
                    self._peer_host,
                    self._limits.max_message_bytes,
                )
                self._close_with(
                    f"552 5.3.4 message larger than {self._limits.max_message_bytes} bytes"
                )
                return
        super().data_received(data)

    async def smtp_DATA(self, arg: str) -> None:
        self._data_budget = self._limits.max_message_bytes + _DATA_SLACK
        try:
            await super().smtp_DATA(arg)
        finally:
            self._data_budget = None

    async def smtp_RCPT(self, arg: str | None) -> None:
        envelope = self.envelope
        if envelope is not None and len(envelope.rcpt_tos) >= self._limits.max_recipients:
            await self.push(f"452 4.5.3 at most {self._limits.max_recipients} recipients")
            return
        await super().smtp_RCPT(arg)

    def _session_expired(self) -> None:
        log.warning("smtp session from %s passed its time limit: closed", self._peer_host)
        self._close_with("421 4.4.2 session time limit reached, closing")

    def _close_with(self, reply: str) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(reply.encode() + b"\r\n")
        transport.close()


def bound_port(server: asyncio.Server) -> int:
    """The port a server listens on (the one picked for it when it asked for 0)."""
    port: int = server.sockets[0].getsockname()[1]
    return port


async def serve_smtp(
    handler: object,
    host: str,
    port: int,
    *,
    smtp_class: type[SMTP] = SMTP,
    ssl: SSLContext | None = None,
    limits: ListenerLimits | None = None,
    **smtp_kwargs: Any,
) -> asyncio.Server:
    """Listen on host:port (0: any free port; read it from `server.sockets[0]`) with one
    `smtp_class(handler, **smtp_kwargs)` per connection, over implicit TLS when `ssl` is
    given; with `limits`, `smtp_class` is a `LimitedSMTP` (the default one, or a subclass of
    it), sessions counted across this listener. Close with `server.close()`.

    Give one address for `host`: a name such as `localhost` may bind IPv4 and IPv6, each
    on a different free port when `port` is 0."""
    loop = asyncio.get_running_loop()
    # Without a hostname, aiosmtpd calls socket.getfqdn() for every connection: a DNS
    # lookup that can stall the loop for seconds where DNS is slow.
    smtp_kwargs.setdefault("hostname", socket.gethostname())
    smtp_kwargs.setdefault("loop", loop)
    if limits is None:
        return await loop.create_server(
            lambda: smtp_class(handler, **smtp_kwargs), host, port, ssl=ssl
        )
    limited = LimitedSMTP if smtp_class is SMTP else smtp_class
    if not issubclass(limited, LimitedSMTP):
        raise ValueError("limits need a LimitedSMTP (or a subclass of it) as smtp_class")
    sessions = _Sessions(limits)
    return await loop.create_server(
        lambda: limited(handler, limits=limits, sessions=sessions, **smtp_kwargs),
        host,
        port,
        ssl=ssl,
    )
