"""Hostile input at the door: every body ends as a `rejected` event (with the request id
whenever one can be read) and a dead letter with a reason, and nothing raises out of
`Service._read`, the one place a delivery is read.

The regression cases and the fuzz tests call `Service._read` on deliveries built by hand
(the channel is a dummy: `_read` never touches it) and build each rejection's event with
the settler's own `Settler._event`; one test runs a handful through the real consumer.
"""

from __future__ import annotations

import json
import time
import unicodedata
import uuid
from collections import Counter
from typing import Any, cast

import aiormq.abc
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from tests.conftest import collecting, gateway_and_worker, phone
from worker.contract import (
    MAX_RECIPIENT_CHARS,
    ResultEvent,
    SendRequest,
    Status,
    largest_request_bytes,
)
from worker.delivery import (
    ATTEMPT_HEADER,
    ERROR_CODE_HEADER,
    FIRST_SEEN_HEADER,
    GROUP_HEADER,
    IN_DOUBT_HEADER,
    SIGNATURE_HEADER,
    Delivery,
    RequestCopy,
)
from worker.errors import InvalidRequest
from worker.fate import Reject, request_id_of
from worker.protocol.fields import check_text, hides_reserved_prefix
from worker.service import Arrival, Service
from worker.settings import DEFAULT_MAX_BODY_BYTES, AmqpSettings, Settings
from worker.settle import Settler

SERVICE = Service(Settings())
MAX_BODY = SERVICE.settings.amqp.max_body_bytes
DUMMY_CHANNEL = cast(aiormq.abc.AbstractChannel, object())
TO = "+79161234567"


def delivery(body: bytes, headers: dict[str, Any] | None = None, tag: int = 1) -> Delivery:
    return Delivery(
        channel=DUMMY_CHANNEL,
        tag=tag,
        copy=RequestCopy(body, headers or {}, message_id=None),
        redelivered=False,
    )


def request(**fields: Any) -> bytes:
    """A request body; `fields` override or add to a valid sms request (None: left out)."""
    base: dict[str, Any] = {"request_id": "hostile", "to": TO, "text": "hello"}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not None}).encode()


def settled(arrival: Arrival) -> ResultEvent:
    """The event the settler publishes for a rejection, checked against the schema."""
    fate = arrival.fate
    assert isinstance(fate, Reject), arrival
    assert fate.code and fate.reason
    assert fate.dead_letter
    fate.reason.encode()  # no lone surrogate: loggable, fits an AMQP header
    event = Settler._event(arrival.subject, fate, time.time())
    assert event is not None
    assert event.status == Status.rejected
    assert event.request_id == arrival.subject.request_id
    assert event.error is not None and event.error.code == fate.code
    # What is published validates against the contract (model_construct skipped that).
    assert ResultEvent.model_validate_json(event.model_dump_json()) == event
    return event


def rejected(body: bytes, headers: dict[str, Any] | None = None) -> tuple[str, str | None]:
    arrival = SERVICE._read(delivery(body, headers))
    event = settled(arrival)
    assert event.error is not None
    return event.error.code, event.request_id


# 1. lone surrogates --------------------------------------------------------------------


def test_a_lone_surrogate_request_id_is_not_readable() -> None:
    body = b'{"request_id": "\\ud800", "to": "+79161234567", "text": "x"}'
    assert rejected(body) == ("not_json", None)
    assert request_id_of(body) is None
    # The pattern refuses it even where a JSON parser lets it through.
    with pytest.raises(ValidationError):
        SendRequest.model_validate({"request_id": "\ud800", "to": TO, "text": "x"})


SURROGATE_FIELDS = {
    "text": {"text": "a\ud800b"},
    "sender": {"sender": "S\udc00"},
    "subject": {"channel": "email", "to": "a@b.cc", "subject": "s\ud800"},
    "voice": {"channel": "voice", "voice": "m\udfff"},
    "metadata-key": {"metadata": {"k\ud800": 1}},
    "metadata-value": {"metadata": {"k": "v\udbff"}},
    "to-item": {"to": [TO, "+7916\ud8001234567"]},
}


@pytest.mark.parametrize("fields", SURROGATE_FIELDS.values(), ids=SURROGATE_FIELDS.keys())
def test_a_lone_surrogate_in_any_text_field_is_rejected_with_its_id(fields: dict[str, Any]) -> None:
    body = request(request_id="sur", **fields)
    assert b"\\ud" in body  # json.dumps wrote the surrogate as an escape
    assert rejected(body) == ("not_json", "sur")
    # A request built in Python (not from JSON) is refused as well: by pydantic itself in
    # constrained fields, by the contract's own check in the others.
    with pytest.raises(ValidationError) as caught:
        SendRequest.model_validate(json.loads(body))
    assert {e["type"] for e in caught.value.errors()} <= {"string_unicode", "invalid_unicode"}


