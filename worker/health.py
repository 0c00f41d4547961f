"""Health and metrics over HTTP: `GET /livez`, `GET /readyz` on the health port and
`GET /metrics` on the metrics port (one server when both are the same port).

- /livez: 200 whenever the event loop gets round to answering, which is what it tests;
- /readyz: 200 only while the service is connected and consuming; 503 before that, while
  draining, and while the circuit is open (`Service.ready`);
- /metrics: the service's own Prometheus registry.

A few lines of asyncio rather than a web framework: three fixed GET routes for probes and
scrapers, answered from the service's own loop, with nothing new to install (aiohttp is
not a dependency of aio-pika), and no thread reading the service's state.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from http import HTTPStatus
from types import TracebackType
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from worker.settings import ObservabilitySettings

log = logging.getLogger(__name__)

Response = tuple[HTTPStatus, str, bytes]
Route = Callable[[], Response]

TEXT = "text/plain; charset=utf-8"
# Probes and scrapers send a few hundred bytes at once; anything slower is cut off.
REQUEST_TIMEOUT_S = 5.0
MAX_HEAD_BYTES = 8192


class HttpServer:
    """Answers GET and HEAD on fixed paths, one request per connection."""

    def __init__(self, routes: Mapping[str, Route]) -> None:
        self._routes = routes
        self._server: asyncio.Server | None = None

    async def start(self, port: int) -> None:
        # Every IPv4 interface, like the reply receiver: probes come from the node's address.
        # (No host would bind IPv6 too, but each family to its own port when it is 0.)
        self._server = await asyncio.start_server(
            self._serve, host="0.0.0.0", port=port, limit=MAX_HEAD_BYTES
        )

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
                method, status, content_type, body = self._answer(head)
                lines = [
                    f"HTTP/1.1 {status.value} {status.phrase}",
                    f"Content-Type: {content_type}",
                    f"Content-Length: {len(body)}",
                    "Cache-Control: no-store",
                    "Connection: close",
                ]
                if status == HTTPStatus.METHOD_NOT_ALLOWED:
                    lines.append("Allow: GET, HEAD")
                writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
                if method != "HEAD":
                    writer.write(body)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass  # a client that went away or never finished asking gets nothing
        finally:
            writer.close()

    def _answer(self, head: bytes) -> tuple[str, HTTPStatus, str, bytes]:
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return "", HTTPStatus.BAD_REQUEST, TEXT, b"bad request\n"
        method, target, _ = parts
        if method not in ("GET", "HEAD"):
            return method, HTTPStatus.METHOD_NOT_ALLOWED, TEXT, b"method not allowed\n"
        route = self._routes.get(urlsplit(target).path)
        if route is None:
            return method, HTTPStatus.NOT_FOUND, TEXT, b"not found\n"
        try:
            status, content_type, body = route()
        except Exception:
            log.exception("%s failed", target)
            return method, HTTPStatus.INTERNAL_SERVER_ERROR, TEXT, b"internal error\n"
        return method, status, content_type, body


class Endpoints:
    """The health and metrics servers of one service; `async with` around the service's
    whole life, so the probes answer while it starts and drains."""

    def __init__(
        self,
        settings: ObservabilitySettings,
        ready: Callable[[], bool],
        registry: CollectorRegistry,
    ) -> None:
        self._settings = settings
        self._ready = ready
        self._registry = registry
        self._health: HttpServer | None = None
        self._metrics: HttpServer | None = None

    async def start(self) -> None:
        health: dict[str, Route] = {"/livez": self._livez, "/readyz": self._readyz}
        metrics: dict[str, Route] = {"/metrics": self._metrics_text}
        s = self._settings
        if s.metrics_port == s.health_port and s.health_port != 0:
            self._health = self._metrics = HttpServer(health | metrics)
        else:
            self._health, self._metrics = HttpServer(health), HttpServer(metrics)
        try:
            await self._health.start(s.health_port)
            if self._metrics is not self._health:
                await self._metrics.start(s.metrics_port)
        except OSError:
            await self.close()
            raise
        log.info("health on port %d, metrics on port %d", self.health_port, self.metrics_port)

    @property
    def health_port(self) -> int:
        assert self._health is not None
        return self._health.port

    @property
    def metrics_port(self) -> int:
        assert self._metrics is not None
        return self._metrics.port

    async def close(self) -> None:
        if self._health is not None:
            await self._health.close()
        if self._metrics is not None and self._metrics is not self._health:
            await self._metrics.close()

    async def __aenter__(self) -> Endpoints:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @staticmethod
    def _livez() -> Response:
        return HTTPStatus.OK, TEXT, b"ok\n"

    def _readyz(self) -> Response:
        if self._ready():
            return HTTPStatus.OK, TEXT, b"ready\n"
        return HTTPStatus.SERVICE_UNAVAILABLE, TEXT, b"not ready\n"

    def _metrics_text(self) -> Response:
        return HTTPStatus.OK, CONTENT_TYPE_LATEST, generate_latest(self._registry)
