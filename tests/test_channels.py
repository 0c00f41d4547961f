"""The channels as the worker prepares them: telegram (format 0, every text behind
`__BOT__:`, #ids and @nicknames), voice call parameters written by the encoder, the email
channel's sender address; then end to end through RabbitMQ and the emulator."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from tests.conftest import collecting, gateway_and_worker, phone
from worker.contract import SendRequest, Status
from worker.errors import InvalidRequest
from worker.ledger.memory import MemoryStateStore
from worker.prepare import PreparedRequest, prepare
from worker.protocol.fields import Channel, Format
from worker.protocol.mail import ListLine
from worker.settings import AmqpSettings, GatewaySettings

NOW = datetime(2026, 1, 1, tzinfo=UTC)
GATEWAY = GatewaySettings(default_sender="Shop")
PHONE = "+79161234567"


def request(**fields: Any) -> SendRequest:
    return SendRequest.model_validate({"request_id": "r1", "to": PHONE, "text": "hi", **fields})


def prepared(default: Channel = Channel.sms, **fields: Any) -> PreparedRequest:
    return prepare(request(**fields), GATEWAY, default, NOW)


def refusal(default: Channel = Channel.sms, **fields: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        prepared(default, **fields)
    return info.value


# telegram -----------------------------------------------------------------------------------


def test_a_telegram_request_is_format_0_behind_the_bot_prefix() -> None:
    done = prepared(channel="telegram", to=["#42", "@Shop_Bot", PHONE], text="Your code: 1234")
    options = done.key.options
    assert (options.format, options.telegram, options.sender) == (Format.sms, True, "Shop")
    assert done.line == ListLine(("#42", "@Shop_Bot", PHONE), "Your code: 1234")
    assert done.line.render(options) == f"#42,@Shop_Bot,{PHONE}:__BOT__:Your code: 1234"
    assert [r.key for r in done.recipients] == ["#42", "@shop_bot", PHONE]
    # A message to a chat bot is no SMS: no parts to count.
    assert (done.sms_parts, done.sms_count) == (None, None)


def test_telegram_is_the_default_channel_when_configured() -> None:
    assert prepared(Channel.telegram, to="#42").key.options.telegram


def test_telegram_and_sms_requests_never_share_an_email() -> None:
    sms = prepared(to=PHONE)
    telegram = prepared(channel="telegram", to=PHONE)
    assert sms.key != telegram.key
    # Nor are they identical requests to the gateway.
    assert sms.content_key != telegram.content_key


@pytest.mark.parametrize("channel", [None, "sms", "flash", "viber", "whatsapp", "soc", "voice"])
@pytest.mark.parametrize("recipient", ["#42", "@shop_bot"])
def test_ids_and_nicknames_are_refused_up_front_outside_telegram(
    channel: str | None, recipient: str
) -> None:
    error = refusal(channel=channel, to=[PHONE, recipient])
    assert error.code == "telegram_only_recipient"
    assert "for the telegram channel only" in error.message


def test_an_id_on_the_email_channel_is_refused_as_telegrams() -> None:
    error = refusal(channel="email", to="#42", subject="S", sender="me@shop.example")
    assert error.code == "telegram_only_recipient"


def test_a_malformed_telegram_recipient_is_refused() -> None:
    assert refusal(channel="telegram", to="#abc").code == "invalid_recipient"
    assert refusal(channel="telegram", to="@abc").code == "invalid_recipient"


# voice call parameters ---------------------------------------------------------------------


def test_the_encoder_writes_the_call_parameters_after_the_separator() -> None:
    done = prepared(channel="voice", voice="w", text="Hello\nthere", voice_params="10,20,3")
    assert done.line.message == "Hello\nthere\n~~~\n10,20,3"
    assert done.line.render(done.key.options) == f"{PHONE}:Hello\\nthere\\n~~~\\n10,20,3"
    # A call is not SMS parts: no count (tests/test_sms_parts.py).
    assert done.sms_parts is None
    # Different parameters make a different request to the gateway.
    other = prepared(channel="voice", voice="w", text="Hello\nthere", voice_params="10,20,4")
    assert other.content_key != done.content_key
    assert other.key == done.key  # but the same e-mail may carry both


@pytest.mark.parametrize("text", ["a~~~b", "Hello\n~~~\n10,20,3", "~~~"])
def test_a_voice_text_holding_the_mark_is_refused_up_front(text: str) -> None:
    for params in ({}, {"voice_params": "1"}):
        error = refusal(channel="voice", text=text, **params)
        assert error.code == "unsendable_text"
        assert "voice_params" in error.message
    # The default channel decides too.
    assert refusal(Channel.voice, text=text).code == "unsendable_text"
    # On other channels tildes are text.
    assert prepared(text=text).line.text == text


def test_text_and_call_parameters_share_the_gateways_1000_characters() -> None:
    assert len(prepared(channel="voice", text="x" * 994, voice_params="1").line.message) == 1000
    error = refusal(channel="voice", text="x" * 994, voice_params="12")
    assert error.code == "text_too_long"
    assert "1001 characters" in error.message


# the email channel's sender ----------------------------------------------------------------


def email(**fields: Any) -> dict[str, Any]:
    return {"channel": "email", "to": "a@example.com", "subject": "S", **fields}


def test_an_email_request_without_the_senders_address_is_refused_up_front() -> None:
    error = refusal(**email())
    assert error.code == "email_sender_required"
    assert "names no sender" in error.message
    named = refusal(**email(sender="Shop"))
    assert named.code == "email_sender_required"
    assert "'Shop' is not one" in named.message


def test_the_email_channels_default_address_or_the_requests_own_goes() -> None:
    gateway = GatewaySettings(default_sender="Shop", default_senders={"email": "no@shop.example"})
    done = prepare(request(**email()), gateway, Channel.sms, NOW)
    assert done.key.options.sender == "no@shop.example"
    own = prepare(request(**email(sender="me@shop.example")), gateway, Channel.sms, NOW)
    assert own.key.options.sender == "me@shop.example"


# end to end --------------------------------------------------------------------------------


async def test_telegram_requests_go_to_the_gateway_behind_the_bot_prefix(
    amqp: AmqpSettings,
) -> None:
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp) as (emulator, _),
    ):
        await broker.publish(
            {
                "request_id": "tg-1",
                "to": ["#42", "@Shop_Bot"],
                "text": "a: b",
                "channel": "telegram",
            }
        )
        await broker.publish(
            {"request_id": "tg-2", "to": phone(2), "text": "by phone", "channel": "telegram"}
        )
        await broker.publish({"request_id": "sms-1", "to": phone(3), "text": "plain"})
        await broker.publish({"request_id": "sms-id", "to": "#42", "text": "x"})
        ids = ("tg-1", "tg-2", "sms-1")
        await results.wait_until(
            lambda: (
                all(Status.accepted in results.statuses(i) for i in ids)
                and Status.rejected in results.statuses("sms-id")
            )
        )
    delivered = sorted((d.phone, d.text, d.format, d.telegram) for d in emulator.deliveries)
    assert delivered == sorted(
        [
            ("#42", "a: b", 0, True),
            ("@Shop_Bot", "a: b", 0, True),
            (phone(2), "by phone", 0, True),
            (phone(3), "plain", 0, False),
        ]
    )
    mail_of = {i: results.of(i)[-1].gateway_id for i in ids}
    assert mail_of["tg-1"] == mail_of["tg-2"] != mail_of["sms-1"]
    accepted = results.of("tg-1")[-1]
    assert (accepted.schema_version, accepted.sms_parts, accepted.sms_count) == (2, None, None)
    [refused] = results.of("sms-id")
    assert refused.error is not None and refused.error.code == "telegram_only_recipient"
    # The gateway never saw the refused request, nor any error from it.
    assert all(m.reply.mail_id in set(mail_of.values()) for m in emulator.mails)


async def test_an_email_request_without_a_sender_address_never_reaches_the_gateway(
    amqp: AmqpSettings,
) -> None:
    mail = {"channel": "email", "subject": "Invoice", "text": "see attached"}
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp) as (emulator, _),
    ):
        await broker.publish({"request_id": "no-sender", "to": "a@example.com", **mail})
        await broker.publish(
            {
                "request_id": "with-sender",
                "to": "b@example.com",
                "sender": "me@shop.example",
                **mail,
            }
        )
        await broker.publish({"request_id": "v1-binary", "schema_version": 1, "to": phone(1),
                              "text": "00ff", "channel": "binary"})  # fmt: skip
        await results.wait_until(
            lambda: (
                Status.accepted in results.statuses("with-sender")
                and Status.rejected in results.statuses("no-sender")
                and Status.rejected in results.statuses("v1-binary")
            )
        )
        dead = await broker.dead_letters(2)
    [event] = results.of("no-sender")
    assert event.error is not None and event.error.code == "email_sender_required"
    assert not event.error.retryable
    [binary] = results.of("v1-binary")
    assert binary.error is not None and binary.error.code == "channel_not_offered"
    assert binary.schema_version == 2
    assert sorted(m.headers["x-smsc-error-code"] for m in dead) == [  # type: ignore[type-var]
        "channel_not_offered",
        "email_sender_required",
    ]
    assert [(d.phone, d.format, d.sender) for d in emulator.deliveries] == [
        ("b@example.com", 8, "me@shop.example")
    ]
    # Nothing the gateway refused: no e-mail failed with error 1.
    assert all(m.reply.mail_id == results.of("with-sender")[-1].gateway_id for m in emulator.mails)


async def test_voice_call_parameters_reach_the_gateway_apart_from_the_text(
    amqp: AmqpSettings,
) -> None:
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp) as (emulator, _),
    ):
        voice = {"channel": "voice", "voice": "w"}
        await broker.publish(
            {"request_id": "call-1", "to": phone(1), "text": "Hello", "voice_params": "10,20,3",
             **voice}
        )  # fmt: skip
        await broker.publish({"request_id": "call-2", "to": phone(2), "text": "Hi", **voice})
        await broker.publish({"request_id": "tilde", "to": phone(3), "text": "a\n~~~\nb", **voice})
        await results.wait_until(
            lambda: (
                all(Status.accepted in results.statuses(i) for i in ("call-1", "call-2"))
                and Status.rejected in results.statuses("tilde")
            )
        )
    assert sorted((d.text, d.voice_params, d.format) for d in emulator.deliveries) == [
        ("Hello", "10,20,3", 9),
        ("Hi", None, 9),
    ]
    [event] = results.of("tilde")
    assert event.error is not None and event.error.code == "unsendable_text"


async def test_a_redelivery_answered_from_an_event_a_version_1_worker_stored_says_2(
    amqp: AmqpSettings,
) -> None:
    """After an upgrade the ledger may still hold events a version-1 worker stored: a
    redelivered request gets its event again, same id, as version 2."""
    body = {"request_id": "old", "to": phone(1), "text": "once"}
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp) as (emulator, service),
    ):
        await broker.publish(body)
        await results.wait_until(lambda: Status.accepted in results.statuses("old"))
        store = service.store
        assert isinstance(store, MemoryStateStore)
        entry = store._ledger["old"]
        assert entry.event is not None
        entry.event = entry.event.replace('"schema_version":2', '"schema_version":1')
        await broker.publish(body)  # the same message again: answered from the ledger
        await results.wait_until(lambda: results.statuses("old").count(Status.accepted) == 2)
    first, again = [e for e in results.of("old") if e.status is Status.accepted]
    assert again.event_id == first.event_id
    assert again.schema_version == 2
    assert len(emulator.deliveries) == 1  # never sent twice
