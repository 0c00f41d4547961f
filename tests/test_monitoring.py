"""The Grafana dashboard and the alerting rules the chart ships: their queries parse
(promtool), every worker metric they read is served by a running worker's /metrics, and the
alerts fire on the situations they are named for (promtool's rule unit tests)."""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.promtool import check_rules, promtool
from tests.test_helm import CHART, CREDENTIALS, DASHBOARD_FILE, FULLNAME, NAMESPACE, one, render
from tests.test_observability import http_get, observed
from worker.settings import AmqpSettings

DASHBOARD: dict[str, Any] = json.loads(DASHBOARD_FILE.read_text())
# RabbitMQ's own series, from its rabbitmq_prometheus plugin: per-queue metrics are served
# as rabbitmq_detailed_* by /metrics/detailed?family=queue_coarse_metrics and as
# rabbitmq_queue_* by /metrics/per-object (or /metrics with return_per_object_metrics).
RABBITMQ_METRICS = {
    "rabbitmq_detailed_queue_messages",
    "rabbitmq_detailed_queue_messages_ready",
    "rabbitmq_detailed_queue_messages_unacked",
    "rabbitmq_queue_messages",
    "rabbitmq_queue_messages_ready",
    "rabbitmq_queue_messages_unacked",
}
# What Grafana puts in place of the dashboard's variables before it sends a query.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$namespace": ".*",
    "$job": ".*",
    "$queue_prefix": "sms.requests",
}
WORKER = f'job="{FULLNAME}-metrics",namespace="{NAMESPACE}"'


def panels() -> Iterator[dict[str, Any]]:
    for panel in DASHBOARD["panels"]:
        if panel["type"] != "row":
            yield panel


def dashboard_queries() -> list[str]:
    queries = []
    for panel in panels():
        for target in panel["targets"]:
            query = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                query = query.replace(variable, value)
            queries.append(query)
    return queries


@pytest.fixture(scope="module")
def rule_groups() -> list[dict[str, Any]]:
    """The chart's alerting rules as its default values render them."""
    with helm.Chart.load(CHART) as chart:
        docs = render(chart, CREDENTIALS + "prometheusRule:\n  enabled: true\n")
    groups: list[dict[str, Any]] = one(docs, "PrometheusRule")["spec"]["groups"]
    return groups


def metric_names(query: str) -> set[str]:
    return set(re.findall(r"\b(?:smsc|rabbitmq)_\w+(?=\s*[{\[])", query))


def test_the_dashboard_has_the_panels() -> None:
    titles = {panel["title"] for panel in panels()}
    assert {
        "Requests by status",
        "E-mails per second",
        "SMS parts per second",
        "Request to accepted (p50, p99)",
        "Circuit state",
        "Gateway errors",
        "Retries by reason",
        "Dead letters by code",
        "Queue depth: ready",
    } <= titles
    ids = [panel["id"] for panel in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    (datasource,) = [v for v in DASHBOARD["templating"]["list"] if v["type"] == "datasource"]
    for panel in panels():
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${" + datasource["name"] + "}"
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            # Every worker series is this dashboard's namespace and job.
            for selector in re.findall(r"smsc_\w+\{([^}]*)\}", target["expr"]):
                assert selector.startswith('namespace=~"$namespace", job=~"$job"'), selector
    latency = next(p for p in panels() if p["title"] == "Request to accepted (p50, p99)")
    quantiles = [re.match(r"histogram_quantile\((0\.\d+),", t["expr"]) for t in latency["targets"]]
    assert [q.group(1) for q in quantiles if q] == ["0.5", "0.99", "0.99"]
    assert "smsc_request_to_accepted_seconds_bucket" in latency["targets"][1]["expr"]


def test_the_dashboard_queries_parse() -> None:
    queries = dashboard_queries()
    check_rules(
        [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query{n}", "expr": q} for n, q in enumerate(queries)
                ],
            }
        ]
    )


