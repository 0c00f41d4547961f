"""The command line as a user runs it: real subprocesses, real RabbitMQ, real SMTP."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import collecting, free_port, phone
from worker.contract import Status
from worker.emulator.config import EmulatorConfig
from worker.emulator.server import Emulator
from worker.lanes import Lane
from worker.schemas import render_all
from worker.settings import AmqpSettings

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "worker"]
WORKER_LOGS: list[list[str]] = []


def cli_env(amqp: AmqpSettings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMSC_")}
    env.update(
        {
            "SMSC_AMQP__REQUESTS_QUEUE": amqp.requests_queue,
            "SMSC_AMQP__RESULTS_EXCHANGE": amqp.results_exchange,
            "SMSC_AMQP__DEAD_LETTER_EXCHANGE": amqp.dead_letter_exchange,
            "SMSC_AMQP__DEAD_LETTER_QUEUE": amqp.dead_letter_queue,
            "SMSC_AMQP__RETRY_QUEUE": amqp.retry_queue,
            "SMSC_REPLY__HOST": "127.0.0.1",
            "SMSC_REPLY__PORT": str(free_port()),
            "SMSC_OBSERVABILITY__HEALTH_PORT": "0",
            "SMSC_OBSERVABILITY__METRICS_PORT": "0",
            "SMSC_OBSERVABILITY__LOG_FORMAT": "text",
            "SMSC_SECRETS_DIR": str(ROOT / "tests" / "no-secrets-here"),
            **extra,
        }
    )
    return env


async def run_cli(
    *args: str, env: dict[str, str], timeout: float = 60, cwd: Path = ROOT
) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *CLI,
        *args,
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@asynccontextmanager
async def worker_process(
    env: dict[str, str], *args: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    """`smsc-worker run` as a subprocess, yielded once it consumes; stopped with SIGTERM."""
    process = await asyncio.create_subprocess_exec(
        *CLI, "run", *args, env=env, cwd=ROOT, stderr=asyncio.subprocess.PIPE
    )
    assert process.stderr is not None
    seen: list[str] = []
    WORKER_LOGS.append(seen)
    try:
        async with asyncio.timeout(30):
            while True:
                line = (await process.stderr.readline()).decode()
                if not line:
                    raise AssertionError("worker exited early:\n" + "".join(seen))
                seen.append(line)
                if "consuming" in line:
                    break

        async def keep_reading() -> None:
            assert process.stderr is not None
            async for raw in process.stderr:
                seen.append(raw.decode())

        reader = asyncio.create_task(keep_reading())
        try:
            yield process
        except BaseException:
            sys.stderr.write("worker log:\n" + "".join(seen[-80:]))
            raise
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                await asyncio.wait_for(process.wait(), 60)
            await reader
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_config_prints_settings_with_secrets_masked(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "SMSC_GATEWAY__PASSWORD").write_text("hunter2-from-file")
    env = cli_env(
        AmqpSettings(),
        SMSC_SECRETS_DIR=str(secrets),
        SMSC_GATEWAY__LOGIN="alex",
        SMSC_SMTP__PASSWORD="smtp-secret-value",
    )
    code, out, err = asyncio.run(run_cli("config", env=env))
    assert code == 0, err
    config = json.loads(out)
    assert config["gateway"]["login"] == "alex"
    assert config["gateway"]["password"] == "**********"
    assert "hunter2-from-file" not in out and "smtp-secret-value" not in out
    assert "guest:guest" not in out


def test_a_dotenv_file_in_the_working_directory_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("SMSC_GATEWAY__LOGIN=from-dotenv\nSMSC_BATCH__MAX_LINES=7\n")
    env = cli_env(AmqpSettings(), PYTHONPATH=str(ROOT))
    code, out, err = asyncio.run(run_cli("config", env=env, cwd=tmp_path))
    assert code == 0, err
    config = json.loads(out)
    assert config["gateway"]["login"] == "from-dotenv"
    assert config["batch"]["max_lines"] == 7


def test_a_bad_setting_stops_startup_naming_it() -> None:
    env = cli_env(AmqpSettings(), SMSC_BATCH__MAX_LINES="lots", SMSC_SMTP__SECURITY="maybe")
    code, _, err = asyncio.run(run_cli("run", env=env))
    assert code == 2
    assert "SMSC_BATCH__MAX_LINES" in err and "SMSC_SMTP__SECURITY" in err


def test_a_bad_tracing_variable_stops_startup_without_a_traceback() -> None:
    env = cli_env(AmqpSettings(), OTEL_TRACES_EXPORTER="zipkin")
    code, _, err = asyncio.run(run_cli("run", env=env))
    assert code == 2
    assert "OTEL_TRACES_EXPORTER" in err
    assert "Traceback" not in err


def test_checked_in_schemas_match_the_code() -> None:
    for name, text in render_all().items():
        assert (ROOT / "schemas" / name).read_text(encoding="utf-8") == text, (
            f"schemas/{name} is stale: run `smsc-worker schemas`"
        )
    code, _, err = asyncio.run(run_cli("schemas", "--check", env=dict(os.environ)))
    assert code == 0, err


async def test_sigterm_mid_stream_loses_nothing(amqp: AmqpSettings) -> None:
    total = 400
    reply_port = free_port()
    config = EmulatorConfig(reply_relay=("127.0.0.1", reply_port), latency_s=0.02)
    async with Emulator(config) as emulator, collecting(amqp) as (broker, results):
        env = cli_env(
            amqp,
            SMSC_SMTP__HOST="127.0.0.1",
            SMSC_SMTP__PORT=str(emulator.port),
            SMSC_REPLY__PORT=str(reply_port),
            SMSC_BATCH__MAX_LINES="20",
        )
        async with worker_process(env) as first:
            for n in range(total):
                await broker.publish({"request_id": f"s{n}", "to": phone(n), "text": f"t{n}"})
                if n == total // 2:
                    first.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(first.wait(), 60) == 0
        sent_by_first = len(emulator.deliveries)
        assert 0 < sent_by_first < total
        async with worker_process(env):
            try:
                await results.wait_until(
                    lambda: (
                        len({e.request_id for e in results.with_status(Status.accepted)}) == total
                    ),
                    60,
                )
            except TimeoutError:
                missing = [
                    (n, results.statuses(f"s{n}"), emulator.delivered(phone(n), f"t{n}"))
                    for n in range(total)
                    if Status.accepted not in results.statuses(f"s{n}")
                ]
                logs = "\n".join("".join(log[-40:]) for log in WORKER_LOGS[-2:])
                raise AssertionError(
                    f"not accepted: {missing[:10]} of {len(missing)}\n{logs}"
                ) from None
    deliveries = Counter(d.text for d in emulator.deliveries)
    assert len(deliveries) == total
    assert set(deliveries.values()) == {1}


@pytest.mark.parametrize("priority", ["normal", "high"])
async def test_send_wait_against_run_with_emulator_prints_accepted(
    amqp: AmqpSettings, priority: str
) -> None:
    env = cli_env(amqp)
    async with worker_process(env, "--emulator"):
        code, out, err = await run_cli(
            "send",
            "--to",
            "+79161234567",
            "--text",
            "hello from the CLI",
            "--priority",
            priority,
            "--wait",
            "--timeout",
            "30",
            env=env,
        )
    assert code == 0, err
    statuses = [line.split("\t")[0] for line in out.splitlines()]
    assert statuses == ["submitted", "accepted"]
    lane = Lane(priority)
    assert "published request " in err and f"to {amqp.queue(lane)}\n" in err


async def startup_log(env: dict[str, str], *, terminal: bool) -> list[str]:
    """What `smsc-worker run --emulator` writes to stderr up to its "consuming" line, with
    stderr a pseudo-terminal (as in a shell) or a pipe (as under a container runtime)."""
    if not terminal:
        async with worker_process(env, "--emulator"):
            return list(WORKER_LOGS[-1])
    controller, terminal_end = pty.openpty()
    process = await asyncio.create_subprocess_exec(
        *CLI, "run", "--emulator", env=env, cwd=ROOT, stderr=terminal_end
    )
    os.close(terminal_end)
    chunks: asyncio.Queue[bytes] = asyncio.Queue()

    def readable() -> None:
        try:
            chunks.put_nowait(os.read(controller, 65536))
        except OSError:  # EIO: the worker closed its end
            chunks.put_nowait(b"")

    os.set_blocking(controller, False)
    loop = asyncio.get_running_loop()
    loop.add_reader(controller, readable)
    text = ""
    try:
        async with asyncio.timeout(30):
            while "consuming" not in text:
                chunk = await chunks.get()
                assert chunk, f"worker exited early:\n{text}"
                text += chunk.decode()
    finally:
        loop.remove_reader(controller)
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), 60)
        os.close(controller)
    # The terminal turns each "\n" into "\r\n".
    return text.splitlines()


def json_lines(lines: list[str]) -> list[dict[str, Any]]:
    parsed = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            parsed.append(entry)
    return parsed


TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING|ERROR|DEBUG) +\S+: ")


async def test_logs_are_text_on_a_terminal_by_default(amqp: AmqpSettings) -> None:
    env = cli_env(amqp)
    del env["SMSC_OBSERVABILITY__LOG_FORMAT"]
    lines = await startup_log(env, terminal=True)
    (consuming,) = [line for line in lines if "consuming" in line]
    assert TEXT_LINE.match(consuming), consuming
    assert "INFO    worker.service: consuming " + amqp.requests_queue in consuming
    assert json_lines(lines) == []


async def test_logs_are_json_lines_through_a_pipe_by_default(amqp: AmqpSettings) -> None:
    env = cli_env(amqp)
    del env["SMSC_OBSERVABILITY__LOG_FORMAT"]
    lines = [line for line in await startup_log(env, terminal=False) if line.strip()]
    entries = json_lines(lines)
    assert len(entries) == len(lines), lines
    (consuming,) = [e for e in entries if e["message"].startswith("consuming")]
    assert consuming["level"] == "INFO"
    assert consuming["logger"] == "worker.service"
    assert amqp.requests_queue in consuming["message"]


async def test_an_explicit_log_format_holds_on_a_terminal(amqp: AmqpSettings) -> None:
    env = cli_env(amqp, SMSC_OBSERVABILITY__LOG_FORMAT="json")
    lines = [line for line in await startup_log(env, terminal=True) if line.strip()]
    assert len(json_lines(lines)) == len(lines), lines
