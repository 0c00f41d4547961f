"""Throughput benchmark: the smsc-worker against a bare aio-pika loop, on the real RabbitMQ.

    python -m bench.run [--requests 20000] [--runs 3] [--json]

Each run measures two phases, in alternating order from run to run:

- baseline: a bare aio-pika loop that consumes the requests from a quorum queue and, per
  message, publishes one confirmed result to a topic exchange and acks;
- worker: an in-process `Service` with an in-process gateway `Emulator` that relays its
  replies to the worker's reply port; the time that counts ends with the last `submitted`
  event, and the `accepted` events are tracked too.

Both get the same N pre-loaded requests (distinct recipients, the publish time in
`metadata.bench_t`) and run in a child process of their own, so peak RSS and CPU belong
to the measured loop alone. This process pre-loads the queue while the child waits,
connected and set up, then lets it consume and collects the result events (receipt
time minus `bench_t` is a request's latency). The clock starts when the child starts
consuming. Every figure is also given as worker/baseline of the same run: the ratios,
not the absolute numbers, are what compare across machines.

Queue and exchange names are unique (`bench.<tag>.*`) and deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import math
import os
import pstats
import resource
import socket
import statistics
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

ROOT = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "BENCH-RESULT "
READY_PREFIX = "BENCH-READY "
DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
GOAL = 0.8  # the worker should reach this share of the baseline's throughput
BROKER_AIM = 0.95  # ... of the broker baseline's drain rate (both events out)
REDIS_AIM = 0.9  # the Redis store's drain rate over the in-memory store's
RSS_PEAK_AIM_MB = 150  # peak RSS of the worker draining `--rss N` requests
RSS_FLAT_SHARE = 0.10  # "flat": RSS at 100 % at most this share above RSS at 25 %
PHASE_ORDER = ("baseline", "broker", "worker-memory", "worker-redis")
PRELOAD_CHUNK = 1000
MIB = 1024 * 1024


# inside a child: measuring -------------------------------------------------------------


def current_rss() -> int:
    """Resident set size now, in bytes (Linux; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss()


def peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Meter:
    """Wall clock, CPU and RSS (optionally tracemalloc and cProfile) from the moment the
    child starts consuming to the moment it is told to stop."""

    def __init__(self, profile: str | None, trace: bool) -> None:
        self._profile_path = profile
        self._trace = trace
        self._profiler: cProfile.Profile | None = None
        self.t0: float | None = None
        self.t1: float | None = None
        self._rss0 = 0
        self._cpu0 = 0.0
        self._cpu = 0.0
        self._traced_peak: int | None = None

    def start(self) -> None:
        if self.t0 is not None:
            return
        self._rss0 = current_rss()
        self._cpu0 = cpu_seconds()
        if self._trace:
            tracemalloc.start()
        if self._profile_path:
            # CPU time, not wall time: on a busy machine wall time blames whatever ran
            # when the process was descheduled.
            self._profiler = cProfile.Profile(time.process_time)
            self._profiler.enable()
        self.t0 = time.time()

    def stop(self) -> None:
        if self.t0 is None or self.t1 is not None:
            return
        self.t1 = time.time()
        if self._profiler is not None:
            self._profiler.disable()
            assert self._profile_path is not None
            self._profiler.dump_stats(self._profile_path)
        self._cpu = cpu_seconds() - self._cpu0
        if self._trace and tracemalloc.is_tracing():
            self._traced_peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()

    def report(self) -> dict[str, Any]:
        return {
            "t0": self.t0,
            "t1": self.t1,
            "cpu_s": self._cpu,
            "rss_start_bytes": self._rss0,
            "rss_peak_bytes": peak_rss(),
            "rss_delta_bytes": max(peak_rss() - self._rss0, 0),
            "traced_peak_bytes": self._traced_peak,
        }


# inside a child: talking to the parent -----------------------------------------------


async def command() -> str:
    """The parent's next word on stdin: `go` once the queue is loaded, `stop` once it has
    seen every event (a closed pipe reads as `stop`)."""
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    return line.strip() or "stop"


def announce_ready(**details: Any) -> None:
    print(READY_PREFIX + json.dumps(details), flush=True)


async def ready_then_go(meter: Meter) -> None:
    """Tell the parent this child is set up, wait for the word, start the clock."""
    announce_ready()
    if await command() != "go":
        raise SystemExit("stopped before the start")
    meter.start()


class HeldQueue:
    """A requests queue of the worker, holding back `consume` until the parent says go: the
    Service is then connected, its topology declared and its tasks running. The queues of
    every lane share one `go`."""

    def __init__(self, queue: Any, go: Callable[[], Awaitable[None]]) -> None:
        self._queue = queue
        self._go = go

    async def consume(self, *args: Any, **kwargs: Any) -> Any:
        await self._go()
        return await self._queue.consume(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._queue, name)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# inside a child: the measured loops ------------------------------------------------------


async def child_baseline(spec: dict[str, Any], meter: Meter) -> dict[str, Any]:
    """The bare loop: consume, publish one confirmed result per message (or two, like the
    worker's `submitted` and `accepted`, with `--baseline-events 2`), ack."""
    connection = await aio_pika.connect(spec["url"])
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=spec["prefetch"])
        exchange = await channel.get_exchange(spec["exchange"])
        queue = await channel.get_queue(spec["queue"])

        statuses = ("submitted", "accepted")[: spec["events"]]

        async def on_message(message: AbstractIncomingMessage) -> None:
            request = json.loads(message.body)
            for status in statuses:
                event = {
                    "event_id": str(uuid.uuid4()),
                    "request_id": request["request_id"],
                    "status": status,
                    "recipients": [request["to"]],
                    "timestamp": time.time(),
                    "metadata": request.get("metadata", {}),
                }
                await exchange.publish(
                    aio_pika.Message(
                        json.dumps(event).encode(),
                        content_type="application/json",
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    routing_key=f"sms.result.{status}",
                )
            await message.ack()

        await ready_then_go(meter)
        await queue.consume(on_message)
        await command()
        meter.stop()
    return {}


async def child_broker(spec: dict[str, Any], meter: Meter) -> dict[str, Any]:
    """The worker's broker work without the worker: a consuming channel (the same prefetch)
    and a confirming publishing channel on one connection, as `worker.broker.Broker` has.
    Deliveries gather into sets (`max_lines`, or `max_wait_ms` after a set's first); per
    set, the `submitted` events go out with `worker.confirmed_publish.publish_confirmed`,
    the set is acked with one `basic.ack(multiple=True)` (in delivery order, as the
    worker's Acker does), then the `accepted` events go out the same way."""
    from pamqp.commands import Basic

    from worker.confirmed_publish import RawMessage, publish_confirmed

    max_lines = spec["settings"]["batch"]["max_lines"]
    max_wait_s = spec["settings"]["batch"]["max_wait_ms"] / 1000
    exchange_name = spec["exchange"]
    connection = await aio_pika.connect(spec["url"])
    async with connection:
        publishing = await connection.channel(publisher_confirms=True)
        consuming = await connection.channel(publisher_confirms=True)
        await consuming.set_qos(prefetch_count=spec["prefetch"])
        publish_channel = await publishing.get_underlay_channel()
        ack_channel = await consuming.get_underlay_channel()
        queue = await consuming.get_queue(spec["queue"])
        loop = asyncio.get_running_loop()
        pending: list[AbstractIncomingMessage] = []
        timer: asyncio.TimerHandle | None = None
        previous_ack: asyncio.Future[None] | None = None
        tasks: set[asyncio.Task[None]] = set()
        failures: list[str] = []

        def events(requests: list[dict[str, Any]], status: str) -> list[RawMessage]:
            out = []
            for request in requests:
                event_id = str(uuid.uuid4())
                event = {
                    "event_id": event_id,
                    "request_id": request["request_id"],
                    "status": status,
                    "recipients": [request["to"]],
                    "timestamp": time.time(),
                    "metadata": request.get("metadata", {}),
                }
                properties = Basic.Properties(
                    content_type="application/json",
                    delivery_mode=2,
                    message_id=event_id,
                    message_type=f"sms.result.{status}",
                )
                out.append(
                    RawMessage(
                        exchange_name,
                        f"sms.result.{status}",
                        json.dumps(event).encode(),
                        properties,
                    )
                )
            return out

        async def settle(
            batch: list[AbstractIncomingMessage],
            before: asyncio.Future[None] | None,
            acked: asyncio.Future[None],
        ) -> None:
            try:
                requests = [json.loads(m.body) for m in batch]
                await publish_confirmed(publish_channel, events(requests, "submitted"))
                if before is not None:
                    await before  # multiple=True must not ack an earlier, unsettled set
                tag = batch[-1].delivery_tag
                assert tag is not None
                await ack_channel.basic_ack(tag, multiple=True)
                acked.set_result(None)
                await publish_confirmed(publish_channel, events(requests, "accepted"))
            except Exception as exc:  # reported, and the parent sees an incomplete phase
                failures.append(repr(exc))
                if not acked.done():
                    acked.set_exception(exc)

        def flush() -> None:
            nonlocal timer, previous_ack
            if timer is not None:
                timer.cancel()
                timer = None
            if not pending:
                return
            batch = pending[:]
            pending.clear()
            acked: asyncio.Future[None] = loop.create_future()
            task = loop.create_task(settle(batch, previous_ack, acked))
            previous_ack = acked
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        async def on_message(message: AbstractIncomingMessage) -> None:
            nonlocal timer
            pending.append(message)
            if len(pending) >= max_lines:
                flush()
            elif timer is None:
                timer = loop.call_later(max_wait_s, flush)

        await ready_then_go(meter)
        await queue.consume(on_message)
        await command()
        meter.stop()
    return {"broker_failures": failures[:5]} if failures else {}


async def child_worker(spec: dict[str, Any], meter: Meter) -> dict[str, Any]:
    """The smsc-worker Service, with the gateway Emulator on the same loop unless the
    parent runs it in a process of its own (`spec["gateway_port"]`)."""
    from worker.emulator.config import EmulatorConfig
    from worker.emulator.server import Emulator
    from worker.service import Service

    reply_port = spec["reply_port"]
    async with contextlib.AsyncExitStack() as stack:
        emulator: Emulator | None = None
        gateway_port = spec.get("gateway_port")
        if gateway_port is None:
            config = EmulatorConfig(reply_relay=("127.0.0.1", reply_port))
            emulator = await stack.enter_async_context(Emulator(config))
            gateway_port = emulator.port
        service = Service(
            worker_settings(spec["settings"], gateway_port, reply_port, spec.get("state"))
        )
        consuming_queue = service.broker.consuming_queue
        started: list[asyncio.Future[None]] = []

        async def go() -> None:
            if not started:
                started.append(asyncio.ensure_future(ready_then_go(meter)))
            await asyncio.shield(started[0])

        def held_consuming_queue(*args: Any) -> Any:
            # Service.start() asks for each lane's queue right before basic.consume.
            return HeldQueue(consuming_queue(*args), go)

        service.broker.consuming_queue = held_consuming_queue  # type: ignore[method-assign]
        async with service:
            await command()
            meter.stop()
        if emulator is None:
            return {}
        return {"emulator_mails": len(emulator.mails), "emulator_errors": dict(emulator.errors)}
    raise AssertionError("unreachable")  # pragma: no cover - the stack does not swallow


async def child_gateway(spec: dict[str, Any], meter: Meter) -> dict[str, Any]:
    """The gateway Emulator alone (`--emulator process`)."""
    from worker.emulator.config import EmulatorConfig
    from worker.emulator.server import Emulator

    config = EmulatorConfig(reply_relay=("127.0.0.1", spec["reply_port"]))
    async with Emulator(config) as emulator:
        meter.start()
        announce_ready(port=emulator.port)
        await command()  # go
        await command()  # stop
        meter.stop()
        return {"emulator_mails": len(emulator.mails), "emulator_errors": dict(emulator.errors)}


def worker_settings(
    groups: dict[str, Any], smtp_port: int, reply_port: int, state: dict[str, Any] | None
) -> Any:
    """The worker's Settings; `state` (url, key_prefix) puts its state in Redis, None keeps
    it in memory."""
    from worker.settings import (
        AmqpSettings,
        BatchSettings,
        LimitSettings,
        ReplySettings,
        Settings,
        SmtpSettings,
        StateSettings,
    )

    return Settings(
        state=StateSettings(**state) if state else StateSettings(url=""),
        amqp=AmqpSettings(**groups["amqp"]),
        smtp=SmtpSettings(host="127.0.0.1", port=smtp_port, **groups["smtp"]),
        reply=ReplySettings(host="127.0.0.1", port=reply_port, address="replies@bench.test"),
        batch=BatchSettings(**groups["batch"]),
        limits=LimitSettings(**groups["limits"]),
    )


CHILDREN: dict[str, Callable[[dict[str, Any], Meter], Coroutine[Any, Any, dict[str, Any]]]] = {
    "baseline": child_baseline,
    "broker": child_broker,
    "worker": child_worker,
    "gateway": child_gateway,
}


def child_main(kind: str, spec: dict[str, Any]) -> None:
    meter = Meter(spec.get("profile"), spec.get("tracemalloc", False))
    extra = asyncio.run(CHILDREN[kind](spec, meter))
    print(RESULT_PREFIX + json.dumps({**meter.report(), **extra}), flush=True)


# the parent: children, topology, loading, results ----------------------------------------


class Child:
    """One measured loop in a process of its own, driven over its stdin and stdout."""

    def __init__(self, kind: str, spec: dict[str, Any]) -> None:
        self.kind = kind
        self._spec = spec
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        self._proc: asyncio.subprocess.Process | None = None
        self._exited: asyncio.Future[int] | None = None
        self.ready: dict[str, Any] = {}

    async def start(self, limit_s: float = 60) -> None:
        """Spawn the child and wait until it is connected and ready to consume."""
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.run",
            "--child",
            self.kind,
            "--spec",
            json.dumps(self._spec),
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=self._stderr,
        )
        self._exited = asyncio.ensure_future(self._proc.wait())
        assert self._proc.stdout is not None
        async with asyncio.timeout(limit_s):
            while True:
                line = (await self._proc.stdout.readline()).decode()
                if not line:
                    raise RuntimeError(f"the {self.kind} child ended early:\n{self.stderr()}")
                if line.startswith(READY_PREFIX):
                    self.ready = json.loads(line[len(READY_PREFIX) :])
                    return

    async def send(self, word: str) -> None:
        assert self._proc is not None
        assert self._proc.stdin is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._proc.stdin.write(word.encode() + b"\n")
            await self._proc.stdin.drain()

    async def wait_for(self, finished: Callable[[], Awaitable[Any]], limit_s: float) -> bool:
        """Wait for `finished`; False on the time limit or when the child ends first."""
        assert self._exited is not None
        waiting = asyncio.ensure_future(finished())
        done, _ = await asyncio.wait(
            {waiting, self._exited}, timeout=limit_s, return_when=asyncio.FIRST_COMPLETED
        )
        waiting.cancel()
        return waiting in done

    async def finish(self) -> dict[str, Any] | None:
        """Tell the child to stop and read its report."""
        assert self._proc is not None
        assert self._proc.stdout is not None
        assert self._exited is not None
        await self.send("stop")
        output = await asyncio.wait_for(self._proc.stdout.read(), 60)
        await asyncio.wait_for(asyncio.shield(self._exited), 10)
        for line in output.decode(errors="replace").splitlines():
            if line.startswith(RESULT_PREFIX):
                report: dict[str, Any] = json.loads(line[len(RESULT_PREFIX) :])
                return report
        return None

    async def close(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
            await self._proc.wait()
        self._stderr.close()

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-3000:]


