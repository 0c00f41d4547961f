"""The gateway's judgement of a send e-mail: which error it earns, or what it delivers.

No sockets and no sleeping: time comes from an injectable clock, so tests move time
instead of waiting for it. The first failing check answers, in this order, and an error
rejects the whole e-mail (nothing in it is delivered, charged or counted as a copy):

    4  the client's IP is blocked after frequent errors (checked before the mail is read)
    1  the body is not a send record at all
    2  unknown login, wrong password, or (empty login) unknown API key
    1  bad id, translit not 0-2, format not 0-12, test not 0-2, invalid sender name, a
       line without recipients, an empty text (HLR and ping excepted) or one over 1000
       characters (a voice call's parameters included), an e-mail-format line without a
       `subj:` line or without the sender's e-mail address as the sender
    5  time not in a documented form, or tz not whole hours within -24..24
    7  a recipient that is not valid for its line's format (#ids and @nicknames are
       valid on a Telegram line only)
    6  a denied sender, or a text holding a denied word
    8  a recipient that cannot be delivered to
    9  a line that would be more identical copies than allowed within the window; the
       identity is account, format, sender, time, the line's set of recipients and its
       text (not the mail id, which a client may change between attempts)
    3  the e-mail costs more SMS parts than the balance holds

A text that begins with a channel prefix (`__VIBER__:` and friends, NOTES.md) is checked
and delivered on that channel, without the prefix. `__BOT__:` names no format number: such
a line is a Telegram text, a plain text (counted as format 0) to #ids, @nicknames, phone
numbers or groups, delivered with `telegram` set. On the voice format, what follows
`\\n~~~\\n` in a text is the call's parameters, delivered apart from the text.

The 50-messages rule, as this emulator reads it: every message to a subscriber that
follows the previous one (delivered or not) by less than the gap extends that subscriber's
streak, and a gap at least that long starts a new one. A message that would be number
51+ of a streak is silently not delivered: it is reported as a `Flood`, the rest of the
e-mail is delivered, and the reply stays `OK` with n counting the whole e-mail, since the
gateway accepted the request; only delivered parts are charged to the balance.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

from worker.errors import InvalidRequest
from worker.protocol.decode import DecodedBody, DecodedLine, MalformedMail
from worker.protocol.fields import (
    BOT_PREFIX,
    MAX_TEXT_CHARS,
    MAX_TZ,
    MIN_TZ,
    VOICE_PARAMS_SEPARATOR,
    Format,
    Translit,
    check_mail_id,
    check_sender,
    is_email_sender,
    is_valid_time,
)
from worker.protocol.recipients import Recipient, parse_recipient
from worker.protocol.replies import DESCRIPTIONS, Accepted, GatewayError, Rejected, Reply
from worker.protocol.segments import sms_parts

from .config import EmulatorConfig

Clock = Callable[[], float]

_CHANNEL_PREFIXES = {
    "__CALL__:": Format.voice,
    "__VIBER__:": Format.viber,
    "__SOC__:": Format.soc,
    "__MAIL__:": Format.email,
}
_CHANNEL_TEXTS = {"__PING__": Format.ping, "__HLR__": Format.hlr}
_TEXTLESS_FORMATS = frozenset({Format.hlr, Format.ping})

# The descriptions in Russian, for replies in cp1251 or koi8-r (`reply_charset`), and the
# line under an OK answer in that mode, so that every reply carries Cyrillic bytes.
RUSSIAN_DESCRIPTIONS: dict[GatewayError, str] = {
    GatewayError.parameters: "ошибка в параметрах",
    GatewayError.credentials: "неверный логин или пароль",
    GatewayError.insufficient_funds: "недостаточно средств на счете Клиента",
    GatewayError.ip_blocked: "IP-адрес временно заблокирован из-за частых ошибок в запросах",
    GatewayError.date_format: "неверный формат даты",
    GatewayError.message_denied: "Сообщение запрещено (по тексту или по имени отправителя)",
    GatewayError.phone_format: "неверный формат номера телефона",
    GatewayError.undeliverable: "сообщение на указанный номер не может быть доставлено",
    GatewayError.duplicate_request: "более одного одинакового запроса в течение минуты",
}
ACCEPTED_RU = "Сообщения приняты к отправке."
_TZ = re.compile(r"[+-]?\d{1,2}")


class Flood(NamedTuple):
    """A message held back by the 50-messages rule."""

    phone: str
    text: str
    mail_id: str


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message handed to one recipient. `phone` is as written in the e-mail,
    `recipient` who that is (E.164 for a phone number)."""

    mail_id: str
    phone: str
    recipient: str
    text: str
    format: int
    sender: str
    accepted_at: float
    telegram: bool = False
    voice_params: str | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    reply: Reply
    reason: str
    reply_wanted: bool
    deliveries: tuple[Delivery, ...] = ()
    floods: tuple[Flood, ...] = ()