# 2. bounds -----------------------------------------------------------------------------


BOUNDS = {
    "text": ({"text": "x" * 1001}, "text_too_long"),
    "to-item": ({"to": "+" + "7" * MAX_RECIPIENT_CHARS}, "invalid_schema"),
    "to-count": ({"to": [phone(n) for n in range(1001)]}, "invalid_schema"),
    "sender": ({"sender": "s" * 255}, "invalid_schema"),
    "subject": ({"channel": "email", "to": "a@b.cc", "subject": "s" * 256}, "invalid_schema"),
    "voice": ({"channel": "voice", "voice": "v" * 33}, "invalid_schema"),
    "voice_params": ({"channel": "voice", "voice_params": "p" * 65}, "invalid_schema"),
    "metadata-keys": ({"metadata": {str(n): n for n in range(17)}}, "invalid_schema"),
    "metadata-key": ({"metadata": {"k" * 65: 1}}, "invalid_schema"),
    "metadata-value": ({"metadata": {"k": "v" * 257}}, "invalid_schema"),
}


@pytest.mark.parametrize(("fields", "code"), BOUNDS.values(), ids=BOUNDS.keys())
def test_every_bound_is_enforced_with_its_code(fields: dict[str, Any], code: str) -> None:
    assert rejected(request(request_id="bound", **fields)) == (code, "bound")


def test_the_schema_states_every_bound() -> None:
    schema = SendRequest.model_json_schema()
    props = schema["properties"]
    assert props["text"]["maxLength"] == 1000
    assert props["to"]["maxItems"] == 1000
    assert props["to"]["items"]["maxLength"] == MAX_RECIPIENT_CHARS
    assert props["metadata"]["maxProperties"] == 16
    assert props["metadata"]["propertyNames"]["maxLength"] == 64
    assert {"maxLength": 256, "type": "string"} in props["metadata"]["additionalProperties"][
        "anyOf"
    ]
    for name, bound in (("sender", 254), ("subject", 255), ("voice", 32)):
        assert {"maxLength": bound, "type": "string"} in props[name]["anyOf"]
    [voice_params, _] = props["voice_params"]["anyOf"]
    assert (voice_params["maxLength"], voice_params["pattern"]) == (64, "^[A-Za-z0-9,.=_+-]+$")


def test_a_body_over_the_limit_is_rejected_unread() -> None:
    valid = request(request_id="big")
    body = valid[:-1] + b" " * (MAX_BODY + 1 - len(valid)) + b"}"
    assert len(body) == MAX_BODY + 1
    arrival = SERVICE._read(delivery(body))
    event = settled(arrival)
    assert event.error is not None and event.error.code == "too_large"
    # Never parsed, so not even its id is read; the event is told apart by its body.
    assert event.request_id is None
    # One byte less is read as usual.
    assert SERVICE._read(delivery(body[:-2] + b"}")).pending is not None


def test_the_largest_valid_request_fits_the_default_limit_with_room_to_spare() -> None:
    """1,000 recipients of 254 characters and every other field at its bound, each
    character written as a 12-byte escape, pretty-printed: still accepted."""
    domain = "@example.com"
    to = [f"u{n:04d}".ljust(MAX_RECIPIENT_CHARS - len(domain), "x") + domain for n in range(1000)]
    astral = "\U0001f600"
    fields = {
        "request_id": "r" * 128,
        "to": to,
        "text": astral * 1000,
        "channel": "email",
        "sender": "s".ljust(254 - len(domain), "s") + domain,
        "subject": astral * 255,
        "translit": "off",
        "expires_at": "2999-12-31T23:59:59.999999+03:00",
        "metadata": {f"{n:02d}".ljust(64, "\u0416"): astral * 256 for n in range(16)},
    }
    body = json.dumps(fields, indent=2, ensure_ascii=True).encode()
    assert all(len(r) == MAX_RECIPIENT_CHARS for r in to)
    assert len(body) <= largest_request_bytes()
    assert DEFAULT_MAX_BODY_BYTES == MAX_BODY >= 2 * largest_request_bytes()
    arrival = SERVICE._read(delivery(body))
    assert arrival.fate is None, arrival.fate
    assert arrival.pending is not None and len(arrival.pending.request.to) == 1000


