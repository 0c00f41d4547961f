"""Tracing, and the hooks through which the pipeline reports to tracing and metrics.

Spans (OpenTelemetry; `tracer_provider_from_env` reads the standard OTEL_* variables):
- `process <queue>` (CONSUMER), one per delivered request, a child of the caller's context
  (W3C traceparent/tracestate and baggage in the AMQP headers), with the messaging
  semantic conventions: validation, limits, joining a batch, or the rejection or deferral.
- `submit mail` (INTERNAL), one per e-mail. An e-mail carries requests from many traces
  (fan-in), so it starts a trace of its own with a link to every request span it carries;
  its child `smtp submit` (CLIENT) is the SMTP transaction.
- `gateway reply` (SERVER), one per reply e-mail, linked to the submission it answers (the
  submission's context is kept in the MailRecord).

Propagation onward: on receipt, the request span's context is written over the trace
headers of the delivered message. Everything that carries the request further is copied
from those headers (RequestCopy: result events, retry and dead-letter copies), so all of
it continues the request's trace, under the request span, without the pipeline handing
spans around: a caller's consumer of the result events and the next attempt of a retried
request land in the caller's trace. With tracing off the caller's context passes through
unchanged.

Why not opentelemetry-instrumentation-aio-pika: it patches aio_pika's Queue and Exchange
classes for the whole process, wraps each consumer callback in a span that ends when the
callback returns, and injects the *current* context into every message published. Here
the callback returns as soon as a request has joined a batch, and its result events are
published later from a submission or a reply, whose current context is another trace:
the instrumentation would overwrite each event's context with that one, the very thing
fan-in must not do. The links need our own spans anyway, and its current release pins a
different opentelemetry-semantic-conventions beta than the SDK in uv.lock.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from opentelemetry import context, propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter, TextMapPropagator
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, StatusCode
from opentelemetry.trace import Status as SpanStatus
from opentelemetry.util.types import AttributeValue

from worker.contract import ResultEvent
from worker.delivery import ATTEMPT_HEADER
from worker.errors import ConfigurationError
from worker.lanes import Lane
from worker.ledger import CircuitView, MailRecord
from worker.logs import Masker, gateway_id_var, request_id_var, secrets_of
from worker.metrics import RECEIVED_HEADER, Metrics, gateway_error_label
from worker.protocol.replies import Accepted, Reply
from worker.settings import Settings
from worker.smtp_client import Outcome, SubmitResult

log = logging.getLogger(__name__)

INSTRUMENTATION = "smsc-worker"
DEFAULT_SERVICE_NAME = "smsc-worker"

# The messaging conventions are still in development, so the names are pinned here
# rather than imported from the semantic-conventions package's incubating module.
MESSAGING_SYSTEM = "messaging.system"
MESSAGING_OPERATION_TYPE = "messaging.operation.type"
MESSAGING_OPERATION_NAME = "messaging.operation.name"
MESSAGING_DESTINATION = "messaging.destination.name"
MESSAGING_SUBSCRIPTION = "messaging.destination.subscription.name"
MESSAGING_ROUTING_KEY = "messaging.rabbitmq.destination.routing_key"
MESSAGING_DELIVERY_TAG = "messaging.rabbitmq.message.delivery_tag"
MESSAGING_MESSAGE_ID = "messaging.message.id"
MESSAGING_CONVERSATION_ID = "messaging.message.conversation_id"
MESSAGING_BODY_SIZE = "messaging.message.body.size"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
ERROR_TYPE = "error.type"
REQUEST_ID = "smsc.request_id"
ATTEMPT = "smsc.attempt"
GATEWAY_ID = "smsc.gateway_id"
REQUESTS = "smsc.requests"
BATCH_WAIT_MS = "smsc.batch.wait_ms"
MAIL_BYTES = "smsc.mail.bytes"
MAIL_LINES = "smsc.mail.lines"
SMTP_OUTCOME = "smsc.smtp.outcome"
SMTP_CODE = "smsc.smtp.code"
GATEWAY_ERROR = "smsc.gateway.error"
GATEWAY_ACTION = "smsc.gateway.action"
SMS_COUNT = "smsc.sms_count"

Consumer = Callable[[AbstractIncomingMessage], Awaitable[None]]


class _HeaderGetter(Getter[Mapping[str, Any]]):
    """AMQP header values arrive as str, bytes or anything else a publisher chose."""

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = carrier.get(key)
        if value is None:
            return None
        if isinstance(value, bytes):
            return [value.decode("utf-8", "replace")]
        return [str(value)]

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return list(carrier)


_HEADERS = _HeaderGetter()


def _extract(headers: Mapping[str, Any]) -> Context:
    # An empty starting context: the propagators would otherwise start from the current
    # one and, where the headers carry nothing, hand back whatever span is current.
    return propagate.extract(headers, context=Context(), getter=_HEADERS)


def _span_context(headers: Mapping[str, Any]) -> SpanContext:
    return trace.get_current_span(_extract(headers)).get_span_context()


@functools.lru_cache(maxsize=4)
def _propagated_names(textmap: TextMapPropagator) -> frozenset[str]:
    # A composite propagator builds its set of names anew on every read.
    return frozenset(textmap.fields)


def event_headers(request_headers: Mapping[str, Any]) -> dict[str, str]:
    """The trace headers for a result event about the request with these headers."""
    names = _propagated_names(propagate.get_global_textmap())
    if not any(name in request_headers for name in names):
        # Nothing to carry on; events go out by the thousand, so skip the round trip.
        return {}
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=_extract(request_headers))
    return carrier


@contextmanager
def _log_context(*, request_id: str | None, gateway_id: str | None) -> Iterator[None]:
    tokens = request_id_var.set(request_id), gateway_id_var.set(gateway_id)
    try:
        yield
    finally:
        request_id_var.reset(tokens[0])
        gateway_id_var.reset(tokens[1])


class Telemetry:
    """One per Service: its tracer and metrics, and a method for each point of the pipeline
    worth reporting. Nothing here reads a secret into a span: hosts, ids and counts only,
    and exception texts are masked like the logs."""

    def __init__(
        self, settings: Settings, tracer_provider: trace.TracerProvider | None = None
    ) -> None:
        self.metrics = Metrics()
        self._tracer = trace.get_tracer(INSTRUMENTATION, tracer_provider=tracer_provider)
        provider = tracer_provider or trace.get_tracer_provider()
        self._tracing = not isinstance(
            provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider
        )
        self._queue = settings.amqp.requests_queue
        self._smtp_host = settings.smtp.host
        self._smtp_port = settings.smtp.port
        self.mask = Masker(secrets_of(settings))

    def watch(self, account: str, circuit: Callable[[], CircuitView]) -> None:
        self.metrics.watch(account, circuit)

    def published(self, events: Sequence[ResultEvent]) -> None:
        """Result events confirmed by the broker."""
        self.metrics.published(events)
        statuses = Counter(f"smsc.results.{e.status.value}" for e in events)
        trace.get_current_span().add_event("results published", dict(statuses))

    # requests ------------------------------------------------------------------------

    def consumer(self, callback: Consumer, queue: str | None = None) -> Consumer:
        """Wrap the consumer callback in one span per delivered request, and stamp the
        delivery's headers with that span's context and the time of first receipt.
        With tracing off, the caller's trace headers pass through as they are."""
        subscription = queue or self._queue

        async def untraced(message: AbstractIncomingMessage) -> None:
            headers = message.headers
            headers.setdefault(RECEIVED_HEADER, int(time.time() * 1000))
            # The caller's trace still names the log lines, when there is one.
            token = context.attach(_extract(headers)) if "traceparent" in headers else None
            try:
                with _log_context(request_id=None, gateway_id=None):
                    await callback(message)
            finally:
                if token is not None:
                    context.detach(token)

        if not self._tracing:
            return untraced

        async def traced(message: AbstractIncomingMessage) -> None:
            headers = message.headers
            headers.setdefault(RECEIVED_HEADER, int(time.time() * 1000))
            attributes: dict[str, AttributeValue] = {
                MESSAGING_SYSTEM: "rabbitmq",
                MESSAGING_OPERATION_TYPE: "process",
                MESSAGING_OPERATION_NAME: "process",
                MESSAGING_DESTINATION: message.exchange or "",
                MESSAGING_SUBSCRIPTION: subscription,
                MESSAGING_BODY_SIZE: len(message.body),
            }
            optional = {
                MESSAGING_ROUTING_KEY: message.routing_key,
                MESSAGING_DELIVERY_TAG: message.delivery_tag,
                MESSAGING_MESSAGE_ID: message.message_id,
                MESSAGING_CONVERSATION_ID: message.correlation_id,
                ATTEMPT: headers.get(ATTEMPT_HEADER),
            }
            attributes.update({k: v for k, v in optional.items() if isinstance(v, str | int)})
            # Attached rather than passed as the parent, so that the caller's baggage is in
            # the context too and goes on with the request.
            token = context.attach(_extract(headers))
            try:
                with (
                    self._span(f"process {subscription}", SpanKind.CONSUMER, attributes),
                    _log_context(request_id=None, gateway_id=None),
                ):
                    # The request span becomes the parent of everything copied from these
                    # headers later: result events, retry and dead-letter copies.
                    propagate.inject(headers)
                    await callback(message)
            finally:
                context.detach(token)

        return traced

    def request_known(self, request_id: str) -> None:
        """The delivered request was read: name it on its span and in its logs."""
        trace.get_current_span().set_attribute(REQUEST_ID, request_id)
        request_id_var.set(request_id)

    # submissions ---------------------------------------------------------------------

    @contextmanager
    def submission(self, requests: Sequence[Mapping[str, Any]], opened_at: float) -> Iterator[None]:
        """One e-mail on its way, from the batch closing to its events being published;
        `requests` are the headers of the deliveries it carries."""
        waited = time.monotonic() - opened_at
        self.metrics.batch_wait.observe(waited)
        links = [Link(c) for c in map(_span_context, requests) if c.is_valid]
        attributes: dict[str, AttributeValue] = {
            REQUESTS: len(requests),
            BATCH_WAIT_MS: round(waited * 1000, 3),
        }
        # The task was spawned from whatever request closed the batch: start afresh.
        with (
            self._span(
                "submit mail", SpanKind.INTERNAL, attributes, context=Context(), links=links
            ),
            _log_context(request_id=None, gateway_id=None),
        ):
            yield

    @contextmanager
    def smtp(self, mail_id: str, lines: int, size: int, account: str) -> Iterator[SmtpCall]:
        """The SMTP transaction of the e-mail `mail_id` (final: a batch rebuilt after
        expiries has a new id, so the submission span learns it here)."""
        trace.get_current_span().set_attribute(GATEWAY_ID, mail_id)
        # Not reset here: the rest of the submission logs for this e-mail too, and the
        # submission's own log context ends with it.
        gateway_id_var.set(mail_id)
        attributes: dict[str, AttributeValue] = {
            SERVER_ADDRESS: self._smtp_host,
            SERVER_PORT: self._smtp_port,
            GATEWAY_ID: mail_id,
            MAIL_LINES: lines,
            MAIL_BYTES: size,
        }
        with self._span("smtp submit", SpanKind.CLIENT, attributes) as span:
            yield SmtpCall(self, span, lines, size, account)

    def submitted(self, requests: Iterable[tuple[Mapping[str, Any], Lane]]) -> None:
        """The `submitted` (or `unknown`) events of these requests are confirmed."""
        self.metrics.submitted(requests)

    @staticmethod
    def carrier() -> dict[str, str]:
        """The current span's context as W3C headers, to keep with a MailRecord."""
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        return carrier

    # replies -------------------------------------------------------------------------

    @contextmanager
    def reply(self, record: MailRecord, reply: Reply, account: str) -> Iterator[None]:
        submission = _span_context(record.trace)
        links = [Link(submission)] if submission.is_valid else []
        attributes: dict[str, AttributeValue] = {
            GATEWAY_ID: record.mail_id,
            REQUESTS: len(record.requests),
        }
        if isinstance(reply, Accepted):
            attributes[SMS_COUNT] = reply.sms_count
        else:
            number = int(reply.error)
            attributes[GATEWAY_ERROR] = number
            attributes[GATEWAY_ACTION] = reply.action.value
            self.metrics.gateway_errors.labels(gateway_error_label(number), account).inc()
        with (
            self._span(
                "gateway reply", SpanKind.SERVER, attributes, context=Context(), links=links
            ),
            _log_context(request_id=None, gateway_id=record.mail_id),
        ):
            yield
        if isinstance(reply, Accepted):
            self.metrics.accepted((r.copy.headers, r.lane) for r in record.requests)
        self.metrics.replies.labels("ok" if isinstance(reply, Accepted) else "error").inc()

    # spans ---------------------------------------------------------------------------

    @contextmanager
    def _span(
        self,
        name: str,
        kind: SpanKind,
        attributes: Mapping[str, AttributeValue],
        *,
        context: Context | None = None,
        links: Sequence[Link] = (),
    ) -> Iterator[Span]:
        with self._tracer.start_as_current_span(
            name,
            context=context,
            kind=kind,
            attributes=attributes,
            links=links,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield span
            except BaseException as exc:
                self._failed(span, exc)
                raise

    def _failed(self, span: Span, exc: BaseException) -> None:
        """Like `record_exception`, with the secrets masked out of the texts."""
        kind = type(exc).__qualname__
        message = self.mask(str(exc))
        span.set_attribute(ERROR_TYPE, kind)
        span.add_event(
            "exception",
            {
                "exception.type": kind,
                "exception.message": message,
                "exception.stacktrace": self.mask("".join(traceback.format_exception(exc))),
            },
        )
        span.set_status(SpanStatus(StatusCode.ERROR, f"{kind}: {message}" if message else kind))


class SmtpCall:
    """`finished(result)` at the end of an SMTP transaction."""

    def __init__(
        self, telemetry: Telemetry, span: Span, lines: int, size: int, account: str
    ) -> None:
        self._telemetry = telemetry
        self._account = account
        self._span = span
        self._lines = lines
        self._size = size

    def finished(self, result: SubmitResult) -> None:
        self._telemetry.metrics.mail(result.outcome.value, self._account, self._lines, self._size)
        self._span.set_attribute(SMTP_OUTCOME, result.outcome.value)
        if result.code is not None:
            self._span.set_attribute(SMTP_CODE, result.code)
        if result.outcome != Outcome.accepted:
            detail = self._telemetry.mask(result.detail)
            self._span.set_attribute(ERROR_TYPE, result.outcome.value)
            self._span.set_status(SpanStatus(StatusCode.ERROR, detail))


# configuration ---------------------------------------------------------------------------


def tracer_provider_from_env(max_links: int) -> TracerProvider | None:
    """A tracer provider as the OTEL_* variables describe it, or None when tracing is off.

    OTEL_TRACES_EXPORTER: comma-separated `otlp`, `console`; unset or `none`: off.
    OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL: `grpc` (the default, as in the Python SDK) or
    `http/protobuf`; the exporters read their own OTEL_EXPORTER_OTLP_* endpoint, headers,
    timeout and TLS variables. OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES name the
    service (`smsc-worker` if neither does); OTEL_TRACES_SAMPLER(_ARG) choose the sampler;
    OTEL_PROPAGATORS the header formats (W3C trace context and baggage by default).

    `max_links` (the most requests one e-mail carries) replaces the SDK's default limit
    of 128 links per span, so that a submission links to every request it carries;
    OTEL_SPAN_LINK_COUNT_LIMIT still overrides it.
    """
    names = [n.strip().lower() for n in os.environ.get("OTEL_TRACES_EXPORTER", "").split(",")]
    names = [n for n in names if n and n != "none"]
    if not names:
        return None
    processors = [_processor(name) for name in names]
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    limits = SpanLimits(
        max_links=None if os.environ.get("OTEL_SPAN_LINK_COUNT_LIMIT") else max_links
    )
    provider = TracerProvider(resource=resource, span_limits=limits)
    for processor in processors:
        provider.add_span_processor(processor)
    log.info("tracing on: exporting to %s", ", ".join(names))
    return provider


def _processor(name: str) -> SpanProcessor:
    if name == "console":
        # Span by span as they end: for reading along on a terminal, not for volume.
        return SimpleSpanProcessor(ConsoleSpanExporter())
    if name == "otlp":
        return BatchSpanProcessor(_otlp_exporter())
    raise ConfigurationError(
        f"OTEL_TRACES_EXPORTER: {name!r} is not supported; use otlp, console or none"
    )


def _otlp_exporter() -> SpanExporter:
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    ).strip()
    # Imported on demand: each pulls in its transport (grpcio or requests).
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpSpanExporter,
        )

        return HttpSpanExporter()
    raise ConfigurationError(
        f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} is not supported; use grpc or http/protobuf"
    )
