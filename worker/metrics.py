"""Prometheus metrics of one Service.

Each Service has its own `CollectorRegistry` rather than prometheus_client's global one:
several services in one process (the tests run many) would otherwise share counters and
refuse to register the same names twice. `worker.health` serves it on `/metrics`.

Outcomes are counted from the result events as they are confirmed (`published`), so the
counters agree with what the callers were told; the rest is fed by `worker.telemetry`'s
hooks around the SMTP submission and the gateway's replies.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from worker.contract import ResultEvent, Status
from worker.lanes import Lane
from worker.ledger import CircuitView
from worker.reply_imap import NOT_REPLY_REASONS
from worker.reply_receiver import REFUSAL_REASONS

# Added to every request on receipt (unless a previous attempt did), in epoch milliseconds:
# retry and deferral copies keep it, so the latencies below run from the first receipt.
# An integer because AMQP field tables carry Python floats as 32-bit floats.
RECEIVED_HEADER = "x-smsc-received-ms"

# From a batch flush (tens of ms) to a request that waited out retries (up to max_age_s).
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
BATCH_WAIT_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
LINE_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000)
BYTE_BUCKETS = (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 102400)


def received_at(headers: Mapping[str, Any]) -> float | None:
    """When the worker first received a request (epoch seconds), from its headers."""
    value = headers.get(RECEIVED_HEADER)
    return value / 1000 if isinstance(value, int) else None


def gateway_error_label(number: int) -> str:
    """The `error` label of a gateway error: its number for the documented ones (1-9), one
    label for any other, so a reply cannot add label values (series) at will."""
    return str(number) if 1 <= number <= 9 else "other"


def dead_letter_label(code: str) -> str:
    """The `code` label of a dead letter: the worker's own error codes as they are, but a
    gateway error's (`gateway_<n>`) bounded like `gateway_error_label`."""
    number = code.removeprefix("gateway_")
    if number == code:
        return code
    return "gateway_" + (gateway_error_label(int(number)) if number.isdigit() else "other")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.results = Counter(
            "smsc_request_results",
            "Result events published (and confirmed), by status and account",
            ["status", "account"],
            registry=r,
        )
        self.retries = Counter(
            "smsc_retries",
            "Requests scheduled for another attempt, by reason and account",
            ["reason", "account"],
            registry=r,
        )
        self.deferrals = Counter(
            "smsc_deferrals",
            "Requests held back for a limit or a paused account, by reason and account",
            ["reason", "account"],
            registry=r,
        )
        self.emails = Counter(
            "smsc_emails",
            "E-mails submitted over SMTP, by outcome and account",
            ["outcome", "account"],
            registry=r,
        )
        self.email_lines = Histogram(
            "smsc_email_lines",
            "Lines (requests) per submitted e-mail",
            buckets=LINE_BUCKETS,
            registry=r,
        )
        self.email_bytes = Histogram(
            "smsc_email_bytes", "Size of each submitted e-mail", buckets=BYTE_BUCKETS, registry=r
        )
        self.sms_parts = Counter(
            "smsc_sms_parts",
            "SMS parts (times recipients) handed to the gateway, by account",
            ["account"],
            registry=r,
        )
        self.gateway_errors = Counter(
            "smsc_gateway_errors",
            "Error replies from the gateway, by error number and account",
            ["error", "account"],
            registry=r,
        )
        self.replies = Counter(
            "smsc_replies",
            "Gateway replies applied to the e-mail they answer, by answer: ok or error",
            ["answer"],
            registry=r,
        )
        self.dead_letters = Counter(
            "smsc_dead_letters",
            "Copies published (and confirmed) to the dead-letter exchange, by error code",
            ["code"],
            registry=r,
        )
        self.settle_skipped = Counter(
            "smsc_settle_skipped",
            "Deliveries not acked or nacked because their channel had closed (the broker "
            "had requeued them already)",
            registry=r,
        )
        self.state_unavailable = Counter(
            "smsc_state_unavailable",
            "Calls to the shared state store that failed, by step",
            ["step"],
            registry=r,
        )
        self.replies_refused = Counter(
            "smsc_replies_refused",
            "Reply e-mails (or connections) refused by the reply receiver, by reason: peer, "
            "sender, address, token, mail_id_mismatch, ambiguous",
            ["reason"],
            registry=r,
        )
        self.replies_unreadable = Counter(
            "smsc_replies_unreadable",
            "Reply e-mails with no answer the worker could read (a copy of each, secrets "
            "masked, goes to the dead letters)",
            registry=r,
        )
        self.reply_body_id_ignored = Counter(
            "smsc_reply_body_id_ignored",
            "Replies whose body named an ID that is no known e-mail: that ID was ignored and "
            "the reply applied to the e-mail its (verified) address names",
            registry=r,
        )
        self.reply_parts_mismatch = Counter(
            "smsc_reply_parts_mismatch",
            "OK replies whose SMS count differs from the parts the worker expected for the "
            "e-mail (the requests are still accepted)",
            registry=r,
        )
        self.imap_connected = Gauge(
            "smsc_imap_connected", "1 while the reply mailbox (IMAP) is connected", registry=r
        )
        self.imap_last_poll = Gauge(
            "smsc_imap_last_poll_timestamp_seconds",
            "When the reply mailbox was last read to its end (Unix time)",
            registry=r,
        )
        self.imap_replies = Counter(
            "smsc_imap_replies",
            "Replies read from the mailbox and settled (then moved to the processed folder)",
            registry=r,
        )
        self.imap_not_replies = Counter(
            "smsc_imap_not_replies",
            "Messages moved to the not-a-reply folder, by reason: bounce, too_large, sender, "
            "address, token, authentication, mail_id_mismatch, ambiguous, unknown_mail, "
            "unreadable",
            ["reason"],
            registry=r,
        )
        self.state_up = Gauge("smsc_state_up", "1 while the shared state store answers", registry=r)
        self.circuit = Gauge(
            "smsc_circuit_state",
            "1 for the current state of each account's circuit breaker",
            ["account", "state"],
            registry=r,
        )
        self.to_submitted = Histogram(
            "smsc_request_to_submitted_seconds",
            "From the first receipt of a request to its e-mail being handed to the gateway",
            ["priority"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.to_accepted = Histogram(
            "smsc_request_to_accepted_seconds",
            "From the first receipt of a request to the gateway's OK for its e-mail",
            ["priority"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        for lane in Lane:
            self.to_submitted.labels(lane.value)
            self.to_accepted.labels(lane.value)
        self.batch_wait = Histogram(
            "smsc_batch_wait_seconds",
            "From an e-mail's first request to the e-mail being closed for sending",
            buckets=BATCH_WAIT_BUCKETS_S,
            registry=r,
        )
        # Zeros from the start: a rate over a series that appears late misses its first step.
        for reason in REFUSAL_REASONS:
            self.replies_refused.labels(reason)
        for reason in NOT_REPLY_REASONS:
            self.imap_not_replies.labels(reason)
        for answer in ("ok", "error"):
            self.replies.labels(answer)

    def watch(self, account: str, circuit: Callable[[], CircuitView]) -> None:
        """An account: its results' and gateway errors' series start at zero, and its
        circuit's last known state is read at each scrape."""
        for status in Status:
            self.results.labels(status.value, account)
        self.sms_parts.labels(account)
        # The alerts on errors 2, 3 and 4 would otherwise miss the first one of each.
        for label in [*map(str, range(1, 10)), "other"]:
            self.gateway_errors.labels(label, account)

        def is_in(state: CircuitView) -> float:
            return 1.0 if circuit() == state else 0.0

        for state in CircuitView:
            self.circuit.labels(account, state.value).set_function(partial(is_in, state))

    def published(self, events: Sequence[ResultEvent]) -> None:
        # Tallied per series first: events come by the thousand, and each touch of a
        # series costs a lock and a lookup.
        tally: collections.Counter[tuple[Counter, tuple[str, ...]]] = collections.Counter()
        for event in events:
            account = event.account or ""
            tally[self.results, (event.status.value, account)] += 1
            reason = event.error.code if event.error else ""
            if event.status == Status.retrying:
                tally[self.retries, (reason, account)] += 1
            elif event.status == Status.deferred:
                tally[self.deferrals, (reason, account)] += 1
            elif event.status in (Status.submitted, Status.unknown):
                tally[self.sms_parts, (account,)] += event.sms_count or 0
        for (series, labels), count in tally.items():
            series.labels(*labels).inc(count)

    def dead_lettered(self, codes: Iterable[str]) -> None:
        for code in codes:
            self.dead_letters.labels(dead_letter_label(code)).inc()

    def reply_refused(self, reason: str) -> None:
        self.replies_refused.labels(reason).inc()

    def mail(self, outcome: str, account: str, lines: int, size: int) -> None:
        self.emails.labels(outcome, account).inc()
        self.email_lines.observe(lines)
        self.email_bytes.observe(size)

    def submitted(self, requests: Iterable[tuple[Mapping[str, Any], Lane]]) -> None:
        _since_receipt(self.to_submitted, requests)

    def accepted(self, requests: Iterable[tuple[Mapping[str, Any], Lane]]) -> None:
        _since_receipt(self.to_accepted, requests)


def _since_receipt(
    histogram: Histogram, requests: Iterable[tuple[Mapping[str, Any], Lane]]
) -> None:
    """Each request's headers (its first receipt) and lane, labelled `priority`."""
    now = time.time()
    by_lane: dict[Lane, Histogram] = {}
    for headers, lane in requests:
        received = received_at(headers)
        if received is not None:
            series = by_lane.get(lane)
            if series is None:
                series = by_lane[lane] = histogram.labels(lane.value)
            series.observe(max(now - received, 0.0))
