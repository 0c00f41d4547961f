"""The default senders: checked at start-up against every channel they apply to, and never
put on a channel that cannot take them; the default channel, by name."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from worker.contract import SendRequest
from worker.errors import InvalidRequest
from worker.prepare import default_sender, prepare
from worker.protocol.fields import Channel
from worker.settings import GatewaySettings, Settings

ROOT = Path(__file__).resolve().parent.parent
SMSC_WORKER = ROOT / ".venv" / "bin" / "smsc-worker"
VARIABLE = "SMSC_GATEWAY__DEFAULT_SENDER"
PER_CHANNEL = "SMSC_GATEWAY__DEFAULT_SENDERS"
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


def sender_of(req: SendRequest, gateway: GatewaySettings, default: Channel = Channel.sms) -> str:
    return prepare(req, gateway, default, NOW).key.options.sender


NAME_CHANNELS = [c for c in Channel if c is not Channel.email]


@pytest.mark.parametrize("channel", [None, "sms", "flash", "viber", "voice", "telegram"])
def test_the_default_sender_name_goes_on_requests_without_a_sender(channel: str | None) -> None:
    gateway = GatewaySettings(default_sender="Shop")
    assert sender_of(request(channel), gateway) == "Shop"
    assert sender_of(request(channel, sender="Other"), gateway) == "Other"


def test_the_email_channel_never_gets_the_default_sender_name() -> None:
    gateway = GatewaySettings(default_sender="Shop")
    assert default_sender(gateway, Channel.email) == ""
    assert sender_of(request("email", sender="me@shop.example"), gateway) == "me@shop.example"


def test_an_e_mail_address_default_sender_never_reaches_a_non_email_channel() -> None:
    # The settings refuse it; prepare() does not rely on that alone.
    gateway = GatewaySettings.model_construct(
        default_sender="me@shop.example", default_senders={Channel.viber: "you@shop.example"}
    )
    assert sender_of(request("sms"), gateway) == ""
    assert sender_of(request(None), gateway) == ""
    assert sender_of(request("viber"), gateway) == ""
    assert default_sender(gateway, Channel.email) == ""


def test_each_channel_may_have_a_default_sender_of_its_own() -> None:
    gateway = GatewaySettings(
        default_sender="Shop",
        default_senders={"email": "noreply@shop.example", "viber": "ShopViber", "flash": ""},
    )
    assert sender_of(request("email"), gateway) == "noreply@shop.example"
    assert sender_of(request("viber"), gateway) == "ShopViber"
    assert sender_of(request("flash"), gateway) == ""  # the account's own, over default_sender
    assert sender_of(request("sms"), gateway) == "Shop"
    assert sender_of(request(None), gateway, Channel.viber) == "ShopViber"
    assert sender_of(request("viber", sender="Other"), gateway) == "Other"


@pytest.mark.parametrize("sender", [None, "", "Shop"])
def test_the_email_channel_without_the_senders_address_is_refused_up_front(
    sender: str | None,
) -> None:
    gateway = GatewaySettings(default_sender="Shop", default_senders={"viber": "ShopViber"})
    fields = {} if sender is None else {"sender": sender}
    with pytest.raises(InvalidRequest) as info:
        prepare(request("email", **fields), gateway, Channel.sms, NOW)
    assert info.value.code == "email_sender_required"
    assert "sender's e-mail address" in info.value.message
    if sender is None:
        assert PER_CHANNEL in info.value.message
    # With the email channel's default it goes.
    gateway = GatewaySettings(default_senders={"email": "noreply@shop.example"})
    assert sender_of(request("email"), gateway) == "noreply@shop.example"


@pytest.mark.parametrize(
    ("senders", "says"),
    [
        ({"email": "Shop"}, "must be the sender's e-mail address"),
        ({"email": "me@shop"}, "must be the sender's e-mail address"),
        ({"sms": "me@shop.example"}, "on the email channel only, not on sms"),
        ({"telegram": "TwelveLetter"}, "not a valid sender for the telegram channel"),
        ({"viber": "Al:ex"}, "not a valid sender for the viber channel"),
        ({"mms": "Shop"}, "'telegram'"),
        ({"binary": "Shop"}, "'binary_hex'"),
    ],
)
def test_per_channel_senders_a_channel_refuses_are_rejected(
    senders: dict[str, str], says: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        GatewaySettings(default_senders=senders)
    assert says in str(caught.value)


def test_per_channel_senders_come_from_the_environment(tmp_path: Path) -> None:
    as_json = smsc_worker_config(
        tmp_path, **{PER_CHANNEL: '{"email": "noreply@shop.example", "viber": "ShopViber"}'}
    )
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["gateway"]["default_senders"] == {
        "email": "noreply@shop.example",
        "viber": "ShopViber",
    }
    one_by_one = smsc_worker_config(tmp_path, **{f"{PER_CHANNEL}__EMAIL": "noreply@shop.example"})
    assert one_by_one.returncode == 0, one_by_one.stderr
    assert json.loads(one_by_one.stdout)["gateway"]["default_senders"] == {
        "email": "noreply@shop.example"
    }
    bad = smsc_worker_config(tmp_path, **{PER_CHANNEL: '{"email": "Shop"}'})
    assert bad.returncode == 2
    assert PER_CHANNEL in bad.stderr and "Traceback" not in bad.stderr


# the default channel: a name (or the format number it once took), never one not offered --


@pytest.mark.parametrize(
    ("value", "channel"),
    [("sms", Channel.sms), ("telegram", Channel.telegram), ("binary_hex", Channel.binary_hex),
     ("1", Channel.flash), (9, Channel.voice), ("0", Channel.sms)],
)  # fmt: skip
def test_the_default_channel_is_read_by_name_or_format_number(
    value: str | int, channel: Channel
) -> None:
    assert Settings(default_channel=value).default_channel is channel


@pytest.mark.parametrize("value", ["binary", "mms", "4", 7])
def test_a_default_channel_not_offered_stops_startup(value: str | int) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(default_channel=value)
    assert "is not offered" in str(caught.value)


@pytest.mark.parametrize("value", ["13", "fax", "", True])
def test_an_unknown_default_channel_stops_startup(value: str | int) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(default_channel=value)
    assert "'telegram'" in str(caught.value)


def test_the_default_channel_from_the_environment(tmp_path: Path) -> None:
    done = smsc_worker_config(tmp_path, SMSC_DEFAULT_CHANNEL="telegram")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["default_channel"] == "telegram"
    refused = smsc_worker_config(tmp_path, SMSC_DEFAULT_CHANNEL="mms")
    assert refused.returncode == 2
    assert "SMSC_DEFAULT_CHANNEL" in refused.stderr and "not offered" in refused.stderr


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
