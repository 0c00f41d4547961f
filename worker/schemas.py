"""The published contract, generated from the models: JSON Schema for both messages and
an AsyncAPI 3 document of the queue, the exchange and the routing keys."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from worker.contract import SCHEMA_VERSION, ResultEvent, SendRequest, Status
from worker.lanes import Lane
from worker.settings import AmqpSettings

SEND_REQUEST_FILE = "send-request.schema.json"
RESULT_EVENT_FILE = "result-event.schema.json"
ASYNCAPI_FILE = "asyncapi.json"
_LANES = {
    Lane.high: "High-priority send requests (one-time codes): a queue, consumer, batch window, "
    "share of the pace and SMTP connections of their own.",
    Lane.normal: "Send requests.",
    Lane.bulk: "Bulk send requests (campaigns): they give way to the others, within a floor "
    "of the pace.",
}


def _requests_channel(lane: Lane) -> str:
    return "requests" if lane == Lane.normal else f"requests.{lane}"


def _schema(model: type[SendRequest] | type[ResultEvent]) -> dict[str, Any]:
    schema = model.model_json_schema(mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def asyncapi(amqp: AmqpSettings) -> dict[str, Any]:
    results = {
        status.value: {
            "address": f"sms.result.{status.value}",
            "messages": {"resultEvent": {"$ref": "#/components/messages/resultEvent"}},
            "bindings": {
                "amqp": {
                    "is": "routingKey",
                    "exchange": {
                        "name": amqp.results_exchange,
                        "type": "topic",
                        "durable": True,
                        "autoDelete": False,
                    },
                }
            },
        }
        for status in Status
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "smsc-worker",
            "version": f"{SCHEMA_VERSION}.0.0",
            "description": "Send requests in over RabbitMQ; result events out, one per "
            "status change, on a topic exchange (and to the request's reply_to, with its "
            "correlation_id, when it has one).",
        },
        "channels": {
            **{
                _requests_channel(lane): {
                    "address": amqp.queue(lane),
                    "description": _LANES[lane],
                    "messages": {"sendRequest": {"$ref": "#/components/messages/sendRequest"}},
                    "bindings": {
                        "amqp": {
                            "is": "queue",
                            "queue": {"name": amqp.queue(lane), "durable": True},
                        }
                    },
                }
                for lane in Lane
            },
            **{f"result.{name}": channel for name, channel in results.items()},
        },
        "operations": {
            **{
                f"sendRequest{'' if lane == Lane.normal else '.' + lane}": {
                    "action": "receive",
                    "channel": {"$ref": f"#/channels/{_requests_channel(lane)}"},
                    "summary": f"The worker consumes {lane} send requests.",
                }
                for lane in Lane
            },
            **{
                f"publish.{name}": {
                    "action": "send",
                    "channel": {"$ref": f"#/channels/result.{name}"},
                }
                for name in results
            },
        },
        "components": {
            "messages": {
                "sendRequest": {
                    "name": "SendRequest",
                    "contentType": "application/json",
                    "payload": {"$ref": SEND_REQUEST_FILE},
                },
                "resultEvent": {
                    "name": "ResultEvent",
                    "contentType": "application/json",
                    "payload": {"$ref": RESULT_EVENT_FILE},
                },
            }
        },
    }


def render_all() -> dict[str, str]:
    """File name -> contents, exactly as checked in."""
    documents = {
        SEND_REQUEST_FILE: _schema(SendRequest),
        RESULT_EVENT_FILE: _schema(ResultEvent),
        ASYNCAPI_FILE: asyncapi(AmqpSettings()),
    }
    return {
        name: json.dumps(doc, indent=2, sort_keys=True) + "\n" for name, doc in documents.items()
    }


def write_all(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_all().items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