class _Refusal(Exception):
    def __init__(self, error: GatewayError, reason: str) -> None:
        super().__init__(reason)
        self.error = error
        self.reason = reason


@dataclass(frozen=True, slots=True)
class _Channel:
    """Where a line goes: its format, and whether it is a Telegram text (`__BOT__:`)."""

    format: Format
    telegram: bool = False


@dataclass(frozen=True, slots=True)
class _Line:
    format: Format
    translit: Translit
    recipients: tuple[Recipient, ...]
    text: str
    voice_params: str | None = None
    telegram: bool = False

    @property
    def parts_each(self) -> int:
        """What one recipient costs: the worker's own count where it has one; where the seed
        does not say (not an SMS), this emulator charges one part, which the worker, having
        no count of its own there, does not compare."""
        parts = None if self.telegram else sms_parts(self.text, self.format, self.translit)
        return 1 if parts is None else parts

    @property
    def parts(self) -> int:
        # A G<n> group counts as one recipient here: the emulator keeps no group members.
        return self.parts_each * len(self.recipients)


@dataclass(frozen=True, slots=True)
class _Request:
    account: str
    sender: str
    when: str
    test: int
    lines: tuple[_Line, ...]


@dataclass(slots=True)
class _Streak:
    last: float
    length: int


def _channel(text: str, fmt: Format) -> tuple[_Channel, str]:
    if text in _CHANNEL_TEXTS:
        return _Channel(_CHANNEL_TEXTS[text]), ""
    if text.startswith(BOT_PREFIX):
        return _Channel(Format.sms, telegram=True), text.removeprefix(BOT_PREFIX)
    for prefix, channel in _CHANNEL_PREFIXES.items():
        if text.startswith(prefix):
            return _Channel(channel), text.removeprefix(prefix)
    return _Channel(fmt), text


def _voice_params(channel: _Channel, text: str) -> tuple[str, str | None]:
    """A voice text and its call's parameters (after the first `\\n~~~\\n`), if any."""
    if channel.format != Format.voice:
        return text, None
    spoken, separator, params = text.partition(VOICE_PARAMS_SEPARATOR)
    return (spoken, params) if separator else (text, None)


def _valid_tz(tz: str | None) -> bool:
    return not tz or (_TZ.fullmatch(tz) is not None and MIN_TZ <= int(tz) <= MAX_TZ)


def _small_int(name: str, value: str, highest: int) -> int:
    if value == "":
        return 0
    if not (value.isdecimal() and value.isascii()) or int(value) > highest:
        raise _Refusal(GatewayError.parameters, f"{name} must be 0..{highest}, not {value!r}")
    return int(value)


def recipient_key(raw: str) -> str:
    """Who `raw` names, the way deliveries are keyed; unparseable input stays as it is."""
    try:
        return parse_recipient(raw, telegram=True).key
    except InvalidRequest:
        return raw


