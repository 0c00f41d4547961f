"""Logging set-up: JSON lines for production, readable text for local runs (by default,
whichever fits where stderr goes: text to a terminal, JSON to anything else), a filter that
blanks the configured secrets wherever they might appear, and one that stamps each record
with the trace, request and e-mail it was logged for, so a log line can be found from a
trace and the other way round."""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import trace

from worker.settings import Settings

MASK = "**********"
_CONTEXT_FIELDS = ("request_id", "gateway_id", "trace_id", "span_id")
_TEXT_FIELDS = ("request_id", "gateway_id", "trace_id")

# Set by worker.telemetry around the handling of one request or one e-mail; a task
# inherits them, so they must be reset by whoever sets them.
request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
gateway_id_var: ContextVar[str | None] = ContextVar("gateway_id", default=None)


class Masker:
    """Blanks the configured secrets out of any text: logs, span attributes, exceptions.
    Values shorter than three characters are left alone, or ordinary text would be."""

    def __init__(self, secrets: list[str]) -> None:
        self.secrets = [s for s in secrets if len(s) >= 3]

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        return text


class RedactSecrets(logging.Filter):
    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self._mask = Masker(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        if self._mask.secrets:
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = self._mask(record.exc_text)
            record.msg, record.args = self._mask(record.getMessage()), None
        return True


class TraceContext(logging.Filter):
    """Fills `trace_id`, `span_id`, `request_id` and `gateway_id` from the current span and
    context, unless the call gave them in `extra`."""

    def filter(self, record: logging.LogRecord) -> bool:
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            _default(record, "trace_id", trace.format_trace_id(span.trace_id))
            _default(record, "span_id", trace.format_span_id(span.span_id))
        _default(record, "request_id", request_id_var.get())
        _default(record, "gateway_id", gateway_id_var.get())
        return True


def _default(record: logging.LogRecord, name: str, value: str | None) -> None:
    if value and not getattr(record, name, None):
        setattr(record, name, value)


class TextFormatter(logging.Formatter):
    """One readable line, with the request, e-mail and trace it concerns at the end."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        context = " ".join(
            f"{name}={value}" for name in _TEXT_FIELDS if (value := getattr(record, name, None))
        )
        return f"{line} [{context}]" if context else line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in _CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value:
                entry[name] = value
        if record.exc_info or record.exc_text:
            entry["exception"] = record.exc_text or self.formatException(record.exc_info)  # type: ignore[arg-type]
        return json.dumps(entry, ensure_ascii=False)


def secrets_of(settings: Settings) -> list[str]:
    values = [
        settings.gateway.password.get_secret_value(),
        settings.smtp.password.get_secret_value(),
        settings.amqp.url.get_secret_value(),
        settings.reply.token_key.get_secret_value(),
        *(k.strip() for k in settings.reply.token_keys_old.get_secret_value().split(",")),
    ]
    password = _url_password(settings.amqp.url.get_secret_value())
    if password:
        values.append(password)
    return values


def _url_password(url: str) -> str | None:
    return urlsplit(url).password


def _text_logs(settings: Settings) -> bool:
    log_format = settings.observability.log_format
    if log_format == "auto":
        return sys.stderr.isatty()
    return log_format == "text"


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(TextFormatter() if _text_logs(settings) else JsonFormatter())
    handler.addFilter(TraceContext())
    handler.addFilter(RedactSecrets(secrets_of(settings)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.observability.log_level)
    logging.getLogger("aiormq").setLevel(logging.WARNING)
    logging.getLogger("aio_pika").setLevel(logging.WARNING)
    logging.getLogger("mail.log").setLevel(logging.WARNING)
