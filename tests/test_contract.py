"""The send request's contract where the gateway's document is read for the caller: the
time zone of a delivery window, the channels that can be carried (schema version 2), the
voice call's parameters."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from worker.contract import SCHEMA_VERSION, ResultEvent, SendRequest, Status
from worker.fate import Reject, read_request
from worker.prepare import _send_time
from worker.protocol.fields import Channel, Format


def body(**fields: object) -> bytes:
    return json.dumps({"request_id": "r1", "to": "+79161234567", "text": "hi", **fields}).encode()


WINDOW = {"start_hour": 9, "end_hour": 21}


@pytest.mark.parametrize("tz", [-15, -12, 0, 9, 11])
def test_every_whole_hour_offset_of_a_real_zone_is_taken(tz: int) -> None:
    # Real zones run from UTC-12 (Baker Island) to UTC+14 (Line Islands): -15..+11 from Moscow.
    request = read_request(body(window=WINDOW, tz=tz))
    assert isinstance(request, SendRequest)
    assert _send_time(request).render() == f"9-21,{tz}"


@pytest.mark.parametrize("tz", [-16, 12, 24])
def test_an_offset_no_zone_has_is_refused(tz: int) -> None:
    rejected = read_request(body(window=WINDOW, tz=tz))
    assert isinstance(rejected, Reject) and rejected.code == "invalid_schema"
    assert "tz" in rejected.reason


def test_a_fractional_offset_is_refused_saying_why() -> None:
    rejected = read_request(body(window=WINDOW, tz=2.5))  # India is Moscow + 2.5
    assert isinstance(rejected, Reject) and rejected.code == "fractional_tz"
    assert "whole hours" in rejected.reason and "send_at" in rejected.reason


def test_a_tz_with_no_window_to_apply_to_is_refused() -> None:
    rejected = read_request(body(tz=3))
    assert isinstance(rejected, Reject) and rejected.code == "invalid_schema"
    assert "tz applies to window only" in rejected.reason
    with_send_at = read_request(body(tz=3, send_at="2030-01-02T03:04:05+00:00"))
    assert isinstance(with_send_at, Reject)


def test_a_window_without_tz_is_in_the_accounts_own_zone() -> None:
    request = read_request(body(window=WINDOW))
    assert isinstance(request, SendRequest)
    assert _send_time(request).render() == "9-21"


# schema version 2: the channels that can be carried, telegram, voice_params ---------------


def test_a_request_names_version_2_or_1_and_both_are_read() -> None:
    for version in (1, 2):
        request = read_request(body(schema_version=version))
        assert isinstance(request, SendRequest) and request.schema_version == version
    request = read_request(body())
    assert isinstance(request, SendRequest) and request.schema_version == SCHEMA_VERSION == 2
    rejected = read_request(body(schema_version=3))
    assert isinstance(rejected, Reject) and rejected.code == "invalid_schema"


@pytest.mark.parametrize("version", [1, 2, None])
@pytest.mark.parametrize(("channel", "why"), [("binary", "raw bytes"), ("mms", "attach media")])
def test_binary_and_mms_are_refused_as_not_offered(
    version: int | None, channel: str, why: str
) -> None:
    fields: dict[str, object] = {"channel": channel}
    if version is not None:
        fields["schema_version"] = version
    rejected = read_request(body(**fields))
    assert isinstance(rejected, Reject) and rejected.code == "channel_not_offered"
    assert f"channel {channel} is not offered" in rejected.reason and why in rejected.reason


def test_the_channels_offered_are_the_protocols() -> None:
    offered = SendRequest.model_json_schema()["$defs"]["Channel"]["enum"]
    assert offered == [c.value for c in Channel]
    assert "binary" not in offered and "mms" not in offered
    assert {"binary_hex", "telegram"} <= set(offered)
    # Every channel but telegram is a gateway format of the same name; telegram is format 0.
    assert {c: c.gateway_format for c in Channel if c.gateway_format.name != c.value} == {
        Channel.telegram: Format.sms
    }


def test_result_events_carry_version_2() -> None:
    event = ResultEvent.create("r1", Status.accepted)
    assert event.schema_version == 2
    assert json.loads(event.model_dump_json())["schema_version"] == 2


@pytest.mark.parametrize("params", ["10,20,3", "a=1", "x" * 64, "+1.5_-"])
def test_voice_params_on_the_voice_channel(params: str) -> None:
    request = read_request(body(channel="voice", voice_params=params))
    assert isinstance(request, SendRequest) and request.voice_params == params


@pytest.mark.parametrize("params", ["", "x" * 65, "a b", "a\nb", "a\\nb", "~~~", "a:b", "ж"])
def test_voice_params_that_could_break_the_line_are_refused(params: str) -> None:
    rejected = read_request(body(channel="voice", voice_params=params))
    assert isinstance(rejected, Reject)
    assert rejected.code in ("invalid_schema", "control_character")
    assert "voice_params" in rejected.reason


@pytest.mark.parametrize("channel", [None, "sms", "telegram", "email"])
def test_voice_params_are_for_the_voice_channel_only(channel: str | None) -> None:
    rejected = read_request(body(channel=channel, voice_params="10"))
    assert isinstance(rejected, Reject) and rejected.code == "invalid_schema"
    assert "voice_params is for the voice channel only" in rejected.reason


@pytest.mark.parametrize("text", ["__BOT__:hi", " __bot__:hi", "\ufeff__BOT__:x", "__PING__"])
def test_a_telegram_text_cannot_bring_a_prefix_of_its_own(text: str) -> None:
    rejected = read_request(body(channel="telegram", text=text))
    assert isinstance(rejected, Reject) and rejected.code == "reserved_prefix"


def test_a_stored_event_is_read_back_and_published_as_it_was_stored() -> None:
    event = ResultEvent.create("r1", Status.accepted, gateway_id="m1", metadata={"a": 1.5})
    stored = event.model_dump_json()
    read, raw = ResultEvent.from_stored(stored)
    assert (read, raw) == (event, stored.encode())


def test_an_event_a_version_1_worker_stored_is_published_again_as_version_2() -> None:
    event = ResultEvent.create("r1", Status.accepted, gateway_id="m1", metadata={"a": 1.5})
    stored_by_v1 = event.model_dump_json().replace('"schema_version":2', '"schema_version":1')
    read, raw = ResultEvent.from_stored(stored_by_v1)
    assert read == event
    assert json.loads(raw) == {**json.loads(stored_by_v1), "schema_version": 2}


@pytest.mark.parametrize("stored", ['{"schema_version": 3}', '{"schema_version": 1}', "[1]"])
def test_a_stored_event_that_is_neither_version_is_not_read(stored: str) -> None:
    with pytest.raises(ValidationError):
        ResultEvent.from_stored(stored)
