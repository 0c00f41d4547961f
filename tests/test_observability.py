"""Tracing, metrics, health and logs of the real worker: real RabbitMQ, the emulator over
real SMTP, spans caught by an in-memory exporter, /metrics and the probes over real HTTP."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanContext, SpanKind
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from tests.conftest import collecting, free_port, make_settings, phone
from worker.contract import Status
from worker.emulator.config import EmulatorConfig
from worker.emulator.server import Emulator
from worker.errors import ConfigurationError
from worker.health import Endpoints
from worker.logs import JsonFormatter, RedactSecrets, TextFormatter, TraceContext, secrets_of
from worker.metrics import Metrics, dead_letter_label
from worker.service import Service
from worker.settings import AmqpSettings, GatewaySettings, ObservabilitySettings, Settings
from worker.telemetry import GATEWAY_ID, REQUEST_ID, tracer_provider_from_env

API_KEY = "obs-test-key-5c1e"  # distinctive, so a leak into a span or a log line shows
ANY_PORTS = ObservabilitySettings(health_port=0, metrics_port=0)


@asynccontextmanager
async def observed(
    amqp: AmqpSettings,
    tracer_provider: TracerProvider | None = None,
    emulator_config: dict[str, Any] | None = None,
) -> AsyncIterator[tuple[Emulator, Service, Endpoints]]:
    """The emulator, a worker with its health and metrics endpoints on free ports, running."""
    reply_port = free_port()
    config = EmulatorConfig(
        reply_relay=("127.0.0.1", reply_port),
        accounts={},
        api_keys=frozenset({API_KEY}),
        **(emulator_config or {}),
    )
    async with Emulator(config) as emulator:
        settings = worker_settings(amqp, reply_port, emulator.port)
        service = Service(settings, tracer_provider=tracer_provider)
        async with endpoints_of(service) as endpoints, service:
            yield emulator, service, endpoints


def worker_settings(amqp: AmqpSettings, reply_port: int, smtp_port: int) -> Settings:
    return make_settings(
        amqp,
        reply_port,
        smtp_port,
        gateway=GatewaySettings(password=SecretStr(API_KEY)),
        observability=ANY_PORTS,
    )


def endpoints_of(service: Service) -> Endpoints:
    return Endpoints(
        service.settings.observability, lambda: service.ready, service.telemetry.metrics.registry
    )


async def http_get(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    writer.write(request.encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = await http_get(port, "/metrics")
    assert status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


async def eventually(condition: Callable[[], bool], timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


def caller_context() -> tuple[str, str, str]:
    """A caller's trace id, span id, and the traceparent header carrying them."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def parse_traceparent(value: Any) -> tuple[str, str]:
    _, trace_id, span_id, _ = str(value).split("-")
    return trace_id, span_id


def hex_ids(span: ReadableSpan) -> tuple[str, str]:
    assert span.context is not None
    return hex_ids_of(span.context)


def hex_ids_of(context: SpanContext) -> tuple[str, str]:
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


# tracing -----------------------------------------------------------------------------


