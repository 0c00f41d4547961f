"""Running the service as a process: signals, tracing from the OTEL_* variables, the health
and metrics servers, and the optional in-process emulator."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from contextlib import AsyncExitStack

from worker.emulator.config import EmulatorConfig
from worker.emulator.server import Emulator
from worker.health import Endpoints
from worker.service import Service
from worker.settings import Settings
from worker.telemetry import tracer_provider_from_env

log = logging.getLogger(__name__)


def emulator_for(settings: Settings, reply_port: int) -> EmulatorConfig:
    """A gateway that knows this worker's account and replies to its receiver."""
    gateway = settings.gateway
    password = gateway.password.get_secret_value()
    return EmulatorConfig(
        gateway_address=gateway.address,
        accounts={gateway.login: password} if gateway.login else {},
        api_keys=frozenset() if gateway.login else frozenset({password}),
        reply_relay=("127.0.0.1", reply_port),
    )


def pointed_at(settings: Settings, host: str, port: int) -> Settings:
    # The in-process emulator speaks plain SMTP without AUTH (a username would be refused
    # in clear).
    smtp = settings.smtp.model_copy(
        update={"host": host, "port": port, "security": "none", "username": ""}
    )
    return settings.model_copy(update={"smtp": smtp})


def free_port(host: str) -> int:
    """A port free now, for the emulator's replies to be relayed to before the receiver
    that will listen on it exists."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def with_reply_port(settings: Settings, port: int) -> Settings:
    return settings.model_copy(update={"reply": settings.reply.model_copy(update={"port": port})})


async def run(settings: Settings, *, with_emulator: bool = False) -> None:
    tracer_provider = tracer_provider_from_env(max_links=settings.batch.max_lines)
    async with AsyncExitStack() as stack:
        if tracer_provider is not None:
            # Last out: the spans of the drain's own submissions are exported too.
            stack.push_async_callback(asyncio.to_thread, tracer_provider.shutdown)
        if with_emulator:
            if settings.reply.port == 0:
                settings = with_reply_port(settings, free_port(settings.reply.host))
            emulator = await stack.enter_async_context(
                Emulator(emulator_for(settings, settings.reply.port))
            )
            log.info("gateway emulator listening on %s:%d", emulator.host, emulator.port)
            settings = pointed_at(settings, emulator.host, emulator.port)
        service = Service(settings, tracer_provider=tracer_provider)
        # Up before the service starts and down after it has drained: the probes and the
        # last scrape see its whole life.
        await stack.enter_async_context(
            Endpoints(
                settings.observability, lambda: service.ready, service.telemetry.metrics.registry
            )
        )
        await stack.enter_async_context(service)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, service.stop)
        await service.wait()
        log.info("signal received: draining")
