"""Faults end to end, with the Redis store and the real emulator: replicas sharing one
queue, worker processes killed and restarted, a gateway outage, Redis going away and
Redis coming back empty. Every test counts lost, doubled and unexpected messages."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from pydantic import SecretStr

from tests.conftest import (
    Broker,
    Results,
    collecting,
    delete_keys,
    free_port,
    gateway_and_worker,
    make_settings,
    phone,
)
from tests.test_cli import cli_env
from tests.test_limits_and_retries import (
    FAST_RETRY,
    SHORT_WINDOWS,
    WORKER_LIMITS,
    close_connection_named,
)
from worker.contract import Status
from worker.emulator.config import EmulatorConfig
from worker.emulator.rules import recipient_key
from worker.emulator.server import Emulator
from worker.service import Service
from worker.settings import AmqpSettings, LimitSettings, RetrySettings, StateSettings
from worker.smtp_server import bound_port, serve_smtp

ROOT = Path(__file__).resolve().parent.parent
WORKER_BIN = ROOT / ".venv" / "bin" / "smsc-worker"
FINAL = frozenset({Status.accepted, Status.failed, Status.rejected})

HIGH_PACE = LimitSettings(mails_per_second=1000, parts_per_second=100_000)
FAST_BACKOFF = RetrySettings(
    base_delay_s=0.5, max_delay_s=2, max_age_s=3600, circuit_base_s=1, circuit_max_s=2
)


# helpers ---------------------------------------------------------------------------------


class ReplyRelay:
    """A store-and-forward mail relay between the emulator and the workers' reply ports:
    each reply is taken at once (250) and handed to the next target in turn, retried (on
    the next target) until one takes it, as a real MTA would."""

    def __init__(self, targets: Iterable[int] = ()) -> None:
        self.targets: list[int] = list(targets)
        self._turn = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.forwarded = 0
        self.port = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        task = asyncio.create_task(
            self._forward(str(envelope.mail_from), list(envelope.rcpt_tos), content)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return "250 OK queued"

    def _next_target(self) -> int:
        while not self.targets:
            raise LookupError("no target")
        port = self.targets[self._turn % len(self.targets)]
        self._turn += 1
        return port

    async def _forward(self, sender: str, recipients: list[str], content: bytes) -> None:
        while True:
            try:
                await aiosmtplib.send(
                    content,
                    hostname="127.0.0.1",
                    port=self._next_target(),
                    sender=sender,
                    recipients=recipients,
                    start_tls=False,
                    timeout=10,
                )
                self.forwarded += 1
                return
            except (aiosmtplib.SMTPException, OSError, LookupError):
                await asyncio.sleep(0.2)

    async def __aenter__(self) -> ReplyRelay:
        self._server = await serve_smtp(self, "127.0.0.1", 0)
        self.port = bound_port(self._server)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class TcpProxy:
    """A TCP proxy to Redis that can be taken down (every connection cut, new ones closed
    at once) and brought up again."""

    def __init__(self, target_port: int = 6379) -> None:
        self._target = target_port
        self.up = True
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from_client = writer.transport.get_extra_info("peername")[1] == self._target
        try:
            while data := await reader.read(65536):
                if not await self._passing(data, from_client):
                    return
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _passing(self, data: bytes, from_client: bool) -> bool:
        """Whether `data` goes on (a subclass may hold it first, or stop its connection)."""
        return True

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            self._writers -= {writer, up_writer}

    def down(self) -> None:
        self.up = False
        for writer in list(self._writers):
            writer.transport.abort()

    def restore(self) -> None:
        self.up = True

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self.down()


def message_counts(
    emulator: Emulator, expected: Counter[tuple[str, str]]
) -> tuple[dict[Any, int], dict[Any, int], dict[Any, int]]:
    """(lost, doubled, unexpected): what was sent fewer, more times than asked, or never asked."""
    got = Counter((d.recipient, d.text) for d in emulator.deliveries)
    lost = {k: n - got[k] for k, n in expected.items() if got[k] < n}
    doubled = {k: got[k] - n for k, n in expected.items() if got[k] > n}
    unexpected = {k: n for k, n in got.items() if k not in expected}
    return lost, doubled, unexpected


def expected_of(requests: Iterable[dict[str, Any]]) -> Counter[tuple[str, str]]:
    return Counter((recipient_key(str(r["to"])), str(r["text"])) for r in requests)


def all_accepted(results: Results, ids: Iterable[str]) -> bool:
    return all(Status.accepted in results.statuses(r) for r in ids)


def all_ended(results: Results, ids: Iterable[str]) -> bool:
    """Every request has its final event: accepted, or failed."""
    return all({Status.accepted, Status.failed} & set(results.statuses(r)) for r in ids)


async def close_connection_soon(name: str) -> None:
    await asyncio.to_thread(close_connection_named, name)


async def publish_stream(
    broker: Broker, requests: list[dict[str, Any]], per_second: float | None = None
) -> None:
    started = time.monotonic()
    for n, request in enumerate(requests):
        await broker.publish(request)
        if per_second is not None:
            ahead = started + n / per_second - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)


def missing_report(results: Results, emulator: Emulator, requests: list[dict[str, Any]]) -> str:
    got = Counter((d.recipient, d.text) for d in emulator.deliveries)
    missing = [
        (
            r["request_id"],
            [
                (e.status.value, e.error.code if e.error else None)
                for e in results.of(r["request_id"])
            ],
            got[recipient_key(r["to"]), r["text"]],
        )
        for r in requests
        if Status.accepted not in results.statuses(r["request_id"])
    ]
    return f"{len(missing)} not accepted, e.g. {missing[:8]}"


# 1. replicas -----------------------------------------------------------------------------


@pytest.mark.parametrize("replicas", [2, 3])
async def test_replicas_on_one_queue_send_each_message_once(
    amqp: AmqpSettings, shared_state: StateSettings, replicas: int
) -> None:
    subscriber = phone(9000)
    requests = [{"request_id": f"streak-{n}", "to": subscriber, "text": f"s{n}"} for n in range(60)]
    requests += [{"request_id": f"same-{n}", "to": phone(1), "text": "same text"} for n in range(3)]
    requests += [
        {"request_id": f"r-{n}", "to": phone(100 + n), "text": f"t{n}"} for n in range(237)
    ]
    random.Random(replicas).shuffle(requests)
    ids = [str(r["request_id"]) for r in requests]
    ports = [free_port() for _ in range(replicas)]
    async with AsyncExitStack() as stack:
        relay = await stack.enter_async_context(ReplyRelay(ports))
        # latency: every reply is relayed while the e-mail's 250 is still held back.
        config = EmulatorConfig(
            reply_relay=("127.0.0.1", relay.port), latency_s=0.15, **SHORT_WINDOWS
        )
        emulator = await stack.enter_async_context(Emulator(config))
        broker, results = await stack.enter_async_context(collecting(amqp))
        services = [
            await stack.enter_async_context(
                Service(
                    make_settings(
                        amqp,
                        port,
                        emulator.port,
                        state=shared_state,
                        limits=WORKER_LIMITS,
                        retry=FAST_RETRY,
                    )
                )
            )
            for port in ports
        ]
        await publish_stream(broker, requests, per_second=400)
        try:
            await results.wait_until(lambda: all_accepted(results, ids), 90)
        except TimeoutError:
            raise AssertionError(missing_report(results, emulator, requests)) from None
        await asyncio.sleep(0.5)
        assert all(s.ready for s in services)

    lost, doubled, unexpected = message_counts(emulator, expected_of(requests))
    assert (lost, doubled, unexpected) == ({}, {}, {})
    assert emulator.errors[9] == 0
    assert emulator.floods == []
    assert relay.forwarded >= len(emulator.mails) - emulator.errors.total()
    assert all(not results.with_status(s) for s in (Status.failed, Status.rejected))


# 2. crashes and restarts of worker processes --------------------------------------------


class WorkerProcess:
    """`smsc-worker run` as a subprocess, its log kept."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.log: list[str] = []
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> WorkerProcess:
        self.process = await asyncio.create_subprocess_exec(
            str(WORKER_BIN), "run", env=self.env, cwd=ROOT, stderr=asyncio.subprocess.PIPE
        )
        started = asyncio.get_running_loop().create_future()

        async def read() -> None:
            assert self.process is not None and self.process.stderr is not None
            async for raw in self.process.stderr:
                line = raw.decode(errors="replace")
                self.log.append(line)
                if "consuming" in line and not started.done():
                    started.set_result(None)
            if not started.done():
                started.set_exception(AssertionError("worker exited:\n" + "".join(self.log)))

        self._reader = asyncio.create_task(read())
        await asyncio.wait_for(started, 30)
        return self

    async def stop(self, sig: int, timeout: float = 60) -> int:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(sig)
        code = await asyncio.wait_for(self.process.wait(), timeout)
        if self._reader is not None:
            await self._reader
        return code

    async def kill_if_running(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await self._reader


def worker_env(
    amqp: AmqpSettings, state: StateSettings, smtp_port: int, reply_port: int, name: str
) -> dict[str, str]:
    return cli_env(
        amqp,
        SMSC_AMQP__CONNECTION_NAME=name,
        SMSC_STATE__URL=state.url.get_secret_value(),
        SMSC_STATE__KEY_PREFIX=state.key_prefix,
        SMSC_STATE__OWNER_TTL_S="3",
        SMSC_SMTP__HOST="127.0.0.1",
        SMSC_SMTP__PORT=str(smtp_port),
        SMSC_SMTP__TIMEOUT_S="5",
        SMSC_SMTP__SUBMIT_DEADLINE_S="10",
        SMSC_REPLY__PORT=str(reply_port),
        SMSC_REPLY__ADDRESS="replies@worker.test",
        SMSC_GATEWAY__PASSWORD="demo",
        SMSC_BATCH__MAX_LINES="500",
        SMSC_LIMITS__MAILS_PER_SECOND="1000",
        SMSC_LIMITS__PARTS_PER_SECOND="100000",
        SMSC_RETRY__BASE_DELAY_S="1",
        SMSC_RETRY__MAX_DELAY_S="2",
        SMSC_RETRY__CIRCUIT_BASE_S="1",
        SMSC_RETRY__CIRCUIT_MAX_S="2",
    )


def check_fates(results: Results, emulator: Emulator, requests: list[dict[str, Any]]) -> None:
    """0 lost, 0 doubled without an `unknown` event, every request's events end final
    (accepted; failed or unknown only after an `unknown`)."""
    got = Counter((d.recipient, d.text) for d in emulator.deliveries)
    expected = expected_of(requests)
    unexpected = {k: n for k, n in got.items() if k not in expected}
    lost, doubled_silently, not_final = [], [], []
    for request in requests:
        request_id = str(request["request_id"])
        statuses = results.statuses(request_id)
        unknown = Status.unknown in statuses
        sent = got[recipient_key(request["to"]), request["text"]]
        if (sent == 0 and not unknown) or not statuses:
            lost.append((request_id, statuses))
        if sent > 1 and not unknown:
            doubled_silently.append((request_id, sent, statuses))
        last = statuses[-1] if statuses else None
        if not (
            Status.accepted in statuses
            or (unknown and last in {Status.failed, Status.unknown, Status.accepted})
        ):
            not_final.append((request_id, statuses))
    assert unexpected == {}
    assert lost == [], f"{len(lost)} lost, e.g. {lost[:5]}"
    assert doubled_silently == [], f"{len(doubled_silently)} doubled: {doubled_silently[:5]}"
    assert not_final == [], f"{len(not_final)} without a final event: {not_final[:5]}"


def submitted_or_unknown(results: Results, ids: list[str]) -> bool:
    return all({Status.submitted, Status.unknown} & set(results.statuses(r)) for r in ids)


def settled(results: Results, ids: list[str]) -> bool:
    return all(Status.accepted in (s := results.statuses(r)) or Status.unknown in s for r in ids)


@pytest.mark.timeout(240)
async def test_killed_and_restarted_worker_processes_lose_and_double_nothing(
    amqp: AmqpSettings, shared_state: StateSettings
) -> None:
    total = 5000
    requests = [{"request_id": f"c{n}", "to": phone(n), "text": f"crash {n}"} for n in range(total)]
    ids = [str(r["request_id"]) for r in requests]
    name = f"smsc-faults-{uuid.uuid4().hex[:8]}"
    reply_port = free_port()
    rng = random.Random()
    workers: list[WorkerProcess] = []
    async with AsyncExitStack() as stack:
        relay = await stack.enter_async_context(ReplyRelay([reply_port]))
        config = EmulatorConfig(reply_relay=("127.0.0.1", relay.port), latency_s=0.05)
        emulator = await stack.enter_async_context(Emulator(config))
        broker, results = await stack.enter_async_context(collecting(amqp))
        env = worker_env(amqp, shared_state, emulator.port, reply_port, name)

        async def new_worker() -> WorkerProcess:
            worker = WorkerProcess(env)
            workers.append(worker)
            return await worker.start()

        try:
            worker = await new_worker()
            stream = asyncio.create_task(publish_stream(broker, requests, per_second=400))
            await asyncio.sleep(2)
            await close_connection_soon(name)
            await asyncio.sleep(1.5)
            await close_connection_soon(name)
            await asyncio.sleep(rng.uniform(1, 3))
            assert worker.process is not None
            await worker.stop(signal.SIGKILL)
            worker = await new_worker()
            await asyncio.sleep(rng.uniform(2, 3))
            assert await worker.stop(signal.SIGTERM) == 0
            worker = await new_worker()
            await stream
            try:
                await results.wait_until(lambda: settled(results, ids), 90)
                # an `unknown` is resolved by the gateway's reply, when it comes.
                await results.wait_until(lambda: all_accepted(results, ids), 5)
            except TimeoutError:
                pass
            await asyncio.sleep(1)
        except BaseException:
            for w in workers:
                print("".join(w.log[-40:]))
            raise
        finally:
            for w in workers:
                await w.kill_if_running()
            log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"{name}.log"
            log_path.write_text("\n=====\n".join("".join(w.log) for w in workers))
    try:
        check_fates(results, emulator, requests)
    except AssertionError:
        print(missing_report(results, emulator, requests))
        print("".join(workers[-1].log[-60:]))
        raise


# 3. the gateway away ---------------------------------------------------------------------


async def gateway_outage(
    amqp: AmqpSettings, shared_state: StateSettings, outage_s: float, total: int
) -> None:
    requests = [{"request_id": f"o{n}", "to": phone(n), "text": f"out {n}"} for n in range(total)]
    ids = [str(r["request_id"]) for r in requests]
    reply_port = free_port()
    async with AsyncExitStack() as stack:
        relay = await stack.enter_async_context(ReplyRelay([reply_port]))
        emulator = await stack.enter_async_context(
            Emulator(EmulatorConfig(reply_relay=("127.0.0.1", relay.port)))
        )
        broker, results = await stack.enter_async_context(collecting(amqp))
        settings = make_settings(
            amqp,
            reply_port,
            emulator.port,
            # An e-mail cut mid-DATA by the outage has no reply to wait for: a short wait.
            reply={"timeout_s": 20},
            state=shared_state,
            limits=HIGH_PACE,
            retry=FAST_BACKOFF,
        )
        await stack.enter_async_context(Service(settings))
        stream = asyncio.create_task(publish_stream(broker, requests, per_second=total / 10))
        await asyncio.sleep(3)
        await emulator.faults.refuse_connections()
        await asyncio.sleep(outage_s)
        await emulator.faults.accept_connections()
        await stream
        try:
            await results.wait_until(lambda: all_ended(results, ids), 120)
        except TimeoutError:
            raise AssertionError(missing_report(results, emulator, requests)) from None
        # The outage fails nothing by itself: every request is accepted, except those whose
        # e-mail the outage cut after its data went out (the gateway never got it, or did:
        # the worker cannot tell, so it never resends it), which end `failed`,
        # `outcome_unknown`, each dead-lettered.
        cut = {e.request_id for e in results.with_status(Status.failed)}
        dead = await broker.dead_letters(len(cut), timeout=5)

    for request_id in cut:
        codes = [(e.status, e.error.code if e.error else None) for e in results.of(request_id)]
        assert (Status.unknown, "outcome_unknown") in codes, codes
        assert codes[-1] == (Status.failed, "outcome_unknown"), codes
    # At most the e-mails on the wire when it began: one per SMTP connection.
    cut_mails = {e.gateway_id for r in cut for e in results.of(r) if e.status == Status.unknown}
    assert len(cut_mails) <= settings.smtp.connections + settings.smtp.high_connections
    cut_keys = expected_of(r for r in requests if r["request_id"] in cut)
    lost, doubled, unexpected = message_counts(emulator, expected_of(requests))
    # A cut e-mail may or may not have reached the gateway; nothing reached it twice.
    assert set(lost) <= set(cut_keys), lost
    assert (doubled, unexpected) == ({}, {})
    assert all(Status.accepted in results.statuses(r) for r in ids if r not in cut)
    assert sorted(json.loads(m.body)["request_id"] for m in dead) == sorted(cut)
    assert results.with_status(Status.retrying), "the outage was not noticed"


async def test_a_gateway_outage_mid_stream_fails_nothing(
    amqp: AmqpSettings, shared_state: StateSettings
) -> None:
    await gateway_outage(amqp, shared_state, outage_s=20, total=500)


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.skipif(os.environ.get("SMSC_SLOW_TESTS") != "1", reason="set SMSC_SLOW_TESTS=1")
async def test_a_ten_minute_gateway_outage_fails_nothing(
    amqp: AmqpSettings, shared_state: StateSettings
) -> None:
    await gateway_outage(amqp, shared_state, outage_s=600, total=500)


# 4. Redis away, and Redis back empty -----------------------------------------------------


async def test_redis_unreachable_mid_stream_pauses_and_loses_nothing(
    amqp: AmqpSettings, shared_state: StateSettings
) -> None:
    total = 400
    requests = [
        {"request_id": f"rd{n}", "to": phone(n), "text": f"redis {n}"} for n in range(total)
    ]
    ids = [str(r["request_id"]) for r in requests]
    reply_port = free_port()
    async with AsyncExitStack() as stack:
        proxy = await stack.enter_async_context(TcpProxy())
        state = shared_state.model_copy(
            update={"url": SecretStr(f"redis://127.0.0.1:{proxy.port}/0"), "timeout_s": 0.5}
        )
        relay = await stack.enter_async_context(ReplyRelay([reply_port]))
        emulator = await stack.enter_async_context(
            Emulator(EmulatorConfig(reply_relay=("127.0.0.1", relay.port), latency_s=0.02))
        )
        broker, results = await stack.enter_async_context(collecting(amqp))
        settings = make_settings(
            amqp, reply_port, emulator.port, state=state, limits=HIGH_PACE, retry=FAST_RETRY
        )
        service = await stack.enter_async_context(Service(settings))
        assert service.ready
        stream = asyncio.create_task(publish_stream(broker, requests, per_second=total / 12))
        await asyncio.sleep(3)
        proxy.down()
        went_down = time.monotonic()
        readiness: list[bool] = []
        while time.monotonic() - went_down < 8:
            readiness.append(service.ready)
            await asyncio.sleep(0.1)
        proxy.restore()
        await stream
        try:
            await results.wait_until(lambda: all_accepted(results, ids), 90)
        except TimeoutError:
            raise AssertionError(missing_report(results, emulator, requests)) from None
        assert service.ready
        await asyncio.sleep(0.5)

    # Not ready within a few seconds of Redis going away, and not ready again until it came back.
    first_false = readiness.index(False)
    assert first_false < 40
    assert not any(readiness[first_false:])
    lost, doubled, unexpected = message_counts(emulator, expected_of(requests))
    assert (lost, doubled, unexpected) == ({}, {}, {})
    assert results.with_status(Status.failed) == []


async def test_redis_restarted_empty_doubles_nothing_without_saying_unknown(
    amqp: AmqpSettings, shared_state: StateSettings
) -> None:
    total = 60
    requests = [{"request_id": f"e{n}", "to": phone(n), "text": f"empty {n}"} for n in range(total)]
    ids = [str(r["request_id"]) for r in requests]
    name = f"smsc-faults-{uuid.uuid4().hex[:8]}"
    amqp = amqp.model_copy(update={"connection_name": name})
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(
            amqp,
            {"latency_s": 2.0},
            state=shared_state,
            limits=HIGH_PACE,
            retry=FAST_RETRY,
            reply={"timeout_s": 8},
        ) as (emulator, service),
    ):
        await publish_stream(broker, requests)
        await emulator.wait_for_mails(1, timeout_s=10)
        assert service._acker.unacked
        # Redis restarted without persistence: every key of this worker is gone.
        await delete_keys(shared_state.key_prefix)
        await close_connection_soon(name)
        # The e-mails' records went with the data, so their replies cannot be matched: a
        # request ends `submitted` (or `unknown`), never sent a second time.
        try:
            await results.wait_until(lambda: submitted_or_unknown(results, ids), 60)
        except TimeoutError:
            raise AssertionError(missing_report(results, emulator, requests)) from None
        async with asyncio.timeout(30):
            while service._acker.unacked or service.batched:
                await asyncio.sleep(0.1)
        await asyncio.sleep(2.5)

    got = Counter((d.recipient, d.text) for d in emulator.deliveries)
    expected = expected_of(requests)
    assert {k: n for k, n in got.items() if k not in expected} == {}
    silently_doubled = [
        r["request_id"]
        for r in requests
        if got[recipient_key(r["to"]), r["text"]] > 1
        and Status.unknown not in results.statuses(r["request_id"])
    ]
    assert silently_doubled == []
    lost = [
        r["request_id"]
        for r in requests
        if got[recipient_key(r["to"]), r["text"]] == 0
        and Status.unknown not in results.statuses(r["request_id"])
    ]
    assert lost == []
    codes = {e.error.code for e in results.with_status(Status.unknown) if e.error}
    assert codes <= {"ledger_lost", "outcome_unknown"}