def amqp_names(tag: str) -> dict[str, str]:
    return {
        "requests_queue": f"bench.{tag}.requests",
        "results_exchange": f"bench.{tag}.results",
        "dead_letter_exchange": f"bench.{tag}.dlx",
        "dead_letter_queue": f"bench.{tag}.dead",
        "retry_queue": f"bench.{tag}.retry",
    }


def worker_groups(args: argparse.Namespace, amqp: dict[str, Any]) -> dict[str, Any]:
    """The worker's settings for the benchmark: batching for throughput, and limits high
    enough never to throttle."""
    return {
        "amqp": {**amqp, "prefetch": args.prefetch},
        "smtp": {"connections": args.connections, "timeout_s": 10, "submit_deadline_s": 20},
        "batch": {"max_lines": args.max_lines, "max_wait_ms": args.max_wait_ms},
        "limits": {"mails_per_second": 100_000.0, "parts_per_second": 100_000_000.0},
    }


class Topology:
    """Declares what a phase needs (as its consumer would) and deletes it afterwards."""

    def __init__(self, kind: str, url: str, groups: dict[str, Any]) -> None:
        # The broker baseline consumes from a queue declared as the worker declares it.
        kind = "worker" if kind == "broker" else kind
        self.kind = kind
        self.url = url
        amqp = groups["amqp"]
        self.queue: str = amqp["requests_queue"]
        self.exchange: str = amqp["results_exchange"]
        self._queues = [self.queue]
        self._exchanges = [self.exchange]
        if kind == "worker":
            from worker.broker import RETRY_TIERS_S, retry_queue_name
            from worker.lanes import Lane
            from worker.settings import AmqpSettings

            self.amqp = AmqpSettings(**amqp)
            self._queues += [self.amqp.dead_letter_queue]
            self._queues += [self.amqp.queue(lane) for lane in (Lane.high, Lane.bulk)]
            self._queues += [
                retry_queue_name(self.amqp, t, lane) for t in RETRY_TIERS_S for lane in Lane
            ]
            self._exchanges += [self.amqp.dead_letter_exchange]

    async def declare(self, channel: AbstractChannel) -> None:
        if self.kind == "worker":
            from worker.broker import Broker

            broker = Broker(self.amqp)  # the worker's own declarations, arguments and all
            try:
                await broker.connect()
            finally:
                await broker.close()
            return
        await channel.declare_exchange(self.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        await channel.declare_queue(
            self.queue,
            durable=True,
            arguments={"x-queue-type": "quorum", "x-delivery-limit": 10},
        )

    async def delete(self) -> None:
        connection = await aio_pika.connect(self.url)
        async with connection:
            channel = await connection.channel()
            for name in self._queues:
                await channel.queue_delete(name)
            for name in self._exchanges:
                await channel.exchange_delete(name)


def request_body(tag: str, n: int, sent: float) -> bytes:
    return json.dumps(
        {
            "request_id": f"bench-{tag}-{n}",
            "to": f"+7916{n:07d}",
            "text": f"Your code is {n:06d}",
            "metadata": {"bench_t": sent, "n": n},
        }
    ).encode()


async def publish_requests(channel: AbstractChannel, queue: str, tag: str, numbers: range) -> None:
    sent = time.time()
    await asyncio.gather(
        *(
            channel.default_exchange.publish(
                aio_pika.Message(
                    request_body(tag, i, sent),
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=queue,
            )
            for i in numbers
        )
    )


async def preload(channel: AbstractChannel, queue: str, tag: str, n: int) -> float:
    """Publish n requests with confirms; return the seconds it took."""
    started = time.perf_counter()
    for first in range(0, n, PRELOAD_CHUNK):
        await publish_requests(channel, queue, tag, range(first, min(first + PRELOAD_CHUNK, n)))
    return time.perf_counter() - started


async def paced(channel: AbstractChannel, queue: str, tag: str, n: int, rate: float) -> float:
    """Publish n requests at about `rate` per second while the consumer runs."""
    started = time.perf_counter()
    sent = 0
    while sent < n:
        due = min(n, int((time.perf_counter() - started) * rate) + 1)
        if due > sent:
            await publish_requests(channel, queue, tag, range(sent, due))
            sent = due
        await asyncio.sleep(max(sent / rate - (time.perf_counter() - started), 0.002))
    return time.perf_counter() - started


class Results:
    """The result events of one phase, as they arrive, with their receipt times."""

    def __init__(self, requests: int, need_accepted: bool) -> None:
        self._requests = requests
        self._need_accepted = need_accepted
        self.submitted: dict[str, float] = {}
        self.accepted: dict[str, float] = {}
        self.latencies: list[float] = []
        self.gateway_ids: set[str] = set()
        self.other: Counter[str] = Counter()
        self.done = asyncio.Event()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        now = time.time()
        event = json.loads(message.body)
        status, request_id = event.get("status"), event.get("request_id")
        if status == "submitted":
            if request_id not in self.submitted:
                self.submitted[request_id] = now
                sent = (event.get("metadata") or {}).get("bench_t")
                if isinstance(sent, int | float):
                    self.latencies.append(now - sent)
            if event.get("gateway_id"):
                self.gateway_ids.add(event["gateway_id"])
        elif status == "accepted":
            self.accepted.setdefault(request_id, now)
        else:
            self.other[str(status)] += 1
        if len(self.submitted) >= self._requests and (
            not self._need_accepted or len(self.accepted) >= self._requests
        ):
            self.done.set()


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (the kernel's peak of VmRSS) of a process, in bytes; empty once it
    has ended."""
    figures: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    name, value = line.split(":", 1)
                    figures[name] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return figures


RSS_MARKS = (25, 50, 75, 100)


class RssSampler:
    """Samples a child's VmRSS while it drains, with the number of requests handled (their
    `submitted` event received) at each sample, and keeps the sample at which the count
    first reached 25 %, 50 %, 75 % and 100 % of the requests."""

    def __init__(self, pid: int, results: Results, n: int, interval_s: float) -> None:
        self._pid = pid
        self._results = results
        self._n = n
        self._interval_s = interval_s
        self.samples: list[tuple[float, int, int]] = []  # (time, handled, VmRSS bytes)
        self.marks: dict[int, int] = {}
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> dict[str, int]:
        status = proc_status(self._pid)
        if "VmRSS" in status:
            handled = len(self._results.submitted)
            self.samples.append((time.time(), handled, status["VmRSS"]))
            for mark in RSS_MARKS:
                if mark not in self.marks and handled * 100 >= mark * self._n:
                    self.marks[mark] = status["VmRSS"]
        return status

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self._interval_s)

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> dict[str, int]:
        """Stop sampling; the last sample's status (VmHWM included)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        return self.sample()


# the parent: where the machine's CPU goes --------------------------------------------


def machine_cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) clock ticks of all cores together since boot, from the aggregate `cpu`
    line of /proc/stat; None where there is none. Busy is total minus idle and iowait (a
    core waiting for the disk could run something else). Total is user, nice, system,
    idle, iowait, irq, softirq and steal: guest and guest_nice are already in user and
    nice."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    if len(fields) < 6 or fields[0] != "cpu":
        return None
    ticks = [int(value) for value in fields[1:9]]
    total = sum(ticks)
    return total - ticks[3] - ticks[4], total


def process_cpu_ticks(pid: int) -> tuple[str, int] | None:
    """(comm, utime + stime in clock ticks) of a process, from /proc/<pid>/stat; None once
    it has ended or where it cannot be read. `comm` is in parentheses and may hold spaces
    and parentheses of its own, so the numbered fields are split after the last `)`."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            text = stat.read().decode(errors="replace")
    except OSError:
        return None
    head, paren, tail = text.rpartition(")")
    fields = tail.split()  # fields[0] is field 3 (state), so field k is fields[k - 3]
    if not paren or len(fields) < 13:
        return None
    try:
        return head.partition("(")[2], int(fields[11]) + int(fields[12])  # fields 14, 15
    except ValueError:
        return None


def rabbitmq_cpu_ticks() -> dict[int, int] | None:
    """utime + stime in clock ticks of every `beam.smp` process (RabbitMQ's Erlang VM), by
    pid; None where /proc cannot be listed or none is found (RabbitMQ on another host, or
    in a container whose processes this one does not see)."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    found: dict[int, int] = {}
    for entry in entries:
        if not entry.isdigit():
            continue
        process = process_cpu_ticks(int(entry))
        if process is not None and process[0] == "beam.smp":
            found[int(entry)] = process[1]
    return found or None


class CpuSnapshot:
    """What the parent reads at each end of a phase's measured window: the machine's CPU
    ticks, RabbitMQ's, and this process's own CPU (it is the results reader)."""

    def __init__(self, start: bool) -> None:
        # The order keeps the /proc scan, which costs this process a few ms, out of the
        # reader's figure at both ends: read before the reader's clock at the start and
        # after it at the end.
        if start:
            self.rabbitmq = rabbitmq_cpu_ticks()
            self.reader_s = cpu_seconds()
            self.machine = machine_cpu_ticks()
            self.t = time.perf_counter()
        else:
            self.t = time.perf_counter()
            self.machine = machine_cpu_ticks()
            self.reader_s = cpu_seconds()
            self.rabbitmq = rabbitmq_cpu_ticks()


def cpu_window(start: CpuSnapshot, end: CpuSnapshot) -> dict[str, float | None]:
    """The machine's CPU between two snapshots, in seconds of CPU (None where /proc is not
    there): busy time of all cores, its share of their total, RabbitMQ's CPU, this
    process's CPU. A `beam.smp` that started within the window counts whole; one that
    ended within it is lost."""
    tick_s = 1 / os.sysconf("SC_CLK_TCK")
    machine_busy_s = machine_busy_pct = rabbitmq_s = None
    if start.machine is not None and end.machine is not None:
        busy, total = (e - s for s, e in zip(start.machine, end.machine, strict=True))
        machine_busy_s = busy * tick_s
        machine_busy_pct = 100 * busy / total if total > 0 else None
    if start.rabbitmq is not None and end.rabbitmq is not None:
        ticks = sum(t - start.rabbitmq.get(pid, 0) for pid, t in end.rabbitmq.items())
        rabbitmq_s = ticks * tick_s
    return {
        "window_s": end.t - start.t,
        "machine_busy_pct": machine_busy_pct,
        "machine_busy_cpu_s": machine_busy_s,
        "rabbitmq_cpu_s": rabbitmq_s,
        "reader_cpu_s": end.reader_s - start.reader_s,
    }


async def delete_redis_keys(url: str, prefix: str) -> int:
    """SCAN for `<prefix>:*` and UNLINK what it finds; the number of keys removed."""
    import redis.asyncio as redis

    client = redis.from_url(url)
    removed = 0
    try:
        batch: list[bytes] = []
        async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                removed += await client.unlink(*batch)
                batch = []
        if batch:
            removed += await client.unlink(*batch)
    finally:
        await client.aclose()
    return removed


def phase_kind(name: str) -> tuple[str, str | None]:
    """`worker-redis` -> ("worker", "redis"); `baseline` -> ("baseline", None)."""
    kind, _, store = name.partition("-")
    return kind, store or None


async def run_phase(name: str, args: argparse.Namespace, run: int) -> dict[str, Any]:
    """Set up, load and measure one phase; always delete its queues and exchanges (and,
    for the Redis store, its keys)."""
    kind, store = phase_kind(name)
    tag = uuid.uuid4().hex[:10]
    groups = worker_groups(args, amqp_names(tag))
    topology = Topology(kind, args.url, groups)
    n = args.rss or args.requests
    limit_s = max(args.timeout, n / 100) if args.rss else args.timeout
    profile = Path(args.profile) / f"{name}-run{run + 1}.pstats" if args.profile else None
    state = None
    if store == "redis":
        state = {"url": args.redis_url, "key_prefix": f"bench-{tag}"}
    spec: dict[str, Any] = {
        "url": args.url,
        "prefetch": args.prefetch,
        "events": args.baseline_events,
        "queue": topology.queue,
        "exchange": topology.exchange,
        "settings": groups,
        "state": state,
        "reply_port": free_port(),
        "tracemalloc": args.tracemalloc,
        "profile": str(profile) if profile else None,
    }
    two_events = kind in ("worker", "broker") or args.baseline_events == 2
    results = Results(n, need_accepted=two_events)
    children: list[Child] = []
    gateway: Child | None = None
    sampler: RssSampler | None = None
    report: dict[str, Any] | None = None
    gateway_report: dict[str, Any] | None = None
    final_status: dict[str, int] = {}
    rss_start = 0
    redis_keys: int | None = None
    try:
        connection = await aio_pika.connect(args.url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            await topology.declare(channel)
            exchange = await channel.get_exchange(topology.exchange)
            events = await channel.declare_queue(exclusive=True, auto_delete=True)
            await events.bind(exchange, "sms.result.#")
            await events.consume(results.on_message, no_ack=True)
            if kind == "worker" and args.emulator == "process":
                gateway = Child("gateway", {"reply_port": spec["reply_port"]})
                children.append(gateway)
                await gateway.start()
                spec["gateway_port"] = gateway.ready["port"]
            child = Child(kind, spec)
            children.append(child)
            await child.start()
            sampler = RssSampler(child.pid, results, n, 0.1 if args.rss else 0.25)
            rss_start = sampler.sample().get("VmRSS", 0)
            if args.rate:
                sampler.start()
                cpu_start = CpuSnapshot(start=True)
                for c in children:
                    await c.send("go")
                load_s = await paced(channel, topology.queue, tag, n, args.rate)
            else:
                load_s = await preload(channel, topology.queue, tag, n)
                rss_start = sampler.sample().get("VmRSS", 0)
                sampler.start()
                cpu_start = CpuSnapshot(start=True)
                for c in children:
                    await c.send("go")
            in_time = await child.wait_for(results.done.wait, limit_s)
            # The window: from "go" to the last awaited event (or the time limit).
            cpu = cpu_window(cpu_start, CpuSnapshot(start=False))
            final_status = await sampler.stop()
            report = await child.finish()
            if gateway is not None:
                gateway_report = await gateway.finish()
            # Stragglers (events published while the worker drains) are not waited for.
        stderr = child.stderr()
    finally:
        if sampler is not None:
            await sampler.stop()
        for c in children:
            await c.close()
        await topology.delete()
        if state is not None:
            redis_keys = await delete_redis_keys(args.redis_url, state["key_prefix"])
    if report is None:
        raise RuntimeError(f"the {kind} child gave no report; its stderr:\n{stderr}")
    if gateway_report is not None:
        report["emulator_mails"] = gateway_report.get("emulator_mails")
        report["emulator_errors"] = gateway_report.get("emulator_errors")
        report["gateway_cpu_s"] = gateway_report.get("cpu_s")
    phase = summarize_phase(kind, n, results, report, in_time, load_s, stderr)
    phase.update(machine_figures(phase, cpu, n))
    phase["name"] = name
    phase["store"] = store
    if redis_keys is not None:
        phase["redis_keys_deleted"] = redis_keys
    assert sampler is not None
    phase["vm_hwm_mib"] = final_status["VmHWM"] / MIB if "VmHWM" in final_status else None
    phase["rss_start_mib"] = rss_start / MIB
    phase["rss_end_mib"] = final_status["VmRSS"] / MIB if "VmRSS" in final_status else None
    phase["rss_at_pct_mib"] = {str(k): v / MIB for k, v in sorted(sampler.marks.items())}
    sampled = [rss for _, _, rss in sampler.samples]
    phase["rss_sampled_max_mib"] = max(sampled) / MIB if sampled else None
    if args.rss:
        phase["rss_verdict"] = rss_verdict(phase)
        t_first = sampler.samples[0][0] if sampler.samples else 0.0
        phase["rss_samples"] = [
            [round(t - t_first, 2), handled, round(rss / MIB, 2)]
            for t, handled, rss in sampler.samples
        ]
    return phase


def percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(math.ceil(share * len(ordered)) - 1, 0)]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def summarize_phase(
    kind: str,
    n: int,
    results: Results,
    report: dict[str, Any],
    in_time: bool,
    load_s: float,
    stderr: str,
) -> dict[str, Any]:
    t0, t1 = report["t0"], report["t1"]
    submitted = sorted(results.submitted.values())
    accepted = sorted(results.accepted.values())
    elapsed = submitted[-1] - t0 if submitted else None
    accepted_elapsed = accepted[-1] - t0 if accepted else None
    worker = kind == "worker"
    mails = len(results.gateway_ids)
    cpu_s = report["cpu_s"]
    phase: dict[str, Any] = {
        "kind": kind,
        "requests": n,
        "complete": in_time and len(submitted) >= n,
        "submitted": len(submitted),
        "accepted": len(accepted),
        "other_statuses": dict(results.other),
        "load_s": load_s,
        "elapsed_s": elapsed,
        "throughput_rps": len(submitted) / elapsed if elapsed else None,
        "accepted_elapsed_s": accepted_elapsed,
        "accepted_throughput_rps": len(accepted) / accepted_elapsed if accepted_elapsed else None,
        "emails": mails if worker else None,
        "emulator_mails": report.get("emulator_mails"),
        "emails_per_1000": 1000 * mails / len(submitted) if worker and submitted else None,
        "latency_p50_ms": _ms(percentile(results.latencies, 0.50)),
        "latency_p99_ms": _ms(percentile(results.latencies, 0.99)),
        "rss_delta_mib": report["rss_delta_bytes"] / MIB,
        "rss_peak_mib": report["rss_peak_bytes"] / MIB,
        "traced_peak_mib": report["traced_peak_bytes"] / MIB
        if report.get("traced_peak_bytes") is not None
        else None,
        "cpu_ms_per_1000": 1000 * 1000 * cpu_s / n,
        # From the start to the stop: for the worker that includes the `accepted` tail.
        "cpu_busy_pct": 100 * cpu_s / (t1 - t0) if t1 and t1 > t0 else None,
        "gateway_cpu_ms_per_1000": 1000 * 1000 * report["gateway_cpu_s"] / n
        if report.get("gateway_cpu_s") is not None
        else None,
    }
    if report.get("emulator_errors"):
        phase["emulator_errors"] = report["emulator_errors"]
    if not phase["complete"]:
        phase["stderr_tail"] = stderr
    return phase


def machine_figures(phase: dict[str, Any], cpu: dict[str, float | None], n: int) -> dict[str, Any]:
    """Where the machine's CPU went over the parent's window, per 1,000 requests. The
    window (go sent, to the last awaited event) is not quite the child's (go received, to
    stop received, a little after the last event), nor the gateway child's (from its
    set-up, before the queue is loaded); their sum is the best join there is, not an exact
    one."""

    def per_1000(seconds: float | None) -> float | None:
        return None if seconds is None else 1000 * 1000 * seconds / n

    rabbitmq = per_1000(cpu["rabbitmq_cpu_s"])
    reader = per_1000(cpu["reader_cpu_s"])
    parts = [phase["cpu_ms_per_1000"], phase["gateway_cpu_ms_per_1000"] or 0.0, rabbitmq, reader]
    return {
        **cpu,
        "rabbitmq_cpu_ms_per_1000": rabbitmq,
        "reader_cpu_ms_per_1000": reader,
        # None without RabbitMQ's share: the sum would read as complete and be far off.
        "all_cpu_ms_per_1000": None if None in parts else sum(p for p in parts if p is not None),
        "machine_cpu_ms_per_1000": per_1000(cpu["machine_busy_cpu_s"]),
    }


# reporting ---------------------------------------------------------------------------

FIGURES: list[tuple[str, str]] = [
    ("throughput_rps", "throughput to `submitted` (req/s)"),
    ("accepted_throughput_rps", "throughput to `accepted` (req/s)"),
    ("emails_per_1000", "e-mails per 1,000 requests"),
    ("latency_p50_ms", "latency p50, publish -> submitted (ms)"),
    ("latency_p99_ms", "latency p99, publish -> submitted (ms)"),
    ("rss_delta_mib", "peak RSS delta (MiB)"),
    ("traced_peak_mib", "tracemalloc peak (MiB)"),
    ("cpu_ms_per_1000", "CPU per 1,000 requests (ms)"),
    ("gateway_cpu_ms_per_1000", "gateway process CPU per 1,000 (ms)"),
    ("rabbitmq_cpu_ms_per_1000", "RabbitMQ CPU per 1,000 (ms)"),
    ("reader_cpu_ms_per_1000", "results reader CPU per 1,000 (ms)"),
    ("all_cpu_ms_per_1000", "all CPU per 1,000: sum of the above (ms)"),
    ("cpu_busy_pct", "CPU busy, start to stop (%)"),
    ("machine_cpu_ms_per_1000", "machine busy CPU per 1,000 (ms)"),
    ("machine_busy_pct", "machine busy, go to last event (%)"),
]
# Shown as "-" rather than left out where /proc is not there, so the gap is visible.
ALWAYS_SHOWN = {
    "rabbitmq_cpu_ms_per_1000",
    "all_cpu_ms_per_1000",
    "machine_cpu_ms_per_1000",
    "machine_busy_pct",
}


def comparisons(names: list[str]) -> list[tuple[str, str, str, float]]:
    """(numerator, denominator, the figure the aim is judged on, aim) for the phases run."""
    out = []
    for worker in ("worker-memory", "worker-redis"):
        if worker in names and "baseline" in names:
            out.append((worker, "baseline", "throughput_rps", GOAL))
        if worker in names and "broker" in names:
            out.append((worker, "broker", "accepted_throughput_rps", BROKER_AIM))
    if "worker-memory" in names and "worker-redis" in names:
        out.append(("worker-redis", "worker-memory", "accepted_throughput_rps", REDIS_AIM))
    return out


RATIO_FIGURES = (
    "throughput_rps",
    "accepted_throughput_rps",
    "cpu_ms_per_1000",
    "all_cpu_ms_per_1000",
)
SATURATED_PCT = 90  # machine busy % in the broker phase from which the note is printed


def summarize(runs: list[dict[str, dict[str, Any]]], paced: bool = False) -> dict[str, Any]:
    """Medians over the runs; each ratio is the median of the per-run ratios, so a ratio
    always compares two phases measured in the same run. With `paced` (`--rate`) the rate,
    not the CPU, bounds the drain, so no saturation note."""
    names = [name for name in PHASE_ORDER if name in runs[0]]
    figures: dict[str, dict[str, float | None]] = {}
    for key, _ in FIGURES:
        figures[key] = {name: _median([r[name].get(key) for r in runs]) for name in names}
    ratios = []
    for top, bottom, judged_on, aim in comparisons(names):
        row: dict[str, Any] = {"phase": top, "against": bottom}
        for key in RATIO_FIGURES:
            per_run = []
            for run in runs:
                w, b = run[top].get(key), run[bottom].get(key)
                per_run.append(w / b if w is not None and b else None)
            row[key] = _median(per_run)
        row["aim"] = {"figure": judged_on, "at_least": aim}
        row["met"] = row[judged_on] is not None and row[judged_on] >= aim
        ratios.append(row)
    return {
        "phases": names,
        "figures": figures,
        "ratios": ratios,
        "saturation": None if paced else saturation(figures, ratios),
        "complete": all(phase["complete"] for run in runs for phase in run.values()),
    }


def saturation(
    figures: dict[str, dict[str, float | None]], ratios: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """When the broker phase kept the machine at least SATURATED_PCT % busy (median), a
    drain there is held back by the machine's CPU as a whole rather than by one process, so
    the note gives each worker phase's CPU of all processes per request against the broker
    phase's: the ratio table's figure (median of per-run ratios), so the two agree. None
    otherwise."""
    busy = figures["machine_busy_pct"].get("broker")
    if busy is None or busy < SATURATED_PCT:
        return None
    against_broker = {
        r["phase"]: r["all_cpu_ms_per_1000"]
        for r in ratios
        if r["against"] == "broker" and r["all_cpu_ms_per_1000"] is not None
    }
    if not against_broker:
        return None
    return {"broker_machine_busy_pct": busy, "all_cpu_vs_broker": against_broker}


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def rss_verdict(phase: dict[str, Any]) -> dict[str, Any]:
    """Peak RSS under the aim, and flat: RSS at 100 % no more than RSS_FLAT_SHARE above
    RSS at 25 %."""
    marks = phase["rss_at_pct_mib"]
    peak = phase["vm_hwm_mib"]
    growth = None
    if "25" in marks and "100" in marks:
        growth = marks["100"] - marks["25"]
    return {
        "peak_mib": peak,
        "peak_met": peak is not None and peak * MIB < RSS_PEAK_AIM_MB * 1e6,
        "growth_25_to_100_mib": growth,
        "flat": growth is not None and growth <= RSS_FLAT_SHARE * marks["25"],
    }


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


EMULATOR_PLACES = {"inprocess": "in-process", "process": "in a process of its own"}


def print_table(document: dict[str, Any]) -> None:
    meta, summary = document["settings"], document["summary"]
    if meta["rss"]:
        mode = "pre-loaded, RSS mode"
    else:
        mode = f"paced at {meta['rate']:g} req/s" if meta["rate"] else "pre-loaded"
    print(
        f"smsc-worker benchmark: {meta['requests']} requests ({mode}) x {meta['runs']} run(s), "
        f"RabbitMQ {meta['rabbitmq']}, {os.cpu_count()} CPUs; medians over the runs"
    )
    w = meta["worker"]
    print(
        f"worker settings: batch max_lines={w['batch']['max_lines']} "
        f"max_wait_ms={w['batch']['max_wait_ms']}; "
        f"limits mails_per_second={w['limits']['mails_per_second']:g} "
        f"parts_per_second={w['limits']['parts_per_second']:g}; "
        f"smtp connections={w['smtp']['connections']}; amqp prefetch={w['amqp']['prefetch']}; "
        f"gateway emulator {EMULATOR_PLACES[meta['emulator']]}; "
        f"stores {', '.join(meta['stores'])} (Redis {meta['redis']})"
    )
    names = summary["phases"]
    if "baseline" in names:
        events = "one confirmed publish" if meta["baseline_events"] == 1 else "two"
        print(f"baseline: prefetch {meta['baseline_prefetch']}, {events} + ack per message")
    if "broker" in names:
        print(
            f"broker: prefetch {meta['baseline_prefetch']}, sets of {w['batch']['max_lines']} "
            f"(or {w['batch']['max_wait_ms']} ms): publish_confirmed(submitted), "
            "ack multiple=True, publish_confirmed(accepted)"
        )
    print()
    print(f"{'':42}" + "".join(f"{name:>15}" for name in names))
    for key, label in FIGURES:
        row = summary["figures"][key]
        if key not in ALWAYS_SHOWN and all(row[name] is None for name in names):
            continue
        print(f"{label:42}" + "".join(f"{_fmt(row[name]):>15}" for name in names))
    if summary["ratios"]:
        print()
        print(
            f"{'ratio (median of per-run ratios)':42}{'submitted':>11}{'accepted':>11}"
            f"{'CPU/1000':>11}{'all CPU/1000':>14}   aim"
        )
        for r in summary["ratios"]:
            judged = "submitted" if r["aim"]["figure"] == "throughput_rps" else "accepted"
            verdict = "met" if r["met"] else "NOT met"
            print(
                f"{r['phase'] + ' / ' + r['against']:42}{_fmt(r['throughput_rps'], 2):>11}"
                f"{_fmt(r['accepted_throughput_rps'], 2):>11}"
                f"{_fmt(r['cpu_ms_per_1000'], 2):>11}"
                f"{_fmt(r['all_cpu_ms_per_1000'], 2):>14}"
                f"   >= {r['aim']['at_least']}x on {judged}: {verdict}"
            )
        if summary["saturation"]:
            print(saturation_line(summary["saturation"]))
    print()
    for i, run in enumerate(document["runs"], 1):
        parts = []
        for kind, p in run.items():
            parts.append(
                f"{kind} {_fmt(p['throughput_rps'], 0)}/{_fmt(p['accepted_throughput_rps'], 0)}"
                f" req/s in {_fmt(p['elapsed_s'], 2)} s (load {p['load_s']:.2f} s)"
                + ("" if p["complete"] else f" INCOMPLETE {p['submitted']}/{p['requests']}")
                + (f" other events {p['other_statuses']}" if p["other_statuses"] else "")
                + (
                    f" redis keys deleted {p['redis_keys_deleted']}"
                    if p.get("redis_keys_deleted") is not None
                    else ""
                )
            )
        print(f"run {i} (submitted/accepted): " + "; ".join(parts))
    if meta["rss"]:
        print_rss(document)
    if not summary["complete"]:
        print("\nnote: a phase did not finish; its figures cover what arrived")
    if meta["profiled"] or meta["tracemalloc"]:
        print("note: profiling or tracemalloc slows the children; their throughput is distorted")
    for path in document["profiles"]:
        print(f"profile: {path}")


def saturation_line(found: dict[str, Any]) -> str:
    costs = ", ".join(
        f"{name} costs {ratio:.2f}x" for name, ratio in found["all_cpu_vs_broker"].items()
    )
    return (
        f"the broker phase kept the machine {found['broker_machine_busy_pct']:.0f} % busy: "
        "on this machine a phase's drain rate is bounded by all the CPU it costs per request; "
        f"{costs} the broker phase's (all processes)"
    )


def print_rss(document: dict[str, Any]) -> None:
    print(
        f"\nworker RSS (MiB) draining {document['settings']['requests']} requests; "
        "at x % = when x % of the requests had their `submitted` event"
    )
    heads = ["start"] + [f"{m}%" for m in RSS_MARKS] + ["end", "VmHWM"]
    print(f"{'':16}" + "".join(f"{h:>9}" for h in heads) + "   aim")
    for run in document["runs"]:
        for name, p in run.items():
            marks = p["rss_at_pct_mib"]
            values = [p["rss_start_mib"]] + [marks.get(str(m)) for m in RSS_MARKS]
            values += [p["rss_end_mib"], p["vm_hwm_mib"]]
            v = p["rss_verdict"]
            aim = (
                f"peak < {RSS_PEAK_AIM_MB} MB: {'met' if v['peak_met'] else 'NOT met'}"
                f" ({_fmt((v['peak_mib'] or 0) * MIB / 1e6)} MB); "
                f"flat (25%->100% +{_fmt(v['growth_25_to_100_mib'])} MiB): "
                f"{'yes' if v['flat'] else 'NO'}"
            )
            print(f"{name:16}" + "".join(f"{_fmt(x):>9}" for x in values) + "   " + aim)


def print_profile(path: str, top: int) -> None:
    out = io.StringIO()
    stats = pstats.Stats(path, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    print(out.getvalue(), file=sys.stderr)


# entry point ------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="smsc-worker throughput against a bare aio-pika loop on the local RabbitMQ",
    )
    parser.add_argument("--requests", type=int, default=20000, help="requests per phase")
    parser.add_argument("--runs", type=int, default=3, help="baseline+worker pairs (median)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--url", default=DEFAULT_URL, help="RabbitMQ AMQP URL")
    parser.add_argument(
        "--rate",
        type=float,
        default=0,
        help="publish at this many req/s while consuming instead of pre-loading "
        "(for latency; throughput is then capped by the rate)",
    )
    parser.add_argument(
        "--baseline-events",
        type=int,
        choices=[1, 2],
        default=1,
        help="results the baseline publishes per message: 1 (default), or 2 like the "
        "worker's submitted + accepted",
    )
    parser.add_argument("--timeout", type=float, default=45.0, help="seconds per phase at most")
    parser.add_argument("--prefetch", type=int, default=2000, help="unacked messages per consumer")
    parser.add_argument("--max-lines", type=int, default=1000, help="worker: lines per e-mail")
    parser.add_argument("--max-wait-ms", type=int, default=50, help="worker: batch wait")
    parser.add_argument("--connections", type=int, default=2, help="worker: SMTP connections")
    parser.add_argument(
        "--emulator",
        choices=["inprocess", "process"],
        default="process",
        help="the gateway emulator in a process of its own (default: the real gateway is "
        "not in the worker's process either) or on the worker's loop",
    )
    parser.add_argument(
        "--tracemalloc", action="store_true", help="also trace Python allocations (slower)"
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="cProfile (CPU time) each child into DIR/<kind>-run<n>.pstats (slower)",
    )
    parser.add_argument(
        "--store",
        choices=["memory", "redis", "both"],
        default="both",
        help="the worker's state store: in memory, in Redis (`--redis-url`), or a phase "
        "of each (default)",
    )
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL, help="Redis for the state")
    parser.add_argument(
        "--rss",
        type=int,
        metavar="N",
        default=0,
        help="RSS mode: only the worker (each store), draining N requests once, its VmRSS "
        "sampled; prints RSS at 25/50/75/100 %% of the drain and the peak (VmHWM)",
    )
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.requests < 1 or args.runs < 1:
        parser.error("--requests and --runs must be at least 1")
    if args.rss < 0:
        parser.error("--rss must be positive")
    if args.rss:
        args.runs = 1
    if max(args.requests, args.rss) > 9_999_999:
        parser.error("--requests must be below 10,000,000 (one recipient each)")
    return args


def phase_names(args: argparse.Namespace) -> list[str]:
    stores = ["memory", "redis"] if args.store == "both" else [args.store]
    workers = [f"worker-{store}" for store in stores]
    return workers if args.rss else ["baseline", "broker", *workers]


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    try:
        connection = await aio_pika.connect(args.url, timeout=5)
    except Exception as exc:
        raise SystemExit(f"RabbitMQ is not reachable at {args.url}: {exc}") from None
    await connection.close()
    if args.store != "memory":
        import redis.asyncio as redis

        client = redis.from_url(args.redis_url, socket_timeout=5)
        try:
            await client.ping()
        except Exception as exc:
            raise SystemExit(f"Redis is not reachable at {args.redis_url}: {exc}") from None
        finally:
            await client.aclose()
    profile_dir = Path(args.profile) if args.profile else None
    names = phase_names(args)
    runs: list[dict[str, dict[str, Any]]] = []
    for i in range(args.runs):
        # The order reverses from run to run, so drift does not always hit the same phase.
        order = names if i % 2 == 0 else names[::-1]
        run: dict[str, dict[str, Any]] = {}
        for name in order:
            phase = await run_phase(name, args, i)
            run[name] = phase
            print(
                f"run {i + 1}/{args.runs} {name}: {_fmt(phase['throughput_rps'], 0)} req/s"
                + (f", peak RSS {_fmt(phase['vm_hwm_mib'])} MiB" if phase.get("vm_hwm_mib") else "")
                + ("" if phase["complete"] else " (incomplete)"),
                file=sys.stderr,
                flush=True,
            )
        runs.append(run)
    profiles = []
    if profile_dir is not None:
        profiles = [
            str(profile_dir / f"{k}-run{i + 1}.pstats") for i, r in enumerate(runs) for k in r
        ]
    return {
        "settings": {
            "requests": args.rss or args.requests,
            "runs": args.runs,
            "rss": bool(args.rss),
            "rate": args.rate,
            "rabbitmq": args.url.rpartition("@")[2].rstrip("/"),
            "redis": args.redis_url.rpartition("@")[2],
            "stores": [n.partition("-")[2] for n in names if n.startswith("worker-")],
            "baseline_prefetch": args.prefetch,
            "baseline_events": args.baseline_events,
            "worker": worker_groups(args, {}),
            "emulator": args.emulator,
            "tracemalloc": args.tracemalloc,
            "profiled": bool(args.profile),
        },
        "summary": summarize(runs, paced=bool(args.rate)),
        "runs": runs,
        "profiles": profiles,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(args.child, json.loads(args.spec))
        return
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    document = asyncio.run(bench(args))
    document["wall_s"] = time.perf_counter() - started
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print_table(document)
        print(f"(took {document['wall_s']:.0f} s)")
        for path in document["profiles"]:
            if "/worker-" in path:
                print(f"--- {path}, top by own CPU time", file=sys.stderr)
                print_profile(path, 25)
    if not document["summary"]["complete"]:
        sys.exit(2)


if __name__ == "__main__":
    main()
