"""Hostile replies: the real reply listener of a running worker, real RabbitMQ, the emulator
over real SMTP. A reply counts only when its address carries the token of its e-mail (made
with the current key or an old one), comes from an allowed peer and sender, and names no
other e-mail waiting for its reply in its body; anything else is refused, counted, logged
once, and changes nothing. A body ID that names no known e-mail gives way to the address."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
from pathlib import Path

import aiosmtplib
import pytest
from pydantic import SecretStr, ValidationError

from tests.conftest import Broker, Results, collecting, gateway_and_worker, make_settings, phone
from worker.contract import Status
from worker.emulator.config import EmulatorConfig
from worker.emulator.relay import build_reply
from worker.emulator.server import Emulator
from worker.reply_receiver import LOCAL_PART_MAX, ReplyAddresses
from worker.service import Service
from worker.settings import AmqpSettings, GatewaySettings, ReplySettings, StateSettings

GATEWAY = "send@send.smscentre.com"
BASE = "replies@worker.test"  # the tests' reply address (tests/conftest.py)
NO_REPLIES = {"reply_relay": None}
ROOT = Path(__file__).resolve().parent.parent


async def send_reply(port: int, to: str, body: str, sender: str = GATEWAY) -> None:
    await aiosmtplib.send(
        build_reply(sender, to, body, None),
        hostname="127.0.0.1",
        port=port,
        sender=sender,
        recipients=[to],
        start_tls=False,
        timeout=10,
    )


async def submitted_mail(broker: Broker, results: Results, request_id: str, n: int) -> str:
    """Publish one request; the gateway id of its e-mail once it is `submitted`."""
    await broker.publish({"request_id": request_id, "to": phone(n), "text": "hi"})
    await results.wait_until(lambda: Status.submitted in results.statuses(request_id))
    (event,) = results.of(request_id)
    assert event.gateway_id is not None
    return event.gateway_id


def refused(service: Service, reason: str) -> float:
    value = service.telemetry.metrics.registry.get_sample_value(
        "smsc_replies_refused_total", {"reason": reason}
    )
    return value or 0.0


def refusal_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("reply refused")]


def one_character_off(address: str) -> str:
    local, _, domain = address.rpartition("@")
    return f"{local[:-1]}{'a' if local[-1] != 'a' else 'b'}@{domain}"


def forged_address(mail_id: str, key: bytes = b"not the worker's key") -> str:
    return ReplyAddresses(BASE, key).address(mail_id)


async def test_replies_work_with_the_token(amqp: AmqpSettings) -> None:
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp) as (emulator, service),
    ):
        await broker.publish({"request_id": "ok-1", "to": phone(1), "text": "hi"})
        await results.wait_until(lambda: Status.accepted in results.statuses("ok-1"))
    (mail,) = emulator.mails
    (event,) = [e for e in results.of("ok-1") if e.status == Status.accepted]
    # Events carry the bare mail id; only the e-mail's From has the token.
    assert event.gateway_id is not None and len(event.gateway_id) == 32
    local = mail.envelope_from.rpartition("@")[0]
    assert local.startswith(f"replies+{event.gateway_id}.")
    assert local == local.lower() and len(local) <= LOCAL_PART_MAX
    assert mail.envelope_from == service.reply_addresses.address(event.gateway_id)
    assert refused(service, "token") == 0


async def test_a_forged_reply_with_a_wrong_token_is_refused_and_changes_nothing(
    amqp: AmqpSettings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp, NO_REPLIES) as (_, service),
    ):
        mail_id = await submitted_mail(broker, results, "forged-1", 1)
        genuine = service.reply_addresses.address(mail_id)
        wrong = [
            forged_address(mail_id),
            f"replies+{mail_id}@worker.test",  # no token: the old form
            one_character_off(genuine),
        ]
        for address in wrong:
            with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as caught:
                await send_reply(service.reply_port, address, f"ERROR = 1 (bad), ID - {mail_id}")
            ((code, _),) = [(e.code, e.message) for e in caught.value.recipients]
            assert code == 550
        await asyncio.sleep(0.5)
        assert results.statuses("forged-1") == [Status.submitted]
        assert refused(service, "token") == 3
        assert len(refusal_logs(caplog)) == 3
        # The e-mail's record is still there: the genuine reply still counts.
        await send_reply(service.reply_port, genuine, f"OK - 1 SMS, ID - {mail_id}")
        await results.wait_until(lambda: Status.accepted in results.statuses("forged-1"))


async def test_a_forged_error_2_cannot_stop_the_account(amqp: AmqpSettings) -> None:
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp, NO_REPLIES) as (_, service),
    ):
        mail_id = await submitted_mail(broker, results, "stop-1", 1)
        for address in (forged_address(mail_id), f"replies+{mail_id}@worker.test"):
            with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
                await send_reply(service.reply_port, address, "ERROR = 2 (bad login)")
        # Nor can a forged ERROR = 4 open the circuit.
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
            await send_reply(service.reply_port, forged_address(mail_id), "ERROR = 4 (blocked)")
        await asyncio.sleep(0.5)
        assert not service.account_stopped
        assert await service.store.account_stopped() is None
        assert service.ready
        assert results.statuses("stop-1") == [Status.submitted]
        await submitted_mail(broker, results, "stop-2", 2)


async def test_a_body_id_that_disagrees_changes_nothing(
    amqp: AmqpSettings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp, NO_REPLIES) as (_, service),
    ):
        first = await submitted_mail(broker, results, "body-1", 1)
        second = await submitted_mail(broker, results, "body-2", 2)
        # A genuine address of the first e-mail, a body naming the second.
        address = service.reply_addresses.address(first)
        with pytest.raises(aiosmtplib.SMTPDataError) as caught:
            await send_reply(service.reply_port, address, f"ERROR = 6 (denied), ID - {second}")
        assert caught.value.code == 550
        await asyncio.sleep(0.5)
        assert results.statuses("body-1") == [Status.submitted]
        assert results.statuses("body-2") == [Status.submitted]
        assert refused(service, "mail_id_mismatch") == 1
        assert len(refusal_logs(caplog)) == 1
        # A body that names no e-mail (error 2 is one) applies to its address's e-mail only;
        # a body naming that same e-mail applies too.
        await send_reply(service.reply_port, address, f"OK - 1 SMS, ID - {first.upper()}")
        await results.wait_until(lambda: Status.accepted in results.statuses("body-1"))
        assert results.statuses("body-2") == [Status.submitted]


def body_ids_ignored(service: Service) -> float:
    value = service.telemetry.metrics.registry.get_sample_value("smsc_reply_body_id_ignored_total")
    return value or 0.0


async def test_a_body_id_that_names_no_known_e_mail_gives_way_to_the_address(
    amqp: AmqpSettings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp, NO_REPLIES) as (_, service),
    ):
        first = await submitted_mail(broker, results, "mangled-1", 1)
        # Cut short on the way: no e-mail has that ID, so the address's e-mail is answered.
        address = service.reply_addresses.address(first)
        await send_reply(service.reply_port, address, f"ERROR = 6 (denied), ID - {first[:20]}")
        await results.wait_until(lambda: Status.failed in results.statuses("mangled-1"))
        # An e-mail already answered is no longer known: its ID in another e-mail's reply is
        # read as mangled too.
        second = await submitted_mail(broker, results, "mangled-2", 2)
        address = service.reply_addresses.address(second)
        await send_reply(service.reply_port, address, f"OK - 1 SMS, ID - {first}")
        await results.wait_until(lambda: Status.accepted in results.statuses("mangled-2"))
        assert body_ids_ignored(service) == 2
        assert refused(service, "mail_id_mismatch") == 0
    (failed,) = [e for e in results.of("mangled-1") if e.status == Status.failed]
    assert failed.gateway_id == first
    assert failed.error is not None and failed.error.gateway_error == 6
    (accepted,) = [e for e in results.of("mangled-2") if e.status == Status.accepted]
    assert accepted.gateway_id == second
    ignored = [r for r in caplog.records if "no known e-mail" in r.getMessage()]
    assert len(ignored) == 2
    assert refusal_logs(caplog) == []


async def test_an_old_key_still_verifies_after_rotation(amqp: AmqpSettings) -> None:
    keys = {
        "token_key": SecretStr("key-2026"),
        "token_keys_old": SecretStr("key-2024, key-2025"),
    }
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp, NO_REPLIES, reply=keys) as (_, service),
    ):
        mail_id = await submitted_mail(broker, results, "rot-1", 1)
        # New e-mails use the current key.
        assert service.reply_addresses.address(mail_id) == ReplyAddresses(
            BASE, b"key-2026"
        ).address(mail_id)
        # A key that was never configured does not verify ...
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
            await send_reply(service.reply_port, forged_address(mail_id, b"key-2023"), "x")
        # ... an old one does (a reply to an e-mail sent before the rotation).
        old = ReplyAddresses(BASE, b"key-2025").address(mail_id)
        await send_reply(service.reply_port, old, f"OK - 1 SMS, ID - {mail_id}")
        await results.wait_until(lambda: Status.accepted in results.statuses("rot-1"))
        assert refused(service, "token") == 1


async def test_replies_to_e_mails_sent_before_a_rotation_still_count(
    amqp: AmqpSettings, shared_state: StateSettings
) -> None:
    """One worker sends with the old key and stops; the next, with a new key and the old one
    listed as old, takes the gateway's reply to that e-mail (the record is in Redis)."""
    before = {"token_key": SecretStr("key-2025")}
    after = {"token_key": SecretStr("key-2026"), "token_keys_old": SecretStr("key-2025")}
    async with (
        collecting(amqp) as (broker, results),
        Emulator(EmulatorConfig(reply_relay=None)) as emulator,
    ):
        settings = make_settings(amqp, 0, emulator.port, before, state=shared_state)
        async with Service(settings) as service:
            mail_id = await submitted_mail(broker, results, "rot-2", 1)
        (mail,) = emulator.mails
        settings = make_settings(amqp, 0, emulator.port, after, state=shared_state)
        async with Service(settings) as service:
            assert service.reply_addresses.address(mail_id) != mail.envelope_from
            await send_reply(service.reply_port, mail.envelope_from, f"OK - 1 SMS, ID - {mail_id}")
            await results.wait_until(lambda: Status.accepted in results.statuses("rot-2"))
            assert refused(service, "token") == 0