async def test_every_worker_metric_queried_is_served(
    amqp: AmqpSettings, rule_groups: list[dict[str, Any]]
) -> None:
    """A query naming a metric the worker does not serve shows nothing and alerts never:
    every smsc_* name in the dashboard and the rules is served by a running worker."""
    async with observed(amqp) as (_, _, endpoints):
        status, body = await http_get(endpoints.metrics_port, "/metrics")
    assert status == 200
    served = set()
    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_count", "_sum"]}
    for family in text_string_to_metric_families(body.decode()):
        served |= {family.name + suffix for suffix in suffixes.get(family.type, [])}
    queries = dashboard_queries()
    queries += [rule["expr"] for group in rule_groups for rule in group["rules"]]
    used = set().union(*map(metric_names, queries))
    worker = {name for name in used if name.startswith("smsc_")}
    assert worker
    assert worker <= served, worker - served
    assert used - worker <= RABBITMQ_METRICS, used - worker - RABBITMQ_METRICS
    assert all(
        re.match(r"(smsc|rabbitmq)_", name) for name in re.findall(r"\b(\w+)\{", " ".join(queries))
    )


def test_the_rules_pass_promtool(rule_groups: list[dict[str, Any]]) -> None:
    check_rules(rule_groups)
    alerts = {rule["alert"] for group in rule_groups for rule in group["rules"]}
    assert alerts == {
        "SmscRequestsFailing",
        "SmscRequestsRejected",
        "SmscGatewayAccountStopped",
        "SmscGatewayOutOfFunds",
        "SmscGatewayIpBlocked",
        "SmscCircuitOpenTooLong",
        "SmscDeadLettersGrowing",
        "SmscRequestsWaitingTooLong",
        "SmscRequestsNotDraining",
        "SmscNoReplies",
        "SmscRepliesForged",
    }


def worker(name: str, **labels: str) -> str:
    extra = "".join(f',{k}="{v}"' for k, v in labels.items())
    return f"{name}{{{WORKER}{extra}}}"


