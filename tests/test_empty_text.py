"""An empty text is refused up front (`empty_text`) on every channel but hlr and ping: the
gateway answers it with error 1 for the whole e-mail it travels in."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import collecting, gateway_and_worker, phone
from worker.contract import SendRequest, Status
from worker.errors import InvalidRequest
from worker.prepare import TEXTLESS_FORMATS, prepare
from worker.protocol.fields import Channel
from worker.settings import AmqpSettings, GatewaySettings

NOW = datetime(2026, 1, 1, tzinfo=UTC)
GATEWAY = GatewaySettings()


def request(text: str, channel: Channel | None) -> SendRequest:
    email = channel is Channel.email
    return SendRequest.model_validate(
        {
            "request_id": "r1",
            "to": "a@example.com" if email else "+79161234567",
            "text": text,
            "channel": channel,
            **({"subject": "s", "sender": "me@shop.example"} if email else {}),
            **({"voice": "m"} if channel is Channel.voice else {}),
        }
    )


@pytest.mark.parametrize("channel", [Channel.hlr, Channel.ping])
def test_hlr_and_ping_take_an_empty_text(channel: Channel) -> None:
    prepared = prepare(request("", channel), GATEWAY, Channel.sms, NOW)
    assert prepared.line.text == ""


@pytest.mark.parametrize(
    "channel", [None, Channel.sms, Channel.flash, Channel.viber, Channel.email, Channel.telegram]
)
def test_an_empty_text_is_refused_elsewhere(channel: Channel | None) -> None:
    with pytest.raises(InvalidRequest) as info:
        prepare(request("", channel), GATEWAY, Channel.sms, NOW)
    assert info.value.code == "empty_text"
    assert "hlr and ping" in info.value.message
    assert f"this request's channel: {(channel or Channel.sms).value}" in info.value.message


def test_the_default_channel_decides_too() -> None:
    assert prepare(request("", None), GATEWAY, Channel.ping, NOW).line.text == ""
    with pytest.raises(InvalidRequest):
        prepare(request("", None), GATEWAY, Channel.sms, NOW)


@given(st.sampled_from(list(Channel)))
def test_empty_text_is_refused_exactly_outside_hlr_and_ping(channel: Channel) -> None:
    try:
        prepare(request("", channel), GATEWAY, Channel.sms, NOW)
    except InvalidRequest as exc:
        if exc.code == "empty_text":
            assert channel.gateway_format not in TEXTLESS_FORMATS
            return
        raise AssertionError(f"{channel.value}: {exc.code}") from exc
    assert channel.gateway_format in TEXTLESS_FORMATS


async def test_an_empty_text_is_rejected_and_its_neighbours_delivered(
    amqp: AmqpSettings,
) -> None:
    async with (
        collecting(amqp) as (broker, results),
        gateway_and_worker(amqp) as (emulator, _),
    ):
        await broker.publish({"request_id": "ok-1", "to": phone(1), "text": "one"})
        await broker.publish({"request_id": "empty", "to": phone(2), "text": ""})
        await broker.publish({"request_id": "ok-2", "to": phone(3), "text": "two"})
        await results.wait_until(
            lambda: (
                all(Status.accepted in results.statuses(r) for r in ("ok-1", "ok-2"))
                and Status.rejected in results.statuses("empty")
            )
        )
    [event] = results.of("empty")
    assert event.error is not None and event.error.code == "empty_text"
    assert sorted(d.text for d in emulator.deliveries) == ["one", "two"]