def test_the_body_limit_is_a_setting() -> None:
    assert AmqpSettings(max_body_bytes=4096).max_body_bytes == 4096
    with pytest.raises(ValidationError):
        AmqpSettings(max_body_bytes=10)


# 3. control and format characters --------------------------------------------------------


HIDDEN_PREFIXES = {
    "bom-viber": ("\ufeff__VIBER__:x", "reserved_prefix"),
    "nul-viber": ("\x00__VIBER__:x", "control_character"),
    "zwsp-hlr": ("\u200b__HLR__", "reserved_prefix"),
    "zwsp-inside": ("__VI\u200bBER__:x", "reserved_prefix"),
    "lrm-space-call": ("\u200e  __call__:x", "reserved_prefix"),
    "word-joiner-ping": ("\u2060__PING__", "reserved_prefix"),
    "newline-soc": ("\n__SOC__:x", "reserved_prefix"),
    "cr-mail": ("\r__MAIL__:x", "reserved_prefix"),
}


@pytest.mark.parametrize(("text", "code"), HIDDEN_PREFIXES.values(), ids=HIDDEN_PREFIXES.keys())
def test_no_invisible_character_hides_a_reserved_prefix(text: str, code: str) -> None:
    assert rejected(request(request_id="prefix", text=text)) == (code, "prefix")
    # The encoder's own check (which has no contract in front of it) agrees.
    with pytest.raises(InvalidRequest) as caught:
        check_text(text.replace("\r", "\n"))
    assert caught.value.code == "reserved_prefix"


@pytest.mark.parametrize(
    "text", ["\u200dок", "a\u200bb", "\u05d0\u200f\u05d1", "\U0001f468\u200d\U0001f469", "x\ny"]
)
def test_format_characters_elsewhere_and_newlines_are_ordinary_text(text: str) -> None:
    assert SERVICE._read(delivery(request(text=text))).pending is not None


CONTROLS = {
    "text-bell": {"text": "a\x07b"},
    "text-tab": {"text": "a\tb"},
    "text-del": {"text": "a\x7fb"},
    "text-c1": {"text": "a\x9bb"},
    "text-nel": {"text": "a\x85b"},
    "sender": {"sender": "Shop\x00"},
    "sender-newline": {"sender": "Sh\nop"},
    "subject": {"channel": "email", "to": "a@b.cc", "subject": "s\x1b[0m"},
    "subject-cr": {"channel": "email", "to": "a@b.cc", "subject": "s\rvoice:x"},
    "voice": {"channel": "voice", "voice": "m\x0b"},
    "metadata-key": {"metadata": {"k\x01": 1}},
    "metadata-value": {"metadata": {"k": "v\x9f"}},
    "to-item": {"to": [TO, "+7916\t1234568"]},
}


@pytest.mark.parametrize("fields", CONTROLS.values(), ids=CONTROLS.keys())
def test_control_characters_are_rejected_in_every_text_field(fields: dict[str, Any]) -> None:
    assert rejected(request(request_id="ctl", **fields)) == ("control_character", "ctl")


def test_a_crlf_text_is_normalised_not_refused() -> None:
    arrival = SERVICE._read(delivery(request(text="one\r\ntwo\rthree")))
    assert arrival.pending is not None
    assert arrival.pending.request.text == "one\ntwo\nthree"


# 4. typed result events ------------------------------------------------------------------


def test_the_event_id_is_derived_as_before() -> None:
    event = ResultEvent.create("r-1", Status.rejected, source="invalid_schema")
    # Pinned from the code before the typed constructor: replays keep their ids.
    assert event.event_id == "8a40412f-9aff-5655-b859-88383dcc99aa"
    assert event.event_id == str(
        uuid.uuid5(uuid.NAMESPACE_URL, "r-1|rejected|1|None|invalid_schema")
    )
    sent = ResultEvent.create("r-1", Status.submitted, attempt=2, gateway_id="m.1")
    assert sent.event_id == "e7b558fe-9dba-5e7f-8561-39881db0eaea"
    assert ResultEvent.model_validate_json(sent.model_dump_json()) == sent


def test_a_misspelled_event_field_is_refused() -> None:
    with pytest.raises(TypeError):
        ResultEvent.create("r", Status.rejected, gatway_id="m.1")  # type: ignore[call-arg]


# 5. fuzz: arbitrary bodies and headers through `_read` -----------------------------------