# Scenarios for promtool's rule unit tests, one sample a minute: the series, and the alerts
# expected firing at the given minute (every other alert must be silent then).
SCENARIOS: dict[str, tuple[dict[str, str], int, set[str]]] = {
    "quiet": (
        {
            worker("smsc_request_results_total", status="accepted"): "0+60x40",
            worker("smsc_emails_total", outcome="accepted"): "0+2x40",
            worker("smsc_replies_total", answer="ok"): "0+2x40",
            worker("smsc_circuit_state", state="closed"): "1x40",
            worker("smsc_gateway_errors_total", error="2"): "0x40",
            worker("smsc_dead_letters_total", code="invalid_phone"): "3x40",
            'rabbitmq_detailed_queue_messages{queue="sms.requests.dead-letter"}': "3x40",
            'rabbitmq_detailed_queue_messages_ready{queue="sms.requests"}': "50x40",
        },
        30,
        set(),
    ),
    "error 2": (
        {worker("smsc_gateway_errors_total", error="2"): "0 0 0 1x20"},
        15,
        {"SmscGatewayAccountStopped"},
    ),
    "error 3": (
        {worker("smsc_gateway_errors_total", error="3"): "0 0 0 1x20"},
        15,
        {"SmscGatewayOutOfFunds"},
    ),
    "error 4": (
        {worker("smsc_gateway_errors_total", error="4"): "0 0 0 1x20"},
        10,
        {"SmscGatewayIpBlocked"},
    ),
    "another error": ({worker("smsc_gateway_errors_total", error="8"): "0 0 0 5x20"}, 10, set()),
    "circuit open, not yet long": (
        {worker("smsc_circuit_state", state="closed"): "1x5 0x20"},
        15,
        set(),
    ),
    "circuit open too long": (
        {worker("smsc_circuit_state", state="closed"): "1x5 0x30"},
        25,
        {"SmscCircuitOpenTooLong"},
    ),
    "one replica saw it closed": (
        {
            worker("smsc_circuit_state", state="closed", pod="a"): "1x5 0x30",
            worker("smsc_circuit_state", state="closed", pod="b"): "1x30",
        },
        25,
        set(),
    ),
    "failing": (
        {
            worker("smsc_request_results_total", status="accepted"): "0+90x30",
            worker("smsc_request_results_total", status="failed"): "0+10x30",
        },
        25,
        {"SmscRequestsFailing"},
    ),
    "rejected": (
        {
            worker("smsc_request_results_total", status="accepted"): "0+90x30",
            worker("smsc_request_results_total", status="rejected"): "0+10x30",
        },
        25,
        {"SmscRequestsRejected"},
    ),
    "dead letters in the queue": (
        {'rabbitmq_detailed_queue_messages{queue="sms.requests.dead-letter"}': "3x10 4x10"},
        15,
        {"SmscDeadLettersGrowing"},
    ),
    "dead letters, per-object metrics": (
        {'rabbitmq_queue_messages{queue="sms.requests.dead-letter"}': "3x10 4x10"},
        15,
        {"SmscDeadLettersGrowing"},
    ),
    "dead letters, worker only": (
        {worker("smsc_dead_letters_total", code="gateway_1"): "0x10 1x10"},
        15,
        {"SmscDeadLettersGrowing"},
    ),
    "slow": (
        {
            worker("smsc_request_to_accepted_seconds_bucket", le="60"): "0x30",
            worker("smsc_request_to_accepted_seconds_bucket", le="300"): "0+10x30",
            worker("smsc_request_to_accepted_seconds_bucket", le="+Inf"): "0+10x30",
        },
        25,
        {"SmscRequestsWaitingTooLong"},
    ),
    "fast": (
        {
            worker("smsc_request_to_accepted_seconds_bucket", le="1"): "0+10x30",
            worker("smsc_request_to_accepted_seconds_bucket", le="+Inf"): "0+10x30",
        },
        25,
        set(),
    ),
    "not draining": (
        {
            'rabbitmq_detailed_queue_messages_ready{queue="sms.requests"}': "500x30",
            worker("smsc_emails_total", outcome="accepted"): "7x30",
        },
        25,
        {"SmscRequestsNotDraining"},
    ),
    "not draining, high lane": (
        {'rabbitmq_queue_messages_ready{queue="sms.requests.high"}': "3x30"},
        25,
        {"SmscRequestsNotDraining"},
    ),
    "only dead letters wait": (
        {'rabbitmq_queue_messages_ready{queue="sms.requests.dead-letter"}': "3x30"},
        25,
        set(),
    ),
    "no replies": (
        {
            worker("smsc_emails_total", outcome="accepted"): "0+2x40",
            worker("smsc_replies_total", answer="ok"): "0x40",
            worker("smsc_replies_total", answer="error"): "0x40",
        },
        20,
        {"SmscNoReplies"},
    ),
    "forged replies": (
        {worker("smsc_replies_refused_total", reason="token"): "0x5 1x10"},
        10,
        {"SmscRepliesForged"},
    ),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_the_alerts_fire_when_they_should(rule_groups: list[dict[str, Any]], scenario: str) -> None:
    series, minute, firing = SCENARIOS[scenario]
    alerts = {rule["alert"]: rule for group in rule_groups for rule in group["rules"]}
    # Annotations are text for people; the unit tests check which alerts fire, with what
    # labels.
    bare = [
        {
            **group,
            "rules": [{k: v for k, v in r.items() if k != "annotations"} for r in group["rules"]],
        }
        for group in rule_groups
    ]
    tests = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in series.items()],
                "alert_rule_test": [
                    {
                        "eval_time": f"{minute}m",
                        "alertname": name,
                        "exp_alerts": (
                            [{"exp_labels": alerts[name]["labels"]}] if name in firing else []
                        ),
                    }
                    for name in alerts
                ],
            }
        ],
    }
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory)
        (path / "rules.yml").write_text(yaml.safe_dump({"groups": bare}))
        (path / "tests.yml").write_text(yaml.safe_dump(tests))
        result = promtool("test", "rules", "tests.yml", cwd=path)
    assert result.returncode == 0, result.stdout + result.stderr