async def test_a_disallowed_peer_is_refused_at_connect(amqp: AmqpSettings) -> None:
    """The emulator's replies come from 127.0.0.1, outside the allowed network."""
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp, reply={"allowed_networks": "192.0.2.0/24, 2001:db8::/32"}) as (
            _,
            service,
        ),
    ):
        await broker.publish({"request_id": "peer-1", "to": phone(1), "text": "hi"})
        await results.wait_until(lambda: Status.submitted in results.statuses("peer-1"))
        (event,) = results.of("peer-1")
        assert event.gateway_id is not None
        genuine = service.reply_addresses.address(event.gateway_id)
        with pytest.raises(aiosmtplib.SMTPConnectResponseError) as caught:
            await send_reply(service.reply_port, genuine, f"ERROR = 2 (x), ID - {event.gateway_id}")
        assert caught.value.code == 554
        async with asyncio.timeout(10):
            while refused(service, "peer") < 2:  # the emulator's reply, and this one
                await asyncio.sleep(0.05)
        assert results.statuses("peer-1") == [Status.submitted]
        assert not service.account_stopped


async def test_an_allowed_peer_and_sender_get_through(amqp: AmqpSettings) -> None:
    allowed = {"allowed_networks": "127.0.0.0/8", "allowed_senders": "@SEND.smscentre.com"}
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp, reply=allowed) as (_, service),
    ):
        await broker.publish({"request_id": "allowed-1", "to": phone(1), "text": "hi"})
        await results.wait_until(lambda: Status.accepted in results.statuses("allowed-1"))
    assert refused(service, "peer") == refused(service, "sender") == 0


