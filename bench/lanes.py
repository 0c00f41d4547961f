"""The priority lane, measured: how long high-priority requests take to reach the gateway
while a bulk backlog drains at the account's default pace, against the same requests with
nothing else to do, measured in the same run (`make bench-lanes`).

The worker runs with its default settings (pace, batch windows, lanes) against the gateway
emulator in a process of its own (the real gateway is not in the worker's process either).
First, high-priority requests are published at `--high-rate` per second for a few seconds
with no backlog (the baseline); then `--bulk` bulk requests are published at once, and
high-priority ones again at the same rate for `--duration` seconds while the bulk drains.
Latency is from a request's publish to its `submitted` event (its e-mail taken by the
gateway's SMTP server); the bulk rate is the bulk requests submitted per second meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from bench.run import (
    DEFAULT_URL,
    PRELOAD_CHUNK,
    Child,
    Topology,
    amqp_names,
    free_port,
    percentile,
)


class Events:
    """`submitted` events: the latency of each high-priority request, and when each bulk
    request was submitted."""

    def __init__(self) -> None:
        self.high: dict[str, float] = {}
        self.bulk: list[float] = []

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        event = json.loads(message.body)
        if event.get("status") != "submitted":
            return
        request_id = str(event.get("request_id"))
        now = time.time()
        if "-high-" in request_id:
            sent = (event.get("metadata") or {}).get("sent")
            if isinstance(sent, int | float):
                self.high.setdefault(request_id, now - sent)
        else:
            self.bulk.append(now)


def body(request_id: str, n: int) -> bytes:
    return json.dumps(
        {
            "request_id": request_id,
            "to": f"+7916{n % 10_000_000:07d}",
            "text": f"Your code is {n:06d}",
            "metadata": {"sent": time.time()},
        }
    ).encode()


async def publish(channel: AbstractChannel, queue: str, bodies: list[bytes]) -> None:
    await asyncio.gather(
        *(
            channel.default_exchange.publish(
                aio_pika.Message(b, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=queue,
            )
            for b in bodies
        )
    )


async def high_stream(
    channel: AbstractChannel, queue: str, tag: str, first: int, rate: float, seconds: float
) -> list[str]:
    """Publish high-priority requests at `rate` per second for `seconds`; their ids."""
    ids: list[str] = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        request_id = f"lanes-{tag}-high-{first + len(ids)}"
        await publish(channel, queue, [body(request_id, 9_000_000 + first + len(ids))])
        ids.append(request_id)
        await asyncio.sleep(max(len(ids) / rate - (time.perf_counter() - started), 0))
    return ids


async def wait_for(ids: list[str], events: Events, limit_s: float) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if all(i in events.high for i in ids):
            return True
        await asyncio.sleep(0.1)
    return False


def latencies(ids: list[str], events: Events) -> dict[str, float | None]:
    values = [events.high[i] for i in ids if i in events.high]
    p50, p99 = percentile(values, 0.5), percentile(values, 0.99)
    return {
        "requests": len(ids),
        "submitted": len(values),
        "p50_ms": None if p50 is None else p50 * 1000,
        "p99_ms": None if p99 is None else p99 * 1000,
    }


async def lanes(args: argparse.Namespace) -> dict[str, Any]:
    from worker.lanes import Lane
    from worker.settings import AmqpSettings, BatchSettings, LimitSettings

    tag = uuid.uuid4().hex[:10]
    amqp = amqp_names(tag)
    groups: dict[str, Any] = {
        "amqp": amqp,
        "smtp": {"timeout_s": 10, "submit_deadline_s": 20},
        "batch": {},
        "limits": {},
    }
    names = AmqpSettings(**amqp)
    topology = Topology("worker", args.url, groups)
    events = Events()
    reply_port = free_port()
    gateway = Child("gateway", {"reply_port": reply_port})
    spec: dict[str, Any] = {
        "settings": groups,
        "state": None,
        "reply_port": reply_port,
        "profile": None,
    }
    # The worker's spec is read when it starts, after the gateway has its port.
    child = Child("worker", spec)
    try:
        connection = await aio_pika.connect(args.url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            await topology.declare(channel)
            exchange = await channel.get_exchange(amqp["results_exchange"])
            queue = await channel.declare_queue(exclusive=True, auto_delete=True)
            await queue.bind(exchange, "sms.result.submitted")
            await queue.consume(events.on_message, no_ack=True)
            await gateway.start()
            spec["gateway_port"] = gateway.ready["port"]
            await child.start()
            await gateway.send("go")
            await child.send("go")
            high_queue = names.queue(Lane.high)

            idle = await high_stream(channel, high_queue, tag, 0, args.high_rate, args.idle)
            await wait_for(idle, events, 30)

            started = time.perf_counter()
            for first in range(0, args.bulk, PRELOAD_CHUNK):
                chunk = range(first, min(first + PRELOAD_CHUNK, args.bulk))
                await publish(
                    channel,
                    names.queue(Lane.bulk),
                    [body(f"lanes-{tag}-bulk-{n}", n) for n in chunk],
                )
            load_s = time.perf_counter() - started
            window_start = time.time()
            busy = await high_stream(
                channel, high_queue, tag, len(idle), args.high_rate, args.duration
            )
            window_end = time.time()
            in_time = await wait_for(busy, events, 60)
            await child.finish()
            await gateway.finish()
    finally:
        await child.close()
        await gateway.close()
        await topology.delete()
    bulk_in_window = sum(1 for t in events.bulk if window_start <= t <= window_end)
    limits, batch = LimitSettings(), BatchSettings()
    idle_figures, busy_figures = latencies(idle, events), latencies(busy, events)
    ratio = None
    if idle_figures["p99_ms"] and busy_figures["p99_ms"]:
        ratio = busy_figures["p99_ms"] / idle_figures["p99_ms"]
    return {
        "settings": {
            "bulk": args.bulk,
            "high_rate": args.high_rate,
            "duration_s": args.duration,
            "parts_per_second": limits.parts_per_second,
            "mails_per_second": limits.mails_per_second,
            "high_share": limits.high_share,
            "high_max_wait_ms": batch.high_max_wait_ms,
        },
        "bulk_load_s": load_s,
        "idle": idle_figures,
        "backlog": busy_figures,
        "p99_backlog_over_idle": ratio,
        "bulk_rate_rps": bulk_in_window / (window_end - window_start),
        "bulk_submitted_total": len(events.bulk),
        "complete": in_time,
    }


def print_report(report: dict[str, Any]) -> None:
    s = report["settings"]
    print(
        f"high-priority requests at {s['high_rate']}/s; {s['bulk']} bulk requests published "
        f"in {report['bulk_load_s']:.1f} s; account pace {s['mails_per_second']:.0f} e-mails/s, "
        f"{s['parts_per_second']:.0f} parts/s, {s['high_share']:.0%} kept for high; "
        f"high batch window {s['high_max_wait_ms']} ms"
    )
    print("| phase | high requests | p50 (ms) | p99 (ms) |")
    print("|---|---|---|---|")
    for name in ("idle", "backlog"):
        f = report[name]
        print(
            f"| {name} | {f['submitted']}/{f['requests']} | "
            f"{_num(f['p50_ms'])} | {_num(f['p99_ms'])} |"
        )
    ratio = report["p99_backlog_over_idle"]
    print(f"p99 with the backlog / p99 idle: {_num(ratio, 2)}x")
    print(
        f"bulk drained at {report['bulk_rate_rps']:.0f} req/s while the high-priority "
        f"requests went ({report['bulk_submitted_total']} bulk submitted in all)"
    )


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.lanes", description=__doc__)
    parser.add_argument("--url", default=DEFAULT_URL, help="RabbitMQ AMQP URL")
    parser.add_argument("--bulk", type=int, default=100_000, help="bulk requests in the backlog")
    parser.add_argument("--high-rate", type=float, default=5.0, help="high-priority req/s")
    parser.add_argument(
        "--duration", type=float, default=60.0, help="seconds of high-priority requests"
    )
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of the idle baseline")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    report = asyncio.run(lanes(args))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    if not report["complete"]:
        sys.exit(2)


if __name__ == "__main__":
    main()