class Gateway:
    """The gateway's checks and the state its limits need (copies, streaks, balance, IPs)."""

    def __init__(self, config: EmulatorConfig, clock: Clock) -> None:
        self._config = config
        self._clock = clock
        self._ids = itertools.count(1)
        self._balance = config.balance
        self._undeliverable = frozenset(recipient_key(r) for r in config.undeliverable)
        self._denied_senders = frozenset(s.casefold() for s in config.denied_senders)
        self._denied_words = tuple(w.casefold() for w in config.denied_words)
        self._copies: dict[tuple[object, ...], deque[float]] = {}
        self._streaks: dict[str, _Streak] = {}
        self._errors_by_ip: dict[str, deque[float]] = {}
        self._blocked_until: dict[str, float] = {}
        self._descriptions = (
            DESCRIPTIONS if config.reply_charset == "utf-8" else RUSSIAN_DESCRIPTIONS
        )

    @property
    def balance(self) -> int | None:
        return self._balance

    def judge(self, body: DecodedBody | MalformedMail, peer: str) -> Verdict:
        """Decide one e-mail from `peer` (an IP address) and update the limits' state."""
        now = self._clock()
        if self._blocked_until.get(peer, float("-inf")) > now:
            return self._rejection(GatewayError.ip_blocked, f"{peer} is blocked", None)
        if isinstance(body, MalformedMail):
            self._note_error(peer, now)
            return self._rejection(GatewayError.parameters, body.message, None)
        mail_id = body.mail_id or str(next(self._ids))
        try:
            request = self._check(body)
            copies = self._check_copies(request, now)
            cost = sum(line.parts for line in request.lines)
            if self._balance is not None and cost > self._balance:
                raise _Refusal(
                    GatewayError.insufficient_funds,
                    f"{cost} SMS parts needed, {self._balance} left",
                )
        except _Refusal as refusal:
            self._note_error(peer, now)
            return self._rejection(refusal.error, refusal.reason, mail_id)
        for identity in copies:
            self._copies.setdefault(identity, deque()).append(now)
        deliveries, floods, charged = self._deliver(request, mail_id, now)
        if self._balance is not None:
            self._balance -= charged
        return Verdict(
            reply=Accepted(sms_count=cost, mail_id=mail_id),
            reason="accepted",
            reply_wanted=request.test == 1,
            deliveries=tuple(deliveries),
            floods=tuple(floods),
        )

    def _rejection(self, error: GatewayError, reason: str, mail_id: str | None) -> Verdict:
        return Verdict(
            reply=Rejected(error=error, description=self._descriptions[error], mail_id=mail_id),
            reason=reason,
            reply_wanted=True,
        )

    def _check(self, body: DecodedBody) -> _Request:
        account = self._authenticate(body.login, body.password)
        if body.mail_id:
            try:
                check_mail_id(body.mail_id)
            except InvalidRequest as exc:
                raise _Refusal(GatewayError.parameters, exc.message) from None
        translit = Translit(_small_int("translit", body.translit, 2))
        fmt = Format(_small_int("format", body.format, int(max(Format))))
        test = _small_int("test", body.test, 2)
        try:
            check_sender(body.sender, fmt=fmt)
        except InvalidRequest as exc:
            raise _Refusal(GatewayError.parameters, exc.message) from None
        channels = [(line, *_channel(line.text, fmt)) for line in body.lines]
        for line, channel, text in channels:
            self._check_line_parameters(line, channel, text, body.subject, body.sender)
        if not is_valid_time(body.time) or not _valid_tz(body.tz):
            raise _Refusal(GatewayError.date_format, f"time {body.time!r}, tz {body.tz!r}")
        lines = tuple(
            _Line(
                channel.format,
                translit,
                self._recipients(line.phones, channel),
                *_voice_params(channel, text),
                telegram=channel.telegram,
            )
            for line, channel, text in channels
        )
        self._check_denied(body.sender, lines)
        self._check_deliverable(lines)
        when = body.time if body.tz is None else f"{body.time},{body.tz}"
        return _Request(account, body.sender, when, test, lines)

    def _authenticate(self, login: str, password: str) -> str:
        if login:
            if self._config.accounts.get(login) != password:
                raise _Refusal(GatewayError.credentials, f"bad login or password for {login!r}")
            return login
        if password not in self._config.api_keys:
            raise _Refusal(GatewayError.credentials, "unknown API key")
        return f"apikey:{password}"

    @staticmethod
    def _check_line_parameters(
        line: DecodedLine, channel: _Channel, text: str, subject: str | None, sender: str
    ) -> None:
        if not line.phones:
            raise _Refusal(GatewayError.parameters, "a line without recipients")
        if not text and channel.format not in _TEXTLESS_FORMATS:
            raise _Refusal(GatewayError.parameters, "empty text")
        if len(text) > MAX_TEXT_CHARS:
            raise _Refusal(GatewayError.parameters, f"text of {len(text)} characters")
        if channel.format == Format.email and not subject:
            raise _Refusal(GatewayError.parameters, "the e-mail format needs a subj: line")
        if channel.format == Format.email and not is_email_sender(sender):
            raise _Refusal(
                GatewayError.parameters, "the e-mail format needs the sender's e-mail address"
            )

    @staticmethod
    def _recipients(phones: Iterable[str], channel: _Channel) -> tuple[Recipient, ...]:
        seen: dict[str, Recipient] = {}
        for raw in phones:
            try:
                recipient = parse_recipient(raw, channel.format, telegram=channel.telegram)
            except InvalidRequest as exc:
                raise _Refusal(GatewayError.phone_format, exc.message) from None
            seen.setdefault(recipient.key, recipient)
        return tuple(seen.values())

    def _check_denied(self, sender: str, lines: Iterable[_Line]) -> None:
        if sender.casefold() in self._denied_senders:
            raise _Refusal(GatewayError.message_denied, f"sender {sender!r} is denied")
        for line in lines:
            folded = line.text.casefold()
            for word in self._denied_words:
                if word in folded:
                    raise _Refusal(GatewayError.message_denied, f"text holds {word!r}")

    def _check_deliverable(self, lines: Iterable[_Line]) -> None:
        for line in lines:
            for recipient in line.recipients:
                if recipient.key in self._undeliverable:
                    raise _Refusal(GatewayError.undeliverable, f"{recipient.wire} is undeliverable")

    def _check_copies(self, request: _Request, now: float) -> list[tuple[object, ...]]:
        """The identities this e-mail adds to the window, or error 9 if one is one too many."""
        window_start = now - self._config.duplicate_window_s
        in_mail: Counter[tuple[object, ...]] = Counter()
        identities = []
        for line in request.lines:
            identity: tuple[object, ...] = (
                request.account,
                line.format,
                line.telegram,
                request.sender,
                request.when,
                frozenset(r.key for r in line.recipients),
                line.text,
                line.voice_params,
            )
            earlier = self._copies.get(identity)
            while earlier and earlier[0] <= window_start:
                earlier.popleft()
            if len(earlier or ()) + in_mail[identity] >= self._config.identical_copies:
                raise _Refusal(
                    GatewayError.duplicate_request,
                    f"more than {self._config.identical_copies} identical requests "
                    f"within {self._config.duplicate_window_s:g} s",
                )
            in_mail[identity] += 1
            identities.append(identity)
        return identities

    def _deliver(
        self, request: _Request, mail_id: str, now: float
    ) -> tuple[list[Delivery], list[Flood], int]:
        """The deliveries, the messages held back, and the parts the deliveries cost."""
        deliveries: list[Delivery] = []
        floods: list[Flood] = []
        charged = 0
        for line in request.lines:
            for recipient in line.recipients:
                if self._extend_streak(recipient.key, now) > self._config.streak_limit:
                    floods.append(Flood(recipient.wire, line.text, mail_id))
                    continue
                charged += line.parts_each
                deliveries.append(
                    Delivery(
                        mail_id=mail_id,
                        phone=recipient.wire,
                        recipient=recipient.key,
                        text=line.text,
                        format=int(line.format),
                        sender=request.sender,
                        accepted_at=now,
                        telegram=line.telegram,
                        voice_params=line.voice_params,
                    )
                )
        return deliveries, floods, charged

    def _extend_streak(self, key: str, now: float) -> int:
        streak = self._streaks.get(key)
        if streak is None or now - streak.last >= self._config.streak_gap_s:
            streak = self._streaks[key] = _Streak(last=now, length=0)
        streak.last = now
        streak.length += 1
        return streak.length

    def _note_error(self, peer: str, now: float) -> None:
        threshold = self._config.block_after_errors
        if threshold is None:
            return
        errors = self._errors_by_ip.setdefault(peer, deque())
        errors.append(now)
        while errors[0] <= now - self._config.block_window_s:
            errors.popleft()
        if len(errors) >= threshold:
            self._blocked_until[peer] = now + self._config.block_for_s
            errors.clear()