async def test_a_disallowed_sender_is_refused(amqp: AmqpSettings) -> None:
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp, NO_REPLIES, reply={"allowed_senders": GATEWAY}) as (_, service),
    ):
        mail_id = await submitted_mail(broker, results, "sender-1", 1)
        genuine = service.reply_addresses.address(mail_id)
        for sender in ("attacker@evil.test", "send@evil.test", ""):
            with pytest.raises(aiosmtplib.SMTPSenderRefused):
                await send_reply(service.reply_port, genuine, "ERROR = 2 (x)", sender=sender)
        assert refused(service, "sender") == 3
        assert results.statuses("sender-1") == [Status.submitted]
        await send_reply(service.reply_port, genuine, f"OK - 1 SMS, ID - {mail_id}", GATEWAY)
        await results.wait_until(lambda: Status.accepted in results.statuses("sender-1"))


# The addresses and the settings --------------------------------------------------------


def test_a_reply_address_verifies_in_any_case() -> None:
    addresses = ReplyAddresses("Smsc-Replies@Example.COM", b"k")
    mail_id = "0123456789abcdef0123456789abcdef"
    address = addresses.address(mail_id)
    assert address.startswith("Smsc-Replies+0123456789abcdef0123456789abcdef.")
    assert addresses.read(address) == (mail_id, None)
    assert addresses.read(address.lower()) == (mail_id, None)
    assert addresses.read(address.upper()) == (mail_id, None)
    assert addresses.read(f"smsc-replies+{mail_id}@example.com") == (None, "token")
    assert addresses.read(f"other+{mail_id}.x@example.com") == (None, "address")
    assert addresses.read(address.lower().replace("example.com", "evil.test")) == (None, "address")


