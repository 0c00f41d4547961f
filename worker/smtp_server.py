"""An aiosmtpd SMTP server served on the running event loop.

aiosmtpd's `Controller` runs the server in a thread with an event loop of its own, so a
handler touching this loop's objects (aio-pika channels, futures, queues) would fail with
"bound to a different event loop" or race. Serving through `loop.create_server` keeps
every SMTP session on the caller's loop.
"""

from __future__ import annotations

import asyncio
import socket
from ssl import SSLContext
from typing import Any

from aiosmtpd.smtp import SMTP


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
    **smtp_kwargs: Any,
) -> asyncio.Server:
    """Listen on host:port (0: any free port; read it from `server.sockets[0]`) with one
    `smtp_class(handler, **smtp_kwargs)` per connection, over implicit TLS when `ssl` is
    given. Close with `server.close()`.

    Give one address for `host`: a name such as `localhost` may bind IPv4 and IPv6, each
    on a different free port when `port` is 0."""
    loop = asyncio.get_running_loop()
    # Without a hostname, aiosmtpd calls socket.getfqdn() for every connection: a DNS
    # lookup that can stall the loop for seconds where DNS is slow.
    smtp_kwargs.setdefault("hostname", socket.gethostname())
    smtp_kwargs.setdefault("loop", loop)
    return await loop.create_server(lambda: smtp_class(handler, **smtp_kwargs), host, port, ssl=ssl)
