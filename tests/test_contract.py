"""The send request's contract where the gateway's document is read for the caller: the
time zone of a delivery window."""

from __future__ import annotations

import json

import pytest

from worker.contract import SendRequest
from worker.fate import Reject, read_request
from worker.prepare import _send_time


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
