"""The default sender: checked at start-up against every channel it applies to, and never
put on a channel that cannot take it."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from worker.contract import SendRequest
from worker.prepare import prepare
from worker.protocol.fields import Format
from worker.settings import GatewaySettings

ROOT = Path(__file__).resolve().parent.parent
SMSC_WORKER = ROOT / ".venv" / "bin" / "smsc-worker"
VARIABLE = "SMSC_GATEWAY__DEFAULT_SENDER"
NOW = datetime(2025, 11, 25, 18, 0, tzinfo=UTC)


def smsc_worker_config(tmp_path: Path, **variables: str) -> subprocess.CompletedProcess[str]:
    """`smsc-worker config` as a user runs it, with only the given SMSC_ variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMSC_")}
    env.update({"SMSC_SECRETS_DIR": str(tmp_path / "no-secrets"), **variables})
    return subprocess.run(
        [str(SMSC_WORKER), "config"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("address", ["a@b.cc", "alerts@shop.example.com"])
def test_an_e_mail_address_as_default_sender_stops_startup(tmp_path: Path, address: str) -> None:
    done = smsc_worker_config(tmp_path, **{VARIABLE: address})
    assert done.returncode == 2, done.stdout
    assert VARIABLE in done.stderr
    assert "is an e-mail address" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_default_sender_no_channel_takes_stops_startup(tmp_path: Path) -> None:
    done = smsc_worker_config(tmp_path, **{VARIABLE: "TwelveLetter"})
    assert done.returncode == 2, done.stdout
    assert VARIABLE in done.stderr
    assert "not a valid sender for the sms channel" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_sender_name_as_default_sender_starts(tmp_path: Path) -> None:
    done = smsc_worker_config(tmp_path, **{VARIABLE: "Shop"})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["gateway"]["default_sender"] == "Shop"


@pytest.mark.parametrize("sender", ["", "Shop", "SMS Centre", "1" * 15, "Shop@Home", "a@b"])
def test_sender_names_are_accepted_as_default_sender(sender: str) -> None:
    assert GatewaySettings(default_sender=sender).default_sender == sender


@pytest.mark.parametrize(
    "sender",
    ["a@b.cc", "John.Doe+x@mail.example.ru", "A" * 12, "1" * 16, "Al:ex", "Алекс", "[text]"],
)
def test_default_senders_some_channel_refuses_are_rejected(sender: str) -> None:
    with pytest.raises(ValidationError) as caught:
        GatewaySettings(default_sender=sender)
    (error,) = caught.value.errors()
    assert error["loc"] == ("default_sender",)
    assert VARIABLE in error["msg"]


def request(channel: str | None, **fields: str) -> SendRequest:
    to = "a@example.com" if channel == "email" else "+79161234567"
    subject = {"subject": "Hello"} if channel == "email" else {}
    return SendRequest.model_validate(
        {"request_id": "r1", "to": to, "text": "hi", "channel": channel, **subject, **fields}
    )


def sender_of(req: SendRequest, gateway: GatewaySettings) -> str:
    return prepare(req, gateway, Format.sms, NOW).key.options.sender


@pytest.mark.parametrize("channel", [None, "sms", "flash", "viber", "voice"])
def test_the_default_sender_name_goes_on_requests_without_a_sender(channel: str | None) -> None:
    gateway = GatewaySettings(default_sender="Shop")
    assert sender_of(request(channel), gateway) == "Shop"
    assert sender_of(request(channel, sender="Other"), gateway) == "Other"


def test_the_email_channel_never_gets_the_default_sender_name() -> None:
    gateway = GatewaySettings(default_sender="Shop")
    assert sender_of(request("email"), gateway) == ""
    assert sender_of(request("email", sender="me@shop.example"), gateway) == "me@shop.example"


def test_an_e_mail_address_default_sender_never_reaches_a_non_email_channel() -> None:
    # The settings refuse it; prepare() does not rely on that alone.
    gateway = GatewaySettings.model_construct(default_sender="me@shop.example")
    assert sender_of(request("sms"), gateway) == ""
    assert sender_of(request(None), gateway) == ""
    assert sender_of(request("email"), gateway) == "me@shop.example"


# the gateway charset: one of a fixed list, checked at start-up ---------------------------


@pytest.mark.parametrize("name", ["latin-1", "no-such-charset", "utf-16"])
def test_an_unknown_charset_stops_startup_naming_the_variable(tmp_path: Path, name: str) -> None:
    done = smsc_worker_config(tmp_path, SMSC_GATEWAY__CHARSET=name)
    assert done.returncode == 2, done.stdout
    assert "SMSC_GATEWAY__CHARSET" in done.stderr
    assert "'koi8-r', 'utf-8' or 'cp1251'" in done.stderr
    assert "Traceback" not in done.stderr
    assert "LookupError" not in done.stderr


@pytest.mark.parametrize(
    ("name", "charset"), [("koi8-r", "koi8-r"), ("UTF-8", "utf-8"), ("cp1251", "cp1251")]
)
def test_a_listed_charset_starts(tmp_path: Path, name: str, charset: str) -> None:
    done = smsc_worker_config(tmp_path, SMSC_GATEWAY__CHARSET=name)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["gateway"]["charset"] == charset


def test_e_mails_are_filled_to_a_margin_under_100_000_bytes_by_default() -> None:
    from worker.protocol.mail import MAX_MAIL_BYTES
    from worker.settings import BatchSettings

    assert BatchSettings().max_bytes == 98_304 < 100_000
    assert BatchSettings(max_bytes=MAX_MAIL_BYTES).max_bytes == 102_400
    with pytest.raises(ValidationError):
        BatchSettings(max_bytes=MAX_MAIL_BYTES + 1)
