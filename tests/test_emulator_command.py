"""`smsc-worker emulator` as a real process."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from pathlib import Path

import aiosmtplib
import pytest

from tests.support.smtp import SmtpSink, raw_mail
from worker.emulator.config import DEFAULT_GATEWAY_ADDRESS

PHONE = "79991234567"
OPTIONS = [
    "--host",
    "--port",
    "--gateway-address",
    "--account",
    "--api-key",
    "--balance",
    "--deny-sender",
    "--deny-word",
    "--undeliverable",
    "--relay",
    "--reply-from",
    "--reply-charset",
    "--latency",
    "--record",
    "--duplicate-window",
    "--identical-copies",
    "--streak-limit",
    "--streak-gap",
    "--block-after-errors",
    "--block-window",
    "--block-for",
]


async def run_emulator(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "emulator",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
    )


async def test_help_documents_every_option() -> None:
    process = await run_emulator("--help")
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    text = out.decode()
    missing = [option for option in OPTIONS if option not in text]
    assert missing == []
    assert "SIGTERM" in text
    assert "LOGIN:PASSWORD" in text
    assert "HOST:PORT" in text


async def test_runs_until_sigterm_answering_like_the_gateway(tmp_path: Path) -> None:
    record = tmp_path / "deliveries.jsonl"
    async with SmtpSink() as sink:
        process = await run_emulator(
            "--port",
            "0",
            "--account",
            "alice:s3cret",
            "--deny-word",
            "casino",
            "--relay",
            f"{sink.host}:{sink.port}",
            "--record",
            str(record),
        )
        try:
            assert process.stdout is not None
            banner = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
            found = re.search(r"listening on ([\d.]+):(\d+)", banner)
            assert found, banner
            host, port = found.group(1), int(found.group(2))
            for n, text in enumerate(("hello", "best casino", "again"), start=1):
                body = f"alice:s3cret:{n}::,,,1:{PHONE}:{text}"
                await _submit(host, port, raw_mail(body))
            replies = await sink.wait_for(3)
        finally:
            process.send_signal(signal.SIGTERM)
            out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    assert "stopped" in out.decode()
    assert sorted(r.text for r in replies) == [
        "ERROR = 6 (message denied), ID - 2",
        "OK - 1 SMS, ID - 1",
        "OK - 1 SMS, ID - 3",
    ]
    rows = [json.loads(line) for line in record.read_text(encoding="utf-8").splitlines()]
    assert [(r["mail_id"], r["text"]) for r in rows] == [("1", "hello"), ("3", "again")]


async def _submit(host: str, port: int, content: bytes) -> None:
    await aiosmtplib.send(
        content,
        hostname=host,
        port=port,
        sender="client@example.com",
        recipients=[DEFAULT_GATEWAY_ADDRESS],
        timeout=10,
    )


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--account", "no-colon"], "LOGIN:PASSWORD"),
        (["--relay", "nowhere"], "host:port"),
        (["--reply-from", "not an address"], "reply_from"),
        (["--reply-charset", "latin-1"], "reply_charset"),
    ],
)
async def test_bad_options_exit_2_saying_why(args: list[str], complaint: str) -> None:
    process = await run_emulator("--port", "0", *args)
    _out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert complaint in err.decode()
