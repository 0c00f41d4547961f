"""From a validated send request to what the gateway needs: recipients on the wire, the
list line, the first-line options it can share an e-mail under, and its SMS cost."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from worker.contract import SendRequest
from worker.errors import InvalidRequest
from worker.lanes import Lane
from worker.protocol.fields import (
    MAX_TEXT_CHARS,
    Channel,
    Format,
    SendTime,
    Translit,
    check_text,
    check_voice_text,
    is_email_sender,
)
from worker.protocol.mail import ListLine, MailOptions, pick_charset
from worker.protocol.recipients import Recipient, parse_recipients, sms_count
from worker.protocol.segments import sms_parts
from worker.settings import GatewaySettings

# The formats that carry no text: the only ones the gateway takes an empty text for.
TEXTLESS_FORMATS = (Format.hlr, Format.ping)


@dataclass(frozen=True, slots=True)
class BatchKey:
    """Requests with equal keys may share one e-mail. `group` keeps requests apart that
    must travel alone (the halves of an e-mail being split to find a bad line); `lane`
    keeps an urgent request out of an e-mail that waits with bulk ones."""

    options: MailOptions
    charset: str
    group: str = ""
    lane: Lane = Lane.normal


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    request: SendRequest
    recipients: tuple[Recipient, ...]
    line: ListLine
    key: BatchKey
    # Per recipient; None when the gateway's count is unknown (segments.sms_parts).
    sms_parts: int | None
    content_key: str

    @property
    def sms_count(self) -> int | None:
        return sms_count(self.sms_parts, self.line.phones)

    @property
    def subscribers(self) -> tuple[str, ...]:
        """Who the recipients are, as the gateway's flood rule counts them."""
        return tuple(r.key for r in self.recipients)

    @property
    def pace_parts(self) -> int:
        """What the account's parts pace counts: a message of unknown size as one part, and
        a group as one recipient, since the pace cannot wait for what it cannot know."""
        parts = 1 if self.sms_parts is None else self.sms_parts
        return parts * len(self.recipients)


def content_key(options: MailOptions, recipients: tuple[Recipient, ...], text: str) -> str:
    """Same options, recipients and text: what the gateway calls an identical request."""
    identity = repr((options, sorted(r.key for r in recipients), text))
    return hashlib.sha256(identity.encode()).hexdigest()


def _send_time(request: SendRequest) -> SendTime:
    if request.send_at is not None:
        return SendTime.at(request.send_at)
    if request.window is not None:
        return SendTime.window(request.window.start_hour, request.window.end_hour, request.tz)
    return SendTime()


def default_sender(gateway: GatewaySettings, channel: Channel) -> str:
    """The channel's configured default sender (`default_senders`; for a channel it does not
    name, `default_sender`, which is never the email channel's), or empty: the account's
    own. An e-mail address only ever on the email channel, a sender name only on the
    others (the settings check that; this does not rely on it alone)."""
    sender = gateway.default_senders.get(channel)
    if sender is None:
        sender = "" if channel is Channel.email else gateway.default_sender
    return sender if is_email_sender(sender) == (channel is Channel.email) else ""


def check_not_expired(request: SendRequest, now: datetime) -> None:
    if request.expires_at is not None and request.expires_at <= now:
        raise InvalidRequest(
            f"expired at {request.expires_at.isoformat()} before it could be sent", code="expired"
        )


def prepare(
    request: SendRequest,
    gateway: GatewaySettings,
    default_channel: Channel,
    now: datetime,
    group: str = "",
    lane: Lane = Lane.normal,
) -> PreparedRequest:
    """Everything about a request that can be known without I/O, or InvalidRequest."""
    check_not_expired(request, now)
    channel = request.channel or default_channel
    fmt = channel.gateway_format
    telegram = channel is Channel.telegram
    recipients = parse_recipients(
        request.to, fmt, gateway.default_region, gateway.national_first, telegram=telegram
    )
    text = check_text(request.text)
    if not text and fmt not in TEXTLESS_FORMATS:
        # The gateway refuses an empty text with error 1 for the whole e-mail, so one such
        # line would fail (or split) every request it shares an e-mail with.
        raise InvalidRequest(
            f"text is empty; only the {' and '.join(f.name for f in TEXTLESS_FORMATS)} "
            f"channels carry no text (this request's channel: {channel.value})",
            code="empty_text",
        )
    translit = Translit[request.translit] if request.translit else None
    if fmt == Format.voice:
        check_voice_text(text)
    sender = request.sender if request.sender is not None else default_sender(gateway, channel)
    if channel is Channel.email and not is_email_sender(sender):
        # The gateway refuses the whole e-mail with error 1 without it (format 8 needs the
        # sender's address), failing every request it shares an e-mail with.
        raise InvalidRequest(
            f"the email channel needs the sender's e-mail address: {sender!r} is not one"
            if sender
            else "the email channel needs the sender's e-mail address: the request names "
            "no sender and SMSC_GATEWAY__DEFAULT_SENDERS has none for email",
            code="email_sender_required",
        )
    options = MailOptions(
        send_time=_send_time(request),
        translit=translit,
        format=fmt,
        sender=sender,
        subject=request.subject,
        voice=request.voice,
        telegram=telegram,
    )
    line = ListLine(tuple(r.wire for r in recipients), text, request.voice_params)
    if len(line.message) > MAX_TEXT_CHARS:
        # The seed bounds the whole message field, which the call's parameters are part of.
        raise InvalidRequest(
            f"text and voice_params are {len(line.message)} characters together (with the "
            f"'\\n~~~\\n' between them); the gateway takes at most {MAX_TEXT_CHARS}",
            code="text_too_long",
        )
    charset = pick_charset(
        gateway.charset, [line.message, sender, options.subject or "", options.voice or ""]
    )
    return PreparedRequest(
        request=request,
        recipients=recipients,
        line=line,
        key=BatchKey(options, charset, group, lane),
        # A Telegram text rides on format 0 but is no SMS: no count, as for messengers.
        sms_parts=None if telegram else sms_parts(text, fmt, translit or Translit.off),
        content_key=content_key(options, recipients, line.message),
    )