async def test_the_callers_trace_goes_through_the_worker_to_the_results(
    amqp: AmqpSettings,
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    callers = {f"t{n}": caller_context() for n in range(3)}
    rejected_caller = caller_context()

    async with collecting(amqp) as (broker, results), observed(amqp, provider):
        for n, (request_id, (_, _, traceparent)) in enumerate(callers.items()):
            await broker.publish(
                {"request_id": request_id, "to": phone(n), "text": f"traced {n}"},
                headers={"traceparent": traceparent, "tracestate": "caller=1", "baggage": f"k={n}"},
            )
        await broker.publish({"request_id": "untraced", "to": phone(9), "text": "no context"})
        await broker.publish(
            {"request_id": "bad", "to": "+7000", "text": "x"},
            headers={"traceparent": rejected_caller[2]},
        )
        done = [*callers, "untraced"]
        await results.wait_until(
            lambda: (
                all(Status.accepted in results.statuses(i) for i in done)
                and Status.rejected in results.statuses("bad")
            )
        )
        await eventually(lambda: len(named(exporter, "gateway reply")) >= 1)

    spans = exporter.get_finished_spans()
    request_spans = {
        s.attributes[REQUEST_ID]: s
        for s in spans
        if s.kind == SpanKind.CONSUMER and s.attributes and REQUEST_ID in s.attributes
    }
    assert set(request_spans) == {*callers, "untraced", "bad"}
    headers_of = {e.request_id: h for e, h in zip(results.events, results.headers, strict=True)}

    for n, (request_id, (trace_id, span_id, _)) in enumerate(callers.items()):
        span = request_spans[request_id]
        # The request span continues the caller's trace, under the caller's span.
        assert hex_ids(span)[0] == trace_id
        assert span.parent is not None
        assert f"{span.parent.span_id:016x}" == span_id
        assert span.name == f"process {amqp.requests_queue}"
        assert span.attributes is not None
        assert span.attributes["messaging.system"] == "rabbitmq"
        assert span.attributes["messaging.operation.type"] == "process"
        assert span.attributes["messaging.destination.subscription.name"] == amqp.requests_queue
        assert span.attributes["messaging.rabbitmq.destination.routing_key"] == amqp.requests_queue
        # Every result event carries the request's trace, the request span as parent, and
        # the caller's trace state and baggage.
        events = [
            h
            for e, h in zip(results.events, results.headers, strict=True)
            if e.request_id == request_id
        ]
        assert len(events) == 2
        for headers in events:
            assert parse_traceparent(headers["traceparent"]) == hex_ids(span)
            assert headers["tracestate"] == "caller=1"
            assert headers["baggage"] == f"k={n}"

    untraced = request_spans["untraced"]
    assert untraced.parent is None
    assert parse_traceparent(headers_of["untraced"]["traceparent"]) == hex_ids(untraced)
    assert hex_ids(request_spans["bad"])[0] == rejected_caller[0]
    assert parse_traceparent(headers_of["bad"]["traceparent"]) == hex_ids(request_spans["bad"])

    # Fan-in: each e-mail's submission span starts a trace of its own and links to the
    # span of every request it carried; the SMTP transaction is its child.
    submissions = {
        s.attributes[GATEWAY_ID]: s for s in named(exporter, "submit mail") if s.attributes
    }
    for request_id in done:
        submission = submissions[results.of(request_id)[-1].gateway_id]
        assert submission.parent is None
        linked = {hex_ids_of(k.context) for k in submission.links}
        assert hex_ids(request_spans[request_id]) in linked
    for gateway_id, submission in submissions.items():
        (smtp,) = [s for s in named(exporter, "smtp submit") if s.parent == submission.context]
        assert smtp.kind == SpanKind.CLIENT
        assert smtp.attributes is not None
        assert smtp.attributes[GATEWAY_ID] == gateway_id
        assert smtp.attributes["server.address"] == "127.0.0.1"
        assert smtp.attributes["smsc.smtp.outcome"] == "accepted"
        assert smtp.attributes["smsc.mail.lines"] == len(submission.links)
        assert isinstance(smtp.attributes["smsc.mail.bytes"], int)
        assert smtp.attributes["smsc.mail.bytes"] > 0
        # The gateway's reply is linked to the submission it answers.
        (reply,) = [
            s
            for s in named(exporter, "gateway reply")
            if s.attributes and s.attributes[GATEWAY_ID] == gateway_id
        ]
        assert [hex_ids_of(k.context) for k in reply.links] == [hex_ids(submission)]

    dumped = "".join(s.to_json() for s in spans)
    assert API_KEY not in dumped
    assert "guest" not in dumped


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def test_tracing_is_configured_by_the_otel_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    assert tracer_provider_from_env(max_links=500) is None
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert tracer_provider_from_env(max_links=500) is None

    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    provider = tracer_provider_from_env(max_links=500)
    assert provider is not None
    assert provider.resource.attributes["service.name"] == "smsc-worker"
    # A submission links to all of an e-mail's requests, beyond the SDK's default 128.
    assert links_kept(provider, 300) == 300
    provider.shutdown()
    monkeypatch.setenv("OTEL_SPAN_LINK_COUNT_LIMIT", "64")
    provider = tracer_provider_from_env(max_links=500)
    assert provider is not None
    assert links_kept(provider, 300) == 64
    provider.shutdown()
    monkeypatch.delenv("OTEL_SPAN_LINK_COUNT_LIMIT")

    monkeypatch.setenv("OTEL_SERVICE_NAME", "sms-eu")
    for protocol in ("grpc", "http/protobuf"):
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
        monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp,console")
        provider = tracer_provider_from_env(max_links=500)
        assert provider is not None
        assert provider.resource.attributes["service.name"] == "sms-eu"
        provider.shutdown()

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    with pytest.raises(ConfigurationError, match="http/json"):
        tracer_provider_from_env(max_links=500)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(ConfigurationError, match="zipkin"):
        tracer_provider_from_env(max_links=500)


def links_kept(provider: TracerProvider, count: int) -> int:
    links = [Link(SpanContext(1, n + 1, is_remote=True)) for n in range(count)]
    span = provider.get_tracer("test").start_span("linked", links=links)
    span.end()
    assert isinstance(span, ReadableSpan)
    return len(span.links)


# metrics -----------------------------------------------------------------------------


async def test_metrics_count_what_happened_in_a_run(amqp: AmqpSettings) -> None:
    good = 20
    emulator_config = {"undeliverable": frozenset({phone(99).lstrip("+")})}
    async with (
        collecting(amqp) as (broker, results),
        observed(amqp, emulator_config=emulator_config) as (emulator, _, endpoints),
    ):
        # Delivered, rejected, and failed by the gateway (a sender of its own keeps the
        # bad line in an e-mail of its own: no split, no retries of the good ones).
        for n in range(good):
            await broker.publish({"request_id": f"m{n}", "to": phone(n), "text": f"count {n}"})
        await broker.publish({"request_id": "invalid", "to": "+7000", "text": "x"})
        await broker.publish(
            {"request_id": "nowhere", "to": phone(99), "text": "lost", "sender": "Lost"}
        )
        await results.wait_until(
            lambda: (
                len(results.with_status(Status.accepted)) == good
                and Status.failed in results.statuses("nowhere")
                and Status.rejected in results.statuses("invalid")
            )
        )
        # A transient SMTP failure: retried, then delivered.
        emulator.faults.fail_data(451)
        await broker.publish({"request_id": "flaky", "to": phone(30), "text": "again"})
        await results.wait_until(lambda: Status.accepted in results.statuses("flaky"))
        # The second identical request within the minute is held back.
        for n in range(2):
            await broker.publish({"request_id": f"same{n}", "to": phone(50), "text": "same"})
        await results.wait_until(
            lambda: (
                Status.deferred in results.statuses("same1")
                and Status.accepted in results.statuses("same0")
            )
        )
        metrics = await scrape(endpoints.metrics_port)

    def value(name: str, **labels: str) -> float:
        return metrics.get((name, tuple(sorted(labels.items()))), 0.0)

    count = {status: len(results.with_status(status)) for status in Status}
    assert count[Status.accepted] == good + 2
    for status in Status:
        assert value("smsc_request_results_total", status=status.value) == count[status]
    assert value("smsc_request_results_total", status="rejected") == 1
    assert value("smsc_request_results_total", status="failed") == 1
    assert value("smsc_gateway_errors_total", error="8") == 1
    assert value("smsc_retries_total", reason="smtp_transient") == 1
    assert value("smsc_deferrals_total", reason="identical_content") == 1

    accepted = value("smsc_emails_total", outcome="accepted")
    transient = value("smsc_emails_total", outcome="transient")
    assert accepted >= 4
    assert transient == 1
    mails = accepted + transient
    assert value("smsc_email_lines_count") == mails
    assert value("smsc_email_bytes_count") == mails
    assert value("smsc_batch_wait_seconds_count") == mails
    # Each request is one line of one SMS part; the e-mail refused with 451 had one.
    assert value("smsc_email_lines_sum") == count[Status.submitted] + 1
    assert value("smsc_sms_parts_total") == count[Status.submitted]
    assert value("smsc_email_bytes_sum") > 100 * mails
    # The requests came on the normal lane: the latencies are labelled with it.
    normal = {"priority": "normal"}
    assert value("smsc_request_to_submitted_seconds_count", **normal) == count[Status.submitted]
    assert value("smsc_request_to_accepted_seconds_count", **normal) == good + 2
    assert value("smsc_request_to_accepted_seconds_bucket", le="+Inf", **normal) == good + 2
    assert value("smsc_request_to_accepted_seconds_count", priority="high") == 0
    assert value("smsc_circuit_state", state="closed") == 1
    assert value("smsc_circuit_state", state="open") == 0
    # One reply per e-mail the gateway took; the lost number's was an error.
    assert value("smsc_replies_total", answer="error") == 1
    assert value("smsc_replies_total", answer="ok") == accepted - 1
    # The rejected and the failed request, each copied to the dead letters.
    dead = {labels: v for (name, labels), v in metrics.items() if name == "smsc_dead_letters_total"}
    assert dead == {(("code", "gateway_8"),): 1, (("code", "invalid_phone"),): 1}


def test_dead_letter_codes_of_gateway_errors_are_bounded() -> None:
    """A reply's error number becomes a dead letter's code; any number the gateway may send
    must not become a new label value (series) of its own."""
    assert dead_letter_label("invalid_phone") == "invalid_phone"
    assert dead_letter_label("gateway_8") == "gateway_8"
    assert dead_letter_label("gateway_31337") == "gateway_other"
    assert dead_letter_label("gateway_x") == "gateway_other"


async def test_each_service_has_its_own_registry(amqp: AmqpSettings) -> None:
    settings = worker_settings(amqp, free_port(), free_port())
    one, two = Service(settings), Service(settings)
    assert one.telemetry.metrics.registry is not two.telemetry.metrics.registry


# health ------------------------------------------------------------------------------


async def test_readiness_follows_the_service_from_start_through_drain(amqp: AmqpSettings) -> None:
    reply_port = free_port()
    config = EmulatorConfig(
        reply_relay=("127.0.0.1", reply_port), accounts={}, api_keys=frozenset({API_KEY})
    )
    async with collecting(amqp) as (broker, results), Emulator(config) as emulator:
        service = Service(worker_settings(amqp, reply_port, emulator.port))
        async with endpoints_of(service) as endpoints:
            port = endpoints.health_port
            assert port != endpoints.metrics_port
            assert await http_get(port, "/livez") == (200, b"ok\n")
            assert (await http_get(port, "/readyz"))[0] == 503  # not connected yet

            await service.start()
            drained = False
            try:
                assert await http_get(port, "/readyz") == (200, b"ready\n")
                # A slow gateway keeps an e-mail in flight, so the drain takes a while.
                emulator.faults.latency_s = 1.0
                await broker.publish({"request_id": "last", "to": phone(1), "text": "bye"})
                await eventually(lambda: len(emulator.mails) == 1)
                drain = asyncio.create_task(service.drain())
                drained = True
                statuses = []
                while not drain.done():
                    statuses.append((await http_get(port, "/readyz"))[0])
                    assert (await http_get(port, "/livez"))[0] == 200
                await drain
                assert statuses
                assert set(statuses) == {503}
                assert (await http_get(port, "/readyz"))[0] == 503
            finally:
                if not drained:
                    await service.drain()
        await results.wait_until(lambda: Status.accepted in results.statuses("last"))


async def test_the_http_server_answers_only_its_routes() -> None:
    settings = ObservabilitySettings(health_port=free_port(), metrics_port=0)
    service_ready = False
    registry = Metrics().registry
    async with Endpoints(settings, lambda: service_ready, registry) as endpoints:
        assert endpoints.health_port == settings.health_port
        assert (await http_get(endpoints.health_port, "/metrics"))[0] == 404
        assert (await http_get(endpoints.metrics_port, "/livez"))[0] == 404
        assert await http_get(endpoints.health_port, "/livez", "HEAD") == (200, b"")
        assert (await http_get(endpoints.health_port, "/livez", "POST"))[0] == 405
        assert (await http_get(endpoints.health_port, "/readyz?verbose"))[0] == 503
        service_ready = True
        assert (await http_get(endpoints.health_port, "/readyz"))[0] == 200
        status, body = await http_get(endpoints.metrics_port, "/metrics")
        assert status == 200
        assert b"smsc_request_results_total" in body

    # One port for both when they are the same.
    shared = free_port()
    same = ObservabilitySettings(health_port=shared, metrics_port=shared)
    async with Endpoints(same, lambda: True, registry) as endpoints:
        assert endpoints.metrics_port == endpoints.health_port == shared
        assert (await http_get(shared, "/metrics"))[0] == 200
        assert (await http_get(shared, "/livez"))[0] == 200


# logs --------------------------------------------------------------------------------


async def test_log_lines_name_their_trace_request_and_email(amqp: AmqpSettings) -> None:
    trace_id, _, traceparent = caller_context()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(TraceContext())
    logger = logging.getLogger("worker")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        async with collecting(amqp) as (broker, results), observed(amqp) as (_, service, _):
            handler.addFilter(RedactSecrets(secrets_of(service.settings)))
            await broker.publish(
                {"request_id": "logged-bad", "to": "+7000", "text": "x"},
                headers={"traceparent": traceparent},
            )
            await broker.publish({"request_id": "logged-good", "to": phone(1), "text": "x"})
            await results.wait_until(
                lambda: (
                    Status.rejected in results.statuses("logged-bad")
                    and Status.accepted in results.statuses("logged-good")
                )
            )
            logging.getLogger("worker.test").info("the key is %s", API_KEY)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)

    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    (rejected,) = [x for x in lines if x["message"].startswith("rejected request logged-bad")]
    assert rejected["request_id"] == "logged-bad"
    assert rejected["trace_id"] == trace_id
    assert len(rejected["span_id"]) == 16
    gateway_id = results.of("logged-good")[-1].gateway_id
    (sent,) = [x for x in lines if x["message"].startswith(f"e-mail {gateway_id}: accepted")]
    assert sent["gateway_id"] == gateway_id
    assert "request_id" not in sent
    assert API_KEY not in stream.getvalue()


def test_text_log_lines_end_with_their_context() -> None:
    record = logging.LogRecord("worker.x", logging.INFO, __file__, 1, "sent %s", ("it",), None)
    record.request_id = "r-1"
    record.gateway_id = "g-1"
    line = TextFormatter().format(record)
    assert line.endswith("worker.x: sent it [request_id=r-1 gateway_id=g-1]")