def test_a_local_part_with_no_room_for_the_token_is_refused() -> None:
    assert ReplySettings(address="fourteen-chars@x.test")
    with pytest.raises(ValidationError, match="SMSC_REPLY__ADDRESS: its local part is too long"):
        ReplySettings(address="fifteen-chars-x@x.test")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SMSC_REPLY__ADDRESS", "a-much-too-long-local-part@replies.example.com"),
        ("SMSC_REPLY__ALLOWED_NETWORKS", "10.0.0.0/8, 10.0.0.300/32"),
        ("SMSC_REPLY__ALLOWED_SENDERS", "gateway.example.com"),
    ],
)
def test_bad_reply_settings_stop_startup(tmp_path: Path, variable: str, value: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMSC_")}
    env.update({"SMSC_SECRETS_DIR": str(tmp_path / "none"), variable: value})
    done = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "smsc-worker"), "config"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stdout
    assert variable in done.stderr
    assert "Traceback" not in done.stderr


def test_token_keys_are_secrets_read_from_the_secrets_directory(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "SMSC_REPLY__TOKEN_KEY").write_text("tok-current-9f1")
    (secrets / "SMSC_REPLY__TOKEN_KEYS_OLD").write_text("tok-old-1a2,tok-old-3b4")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMSC_")}
    env["SMSC_SECRETS_DIR"] = str(secrets)
    done = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "smsc-worker"), "config"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "tok-current" not in done.stdout and "tok-old" not in done.stdout
    assert '"token_key": "**********"' in done.stdout


def test_without_a_token_key_one_is_derived_from_the_gateway_password() -> None:
    from tests.conftest import unique_amqp
    from worker.service import reply_token_keys

    def keys(password: str, **reply: object) -> tuple[bytes, list[bytes]]:
        gateway = GatewaySettings(password=SecretStr(password))
        return reply_token_keys(make_settings(unique_amqp(), 1, 2, reply, gateway=gateway))

    assert keys("p1")[0] == keys("p1")[0] != keys("p2")[0]
    assert b"p1" not in keys("p1")[0]
    assert keys("p1", token_key=SecretStr("own")) == (b"own", [])