# Every code point, lone surrogates and controls included.
ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=12)
HOSTILE_TEXT = st.one_of(
    ANY_TEXT,
    st.sampled_from(
        ["\ufeff__VIBER__:x", "\x00__VIBER__:x", "\u200b__HLR__", "__PING__", "\ud800", "a\\nb"]
    ),
    st.builds(lambda a, b: a + b, ANY_TEXT, st.sampled_from(["__CALL__:", "\r\n", "[text]"])),
)
SCALAR = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), HOSTILE_TEXT
)
JSON = st.recursive(
    SCALAR,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(HOSTILE_TEXT, inner, max_size=4),
    max_leaves=6,
)
REQUEST_ID = st.one_of(
    st.sampled_from(["fuzz-1", "fuzz-2"]),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=130),
    HOSTILE_TEXT,
    st.integers(),
)
TO_ITEM = st.one_of(
    st.sampled_from(
        [TO, "79161234567", "G12", "#user", "#42", "@shop_bot", "a@b.cc", "+7 (916) 123-45-67"]
    ),
    HOSTILE_TEXT,
)
REQUEST = st.fixed_dictionaries(
    {"request_id": REQUEST_ID, "to": st.one_of(TO_ITEM, st.lists(TO_ITEM, max_size=5))},
    optional={
        "text": HOSTILE_TEXT,
        "channel": st.sampled_from(
            ["sms", "email", "voice", "viber", "hlr", "telegram", "binary", "mms", "nope", None]
        ),
        "sender": st.one_of(st.sampled_from(["Shop", "a@b.cc", "123456"]), HOSTILE_TEXT),
        "subject": HOSTILE_TEXT,
        "voice": HOSTILE_TEXT,
        "voice_params": st.one_of(st.just("10,20,3"), HOSTILE_TEXT),
        "translit": st.sampled_from(["off", "translit", "x"]),
        "send_at": st.sampled_from(["2030-01-01T00:00:00+03:00", "2030-01-01", "x"]),
        "expires_at": st.sampled_from(["2999-01-01T00:00:00Z", "2000-01-01T00:00:00Z"]),
        "window": st.fixed_dictionaries(
            {"start_hour": st.integers(-1, 25), "end_hour": st.integers(-1, 25)}
        ),
        "tz": st.integers(-13, 13),
        "metadata": st.dictionaries(HOSTILE_TEXT, SCALAR, max_size=3),
        "schema_version": st.sampled_from([1, 2]),
        "extra": SCALAR,
    },
)


def _dumps(value: Any, ensure_ascii: bool) -> bytes:
    text = json.dumps(value, ensure_ascii=ensure_ascii)
    return text.encode("utf-8", "surrogatepass")


BODY = st.one_of(
    st.binary(max_size=200),
    st.builds(_dumps, JSON, st.booleans()),
    st.builds(_dumps, REQUEST, st.booleans()),
    st.builds(_dumps, REQUEST, st.just(True)),
    st.builds(lambda n: b"[" * n + b"]" * n, st.integers(0, 5000)),
)
HEADER_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64),
    st.floats(),
    ANY_TEXT,
    st.binary(max_size=20),
    st.lists(st.integers(), max_size=3),
)
HEADERS = st.dictionaries(
    st.one_of(
        st.sampled_from(
            [ATTEMPT_HEADER, FIRST_SEEN_HEADER, GROUP_HEADER, IN_DOUBT_HEADER, SIGNATURE_HEADER]
        ),
        ANY_TEXT,
    ),
    HEADER_VALUE,
    max_size=6,
)


def check_read(body: bytes, headers: dict[str, Any]) -> None:
    """What the consumer does with a delivery: read it, and settle a rejection."""
    arrival = SERVICE._read(delivery(body, headers))
    assert (arrival.fate is None) != (arrival.pending is None), arrival
    if arrival.fate is not None:
        event = settled(arrival)
        readable = request_id_of(body)
        if readable is not None and len(body) <= MAX_BODY:
            assert event.request_id == readable
        return
    pending = arrival.pending
    assert pending is not None
    req = pending.request
    # A request taken in carries nothing that fails later (uuid5, logs, the e-mail).
    uuid.uuid5(uuid.NAMESPACE_URL, req.request_id)
    fields = [req.text, *req.to, req.sender or "", req.subject or "", req.voice or ""]
    fields.append(req.voice_params or "")
    fields += [*req.metadata, *(v for v in req.metadata.values() if isinstance(v, str))]
    for value in fields:
        value.encode("utf-8")
        assert not any(
            unicodedata.category(c) == "Cc" and not (c == "\n" and value is req.text) for c in value
        ), value
    assert not hides_reserved_prefix(req.text)


