"""From a validated send request to what the gateway needs: recipients on the wire, the
list line, the first-line options it can share an e-mail under, and its SMS cost."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from worker.contract import SendRequest
from worker.errors import InvalidRequest
from worker.lanes import Lane
from worker.protocol.fields import Format, SendTime, Translit, check_text, is_email_sender
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


def default_sender(gateway: GatewaySettings, fmt: Format) -> str:
    """The configured default sender where the channel takes it, else empty (the account's
    own): an e-mail address only on the email channel, a sender name only on the others.
    (The settings refuse an e-mail address, so the email channel gets the empty one.)"""
    sender = gateway.default_sender
    return sender if is_email_sender(sender) == (fmt == Format.email) else ""


def check_not_expired(request: SendRequest, now: datetime) -> None:
    if request.expires_at is not None and request.expires_at <= now:
        raise InvalidRequest(
            f"expired at {request.expires_at.isoformat()} before it could be sent", code="expired"
        )


def prepare(
    request: SendRequest,
    gateway: GatewaySettings,
    default_channel: Format,
    now: datetime,
    group: str = "",
    lane: Lane = Lane.normal,
) -> PreparedRequest:
    """Everything about a request that can be known without I/O, or InvalidRequest."""
    check_not_expired(request, now)
    fmt = Format[request.channel] if request.channel else default_channel
    recipients = parse_recipients(request.to, fmt, gateway.default_region, gateway.national_first)
    text = check_text(request.text)
    if not text and fmt not in TEXTLESS_FORMATS:
        # The gateway refuses an empty text with error 1 for the whole e-mail, so one such
        # line would fail (or split) every request it shares an e-mail with.
        raise InvalidRequest(
            f"text is empty; only the {' and '.join(f.name for f in TEXTLESS_FORMATS)} "
            f"channels carry no text (this request's channel: {fmt.name})",
            code="empty_text",
        )
    translit = Translit[request.translit] if request.translit else None
    options = MailOptions(
        send_time=_send_time(request),
        translit=translit,
        format=fmt,
        sender=request.sender if request.sender is not None else default_sender(gateway, fmt),
        subject=request.subject,
        voice=request.voice,
    )
    charset = pick_charset(
        gateway.charset, [text, options.sender, options.subject or "", options.voice or ""]
    )
    return PreparedRequest(
        request=request,
        recipients=recipients,
        line=ListLine(tuple(r.wire for r in recipients), text),
        key=BatchKey(options, charset, group, lane),
        sms_parts=sms_parts(text, fmt, translit or Translit.off),
        content_key=content_key(options, recipients, text),
    )
