"""Health and metrics over HTTP (aiohttp): `GET /livez`, `GET /readyz` on the health port
and `GET /metrics` on the metrics port (one server when both are the same port).

- /livez: 200 whenever the event loop gets round to answering, which is what it tests;
- /readyz: 200 only while the service is connected and consuming; 503 before that, while
  draining, and while the circuit is open (`Service.ready`);
- /metrics: the service's own Prometheus registry.

Served from the service's own loop, so no thread reads the service's state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import TracebackType

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from worker.settings import ObservabilitySettings

log = logging.getLogger(__name__)

# Every IPv4 interface, like the reply receiver: probes come from the node's address.
HOST = "0.0.0.0"


async def _serve(app: web.Application, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, HOST, port).start()
    except OSError:
        await runner.cleanup()
        raise
    return runner


def _port(runner: web.AppRunner) -> int:
    port: int = runner.addresses[0][1]
    return port


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
        self._health: web.AppRunner | None = None
        self._metrics: web.AppRunner | None = None

    async def start(self) -> None:
        health = [web.get("/livez", self._livez), web.get("/readyz", self._readyz)]
        metrics = [web.get("/metrics", self._metrics_text)]
        s = self._settings
        try:
            if s.metrics_port == s.health_port and s.health_port != 0:
                self._health = self._metrics = await _serve(
                    self._app(health + metrics), s.health_port
                )
            else:
                self._health = await _serve(self._app(health), s.health_port)
                self._metrics = await _serve(self._app(metrics), s.metrics_port)
        except OSError:
            await self.close()
            raise
        log.info("health on port %d, metrics on port %d", self.health_port, self.metrics_port)

    @staticmethod
    def _app(routes: list[web.RouteDef]) -> web.Application:
        app = web.Application()
        app.add_routes(routes)
        return app

    @property
    def health_port(self) -> int:
        assert self._health is not None
        return _port(self._health)

    @property
    def metrics_port(self) -> int:
        assert self._metrics is not None
        return _port(self._metrics)

    async def close(self) -> None:
        if self._health is not None:
            await self._health.cleanup()
        if self._metrics is not None and self._metrics is not self._health:
            await self._metrics.cleanup()

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
    async def _livez(request: web.Request) -> web.Response:
        return web.Response(text="ok\n", headers={"Cache-Control": "no-store"})

    async def _readyz(self, request: web.Request) -> web.Response:
        ready = self._ready()
        return web.Response(
            status=200 if ready else 503,
            text="ready\n" if ready else "not ready\n",
            headers={"Cache-Control": "no-store"},
        )

    async def _metrics_text(self, request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(self._registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response