FUZZ = settings(
    max_examples=2_500,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(BODY, HEADERS)
@example(b'{"request_id": "\\ud800", "to": "+79161234567", "text": "x"}', {})
@example(request(text="\ufeff__VIBER__:x"), {})
def test_fuzz_arbitrary_bodies_and_headers(body: bytes, headers: dict[str, Any]) -> None:
    check_read(body, headers)


@FUZZ
@given(st.builds(_dumps, REQUEST, st.booleans()))
def test_fuzz_request_shaped_bodies(body: bytes) -> None:
    check_read(body, {})


@FUZZ
@given(st.builds(_dumps, REQUEST, st.booleans()), HEADERS)
def test_fuzz_request_shaped_bodies_with_headers(body: bytes, headers: dict[str, Any]) -> None:
    check_read(body, headers)


@FUZZ
@given(
    st.builds(
        lambda text, fields: request(request_id="fuzz-text", text=text, **fields),
        HOSTILE_TEXT,
        st.fixed_dictionaries(
            {},
            optional={
                "sender": HOSTILE_TEXT,
                "metadata": st.dictionaries(HOSTILE_TEXT, SCALAR, max_size=3),
                "to": st.lists(TO_ITEM, min_size=1, max_size=3),
            },
        ),
    )
)
def test_fuzz_hostile_text_fields(body: bytes) -> None:
    check_read(body, {})


# 6. through the real consumer ------------------------------------------------------------


async def test_hostile_requests_are_rejected_and_dead_lettered_among_valid_ones(
    amqp: AmqpSettings,
) -> None:
    small = amqp.model_copy(update={"max_body_bytes": 4096})
    hostile: list[tuple[str | None, bytes, str]] = [
        ("e2e-bom", request(request_id="e2e-bom", text="\ufeff__VIBER__:x"), "reserved_prefix"),
        ("e2e-nul", request(request_id="e2e-nul", text="\x00__VIBER__:x"), "control_character"),
        ("e2e-zwsp", request(request_id="e2e-zwsp", text="\u200b__HLR__"), "reserved_prefix"),
        ("e2e-sur", request(request_id="e2e-sur", metadata={"k": "\ud800"}), "not_json"),
        ("e2e-ctl", request(request_id="e2e-ctl", sender="Sh\x1bop"), "control_character"),
        ("e2e-long", request(request_id="e2e-long", text="x" * 1001), "text_too_long"),
        ("e2e-meta", request(request_id="e2e-meta", metadata={"k" * 65: 1}), "invalid_schema"),
        (None, request(request_id="e2e-big", text="x" * 5000), "too_large"),
        (None, b'{"request_id": "\\ud800", "to": "+79161234567", "text": "x"}', "not_json"),
    ]
    valid = [f"e2e-valid-{n}" for n in range(len(hostile) + 1)]

    def good(n: int) -> bytes:
        return request(request_id=valid[n], to=phone(200 + n), text=f"t-{valid[n]}")

    async with (
        collecting(small) as (broker, results),
        gateway_and_worker(small) as (emulator, _),
    ):
        await broker.publish(good(0))
        for n, (_, body, _) in enumerate(hostile, start=1):
            await broker.publish(body)
            await broker.publish(good(n))
        await results.wait_until(
            lambda: (
                all(Status.accepted in results.statuses(r) for r in valid)
                and len(results.with_status(Status.rejected)) >= len(hostile)
            ),
            20,
        )
        dead = await broker.dead_letters(len(hostile))

    rejected_events = results.with_status(Status.rejected)
    assert len(rejected_events) == len(hostile)
    assert Counter(e.error.code for e in rejected_events if e.error) == Counter(
        c for *_, c in hostile
    )
    for request_id, _, code in hostile:
        if request_id is not None:
            assert [(e.status, e.error and e.error.code) for e in results.of(request_id)] == [
                (Status.rejected, code)
            ]
    assert sum(1 for e in rejected_events if e.request_id is None) == 2
    assert len(dead) == len(hostile)
    assert Counter(str(m.headers[ERROR_CODE_HEADER]) for m in dead) == Counter(
        c for *_, c in hostile
    )
    assert Counter(d.text for d in emulator.deliveries) == Counter(f"t-{r}" for r in valid)
